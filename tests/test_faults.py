"""Adversarial tests: bad snapshots, bad modules, runaway guests, bad command lines.

Written from the issue's promises, not from the code. Each case that found a bug keeps
its description (the third element of CRAFTED entries, `UNSORTED`) as a regression note.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shlex
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cloudlet.errors as err
from cloudlet.vm import VM, ImageStore, Snapshot, VMLimits
from tests.conftest import WORKLOADS, wat, wat_file

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TYPED = (err.SnapshotError, err.VMMemoryLimit)  # all that a bad snapshot may raise
LIMITS = VMLimits(memory_bytes=64 << 20)
MAGIC = b"CLDSNAP\n"
CLI = str(Path(sys.executable).parent / "cloudlet")


# --- the documented wire format, by hand: MAGIC | u32 LE header length | header | body ----

def frame(stored: bytes, compression: str = "none", raw_bytes: int | None = None, **hdr) -> bytes:
    header = msgpack.packb({"format": 1, "compression": compression, "body_bytes": len(stored),
                            "raw_bytes": len(stored) if raw_bytes is None else raw_bytes,
                            "sha256": hashlib.sha256(stored).hexdigest(), **hdr})
    return MAGIC + struct.pack("<I", len(header)) + header + stored


def encode(body: object, compression: str = "none") -> bytes:
    raw = msgpack.packb(body)
    if compression == "zstd":
        return frame(zstandard.ZstdCompressor().compress(raw), "zstd", len(raw))
    return frame(raw)


def decode(data: bytes) -> dict:
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    header, stored = msgpack.unpackb(data[12 : 12 + n]), data[12 + n :]
    if header["compression"] == "zstd":
        stored = zstandard.ZstdDecompressor().decompress(stored)
    return msgpack.unpackb(stored)


def ids(*xs: int) -> bytes:
    return struct.pack(f"<{len(xs)}I", *xs)


def decode_and_restore(data: bytes, image, base: bytes | None = None) -> str:
    """Decode, then restore (or apply as a delta on `base`). Only typed errors may escape."""
    try:
        snap = Snapshot.from_bytes(data)
        vm = VM.restore(image, snap if base is None else Snapshot.from_bytes(base))
        try:
            if base is not None:
                vm.apply_delta(snap)
        finally:
            vm.close()
    except TYPED:
        return "rejected"
    return "restored"


@pytest.fixture(scope="module")
def kv(workload):
    """A kvstore VM with 300 pairs (the bystander that tests re-check), its overlay, and an
    unrelated base + delta chain."""
    vm, other = (VM.create(workload["kvstore"], LIMITS, clock="virtual") for _ in range(2))
    for k in range(300):
        vm.call("kv_put", k, k * 7 + 1)
    other.call("kv_put", 1, 2)
    base = other.snapshot().to_bytes()
    other.call("kv_put", 3, 4)
    yield {"vm": vm, "image": workload["kvstore"], "data": vm.snapshot().to_bytes(),
           "sum": vm.call("kv_checksum"), "base": base,
           "delta": other.snapshot(delta=True).to_bytes("none"),
           "delta_sum": other.call("kv_checksum")}
    vm.close()
    other.close()


@pytest.fixture(scope="module")
def hog(workload):
    vm = VM.create(workload["memhog"], LIMITS, clock="virtual")
    vm.call("hog_grow", 2)
    vm.call("hog_dirty", 64, 7)
    yield {"image": workload["memhog"], "data": vm.snapshot().to_bytes()}
    vm.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A private image store, for odd modules that should not join the session's store."""
    return ImageStore(tmp_path_factory.mktemp("fault-images"))


def assert_bystander_untouched(kv) -> None:
    vm = kv["vm"]
    assert (vm.call("kv_checksum"), vm.call("kv_count"), vm.call("kv_get", 123)) == (
        kv["sum"], 300, 123 * 7 + 1)


# --- 1. damaged bytes -----------------------------------------------------------------------

def test_every_truncation_is_snapshot_corrupt(kv):
    """Promise: a truncated snapshot gets a typed error (tried at every length)."""
    for n in range(len(kv["data"])):
        with pytest.raises(err.SnapshotCorrupt):
            Snapshot.from_bytes(kv["data"][:n])


