"""A VM's guest memory: its linear memories, what changed in them, and their digests.

The VM runs calls; snapshots read and rewrite state between them. Both need the
same things of memory (zero-copy views, growth, the chunk digests a snapshot
diffs against, write tracking that stays exact when the host writes), so they
live here, in one object with a public surface, rather than as the VM's private
state that snapshot code reaches into.

Dirty detection has two modes. An image instrumented with a dirty bitmap (see
`write_tracking.py`) marks every chunk of memory 0 the guest writes; digests
are then kept as of the last sync and only marked chunks are rehashed. Without
the bitmap (or for other memories) every touched page is hashed; the kernel's
pagemap says which pages were never touched.

The memories belong to a wasmtime store; a view handed out keeps that store
alive, so no view ever reads unmapped memory after the VM closed.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import wasmtime

from cloudlet.errors import BadCall, VMFailed, VMMemoryLimit
from cloudlet.vm import chunks, fastcall
from cloudlet.vm.hostfns import HostState


@dataclass(frozen=True)
class PristineMemory:
    """A memory as its image boots: its size and chunk digests (what overlays diff against)."""

    pages: int
    hashes: chunks.Hashes


class GuestMemory:
    """The linear memories of one store, with dirty tracking and the snapshot base.

    Built empty with its store; `attach` adds the memories once the instance
    exists. Not thread-safe, like the VM that owns it.
    """

    def __init__(self, store: wasmtime.Store, pristine: tuple[PristineMemory, ...]) -> None:
        self._store: wasmtime.Store | None = store
        self._ctx = fastcall.context_of(store)
        self.pristine = pristine
        self._memories: list[Any] = []
        self._views: list[tuple[int, int, memoryview] | None] = []
        # Write tracking: the bitmap memory, and the digests of memory 0 as of the
        # last sync; marked chunks are rehashed on the next one.
        self._dirty_bitmap: Any = None
        self._tracked_hashes: chunks.Hashes | None = None
        # Chunk digests at the last snapshot (or restore): the base of `dirty_chunks`.
        self._base_hashes: list[chunks.Hashes] | None = None
        self._prefaulted_bytes = 0  # of memory 0, by `prefault`

    def attach(self, memories: list[Any], dirty_bitmap: Any | None) -> None:
        """Take the instance's raw memories (in image order) and its dirty bitmap, if any."""
        self._memories = list(memories)
        self._views = [None] * len(self._memories)
        self._dirty_bitmap = dirty_bitmap

    def serve(self, host: HostState) -> None:
        """Give `host`'s functions memory 0 to read and write, and the hook that keeps
        their writes in dirty tracking.

        wasmtime keeps a store's data (the HostState) in a process-wide table until
        the store dies; hooks holding this object strongly would keep it, and so the
        store, alive forever. They hold it weakly instead.
        """
        self_ref = weakref.ref(self)
        host.view = lambda: _live(self_ref).host_view()
        host.on_write = lambda offset, length: _live(self_ref).mark_written(offset, length)

    def close(self) -> None:
        """Forget the memories; views already handed out keep the store alive."""
        self._views = [None] * len(self._views)
        self._memories = []
        self._dirty_bitmap = None
        self._tracked_hashes = None
        self._store = None

    # --- views and sizes -------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many linear memories (0 before `attach` and after `close`)."""
        return len(self._memories)

    def view(self, index: int) -> memoryview:
        """Writable zero-copy view of memory `index`; rebuilt only after it grows (or moves).

        Writes through it escape dirty tracking unless followed by `mark_written`
        (for memory 0) or `restart_tracking`.
        """
        memory = self._memories[index]
        size = fastcall.memory_size(self._ctx, memory)
        cached = self._views[index]
        if cached is not None and cached[1] == size:
            return cached[2]
        addr = fastcall.memory_address(self._ctx, memory)
        array = (ctypes.c_ubyte * size).from_address(addr)
        # The memory lives as long as the store: a view handed out must keep the
        # store alive, or reading it after close() would touch unmapped memory.
        array.owner_store = self._store  # type: ignore[attr-defined]
        view = memoryview(array).cast("B")
        self._views[index] = (addr, size, view)
        return view

    def host_view(self) -> memoryview:
        """Memory 0, or an empty view for an image without memory (host functions' view)."""
        return self.view(0) if self._memories else memoryview(b"")

    def size_bytes(self, index: int) -> int:
        return fastcall.memory_size(self._ctx, self._memories[index])

    def pages(self, index: int) -> int:
        return self.size_bytes(index) // chunks.WASM_PAGE_BYTES

    @property
    def total_bytes(self) -> int:
        return sum(self.size_bytes(i) for i in range(len(self._memories)))

    def write(self, offset: int, data: bytes, index: int = 0) -> None:
        """Write from the host, keeping dirty tracking exact."""
        view = self.view(index)
        if type(offset) is not int or offset < 0 or offset + len(data) > len(view):
            raise BadCall(f"write of {len(data)} bytes at {offset} is outside memory {index} "
                          f"({len(view)} bytes)")
        view[offset : offset + len(data)] = data
        if index == 0:
            self.mark_written(offset, len(data))

    def grow_to(self, index: int, pages: int) -> None:
        """Grow memory `index` to `pages` (never shrinks: callers check that first)."""
        current = self.pages(index)
        if pages < current:
            raise ValueError(f"memory {index} has {current} pages; memories cannot shrink")
        if pages == current:
            return
        error = fastcall.memory_grow(self._ctx, self._memories[index], pages - current)
        if error is not None:
            raise VMMemoryLimit(f"cannot grow memory {index} to {pages} pages within the "
                                f"VM's memory cap: {error}")

    def hint_hugepages(self, index: int) -> None:
        """Ask for transparent huge pages before writing most of a memory: first-touch
        page faults dominate restoring a big, full memory, and huge pages cut them ~5x.
        (Not for sparse writes: each huge-page fault zeroes 2 MiB.)"""
        view = self.view(index)
        cached = self._views[index]
        assert cached is not None
        _madvise_hugepage(cached[0], len(view))

    def prefault(self, max_bytes: int) -> bool:
        """Touch the next `max_bytes` of memory 0 that no one touched yet (one write
        per 4 KiB page, of the byte already there); False once all of it is."""
        view = self.view(0)
        start = self._prefaulted_bytes
        end = min(len(view), start + max_bytes)
        if start < end:
            arr = np.frombuffer(view, dtype=np.uint8)
            touched = arr[start:end:4096]
            np.bitwise_or(touched, 0, out=touched)  # a write (a plain self-copy is skipped)
            self._prefaulted_bytes = end
        return end < len(view)

    # --- write tracking ----------------------------------------------------------------

    @property
    def tracks_writes(self) -> bool:
        """Whether memory 0 has a dirty bitmap (the image was instrumented for it)."""
        return self._dirty_bitmap is not None

    def _bitmap_region(self) -> tuple[int, int]:
        """(address, length) of the dirty bitmap's bytes for memory 0's current chunks."""
        size = fastcall.memory_size(self._ctx, self._dirty_bitmap)
        addr = fastcall.memory_address(self._ctx, self._dirty_bitmap)
        return addr, min(size, self.size_bytes(0) // chunks.CHUNK_BYTES)

    def _bitmap(self) -> npt.NDArray[np.uint8]:
        """The dirty bitmap as a writable array, one byte per chunk of memory 0."""
        addr, n = self._bitmap_region()
        arr: npt.NDArray[np.uint8] = np.ctypeslib.as_array(
            (ctypes.c_uint8 * n).from_address(addr))
        return arr

    def mark_written(self, offset: int, length: int) -> None:
        """Record a host write into memory 0 (a no-op without write tracking)."""
        if self._dirty_bitmap is None or length <= 0:
            return
        first = offset >> chunks.CHUNK_SHIFT
        last = (offset + length - 1) >> chunks.CHUNK_SHIFT
        self._bitmap()[first : last + 1] = 1

    def restart_tracking(self, hashes: list[chunks.Hashes]) -> None:
        """After memory was written wholesale (boot, restore): the digests of every
        memory are known, so clear all marks and track from them (no-op untracked)."""
        if self._dirty_bitmap is not None:
            addr, n = self._bitmap_region()
            ctypes.memset(addr, 0, n)  # cheaper than a numpy view for the boot-time clear
            self._tracked_hashes = hashes[0]  # not copied: a sync replaces it, never writes it

    # --- digests ------------------------------------------------------------------------

    def chunk_hashes(self) -> list[chunks.Hashes]:
        """Digest of every chunk of every memory: one scan, skipping never-touched pages."""
        if self._store is None:
            raise VMFailed("guest memory is closed")
        return [self._memory_hashes(i) for i in range(len(self._memories))]

    def _memory_hashes(self, index: int) -> chunks.Hashes:
        if index == 0 and self._tracked_hashes is not None:
            return self._sync_tracked_hashes()
        view = self.view(index)
        cached = self._views[index]
        assert cached is not None
        touched = chunks.pagemap().touched(cached[0], len(view))
        if touched is None:
            return chunks.hash_chunks(view)
        # The boot image is a copy-on-write file mapping: its untouched pages are not
        # zero, so the pristine region is always hashed.
        if index < len(self.pristine):
            touched[: self.pristine[index].pages * chunks.CHUNKS_PER_PAGE] = True
        else:
            touched[:] = True
        return chunks.hash_touched_chunks(view, touched)

    def _sync_tracked_hashes(self) -> chunks.Hashes:
        """Digests of memory 0 from the bitmap: rehash only the chunks marked since the
        last sync (new chunks from growth are zero), then clear their marks."""
        assert self._tracked_hashes is not None
        view = self.view(0)
        n = len(view) // chunks.CHUNK_BYTES
        hashes = chunks.extend_hashes(self._tracked_hashes, n).copy()
        bitmap = self._bitmap()
        marked = np.flatnonzero(bitmap)
        if len(marked):
            hashes[marked] = chunks.hash_chunk_ids(view, marked)
            bitmap[marked] = 0
        self._tracked_hashes = hashes
        return hashes.copy()  # callers keep theirs; ours changes on the next sync

    @property
    def pristine_hashes(self) -> list[chunks.Hashes]:
        """The image's boot-state digests: what an overlay is taken against."""
        return [p.hashes for p in self.pristine]

    @property
    def base_hashes(self) -> list[chunks.Hashes] | None:
        """Digests at the last snapshot or restore (what a delta is taken against)."""
        return self._base_hashes

    def set_base(self, hashes: list[chunks.Hashes]) -> None:
        """Record `hashes` (the state just captured or restored) as the snapshot base."""
        self._base_hashes = hashes

    def dirty_chunks(self) -> list[chunks.ChunkIds]:
        """Chunks written since the snapshot base, or since boot without one (one scan,
        state unchanged)."""
        base = self._base_hashes or self.pristine_hashes
        return [np.flatnonzero(h != chunks.extend_hashes(b, len(h))).astype(np.uint32)
                for h, b in zip(self.chunk_hashes(), base, strict=True)]


def _live(ref: weakref.ReferenceType[GuestMemory]) -> GuestMemory:
    memory = ref()
    if memory is None:  # only reachable if a store outlives its VM mid-call
        raise VMFailed("the VM of this host call is gone")
    return memory


_MADV_HUGEPAGE = 14
_libc: Any = None


def _madvise_hugepage(addr: int, length: int) -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = 4096
    start = addr & ~(page - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + addr - start), _MADV_HUGEPAGE)
