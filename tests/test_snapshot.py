"""Snapshots: complete state, overlay and delta sizes that track writes, the wire format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudlet.errors import (
    SnapshotCorrupt,
    SnapshotImageMismatch,
    SnapshotTooLarge,
    SnapshotVersionUnsupported,
)
from cloudlet.vm import CHUNK_BYTES, VM, Image, ImageStore, Snapshot
from tests.conftest import wat_file

SEED = bytes(32)
PAGE = 4096


def test_fresh_vm_overlay_is_near_empty(workload: dict[str, Image]) -> None:
    for image in workload.values():
        snap = VM.create(image).snapshot()
        # Booting is deterministic, so a fresh VM equals the pristine state exactly.
        assert snap.overlay_bytes == 0, image.digest
        assert len(snap.to_bytes()) < 2048


def test_overlay_tracks_what_the_guest_wrote(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 16)
    grown = vm.snapshot()
    assert grown.memory_bytes >= 16 << 20
    assert grown.overlay_bytes <= 2 * PAGE  # growing alone writes nothing
    vm.call("hog_fill", 0, 100, 0x5A5A5A5A)
    filled = vm.snapshot()
    assert 100 * PAGE <= filled.overlay_bytes <= 102 * PAGE
    vm.call("hog_fill", 0, 100, 0)  # back to zero: named as zero chunks, not sent
    zeroed = vm.snapshot()
    assert zeroed.overlay_bytes <= 2 * PAGE
    assert sum(len(m.zero_ids) for m in zeroed.memories) == 0  # zero == pristine here


def test_delta_tracks_chunks_dirtied_since_last_snapshot(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 8)
    vm.call("hog_fill", 0, 300, 1)
    base = vm.snapshot()
    vm.call("hog_dirty", 20, 42)
    assert sum(len(d) for d in vm.dirty_chunks()) <= 22
    delta = vm.snapshot(delta=True)
    assert delta.kind == "delta" and delta.base_id == base.snapshot_id
    assert 20 * PAGE <= delta.overlay_bytes <= 22 * PAGE
    vm.call("hog_fill", 0, 5, 0)
    delta2 = vm.snapshot(delta=True)
    assert sum(len(m.zero_ids) for m in delta2.memories) == 5  # became zero: named only

    restored = VM.restore(workload["memhog"], base, delta, delta2)
    assert restored.call("hog_checksum") == vm.call("hog_checksum")
    assert restored.seq == vm.seq


def test_delta_applies_onto_a_running_copy(workload: dict[str, Image]) -> None:
    """The migration pattern: restore the overlay, then bring it forward by deltas."""
    src = VM.create(workload["kvstore"], clock="virtual", random_seed=SEED)
    for k in range(50):
        src.call("kv_put", k, k)
    dst = VM.restore(workload["kvstore"], src.snapshot())
    for k in range(50, 80):
        src.call("kv_put", k, -k)
    dst.apply_delta(src.snapshot(delta=True))
    assert dst.call("kv_checksum") == src.call("kv_checksum")
    src.call("kv_put", 1000, 1)
    with pytest.raises(SnapshotImageMismatch, match="since its last snapshot"):
        dst.apply_delta(src.snapshot(delta=True))  # dst ran kv_checksum: no longer the base


def test_a_prepared_delta_applies_and_a_refused_one_leaves_the_copy_as_it_was(
        workload: dict[str, Image]) -> None:
    """`prepare_delta` does ahead what can refuse a delta (checks, growth): a refused
    delta changes nothing, and a prepared one then applies as `apply_delta` would."""
    src = VM.create(workload["memhog"], clock="virtual", random_seed=SEED)
    src.call("hog_grow", 1)
    dst = VM.restore(workload["memhog"], src.snapshot())
    src.call("hog_grow", 2)  # the delta grows memory
    src.call("hog_dirty", 40, 3)
    delta = src.snapshot(delta=True)
    size, seq = len(dst.memory_view()), dst.seq
    dst.prepare_delta(delta)
    assert len(dst.memory_view()) > size and dst.seq == seq  # grown, not written yet
    dst.apply_delta(delta)
    assert dst.call("hog_checksum") == src.call("hog_checksum")
    other = VM.restore(workload["memhog"], src.snapshot())
    with pytest.raises(SnapshotImageMismatch):
        other.prepare_delta(delta)  # not its base
    assert other.failed is None and other.call("hog_checksum") == src.call("hog_checksum")


def test_chunk_ids_that_are_negative_unsorted_or_past_the_memory_are_refused(
        workload: dict[str, Image]) -> None:
    import dataclasses

    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 1)
    vm.call("hog_dirty", 3, 1)
    snap = vm.snapshot()
    (mem,) = snap.memories
    n = mem.pages * (65536 // CHUNK_BYTES)
    ids = mem.chunk_ids.astype(np.int64)
    for bad in (np.concatenate([[-1], ids[1:]]), ids[::-1].copy(),
                np.concatenate([ids[:-1], [n]])):
        forged = dataclasses.replace(snap, memories=(dataclasses.replace(mem, chunk_ids=bad),))
        with pytest.raises(SnapshotCorrupt, match="ascending"):
            VM.restore(workload["memhog"], forged)


def test_unexported_stack_pointer_and_heap_resume(store: ImageStore) -> None:
    image = store.add(wat_file("stackdep.wat"))
    vm = VM.create(image)
    for v in (11, 22, 33):
        vm.call("push", v)
        vm.call("alloc", v * 10)
    snap = Snapshot.from_bytes(vm.snapshot().to_bytes())
    resumed = VM.restore(image, snap)
    assert [resumed.call("pop") for _ in range(4)] == [33, 22, 11, -1]
    assert resumed.call("heap_sum") == 660
    assert resumed.call("calls") == vm.call("calls") + 4


def test_host_state_resumes_exactly(store: ImageStore) -> None:
    image = store.add(wat_file("wasi.wat"))
    a = VM.create(image, clock="virtual", random_seed=SEED)
    a.call("rand")
    a.call("log")
    a.call("now", 1)
    b = VM.restore(image, Snapshot.from_bytes(a.snapshot().to_bytes()))
    for fn, args in (("rand", ()), ("now", (1,)), ("log", ()), ("rand", ()), ("now", (0,))):
        assert a.call(fn, *args) == b.call(fn, *args)
    assert a.host.log == b.host.log and a.seq == b.seq


def test_real_monotonic_clock_never_goes_back_after_restore(store: ImageStore) -> None:
    image = store.add(wat_file("wasi.wat"))
    a = VM.create(image)
    a.host.monotonic_offset_ns = 10**15  # as if it had run on a host with a later clock
    before = a.call("now", 1)
    b = VM.restore(image, a.snapshot())
    assert b.call("now", 1) >= before


def test_limits_and_identity_travel(workload: dict[str, Image]) -> None:
    from cloudlet.vm import VMLimits

    limits = VMLimits(memory_bytes=32 << 20, fuel_per_call=5_000_000, deadline_ms=123)
    vm = VM.create(workload["kvstore"], limits, vm_id="vm-1", owner="alice")
    vm.call("kv_put", 1, 2)
    b = VM.restore(workload["kvstore"], Snapshot.from_bytes(vm.snapshot().to_bytes()))
    assert (b.limits, b.id, b.owner, b.seq) == (limits, "vm-1", "alice", 1)
    assert b.fuel_used == vm.fuel_used > 0


def test_wire_format_checks(workload: dict[str, Image], tmp_path: Path) -> None:
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 2)
    vm.call("hog_dirty", 30, 1)
    data = vm.snapshot().to_bytes()
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        Snapshot.from_bytes(data[:-1])
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    with pytest.raises(SnapshotCorrupt, match="digest"):
        Snapshot.from_bytes(bytes(flipped))
    with pytest.raises(SnapshotCorrupt, match="magic"):
        Snapshot.from_bytes(b"X" + data[1:])
    with pytest.raises(SnapshotTooLarge):
        Snapshot.from_bytes(data, max_bytes=len(data) - 1)
    with pytest.raises(SnapshotVersionUnsupported):
        Snapshot.from_bytes(data.replace(b"\xa6format\x01", b"\xa6format\x07", 1))
    with pytest.raises(SnapshotImageMismatch):
        VM.restore(workload["kvstore"], Snapshot.from_bytes(data))


def test_compression_only_where_it_pays(workload: dict[str, Image]) -> None:
    from cloudlet.vm.snapshot import read_header

    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 4)
    vm.call("hog_fill", 0, 64, 7)  # repetitive: compresses
    assert read_header(vm.snapshot().to_bytes())["compression"] == "zstd"
    base = vm.call("hog_base")
    rng = np.random.default_rng(1)
    vm.write_memory(base, rng.bytes(64 * CHUNK_BYTES))  # random: does not
    assert read_header(vm.snapshot().to_bytes())["compression"] == "none"


def test_write_is_atomic_and_complete(workload: dict[str, Image], tmp_path: Path) -> None:
    vm = VM.create(workload["kvstore"])
    path = tmp_path / "vm.snap"
    for k in range(3):
        vm.call("kv_put", k, k)
        size = vm.snapshot().write(path)
        assert path.stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.snap"]
    assert VM.restore(workload["kvstore"], Snapshot.read(path)).call("kv_count") == 3


def test_skipping_untouched_pages_gives_the_same_digests(workload: dict[str, Image]) -> None:
    """The pagemap shortcut must agree with hashing every chunk, in every state."""
    from cloudlet.vm import chunks

    assert chunks.pagemap().available  # on Linux CI; otherwise the shortcut is simply off
    vm = VM.create(workload["memhog"])

    def full() -> list[np.ndarray]:
        return [chunks.hash_chunks(vm.memory_view(i)) for i in range(len(vm.image.memories))]

    steps = [("hog_grow", 8), ("hog_dirty", 50, 3), ("hog_fill", 10, 20, 0),
             ("hog_fill", 0, 128, 9), ("hog_checksum",), ("hog_grow", 12), ("hog_dirty", 9, 4)]
    for fn, *args in steps:
        vm.call(fn, *args)
        for skipped, hashed in zip(vm.chunk_hashes(), full(), strict=True):
            assert (skipped == hashed).all(), fn
    restored = VM.restore(workload["memhog"], vm.snapshot())
    assert [(a == b).all() for a, b in zip(restored.chunk_hashes(), full(), strict=True)]
    assert restored.call("hog_checksum") == vm.call("hog_checksum")


def test_limits_from_a_delta_reach_the_store(workload: dict[str, Image]) -> None:
    """A delta carries the VM's limits; the copy's memory cap must follow, not just its field."""
    from cloudlet.vm import VMLimits

    vm = VM.create(workload["memhog"], VMLimits(memory_bytes=64 << 20))
    copy = VM.restore(workload["memhog"], vm.snapshot())
    assert copy.call("hog_grow", 16) > 0  # 64 MiB cap: fine
    copy.close()
    copy = VM.restore(workload["memhog"], vm.snapshot())
    vm.set_limits(VMLimits(memory_bytes=8 << 20))
    copy.apply_delta(vm.snapshot(delta=True))
    assert copy.limits.memory_bytes == 8 << 20
    assert copy.call("hog_grow", 16) == -1  # the store's limiter enforces the new cap


def test_float_globals_and_per_memory_caps_are_checked(store: ImageStore) -> None:
    import dataclasses

    from cloudlet.vm import VMLimits
    from tests.conftest import wat

    image = store.add(wat("""(module (memory 10) (memory 10)
      (global $f (mut f64) (f64.const 1.5))
      (func (export "set") (param f64) (global.set $f (local.get 0)))
      (func (export "get") (result f64) (global.get $f)))"""))
    vm = VM.create(image, VMLimits(memory_bytes=1 << 20))  # two 640 KiB memories, 1 MiB cap
    vm.call("set", 2.5)
    snap = vm.snapshot()
    assert VM.restore(image, Snapshot.from_bytes(snap.to_bytes())).call("get") == 2.5
    (name,) = snap.globals
    for bad in ("x", None, b"", [], 3):
        forged = dataclasses.replace(snap, globals={name: bad})
        with pytest.raises(SnapshotCorrupt):
            VM.restore(image, forged)


@pytest.mark.parametrize("compression", ["none", "zstd", "auto"])
def test_segments_encode_exactly_what_msgpack_would(workload: dict[str, Image], tmp_path: Path,
                                                    compression: str) -> None:
    """Snapshots are written as segments (the chunk data is not copied): the body must
    still be msgpack's own encoding, and the file must read back whole."""
    import msgpack

    from cloudlet.vm.snapshot import body_segments, to_wire

    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 4)
    vm.call("hog_fill", 0, 700, 0x01020304)
    vm.call("hog_dirty", 50, 7)
    snap = vm.snapshot()
    assert b"".join(body_segments(snap)) == msgpack.packb(to_wire(snap))
    written = snap.write(tmp_path / "s.snap", compression=compression)
    data = (tmp_path / "s.snap").read_bytes()
    assert written == len(data) and data == snap.to_bytes(compression)
    back = Snapshot.read(tmp_path / "s.snap")
    assert back.snapshot_id == snap.snapshot_id
    assert [m.data for m in back.memories] == [m.data for m in snap.memories]
    assert VM.restore(workload["memhog"], back).call("hog_checksum") == vm.call("hog_checksum")