@FUZZ
@given(which=st.sampled_from(["kv", "hog"]), region=st.sampled_from(["header", "body"]),
       flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1,
                      max_size=4), cut=st.integers(0, 1 << 30))
def test_flipped_or_truncated_bytes_are_typed(kv, hog, which, region, flips, cut):
    """Promise: corrupted or truncated snapshots (header or body) get a typed error."""
    src = {"kv": kv, "hog": hog}[which]
    data = bytearray(src["data"])
    (hlen,) = struct.unpack_from("<I", data, 8)
    lo, hi = (0, 12 + hlen) if region == "header" else (12 + hlen, len(data))
    for pos, x in flips:
        data[lo + pos % (hi - lo)] ^= x
    assume(bytes(data) != src["data"])
    assert decode_and_restore(bytes(data), src["image"]) == "rejected"
    assert decode_and_restore(src["data"][: cut % len(src["data"])], src["image"]) == "rejected"
    assert_bystander_untouched(kv)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=64), i=st.integers(0, 1 << 30),
       j=st.integers(0, 1 << 30))
def test_appended_garbage_and_spliced_snapshots_are_typed(kv, hog, garbage, i, j):
    """Promise: trailing garbage and two snapshots spliced together get typed errors."""
    with pytest.raises(err.SnapshotCorrupt):
        Snapshot.from_bytes(kv["data"] + garbage)
    a, b = kv["data"], hog["data"]
    decode_and_restore(a[: i % len(a)] + b[j % len(b) :], kv["image"])
    decode_and_restore(b[: i % len(b)] + a[j % len(a) :], hog["image"])


# --- 2. a valid digest over a malicious body ----------------------------------------------

def _set(path, value):
    def mutate(body):
        for key in path[:-1]:
            body = body[key]
        if value is KeyError:
            del body[path[-1]]
        else:
            body[path[-1]] = copy.deepcopy(value)
    return mutate


def _mem(**fields):
    return lambda body: body["memories"][0].update(fields)


def _chunks(*chunk_ids: int):
    return _mem(chunk_ids=ids(*chunk_ids), data=bytes(4096 * len(chunk_ids)))


def _globals(value):
    return lambda body: body["globals"].update(dict.fromkeys(body["globals"], value))


UNSORTED = ("check_restorable tests sortedness with np.diff on uint32 ids, which wraps around, "
            "so descending ids pass, and it range-checks only ids[-1]")
