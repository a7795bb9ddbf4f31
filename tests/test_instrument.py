"""The registration-time rewrite: all mutable state reachable, disallowed modules rejected."""

from __future__ import annotations

import pytest
import wasmtime

from cloudlet.errors import ImageRejected
from cloudlet.vm import wasm_binary as wb
from cloudlet.vm.instrument import instrument
from tests.conftest import WORKLOADS, wat, wat_file


def _export_names(wasm: bytes) -> set[str]:
    module = wasmtime.Module(wasmtime.Engine(), wasm)
    return {e.name for e in module.exports}


def test_unexported_mutable_globals_and_memory_become_exports() -> None:
    src = wat_file("stackdep.wat")
    out = instrument(src)
    # three mutable globals, none exported by the guest, all reachable now
    assert [g.index for g in out.globals] == [0, 1, 2]
    assert [g.valtype for g in out.globals] == ["i32", "i32", "i64"]
    assert len(out.memories) == 1 and out.memories[0].max_pages == 16
    names = _export_names(out.wasm)
    assert {g.export for g in out.globals} <= names
    assert out.memories[0].export in names
    assert {"push", "pop", "alloc", "heap_sum", "calls"} <= names  # originals kept


def test_immutable_globals_are_not_exported() -> None:
    out = instrument(wat('(module (global i32 (i32.const 1)) (global (mut f64) (f64.const 2)))'))
    assert [(g.index, g.valtype) for g in out.globals] == [(1, "f64")]


@pytest.mark.parametrize("name", ["vdi", "filter", "kvstore", "memhog"])
def test_clang_stack_pointer_is_reached(name: str) -> None:
    """clang keeps __stack_pointer in global 0 and never exports it."""
    raw = (WORKLOADS / f"{name}.wasm").read_bytes()
    assert "__cloudlet_global_0" not in _export_names(raw)
    out = instrument(raw)
    assert out.globals[0].index == 0 and out.globals[0].valtype == "i32"
    assert "__cloudlet_global_0" in _export_names(out.wasm)


def test_module_without_export_section_gets_one_in_order() -> None:
    src = wat("(module (memory 1) (global (mut i32) (i32.const 0)) (func) (start 0))")
    out = instrument(src)
    ids = [s.id for s in wb.split_sections(out.wasm) if s.id]
    assert ids == sorted(ids, key=wb.SECTION_ORDER.index)
    wasmtime.Module.validate(wasmtime.Engine(), out.wasm)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ('(module (import "env" "f" (func)))', "env.f"),
        ('(module (import "wasi_snapshot_preview1" "path_open" (func)))', "path_open"),
        ('(module (import "env" "mem" (memory 1)))', "memory"),
        ('(module (import "env" "g" (global i32)))', "global"),
        ('(module (import "env" "t" (table 1 funcref)))', "table"),
        ("(module (table 1 funcref) (func (table.set 0 (i32.const 0) (ref.null func))))",
         "table.set"),
        ("(module (table 1 funcref) (func (drop (table.grow 0 (ref.null func) (i32.const 1)))))",
         "table.grow"),
        ('(module (memory 1) (data "x") (func (data.drop 0)))', "data.drop"),
        ('(module (func (export "__cloudlet_x")))', "reserved prefix"),
        ("(module (memory 1 1 shared))", "shared"),
    ],
)
def test_disallowed_modules_are_rejected_naming_why(source: str, needle: str) -> None:
    with pytest.raises(ImageRejected, match=needle.replace(".", r"\.")):
        instrument(wat(source))


def test_table_get_and_call_indirect_are_fine() -> None:
    src = wat("""(module (type $t (func (result i32)))
      (table 2 funcref) (elem (i32.const 0) $a $a)
      (func $a (result i32) (i32.const 7))
      (func (export "f") (result i32) (drop (table.get 0 (i32.const 1)))
        (call_indirect (type $t) (i32.const 0))))""")
    assert instrument(src).globals == ()


def test_immediates_that_look_like_opcodes_are_not_misread() -> None:
    # 0x26 is table.set; here it is only an i32.const immediate byte.
    src = wat("(module (func (result i32) (i32.const 38)))")
    instrument(src)


def test_garbage_is_rejected() -> None:
    for blob in (b"", b"\x00asm", b"\x00asm\x01\x00\x00\x00\x01\xff", b"hello world!"):
        with pytest.raises(ImageRejected):
            instrument(blob)
