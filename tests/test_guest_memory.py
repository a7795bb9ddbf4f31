"""GuestMemory on real wasmtime memories: views, growth, write tracking, digests.

No VM here: a plain wasmtime instance exports the memories, as an image's
instance does, so each behaviour is checked on the object that owns it. The
ground truth for digests is hashing every chunk of the memory.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import wasmtime

from cloudlet.errors import BadCall, VMError, VMFailed, VMMemoryLimit
from cloudlet.vm import chunks, fastcall
from cloudlet.vm.hostfns import HostState
from cloudlet.vm.limits import VMLimits
from cloudlet.vm.memory import GuestMemory, PristineMemory
from cloudlet.vm.snapshot import MemoryState, Snapshot, apply_memories, capture_memories

PAGE = chunks.WASM_PAGE_BYTES
CHUNK = chunks.CHUNK_BYTES
# Memory 0 starts at 2 pages (max 8) with a data segment in its first chunk; the
# bitmap memory has a byte per chunk of memory 0 (8 pages = 128 chunks, one page).
WAT = """(module
  (memory (export "mem") 2 8)
  (memory (export "bitmap") 1 1)
  (data (memory 0) (i32.const 100) "pristine bytes"))"""


class Instance:
    """One store with the module instantiated, and a GuestMemory over its exports."""

    def __init__(self, *, tracked: bool, pristine: tuple[PristineMemory, ...] = ()) -> None:
        config = wasmtime.Config()
        config.wasm_multi_memory = True
        self.store = wasmtime.Store(wasmtime.Engine(config))
        module = wasmtime.Module(self.store.engine, WAT)
        self.instance = wasmtime.Instance(self.store, module, [])
        ctx = fastcall.context_of(self.store)
        self.memory = GuestMemory(self.store, pristine)
        bitmap = fastcall.export_memory(ctx, self.instance, "bitmap") if tracked else None
        self.memory.attach([fastcall.export_memory(ctx, self.instance, "mem")], bitmap)
        self.bitmap = self.instance.exports(self.store)["bitmap"]
        assert isinstance(self.bitmap, wasmtime.Memory)

    def marks(self) -> list[int]:
        """Chunks marked in the bitmap memory, read through wasmtime's public API."""
        n = self.memory.size_bytes(0) // CHUNK
        return np.flatnonzero(np.frombuffer(self.bitmap.read(self.store, 0, n), np.uint8)).tolist()


def booted(*, tracked: bool) -> Instance:
    """An instance whose memory GuestMemory treats as pristine, tracking from there."""
    first = Instance(tracked=False)
    pristine = tuple(PristineMemory(first.memory.pages(i), h)
                     for i, h in enumerate(first.memory.chunk_hashes()))
    inst = Instance(tracked=tracked, pristine=pristine)
    inst.memory.restart_tracking(inst.memory.pristine_hashes)
    return inst


def truth(memory: GuestMemory) -> np.ndarray:
    return chunks.hash_chunks(memory.view(0))


def test_views_are_zero_copy_and_follow_growth() -> None:
    inst = Instance(tracked=False)
    memory = inst.memory
    assert memory.count == 1 and memory.pages(0) == 2 and memory.total_bytes == 2 * PAGE
    view = memory.view(0)
    assert bytes(view[100:114]) == b"pristine bytes"
    view[5000:5003] = b"abc"  # seen by wasmtime: the view is the guest's memory
    mem = inst.instance.exports(inst.store)["mem"]
    assert isinstance(mem, wasmtime.Memory)
    assert mem.read(inst.store, 5000, 5003) == b"abc"
    assert memory.view(0) is view  # cached while the size holds

    memory.grow_to(0, 5)
    grown = memory.view(0)
    assert len(grown) == 5 * PAGE and memory.pages(0) == 5 and mem.size(inst.store) == 5
    assert bytes(grown[5000:5003]) == b"abc" and not any(grown[2 * PAGE:])
    memory.grow_to(0, 5)  # already there: nothing to do
    assert memory.pages(0) == 5


def test_growth_stops_at_the_memory_maximum_and_never_shrinks() -> None:
    memory = Instance(tracked=False).memory
    with pytest.raises(VMMemoryLimit, match="cannot grow memory 0 to 9 pages"):
        memory.grow_to(0, 9)
    assert memory.pages(0) == 2  # a refused growth leaves the memory as it was
    memory.grow_to(0, 3)
    with pytest.raises(ValueError, match="cannot shrink"):
        memory.grow_to(0, 2)


def test_host_writes_are_bounded_and_marked() -> None:
    inst = booted(tracked=True)
    memory = inst.memory
    assert memory.tracks_writes and inst.marks() == []
    memory.write(CHUNK * 3 - 2, b"span")  # crosses from chunk 2 into chunk 3
    assert bytes(memory.view(0)[CHUNK * 3 - 2 : CHUNK * 3 + 2]) == b"span"
    assert inst.marks() == [2, 3]
    for offset, data in ((2 * PAGE - 1, b"xy"), (-1, b"x")):
        with pytest.raises(BadCall, match="outside memory 0"):
            memory.write(offset, data)
    memory.mark_written(0, 0)  # an empty write marks nothing
    assert inst.marks() == [2, 3]


def test_tracked_digests_rehash_marked_chunks_only() -> None:
    """With a bitmap, a sync rehashes exactly the marked chunks: a write that bypasses
    the marks is (by design) invisible, and marking it makes the digests exact."""
    inst = booted(tracked=True)
    memory = inst.memory
    before = memory.chunk_hashes()[0]
    memory.view(0)[CHUNK * 7] = 0xAB  # no mark
    assert np.array_equal(memory.chunk_hashes()[0], before)
    memory.mark_written(CHUNK * 7, 1)
    after = memory.chunk_hashes()[0]
    assert np.array_equal(after, truth(memory))
    assert np.flatnonzero(after != before).tolist() == [7]
    assert inst.marks() == []  # a sync clears the marks it consumed

    memory.grow_to(0, 3)  # new chunks are zero, and digests cover them
    memory.write(2 * PAGE + 10, b"new page")
    assert np.array_equal(memory.chunk_hashes()[0], truth(memory))


