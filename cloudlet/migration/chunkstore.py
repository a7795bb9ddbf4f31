"""A cloudlet's content-addressed chunk store: digest -> 4 KiB of chunk content.

Why: a destination that already holds a chunk's content (another VM of the same
image, the same VM migrated away earlier, a library page every guest shares)
need not receive it again. The store is shared by every VM and image on a
cloudlet; migration negotiates over it (the source offers digests, the
destination answers which it holds) and sends references for the rest.

Why SHA-256 (truncated to 128 bits) and not the VMs' xxh3 chunk digests: the
store is shared between tenants, and xxh3 is not collision resistant. A guest
could craft a chunk with the xxh3 digest of a common chunk, and once stored,
every later VM migrating that common chunk would receive the guest's forgery.
A cryptographic digest rules that out for ~2.3 us per chunk (37 ms for a full
64 MiB overlay, paid in round 0 while the VM keeps serving). The destination
computes digests itself from the content it receives, never trusting the peer's.

Bounded by bytes, least recently used out first. Eviction never breaks a
migration in flight: a migration keeps its own references to the chunk bytes it
relies on (bytes are immutable, so that costs no copy).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from cloudlet.errors import InvalidArgument
from cloudlet.migration.messages import DIGEST_BYTES
from cloudlet.vm import VM, Image, chunks

DEFAULT_CAPACITY_BYTES = 256 << 20  # room for a few guests' distinct chunks
ZERO_CHUNK = bytes(chunks.CHUNK_BYTES)


def chunk_digest(chunk: bytes | memoryview) -> bytes:
    """The content address of one chunk."""
    return hashlib.sha256(chunk).digest()[:DIGEST_BYTES]


def chunk_digests(data: bytes | memoryview) -> list[bytes]:
    """Digests of a concatenation of whole chunks, in order."""
    view = memoryview(data)
    step = chunks.CHUNK_BYTES
    sha = hashlib.sha256
    return [sha(view[o : o + step]).digest()[:DIGEST_BYTES] for o in range(0, len(view), step)]


class ChunkStore:
    """digest -> chunk bytes; bounded (LRU). Not thread-safe: use it from one thread."""

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        if capacity_bytes < 0:
            raise InvalidArgument("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, digest: object) -> bool:
        return digest in self._chunks

    @property
    def size_bytes(self) -> int:
        return len(self._chunks) * chunks.CHUNK_BYTES

    def get(self, digest: bytes) -> bytes | None:
        chunk = self._chunks.get(digest)
        if chunk is not None:
            self._chunks.move_to_end(digest)
        return chunk

    def put(self, digest: bytes, chunk: bytes) -> None:
        """Keep `chunk` under `digest` (the caller computed it with `chunk_digest`)."""
        if len(chunk) != chunks.CHUNK_BYTES or chunk == ZERO_CHUNK:
            return  # zero chunks are named by index everywhere, never stored
        if digest in self._chunks:
            self._chunks.move_to_end(digest)
            return
        if self.capacity_bytes < chunks.CHUNK_BYTES:
            return
        self._chunks[digest] = chunk
        while len(self._chunks) * chunks.CHUNK_BYTES > self.capacity_bytes:
            self._chunks.popitem(last=False)

    def add_data(self, data: bytes | memoryview) -> int:
        """Add every non-zero chunk of a concatenation of whole chunks; returns how many."""
        view = memoryview(data)
        arr = np.frombuffer(view, dtype=np.uint8).reshape(-1, chunks.CHUNK_BYTES)
        nonzero = np.flatnonzero(arr.any(axis=1))
        step = chunks.CHUNK_BYTES
        for i in nonzero.tolist():
            chunk = bytes(view[i * step : (i + 1) * step])
            self.put(chunk_digest(chunk), chunk)
        return len(nonzero)

    def add_vm(self, vm: VM) -> int:
        """Add the non-zero chunks of a VM's memories (e.g. one just restored)."""
        return sum(self.add_data(vm.memory_view(i)) for i in range(len(vm.image.memories)))

    def add_image(self, image: Image) -> int:
        """Add an image's pristine chunks (boots a throwaway VM to read them)."""
        vm = VM.create(image, clock="virtual", random_seed=bytes(32))
        try:
            return self.add_vm(vm)
        finally:
            vm.close()

    def holds(self, digests: Iterable[bytes]) -> list[bool]:
        return [d in self._chunks for d in digests]