Corrupt, Mismatch, Snap = err.SnapshotCorrupt, err.SnapshotImageMismatch, err.SnapshotError
CRAFTED = {  # name: (mutation, expected error or None for "restores or typed", bug)
    "chunk-id-past-end": (_chunks(0, 100_000), Corrupt, None),
    "duplicate-chunk-ids": (_chunks(3, 3), Corrupt, None),
    "chunk-ids-not-u32": (_mem(chunk_ids=b"\1\2\3"), Corrupt, None),
    "data-length-mismatch": (_mem(chunk_ids=ids(0, 1), data=bytes(4096)), Corrupt, None),
    "zero-id-past-end": (_mem(zero_ids=ids(100_000)), Corrupt, None),
    "pages-70000": (_mem(pages=70000), Snap, None),
    "pages-negative": (_mem(pages=-1), Snap, None),
    "pages-below-boot": (_mem(pages=0, chunk_ids=b"", data=b""), Snap, None),
    "no-memories": (_set(("memories",), []), Mismatch, None),
    "negative-seq": (_set(("seq",), -1), Corrupt, None),
    "globals-missing": (_set(("globals",), {}), Snap, None),
    "globals-not-a-map": (_set(("globals",), [1, 2]), Corrupt, None),
    "global-float": (_globals(1.5), Snap, None),
    "global-i32-overflow": (_globals(1 << 31), Snap, None),
    "global-extra": (lambda b: b["globals"].update(__cloudlet_global_99=1), Snap, None),
    "wrong-image": (_set(("image",), "ab" * 32), Mismatch, None),
    "restore-a-delta": (_set(("kind",), "delta"), Snap, None),
    "unknown-kind": (_set(("kind",), "full"), Corrupt, None),
    "memory-over-limits": (lambda b: (b["limits"].update(memory_bytes=1 << 20),
                                      b["memories"][0].update(pages=20)), err.VMMemoryLimit, None),
    "limits-missing": (_set(("limits",), KeyError), Corrupt, None),
    "limits-negative": (_set(("limits", "deadline_ms"), -5), Corrupt, None),
    "random-key-short": (_set(("host", "random_key"), b"k"), Corrupt, None),
    "unknown-clock": (_set(("host", "clock"), "sundial"), Corrupt, None),
    "int-map-key": (lambda b: b.update({0: 1}), None,
                    "was refused (strict map keys), but the annex is any msgpack map and a "
                    "migration's final round may carry integer keys: the destination wrote "
                    "rounds it could not read back at a restart; now an unknown key, ignored"),
    "unsorted-ids-past-end": (_chunks(1_000_000, 0), Corrupt,
                              UNSORTED + ": numpy IndexError escapes VM.restore"),
    "unsorted-zero-ids-past-end": (_mem(zero_ids=ids(1_000_000, 0)), Corrupt,
                                   UNSORTED + ": numpy IndexError escapes VM.restore"),
    "unsorted-ids-in-range": (_chunks(5, 2), Corrupt,
                              UNSORTED + ": restored silently (ids are documented ascending)"),
    "fuel-per-call-1": (_set(("limits", "fuel_per_call"), 1), None,
                        "restore boots the image (runs _initialize) under the snapshot's own "
                        "fuel_per_call: a valid small limit makes VM.restore raise VMOutOfFuel"),
    "fuel-per-call-true": (_set(("limits", "fuel_per_call"), True), Corrupt,
                           "VMLimits takes bools for ints; restore then raises VMOutOfFuel "
                           "('_initialize' used all True units of fuel)"),
    "random-counter-negative": (_set(("host", "random_counter"), -1), Corrupt,
                                "host ints are not range-checked: the VM restores, then "
                                "random_get fails with OverflowError (as VMTrapped)"),
}


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(
    m, e, id=name, marks=[]) for name, (m, e, _regression) in CRAFTED.items()])
def test_crafted_body_with_valid_digest_gets_typed_error(kv, mutate, expected):
    """Promise: a malicious body behind a valid digest gets a typed error before anything is
    restored, and an existing VM of the same image is unaffected."""
    body = decode(kv["data"])
    mutate(body)
    if expected is None:
        decode_and_restore(encode(body), kv["image"])
    else:
        with pytest.raises(expected):
            VM.restore(kv["image"], Snapshot.from_bytes(encode(body, "zstd"))).close()
    assert_bystander_untouched(kv)


NASTY = [None, True, -1, 0, 1 << 31, (1 << 64) - 1, -(1 << 63), 1.5, float("nan"), "", "delta",
         b"", b"\xff" * 4, bytes(32), [], {}, [1], {"x": 1}, KeyError]


def _paths(obj, prefix=()):
    for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        if key != "limits":  # limits: see the crafted cases above
            yield (*prefix, key)
            if isinstance(value, (dict, list)):
                yield from _paths(value, (*prefix, key))


@FUZZ
@given(data=st.data())
def test_fuzzed_body_fields_get_typed_errors(kv, data):
    """Promise: whatever a digest-valid body holds, restoring it as an overlay or applying it
    as a delta either works or raises a typed error; other VMs are unaffected."""
    as_delta = data.draw(st.booleans())
    body = decode(kv["delta"] if as_delta else kv["data"])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(sorted(_paths(body), key=repr)))
        _set(path, data.draw(st.sampled_from(NASTY)))(body)
    decode_and_restore(encode(body), kv["image"], kv["base"] if as_delta else None)
    assert_bystander_untouched(kv)


@FUZZ
@given(chunk_ids=st.lists(st.integers(0, 40) | st.integers(0, (1 << 32) - 1), min_size=1,
                          max_size=5), zero=st.booleans())