def test_untracked_digests_hash_what_was_touched() -> None:
    memory = booted(tracked=False).memory
    assert not memory.tracks_writes
    memory.view(0)[CHUNK * 5 : CHUNK * 5 + 3] = b"abc"  # no mark needed: all is hashed
    memory.grow_to(0, 4)
    memory.view(0)[3 * PAGE + 1] = 1
    assert np.array_equal(memory.chunk_hashes()[0], truth(memory))


@pytest.mark.parametrize("tracked", [True, False])
def test_dirty_chunks_are_against_boot_then_the_snapshot_base(tracked: bool) -> None:
    memory = booted(tracked=tracked).memory
    assert memory.base_hashes is None
    assert [d.tolist() for d in memory.dirty_chunks()] == [[]]
    memory.write(CHUNK * 4, b"one")
    assert [d.tolist() for d in memory.dirty_chunks()] == [[4]]
    memory.set_base(memory.chunk_hashes())
    assert [d.tolist() for d in memory.dirty_chunks()] == [[]]
    memory.write(CHUNK * 9, b"two")
    memory.write(CHUNK * 4, b"one")  # the same bytes again: not a change
    assert [d.tolist() for d in memory.dirty_chunks()] == [[9]]
    assert [d.tolist() for d in memory.dirty_chunks()] == [[9]]  # a scan changes nothing


@pytest.mark.parametrize("tracked", [True, False])
def test_snapshot_functions_move_memory_through_the_public_surface(tracked: bool) -> None:
    """What snapshot.py does with a GuestMemory: capture an overlay and a delta from one,
    apply them to a fresh one, and get the same bytes, digests and base."""
    source = booted(tracked=tracked).memory
    source.write(CHUNK * 3, b"overlay")
    source.grow_to(0, 4)
    source.write(3 * PAGE, b"grown")
    overlay, base = capture_memories(source, delta=False)
    assert overlay[0].pages == 4 and overlay[0].chunk_ids.tolist() == [3, 48]
    source.set_base(base)
    source.write(CHUNK * 3, b"delta!!")
    delta, _ = capture_memories(source, delta=True)
    assert delta[0].chunk_ids.tolist() == [3]

    dest = booted(tracked=tracked).memory
    apply_memories(dest, snapshot_of(overlay, "overlay"))
    apply_memories(dest, snapshot_of(delta, "delta"))
    assert bytes(dest.view(0)) == bytes(source.view(0))
    assert np.array_equal(dest.chunk_hashes()[0], truth(source))
    assert [d.tolist() for d in dest.dirty_chunks()] == [[]]  # the applied state is the base


def snapshot_of(memories: tuple[MemoryState, ...], kind: str) -> Snapshot:
    """A snapshot with these memories (the rest is not what `apply_memories` reads)."""
    return Snapshot(image_digest="0" * 64, kind=kind, base_id=None if kind == "overlay" else "b",
                    seq=0, limits=VMLimits(), fuel_used=0, host={}, globals={},
                    memories=memories)


def test_a_delta_needs_a_base() -> None:
    with pytest.raises(VMError, match="earlier snapshot"):
        capture_memories(booted(tracked=True).memory, delta=True)


def test_prefault_touches_every_page_once_without_changing_bytes() -> None:
    memory = Instance(tracked=False).memory
    memory.grow_to(0, 4)
    before = bytes(memory.view(0))
    steps = 0
    while memory.prefault(PAGE):
        steps += 1
    assert steps == 3  # four pages, one per step, the last one returns False
    assert not memory.prefault(PAGE)
    assert bytes(memory.view(0)) == before
    touched = chunks.pagemap().touched(
        np.frombuffer(memory.view(0), np.uint8).ctypes.data, 4 * PAGE)
    if touched is not None:  # pagemap readable here: every page is now present
        assert touched.all()


def test_host_functions_see_memory_0_and_mark_their_writes() -> None:
    inst = booted(tracked=True)
    host = HostState()
    inst.memory.serve(host)
    assert host.view is not None and host.on_write is not None
    view = host.view()
    assert bytes(view[100:114]) == b"pristine bytes"
    view[CHUNK * 6] = 1
    host.on_write(CHUNK * 6, 1)
    assert inst.marks() == [6]


def test_hooks_hold_the_memory_weakly() -> None:
    """A store keeps its HostState until it dies: hooks holding the memory strongly
    would keep the memory (and the store it holds) alive forever."""
    inst = booted(tracked=True)
    host = HostState()
    inst.memory.serve(host)
    ref = weakref.ref(inst.memory)
    del inst
    gc.collect()
    assert ref() is None
    assert host.view is not None
    with pytest.raises(VMFailed, match="gone"):
        host.view()


def test_a_view_outlives_close() -> None:
    inst = Instance(tracked=True)
    view = inst.memory.view(0)
    inst.memory.close()
    del inst
    gc.collect()
    assert bytes(view[100:114]) == b"pristine bytes"  # the view keeps the store mapped


def test_closed_memory_has_nothing_to_hash() -> None:
    memory = Instance(tracked=False).memory
    memory.close()
    assert memory.count == 0 and memory.total_bytes == 0
    assert len(memory.host_view()) == 0
    with pytest.raises(VMFailed, match="closed"):
        memory.chunk_hashes()
