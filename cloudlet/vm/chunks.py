"""Guest memory as 4 KiB chunks with 64-bit digests: the unit we hash, diff and move.

Why hashes and not a shadow copy: xxh3 over a 4 KiB chunk is memory-bound
(~0.2 us), so scanning 64 MiB costs ~3.6 ms here and 8 bytes of state per
chunk (128 KiB per 64 MiB VM), where comparing against a copy costs ~6 ms
and doubles the VM's memory. A 64-bit digest collision would hide a changed
chunk; at 2^-64 per chunk per scan that is below the rate of undetected
memory errors in the hardware itself.

Memory is always read through a zero-copy view over wasmtime's linear memory;
nothing here copies guest memory wholesale.

Never-touched memory is not read at all. Hashing a page the guest never
touched would fault it in (16,384 faults, ~30 ms, for a freshly grown 64 MiB
guest, ten times the hashing itself). Linux's /proc/self/pagemap tells, per
4 KiB page, whether it is present or swapped; an anonymous page that is neither
was never written (or was discarded) and reads as zero, so its digest is the
zero digest without looking. Where pagemap is unavailable, every chunk is hashed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

CHUNK_BYTES = 4096  # the x86/arm page: a guest's write dirties pages, so chunks match them
CHUNK_SHIFT = 12
WASM_PAGE_BYTES = 65536
CHUNKS_PER_PAGE = WASM_PAGE_BYTES // CHUNK_BYTES

Hashes = npt.NDArray[np.uint64]
ChunkIds = npt.NDArray[np.uint32]

_hash = xxhash.xxh3_64_intdigest
ZERO_CHUNK_HASH = _hash(bytes(CHUNK_BYTES))


def hash_chunks(view: memoryview) -> Hashes:
    """Digest of every chunk of `view` (whose length is a multiple of CHUNK_BYTES)."""
    n = len(view) // CHUNK_BYTES
    return np.fromiter(
        (_hash(view[i : i + CHUNK_BYTES]) for i in range(0, n * CHUNK_BYTES, CHUNK_BYTES)),
        dtype=np.uint64,
        count=n,
    )


def hash_touched_chunks(view: memoryview, touched: npt.NDArray[np.bool_]) -> Hashes:
    """Like `hash_chunks`, reading only chunks marked touched; the rest are zero."""
    n = len(view) // CHUNK_BYTES
    ids = np.flatnonzero(touched[:n])
    if len(ids) * 8 > n * 7:  # nearly all touched: the plain scan is cheaper
        return hash_chunks(view)
    out = np.full(n, ZERO_CHUNK_HASH, dtype=np.uint64)
    out[ids] = hash_chunk_ids(view, ids)
    return out


def hash_chunk_ids(view: memoryview, ids: npt.NDArray[np.intp]) -> Hashes:
    """Digests of the chunks `ids` of `view`, in that order."""
    offsets = (ids * CHUNK_BYTES).tolist()
    return np.fromiter((_hash(view[o : o + CHUNK_BYTES]) for o in offsets),
                       dtype=np.uint64, count=len(offsets))


class PageMap:
    """Which 4 KiB pages of this process's memory were ever touched (/proc/self/pagemap)."""

    _PRESENT = np.uint64(1 << 63)
    _SWAPPED = np.uint64(1 << 62)
    _ENTRY_BYTES = 8

    def __init__(self) -> None:
        self._fd: int | None = None
        if os.sysconf("SC_PAGE_SIZE") != CHUNK_BYTES:
            return  # chunks must be exactly the host's pages for the answer to be per chunk
        try:
            self._fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    @property
    def available(self) -> bool:
        return self._fd is not None

    def touched(self, addr: int, length: int) -> npt.NDArray[np.bool_] | None:
        """Per page of [addr, addr+length): present or swapped. None if unknown."""
        if self._fd is None or addr % CHUNK_BYTES:
            return None
        n = length // CHUNK_BYTES
        want = n * self._ENTRY_BYTES
        try:
            raw = os.pread(self._fd, want, (addr // CHUNK_BYTES) * self._ENTRY_BYTES)
        except OSError:
            return None
        if len(raw) != want:
            return None
        entries = np.frombuffer(raw, dtype=np.uint64)
        touched: npt.NDArray[np.bool_] = (entries & (self._PRESENT | self._SWAPPED)) != 0
        return touched


_pagemap: PageMap | None = None


def pagemap() -> PageMap:
    global _pagemap
    if _pagemap is None:
        _pagemap = PageMap()
    return _pagemap


def hash_chunk_data(data: bytes | memoryview) -> Hashes:
    """Digests of a concatenation of whole chunks (e.g. a snapshot's chunk payload)."""
    return hash_chunks(memoryview(data))


def extend_hashes(hashes: Hashes, n_chunks: int) -> Hashes:
    """`hashes` for a memory grown to `n_chunks`: new chunks are zero."""
    if len(hashes) >= n_chunks:
        return hashes[:n_chunks]
    out = np.full(n_chunks, ZERO_CHUNK_HASH, dtype=np.uint64)
    out[: len(hashes)] = hashes
    return out


def changed_chunks(current: Hashes, base: Hashes) -> tuple[ChunkIds, ChunkIds]:
    """(ids whose content must be sent, ids that are now zero) going from `base` to `current`."""
    base = extend_hashes(base, len(current))
    differ = np.flatnonzero(current != base).astype(np.uint32)
    is_zero = current[differ] == np.uint64(ZERO_CHUNK_HASH)
    return differ[~is_zero], differ[is_zero]


def as_chunk_array(view: memoryview) -> npt.NDArray[np.uint8]:
    """A zero-copy (n_chunks, CHUNK_BYTES) array over guest memory."""
    arr: Any = np.frombuffer(view, dtype=np.uint8)
    return arr.reshape(-1, CHUNK_BYTES)  # type: ignore[no-any-return]
