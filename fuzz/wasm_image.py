"""Fuzz target: uploaded wasm modules, through the rewriter and the image store.

`POST /v1/images` (and a migration's `ImageData`) hands any client's bytes to
`ImageStore.add`: size cap, magic, wasmtime's validation, then our own reader
and rewriter (`cloudlet.vm.instrument`, `write_tracking`), compile, boot. Per
input this target checks:

- `instrument` on the raw bytes, tracked and not, raises only `ImageRejected`
  (the reader promises to be safe on invalid modules, not only on the valid
  ones wasmtime lets through);
- on a module wasmtime accepts, the rewrite wasmtime accepts too: exports added
  (and write tracking) must never turn a valid module into an invalid one;
- `ImageStore.add` raises nothing but `CloudletError`.
"""

from __future__ import annotations

import contextlib
import functools

import wasmtime

from cloudlet.errors import CloudletError, ImageRejected
from cloudlet.vm import ImageStore
from cloudlet.vm.instrument import instrument
from fuzz import fixtures
from fuzz.runner import fuzz_home

# The store's real cap is 16 MiB; the rewriter is pure Python (~1.3 ms per KiB),
# so 32 KiB (every workload fits) keeps one input well under a second.
MAX_INPUT_BYTES = 32 << 10
# A module that validates is compiled and booted, and a boot may run guest code
# for up to its 10 s deadline (BOOT_DEADLINE_MS): only past that is it a hang.
TIMEOUT_S = 30
DICTIONARY = [b"\0asm\x01\0\0\0", b"__cloudlet_", b"wasi_snapshot_preview1", b"fd_write",
              b"_initialize", b"\xfc\x0a\x00\x00", b"\xfc\x0b\x00", b"\xfd\x0b\x04\x00",
              b"\x36\x02\x00", b"\x41\x00", b"\x0b", b"\xff\xff\xff\xff\x0f"]


@functools.cache
def uploads() -> ImageStore:
    """A store of its own: every accepted input is deleted again, and never lands
    among the workloads the other targets restore."""
    return ImageStore(fuzz_home() / "uploads", max_image_bytes=MAX_INPUT_BYTES)


def TestOneInput(data: bytes) -> None:
    if len(data) > MAX_INPUT_BYTES:
        return
    rewritten = {}
    for track_writes in (True, False):
        with contextlib.suppress(ImageRejected):
            rewritten[track_writes] = instrument(data, track_writes=track_writes).wasm
    engine = uploads().runtime.engine
    if data[:4] == b"\0asm" and _valid(engine, data):
        for track_writes, wasm in rewritten.items():
            assert _valid(engine, wasm), (
                f"the rewrite (track_writes={track_writes}) of a valid module is invalid")
    with contextlib.suppress(CloudletError):
        image = uploads().add(data)
        uploads().delete(image.digest)


def _valid(engine: wasmtime.Engine, wasm: bytes) -> bool:
    try:
        wasmtime.Module.validate(engine, wasm)
    except wasmtime.WasmtimeError:
        return False
    return True


# Small modules for what the workloads (clang C) never do.
MODULES = {
    "empty": "(module)",
    "start-and-globals": """(module (memory 1) (global $g (mut i32) (i32.const 1))
      (global (mut i64) (i64.const -1)) (global (mut f32) (f32.const 1.5))
      (global (mut f64) (f64.const 2.5)) (global i32 (i32.const 7))
      (func $s (global.set $g (i32.const 2))) (start $s))""",
    "multi-memory": """(module (memory 1) (memory $b 1 2)
      (func (export "w") (param i32) (i32.store $b (local.get 0) (i32.const 1))
        (i32.store (local.get 0) (i32.const 2))))""",
    "bulk-memory": """(module (memory 1) (data $d "abc")
      (func (export "f") (memory.fill (i32.const 0) (i32.const 1) (i32.const 10))
        (memory.copy (i32.const 10) (i32.const 0) (i32.const 5))
        (memory.init $d (i32.const 20) (i32.const 0) (i32.const 3))))""",
    "simd": """(module (memory 1) (func (export "s") (param i32)
      (v128.store offset=16 (local.get 0) (v128.const i64x2 1 2))
      (v128.store8_lane 3 (local.get 0) (v128.const i64x2 1 2))
      (drop (i8x16.extract_lane_u 0 (v128.load (local.get 0))))))""",
    "tables": """(module (type $t (func (result i32))) (table 2 funcref)
      (elem (i32.const 0) $a $a) (func $a (result i32) (i32.const 1))
      (func (export "c") (result i32) (call_indirect (type $t) (i32.const 1))))""",
    "table-set": """(module (table 1 funcref) (func $f)
      (func (export "x") (table.set (i32.const 0) (ref.func $f))))""",
    "wasi-imports": """(module (import "wasi_snapshot_preview1" "fd_write"
      (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1))""",
    "bad-import": """(module (import "env" "open" (func)))""",
    "reserved-export": """(module (memory 1) (export "__cloudlet_memory_0" (memory 0)))""",
    "control-flow": """(module (memory 1) (func (export "l") (param i32) (result i32)
      (block $out (loop $top (br_if $out (i32.eqz (local.get 0)))
        (local.set 0 (i32.sub (local.get 0) (i32.const 1)))
        (br_table $top $out (local.get 0))))
      (select (result i32) (i32.const 1) (i32.const 2) (local.get 0))))""",
}


def seeds() -> dict[str, bytes]:
    out = {f"{name}.wasm": fixtures.wasm(name) for name in fixtures.WORKLOAD_NAMES}
    for wat_file in sorted((fixtures.ROOT / "tests" / "wat").glob("*.wat")):
        out[f"test-{wat_file.stem}.wasm"] = bytes(wasmtime.wat2wasm(wat_file.read_text()))
    out.update({f"{name}.wasm": bytes(wasmtime.wat2wasm(text)) for name, text in MODULES.items()})
    out.update(fixtures.damaged("memhog.wasm", out["memhog.wasm"]))
    out["component.wasm"] = b"\0asm\x0d\x00\x01\x00"
    return out