def test_fuzzed_chunk_ids_get_typed_errors(kv, chunk_ids, zero):
    """Promise: chunk ids out of range or unsorted are typed errors."""
    body = decode(kv["data"])
    (_mem(zero_ids=ids(*chunk_ids)) if zero else _chunks(*chunk_ids))(body)
    decode_and_restore(encode(body), kv["image"])


def test_delta_with_the_wrong_base_is_rejected(kv, hog):
    """Promise: a delta whose base does not match (or of another image) gets a typed error;
    the target is left as it was, and the right delta still applies afterwards."""
    delta = Snapshot.from_bytes(kv["delta"])
    with pytest.raises(Mismatch):
        VM.restore(kv["image"], Snapshot.from_bytes(kv["data"]), delta)
    with pytest.raises(Snap):  # an overlay passed as a delta
        VM.restore(kv["image"], Snapshot.from_bytes(kv["base"]), Snapshot.from_bytes(kv["data"]))
    body = decode(kv["delta"])
    body["base_id"] = "0" * 32
    vm = VM.restore(kv["image"], Snapshot.from_bytes(kv["base"]))
    for bad in (Snapshot.from_bytes(encode(body)), Snapshot.from_bytes(hog["data"])):
        with pytest.raises(Snap):
            vm.apply_delta(bad)
    vm.apply_delta(delta)
    assert vm.call("kv_checksum") == kv["delta_sum"]
    vm.close()


def test_failed_delta_leaves_multi_memory_vm_untouched(scratch):
    """Promise: a bad delta gets a typed error, never a half-restored VM."""
    image = scratch.add(wat("""(module (memory 1) (memory 1)
      (func (export "w0") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
      (func (export "r0") (param i32) (result i32) (i32.load (local.get 0)))
      (func (export "g1") (param i32) (result i32) (memory.grow 1 (local.get 0))))"""))
    src = VM.create(image, LIMITS, clock="virtual")
    src.call("w0", 100, 42)
    src.call("g1", 2)
    base = src.snapshot()
    src.call("w0", 100, 99)
    body = decode(src.snapshot(delta=True).to_bytes())
    body["memories"][1]["pages"] = 1  # >= the image's boot size, < the VM's 3 pages
    vm = VM.restore(image, base)
    with pytest.raises(Snap):
        vm.apply_delta(Snapshot.from_bytes(encode(body)))
    assert vm.call("r0", 100) == 42


# --- 3, 4. oversized snapshots, zip bombs, versions, magic --------------------------------

def test_oversized_snapshots_are_too_large(kv, tmp_path):
    """Promise: an oversized snapshot (bytes, file, or honest raw size) is SnapshotTooLarge."""
    data, path = kv["data"], tmp_path / "s"
    path.write_bytes(data)
    zeros = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    for too_large in (lambda: Snapshot.from_bytes(data, max_bytes=len(data) - 1),
                      lambda: Snapshot.read(path, max_bytes=100),
                      lambda: Snapshot.from_bytes(frame(zeros, "zstd", 64 << 20), max_bytes=9999),
                      lambda: Snapshot.from_bytes(frame(b"x", "zstd", 1 << 50))):
        with pytest.raises(err.SnapshotTooLarge):
            too_large()


CLAIMS_2_62 = (struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 62)  # frame header: size 2**62
               + (1 | 1 << 1 | 1000 << 3).to_bytes(3, "little") + b"\0")  # one RLE block


@pytest.mark.parametrize("stored", [
    pytest.param(zstandard.ZstdCompressor().compress(bytes(64 << 20)), id="64MiB"),
    pytest.param(CLAIMS_2_62, id="2**62")])
def test_zstd_bomb_with_lying_header_is_typed_and_not_expanded(stored):
    """Promise: a zip bomb (the header claims 100 bytes) gets a typed error without
    allocating what the compressed frame expands to."""
    tracemalloc.start()
    try:
        with pytest.raises(Snap):
            Snapshot.from_bytes(frame(stored, "zstd", raw_bytes=100), max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("version", [2, 0, -1, "1", None, 1.5,
                                     1.0, True])
def test_wrong_version_is_unsupported(kv, version):
    """Promise: a wrong-version snapshot gets SnapshotVersionUnsupported."""
    with pytest.raises(err.SnapshotVersionUnsupported):
        Snapshot.from_bytes(frame(msgpack.packb(decode(kv["data"])), format=version))


def test_bad_magic_and_bad_headers_are_corrupt(kv):
    """Promise: not-a-snapshot, mangled headers, unknown compressions are SnapshotCorrupt."""
    body = msgpack.packb(decode(kv["data"]))
    good = frame(body)
    for data in [b"CLDSNAP\r" + good[8:], bytes(100), good[:8] + ids(5000) + good[12:],
                 good[:8] + ids(1 << 31) + good[12:], frame(body, compression="lz4"),
                 frame(body, compression=None), frame(body, sha256=b"x"),
                 frame(body, body_bytes=-1), MAGIC + ids(3) + msgpack.packb([1, 2]) + body,
                 frame(zstandard.ZstdCompressor().compress(body)[:-4], "zstd", len(body))]:
        with pytest.raises(Corrupt):
            Snapshot.from_bytes(data)


# --- 5. atomic writes ----------------------------------------------------------------------

def _enospc(*args):
    raise OSError(28, "No space left on device")


def test_write_failing_midway_keeps_old_file_and_leaves_no_temp(kv, tmp_path, monkeypatch):
    """Promise: snapshots are written atomically (write, fsync, rename)."""
    path = tmp_path / "vm.snap"
    old, new = Snapshot.from_bytes(kv["base"]), Snapshot.from_bytes(kv["data"])
    old.write(path)
    new.write(path)  # over an existing file: complete, and the new one
    assert Snapshot.read(path).snapshot_id == new.snapshot_id
    old.write(path)
    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(os, name, _enospc)
            with pytest.raises(OSError):
                new.write(path)
        assert Snapshot.read(path).snapshot_id == old.snapshot_id
        assert [p.name for p in tmp_path.iterdir()] == ["vm.snap"]


# --- 6. images -----------------------------------------------------------------------------

FN, WASI = "(func (param i32) (result i32))", '"wasi_snapshot_preview1"'
TABLE_OPS = {"table.set": "(table.set (i32.const 0) (ref.null func))",
             "table.grow": "(drop (table.grow (ref.null func) (i32.const 1)))",
             "table.fill": "(table.fill (i32.const 0) (ref.null func) (i32.const 1))",
             "table.copy": "(table.copy (i32.const 0) (i32.const 0) (i32.const 0))",
             "table.init": "(table.init 0 (i32.const 0) (i32.const 0) (i32.const 0))",
             "elem.drop": "(elem.drop 0)", "data.drop": "(data.drop 0)"}
REJECTED = {  # name: (module, what the message must name)
    "not-wasm": (b"hello world", "WebAssembly"),
    "truncated": ((WORKLOADS / "memhog.wasm").read_bytes()[:200], "invalid"),
    "invalid": (b"\0asm\1\0\0\0\1\5\1\x60\1\x7f", "invalid"),
    "non-wasi-import": (f'(module (import "env" "host_rng" {FN}))', "host_rng"),
    "path_open": (f'(module (import {WASI} "path_open" {FN}))', "path_open"),
    "sock_accept": (f'(module (import {WASI} "sock_accept" {FN}))', "sock_accept"),
    "imported-memory": (f'(module (import {WASI} "m" (memory 1)))', "memory"),
    "imported-table": ('(module (import "env" "t" (table 1 funcref)))', "table"),
    "imported-global": ('(module (import "env" "g" (global (mut i32))))', "global"),
    "wrong-wasi-type": (f'(module (import {WASI} "fd_write" (func)))', "fd_write"),
    "shared-memory": ("(module (memory 1 1 shared))", "shared"),
    "reserved-export": ('(module (memory (export "__cloudlet_memory_0") 1))', "__cloudlet_"),
    **{op: (f'(module (memory 1) (data "d") (table 2 funcref) (elem func $f) (func $f {body}))',
            op) for op, body in TABLE_OPS.items()},
}


@pytest.mark.parametrize(("module", "named"), list(REJECTED.values()), ids=list(REJECTED))
def test_bad_module_is_rejected_naming_the_problem(store, module, named):
    """Promise: bad modules get ImageRejected, and the message names what is wrong."""
    with pytest.raises(err.ImageRejected) as info:
        store.add(wat(module) if isinstance(module, str) else module)
    assert named.lower() in info.value.message.lower()


def test_oversize_module_is_too_large(tmp_path):
    """Promise: modules over the store's max_image_bytes get ImageTooLarge."""
    small = ImageStore(tmp_path, max_image_bytes=1024)
    with pytest.raises(err.ImageTooLarge):
        small.add((WORKLOADS / "memhog.wasm").read_bytes())
    with pytest.raises(err.ImageTooLarge):
        small.add_file(WORKLOADS / "memhog.wasm")


def test_table_set_hidden_behind_call_ref_is_rejected(scratch):
    """Promise: modules that mutate tables are rejected, naming the instruction."""
    module = wat("(module " + "(type (func (param i64)))" * 68 + """(type $v (func))
      (table 1 funcref) (elem declare func $nop) (func $nop)
      (func (export "evil") (call_ref $v (ref.func $nop))
        (table.set (i32.const 0) (ref.null func)) (nop) (nop) (nop)))""")
    with pytest.raises(err.ImageRejected, match=r"table\.set"):
        scratch.add(module)


def test_start_function_calling_proc_exit_is_rejected(store, workload):
    """Promise: a bad module gets ImageRejected, and other VMs are not disturbed."""
    module = wat(f"""(module (import {WASI} "proc_exit" (func $exit (param i32)))
      (memory 1) (func $boom (call $exit (i32.const 3))) (start $boom))""")
    try:
        with pytest.raises(err.ImageRejected):
            store.add(module)
    finally:
        vm = VM.create(workload["memhog"], LIMITS)
        with pytest.raises(err.VMTrapped):  # no stale host exception leaks into this VM
            vm.call("hog_trap", 1)
        assert vm.failed is None
        vm.close()


MODULES = [(WORKLOADS / "memhog.wasm").read_bytes(), wat_file("wasi.wat"),
           wat_file("stackdep.wat")]


@FUZZ
@given(data=st.data())
def test_mutated_modules_are_rejected_or_accepted(scratch, data):
    """Promise: any mutation of a valid module gives ImageRejected or an image, nothing else."""
    module = bytearray(data.draw(st.sampled_from(MODULES)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(module) - 1))
        if data.draw(st.booleans()):
            module[at] = data.draw(st.integers(0, 255))
        else:
            del module[at]
    with contextlib.suppress(err.ImageRejected):
        scratch.add(bytes(module))


# --- 7. runaway guests ---------------------------------------------------------------------

MiB16 = 16 << 20


@pytest.mark.parametrize(("fn", "args", "limits", "error"), [
    pytest.param("hog_spin", (), VMLimits(MiB16, deadline_ms=50), err.VMDeadlineExceeded,
                 id="loop"),
    pytest.param("hog_spin", (), VMLimits(MiB16, fuel_per_call=10**5), err.VMOutOfFuel, id="fuel"),
    pytest.param("hog_trap", (1,), VMLimits(MiB16), err.VMTrapped, id="trap"),
    pytest.param("hog_recurse", (10**8,), VMLimits(MiB16), err.VMStackOverflow, id="stack"),
    pytest.param("hog_bomb", (), VMLimits(8 << 20), None, id="memory-bomb")])
def test_runaway_guest_is_contained_and_stays_usable(kv, hog, fn, args, limits, error):
    """Promise: a runaway ends in a typed error (or a refused memory.grow), leaves every other
    VM untouched, and its VM stays usable: it answers calls, snapshots and restores."""
    peer = VM.restore(hog["image"], Snapshot.from_bytes(hog["data"]))
    peer_sum = peer.call("hog_checksum")
    vm = VM.create(hog["image"], limits, clock="virtual")
    vm.call("hog_grow", 1)
    vm.call("hog_dirty", 8, 3)
    mine = vm.call("hog_checksum")
    if error is None:
        assert vm.call(fn, *args) * 65536 <= limits.memory_bytes
        assert vm.memory_bytes <= limits.memory_bytes
    else:
        with pytest.raises(error):
            vm.call(fn, *args)
        assert vm.call("hog_checksum") == mine
    assert vm.failed is None and vm.call("hog_trap", 0) == 7
    clone = VM.restore(hog["image"], vm.snapshot())
    assert clone.call("hog_checksum") == vm.call("hog_checksum")
    assert peer.call("hog_checksum") == peer_sum
    assert_bystander_untouched(kv)
    for v in (clone, vm, peer):
        v.close()


def test_proc_exit_marks_only_that_vm_failed(store, kv):
    """Promise: proc_exit ends in a typed error and that VM (only) is clearly marked failed."""
    image = store.add(wat_file("wasi.wat"))
    vm, other = (VM.create(image, LIMITS, clock="virtual") for _ in range(2))
    with pytest.raises(err.VMExited):
        vm.call("exit", 3)
    assert vm.failed
    for action in (lambda: vm.call("rand"), vm.snapshot, lambda: vm.call_bytes("rand", b"")):
        with pytest.raises(err.VMFailed):
            action()
    assert other.call("log") == 6 and other.failed is None
    assert_bystander_untouched(kv)


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target on its own thread; an exception on any of them fails the test."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def exits_until(image: Any, done: threading.Event) -> None:
    """VMs calling proc_exit(3), one after another, until `done`: each call's host
    function raises, which is what another thread must not be charged with."""
    while not done.is_set():
        vm = VM.create(image, LIMITS, clock="virtual")
        with contextlib.suppress(err.VMExited):
            vm.call("exit", 3)
        vm.close()


def test_an_exit_on_one_thread_is_not_charged_to_a_trap_on_another(store, workload):
    """Promise: with guests running on several threads at once, each call's failure is its
    own: one VM's proc_exit is never reported as another's trap, nor the other way round
    (wasmtime-py keeps the last host exception in one slot for the whole process)."""
    image = store.add(wat_file("wasi.wat"))
    wrong: list[str] = []
    done = threading.Event()

    def exiter() -> None:
        try:
            for _ in range(600):
                vm = VM.create(image, LIMITS, clock="virtual")
                try:
                    vm.call("exit", 3)
                    wrong.append("exit returned")
                except err.VMExited:
                    pass
                except err.VMError as exc:
                    wrong.append(f"exit gave {exc!r}")
                vm.close()
        finally:
            done.set()

    def trapper() -> None:
        vm = VM.create(workload["memhog"], LIMITS)
        while not done.is_set():
            try:
                vm.call("hog_trap", 1)
            except err.VMTrapped:
                pass
            except err.VMError as exc:
                wrong.append(f"trap gave {exc!r}")
            if vm.failed:
                wrong.append(f"trapping VM failed: {vm.failed}")
                break
        vm.close()

    run_threads(exiter, trapper, trapper)
    assert wrong == [], f"{len(wrong)} calls got another VM's failure, e.g. {wrong[:3]}"


def test_a_boot_fails_for_its_own_reason_while_other_threads_exit(store):
    """Promise: a VM whose boot fails (a start function that traps or exits, a memory
    minimum over the cap) gets the error of its own failure while guests on other
    threads call proc_exit, whose status never appears in it."""
    start_fails = """(module (import {wasi} "{fn}" (func $f {sig}))
      (memory (export "memory") 1)
      (func $s (if (i32.eq (memory.grow (i32.const 256)) (i32.const -1)) (then {fail})))
      (start $s))"""
    kinds = {  # image, under a 1 MiB cap -> the error and what its message must say
        "trap": (store.add(wat(start_fails.format(
            wasi=WASI, fn="sched_yield", sig="(result i32)", fail="unreachable"))),
            err.VMTrapped, "unreachable"),
        "exit": (store.add(wat(start_fails.format(
            wasi=WASI, fn="proc_exit", sig="(param i32)", fail="(call $f (i32.const 7))"))),
            err.VMExited, "status 7"),
        "too big": (store.add(wat('(module (memory (export "memory") 32))')),
                    err.VMMemoryLimit, "within 1048576 bytes"),
    }
    small = VMLimits(memory_bytes=1 << 20)
    exiter_image = store.add(wat_file("wasi.wat"))
    wrong: list[str] = []
    done = threading.Event()

    def booter() -> None:
        try:
            for _ in range(300):
                for kind, (image, error, says) in kinds.items():
                    try:
                        VM.create(image, small).close()
                        wrong.append(f"{kind}: booted")
                    except err.VMError as exc:
                        if type(exc) is not error or says not in str(exc):
                            wrong.append(f"{kind}: {exc!r}")
        finally:
            done.set()

    run_threads(booter, lambda: exits_until(exiter_image, done))
    assert wrong == [], f"{len(wrong)} boots got another failure, e.g. {wrong[:3]}"


# --- 8. the command line -------------------------------------------------------------------

@pytest.fixture(scope="module")
def snap_files(tmp_path_factory, kv):
    folder = tmp_path_factory.mktemp("cli")
    unsorted = decode(kv["data"])
    _chunks(1_000_000, 0)(unsorted)
    for name, data in {"good": kv["data"], "truncated": kv["data"][:-10], "garbage": b"\x93" * 99,
                       "future": frame(msgpack.packb(decode(kv["data"])), format=9),
                       "unsorted": encode(unsorted)}.items():
        (folder / name).write_bytes(data)
    return folder


KV, HOG, VDI = (shlex.quote(str(WORKLOADS / f"{n}.wasm")) for n in ("kvstore", "memhog", "vdi"))
BAD_COMMANDS = [f"vm {c}" for c in [
    "run /nonexistent.wasm", f"run {shlex.quote(__file__)}", "run", f"run {KV} --call 'nope 1'",
    f"run {KV} --call 'kv_put 1'", f"""run {KV} --call 'kv_put "1 2'""",
    f"run {KV} --call 'kv_put 1 1e99'", f"run {KV} --call 'kv_put 1 99999999999'",
    f"run {KV} --memory-mib 0", f"run {KV} --random-seed zz", f"run {VDI} --call 'vdi_events x:zz'",
    f"run {HOG} --call 'hog_recurse 100000000'", f"run {HOG} --deadline-ms 30 --call hog_spin",
    f"run {HOG} --from-snapshot {{good}}", "run --from-snapshot /nonexistent",
    f"run {KV} --from-snapshot {{truncated}}", f"run {KV} --from-snapshot {{garbage}}",
    f"run {KV} --from-snapshot {{future}}", f"run {KV} --snapshot-out /proc/x/y",
    "inspect /nonexistent", "inspect /", "inspect {truncated}", "inspect {garbage}"]] + [
    f"vm run {KV} --from-snapshot {{unsorted}}",
]


@pytest.mark.parametrize("argv", BAD_COMMANDS)
def test_cli_bad_input_exits_nonzero_with_one_line(cli_env, snap_files, argv):
    """Promise (cli.py): an error exits non-zero with one line on stderr, never a traceback."""
    files = {p.name: shlex.quote(str(p)) for p in snap_files.iterdir()}
    args = shlex.split(argv.format(**files)) if isinstance(argv, str) else argv
    result = subprocess.run([CLI, *args], env=cli_env, capture_output=True, timeout=60)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("cloudlet: error ["), stderr


def test_cli_good_snapshot_still_works(cli_env, snap_files):
    """Sanity check for the above: the snapshot files are bad only where meant to be."""
    good = shlex.quote(str(snap_files / "good"))
    argv = shlex.split(f"vm run {KV} --from-snapshot {good} --call 'kv_get 123'")
    result = subprocess.run([CLI, *argv], env=cli_env, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, b"862", b"")


def test_cli_passes_non_utf8_bytes_through(cli_env):
    """A `s:` argument that is not UTF-8 reaches the guest byte for byte (was a traceback)."""
    out = subprocess.run([CLI, "vm", "run", str(WORKLOADS / "kvstore.wasm"),
                          "--call", b"kv_set s:\xff=v", "--call", "kv_lookup x:ff"],
                         capture_output=True, env=cli_env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [b"x:", b"x:" + b"v".hex().encode()]
