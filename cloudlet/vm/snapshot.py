"""Snapshots: a VM's whole state between calls, as an overlay or a delta, and its wire format.

What a snapshot holds: for every memory its size and the chunks that differ
from a base (the image's pristine boot state for an overlay, the VM's previous
snapshot for a delta), with all-zero chunks named rather than sent; every
mutable global (the unexported C stack pointer included, thanks to the
instrumentation); the host-function state (clock, random generator, log); the
sequence number of the last applied call; the limits and fuel used.

Wire format (version 1)::

    b"CLDSNAP\\n" | u32 LE header length | header (msgpack) | body

The header names the format version, the compression ("none" or "zstd"), the
body's stored and raw sizes and the SHA-256 of the stored body. The body is
msgpack. Everything is checked (magic, version, sizes against a cap, digest,
then every field's type and range) before any VM is touched, so a bad file
costs an error, never a crash or a half-restored VM.

A snapshot is a value: this module knows guest memory (`GuestMemory`'s public
surface, for `capture_memories` and `apply_memories`) and an image's record,
never the VM. The VM (machine.py) captures itself into snapshots and restores
from them, so imports run one way.
"""

from __future__ import annotations

import hashlib
import reprlib
import secrets
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from cloudlet.errors import (
    InvalidArgument,
    SnapshotCorrupt,
    SnapshotImageMismatch,
    SnapshotTooLarge,
    SnapshotVersionUnsupported,
    VMError,
    VMMemoryLimit,
)
from cloudlet.fsutil import atomic_write
from cloudlet.vm import chunks
from cloudlet.vm.compiled import Image
from cloudlet.vm.hostfns import LOG_CAP_BYTES
from cloudlet.vm.limits import VMLimits
from cloudlet.vm.memory import GuestMemory

MAGIC = b"CLDSNAP\n"
FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 4096
# A wasm32 guest has at most 4 GiB of memory; the rest is globals, host state, framing.
MAX_SNAPSHOT_BYTES = (4 << 30) + (16 << 20)
# Enough of a snapshot's start to hold its magic, length and header (see `check_head`).
HEAD_BYTES = 8 + 4 + MAX_HEADER_BYTES
# Compression must pay: try zstd on a sample of the chunk data first, and keep it
# only if it saves at least this share. Level 1 compresses at ~1 GB/s here.
ZSTD_LEVEL = 1
COMPRESS_SAMPLE_BYTES = 64 * 1024
COMPRESS_MIN_SAVING = 0.10
# Fuel used is a u64 on the wire. The VM's own counter is a Python int that only
# grows, so a VM restored near the top (any value the decoder accepts) would make
# its next snapshot unencodable: captures saturate instead.
FUEL_USED_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class MemoryState:
    pages: int
    chunk_ids: chunks.ChunkIds  # ascending, their data follows in `data`
    zero_ids: chunks.ChunkIds  # ascending, all-zero chunks (not sent)
    # The chunks' content in id order: bytes, or a read-only view of a buffer of its
    # own (a capture gathers into a fresh numpy array, on huge pages: for a 256 MiB
    # guest, copying that into a `bytes` costs more than the gather).
    data: bytes | memoryview

    @property
    def size_bytes(self) -> int:
        return self.pages * chunks.WASM_PAGE_BYTES


@dataclass(frozen=True)
class Snapshot:
    image_digest: str
    kind: str  # "overlay" or "delta"
    base_id: str | None  # the snapshot a delta applies on
    seq: int
    limits: VMLimits
    fuel_used: int
    host: dict[str, Any]
    globals: dict[str, int | float]
    memories: tuple[MemoryState, ...]
    vm_id: str | None = None
    owner: str | None = None
    snapshot_id: str = field(default_factory=lambda: secrets.token_hex(16))
    created_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    # State that belongs with the VM but not to the runtime, carried verbatim: the
    # daemon keeps a VM's recent call answers here (exactly-once survives a restart
    # or a move). Any msgpack map; the VM layer never reads it.
    annex: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return sum(m.size_bytes for m in self.memories)

    @property
    def overlay_bytes(self) -> int:
        """Bytes of chunk data carried (zero chunks are named, not carried)."""
        return sum(len(m.data) for m in self.memories)

    @property
    def chunk_count(self) -> int:
        return sum(len(m.chunk_ids) for m in self.memories)

    # --- wire format ------------------------------------------------------------------

    def to_bytes(self, compression: str = "auto") -> bytes:
        return b"".join(self.to_segments(compression))

    def to_segments(self, compression: str = "auto") -> list[bytes | memoryview]:
        """The encoded snapshot as buffers to write back to back: the memories' chunk
        data is not copied (joining them is `to_bytes`; for a 256 MiB guest the
        copies cost more than the write)."""
        body = body_segments(self)
        raw_bytes = sum(len(s) for s in body)
        stored, used = _compress(body, self, compression)
        digest = hashlib.sha256()
        for segment in stored:
            digest.update(segment)
        header = msgpack.packb({
            "format": FORMAT_VERSION,
            "compression": used,
            "body_bytes": sum(len(s) for s in stored),
            "raw_bytes": raw_bytes,
            "sha256": digest.hexdigest(),
        })
        return [MAGIC, _HEADER_LEN.pack(len(header)), header, *stored]

    @classmethod
    def from_bytes(cls, data: bytes | memoryview,
                   max_bytes: int = MAX_SNAPSHOT_BYTES) -> Snapshot:
        return _parse(memoryview(data), max_bytes)

    def write(self, path: str | Path, compression: str = "auto") -> int:
        """Write atomically (write, fsync, rename); returns the file's size."""
        segments = self.to_segments(compression)
        atomic_write(path, segments)
        return sum(len(s) for s in segments)

    @classmethod
    def read(cls, path: str | Path, max_bytes: int = MAX_SNAPSHOT_BYTES) -> Snapshot:
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > max_bytes:
                raise SnapshotTooLarge(f"{p} is {size} bytes; the limit is {max_bytes}")
            data = p.read_bytes()
        except OSError as exc:
            raise SnapshotCorrupt(f"cannot read snapshot {p}: {exc.strerror}") from None
        return cls.from_bytes(data, max_bytes)


def encoded_length(data: bytes | memoryview, max_bytes: int = MAX_SNAPSHOT_BYTES) -> int | None:
    """How long the encoded snapshot at the start of `data` is, by its checked
    header; None when `data` does not start with one. For a snapshot written over
    the start of a larger, zero-filled file (a live migration's final round goes
    into a file made ahead of time, so that writing it costs no metadata)."""
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        return None
    header, start = _head(view, len(view), max_bytes)
    return start + int(header["body_bytes"])


def read_header(data: bytes | memoryview) -> dict[str, Any]:
    """The checked header of an encoded snapshot (for `cloudlet vm inspect`)."""
    header, _ = _split(memoryview(data), MAX_SNAPSHOT_BYTES)
    return header


# --- capture and apply -------------------------------------------------------------------


def capture_memories(memory: GuestMemory, *,
                     delta: bool) -> tuple[tuple[MemoryState, ...], list[chunks.Hashes]]:
    """The memories' part of a snapshot: the chunks that differ from the base (the
    last snapshot's state for a delta, the image's pristine state for an overlay),
    and the digests of every chunk now, which become the next base."""
    bases = memory.base_hashes if delta else memory.pristine_hashes
    if bases is None:
        raise VMError("a delta needs an earlier snapshot of this VM as its base")
    hashes = memory.chunk_hashes()
    memories = []
    for i, (current, base) in enumerate(zip(hashes, bases, strict=True)):
        send, zero = chunks.changed_chunks(current, base)
        data = read_only_view(chunks.as_chunk_array(memory.view(i))[send])
        memories.append(MemoryState(len(current) // chunks.CHUNKS_PER_PAGE, send, zero, data))
    return tuple(memories), hashes


def check_restorable(image: Image, snap: Snapshot) -> None:
    """Everything that could make applying `snap` to `image` fail, checked up front."""
    if snap.image_digest != image.digest:
        raise SnapshotImageMismatch(
            f"snapshot is of image {snap.image_digest[:12]}, not {image.digest[:12]}")
    if len(snap.memories) != len(image.memories):
        raise SnapshotImageMismatch(
            f"snapshot has {len(snap.memories)} memories, the image {len(image.memories)}")
    for i, (mem, info, pristine) in enumerate(
            zip(snap.memories, image.memories, image.pristine, strict=True)):
        if mem.pages < pristine.pages:
            raise SnapshotImageMismatch(
                f"memory {i} has {mem.pages} pages, fewer than the image boots with")
        if info.max_pages is not None and mem.pages > info.max_pages:
            raise SnapshotImageMismatch(f"memory {i} has {mem.pages} pages, over the image's "
                                        f"maximum of {info.max_pages}")
        n_chunks = mem.pages * chunks.CHUNKS_PER_PAGE
        for name, ids in (("chunk", mem.chunk_ids), ("zero chunk", mem.zero_ids)):
            _check_ids(ids, n_chunks, f"memory {i}: {name} ids")
        if len(mem.chunk_ids) and len(mem.zero_ids) and len(
                np.intersect1d(mem.chunk_ids, mem.zero_ids, assume_unique=True)):  # both ascending
            raise SnapshotCorrupt(f"memory {i}: a chunk is listed both with data and as zero")
        if len(mem.data) != len(mem.chunk_ids) * chunks.CHUNK_BYTES:
            raise SnapshotCorrupt(f"memory {i}: {len(mem.data)} bytes of data for "
                                  f"{len(mem.chunk_ids)} chunks")
    for i, mem in enumerate(snap.memories):  # the cap is per linear memory, as in wasmtime
        if mem.size_bytes > snap.limits.memory_bytes:
            raise VMMemoryLimit(f"snapshot's memory {i} holds {mem.size_bytes} bytes, over its "
                                f"cap of {snap.limits.memory_bytes}")
    expected = {g.export: g.valtype for g in image.globals}
    if set(snap.globals) != set(expected):
        raise SnapshotImageMismatch("snapshot's globals do not match the image's")
    for name, value in snap.globals.items():
        want_int = expected[name] in ("i32", "i64")
        if type(value) is not (int if want_int else float):
            raise SnapshotCorrupt(f"global {name} should be {expected[name]}, "
                                  f"got {reprlib.repr(value)}")  # bounded: anyone's value
        if want_int:
            bits = 32 if expected[name] == "i32" else 64
            if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
                raise SnapshotCorrupt(f"global {name} value {value} does not fit {expected[name]}")


def _check_ids(ids: chunks.ChunkIds, n_chunks: int, what: str) -> None:
    """Ids strictly ascending, none negative, all below `n_chunks`. Compared pairwise,
    not by differences (which wrap around for unsigned ids); once ascending, the
    first and last are the bounds. Few numpy calls: a final round's handful of ids
    is checked inside the pause."""
    if len(ids) and (not bool((ids[1:] > ids[:-1]).all()) or int(ids[-1]) >= n_chunks
                     or int(ids[0]) < 0):
        raise SnapshotCorrupt(f"{what} must be ascending and below {n_chunks}")


def check_applicable(image: Image, memory: GuestMemory, snap: Snapshot) -> None:
    """`check_restorable`, plus what depends on the memories' current state (for a delta)."""
    check_restorable(image, snap)
    for i, mem in enumerate(snap.memories):
        current = memory.pages(i)
        if mem.pages < current:
            raise SnapshotCorrupt(f"memory {i} has {current} pages, more than the snapshot's "
                                  f"{mem.pages}: memories cannot shrink")


def grow_memories(memory: GuestMemory, snap: Snapshot) -> None:
    """Grow every memory to `snap`'s size (checked with `check_applicable`): the step
    of applying it that can fail for want of memory, and a no-op done twice."""
    for i, mem in enumerate(snap.memories):
        memory.grow_to(i, mem.pages)


def apply_memories(memory: GuestMemory, snap: Snapshot) -> None:
    """Write `snap`'s memories into `memory`, whose state must be the snapshot's base
    (checked with `check_applicable`), and make the result the snapshot base and
    the start of write tracking. Memories are all grown before anything is
    written, so the only failure left midway is the host running out of memory."""
    if snap.kind == "overlay":
        bases = memory.pristine_hashes
    else:
        assert memory.base_hashes is not None
        bases = memory.base_hashes
    grow_memories(memory, snap)
    new_hashes = []
    for i, mem in enumerate(snap.memories):
        arr = chunks.as_chunk_array(memory.view(i))
        if len(mem.chunk_ids) * 4 > len(arr):
            memory.hint_hugepages(i)
        if len(mem.chunk_ids):
            arr[mem.chunk_ids] = np.frombuffer(mem.data, dtype=np.uint8).reshape(
                -1, chunks.CHUNK_BYTES)
        if len(mem.zero_ids):
            arr[mem.zero_ids] = 0
        hashes = chunks.extend_hashes(bases[i], len(arr)).copy()
        hashes[mem.chunk_ids] = chunks.hash_chunk_data(mem.data)
        hashes[mem.zero_ids] = chunks.ZERO_CHUNK_HASH
        new_hashes.append(hashes)
    memory.set_base(new_hashes)
    memory.restart_tracking(new_hashes)


# --- encoding -------------------------------------------------------------------------


def to_wire(s: Snapshot) -> dict[str, Any]:
    return {
        "snapshot_id": s.snapshot_id,
        "kind": s.kind,
        "base_id": s.base_id,
        "image": s.image_digest,
        "vm_id": s.vm_id,
        "owner": s.owner,
        "seq": s.seq,
        "fuel_used": s.fuel_used,
        "limits": s.limits.to_wire(),
        "host": s.host,
        "globals": s.globals,
        "memories": [
            {"pages": m.pages, "chunk_ids": m.chunk_ids.astype("<u4").tobytes(),
             "zero_ids": m.zero_ids.astype("<u4").tobytes(), "data": m.data}
            for m in s.memories
        ],
        "created_unix_ms": s.created_unix_ms,
        "annex": s.annex,
    }


def body_segments(s: Snapshot) -> list[bytes | memoryview]:
    """`msgpack.packb(to_wire(s))`, byte for byte, as segments: every memory's chunk
    data is one segment of its own (a view, not a copy) behind its bin header."""
    pack = msgpack.Packer().pack
    wire = to_wire(s)
    out: list[bytes | memoryview] = [_map_header(len(wire))]
    for key, value in wire.items():
        out.append(pack(key))
        if key != "memories":
            out.append(pack(value))
            continue
        out.append(_array_header(len(value)))
        for memory in value:
            out.append(_map_header(len(memory)))
            for field_name, field_value in memory.items():
                out.append(pack(field_name))
                if field_name == "data":
                    out += [_bin_header(len(field_value)), memoryview(field_value)]
                else:
                    out.append(pack(field_value))
    return out


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)


def _bin_header(n: int) -> bytes:
    """msgpack's own choice of bin8/16/32 for `n` bytes (so the output is packb's)."""
    if n < 1 << 8:
        return b"\xc4" + bytes([n])
    return b"\xc5" + struct.pack(">H", n) if n < 1 << 16 else b"\xc6" + struct.pack(">I", n)


def _compress(body: list[bytes | memoryview], snap: Snapshot,
              compression: str) -> tuple[list[bytes | memoryview], str]:
    if compression == "none":
        return body, "none"
    if compression not in ("auto", "zstd"):
        raise InvalidArgument("compression must be 'auto', 'zstd' or 'none'")
    if compression == "auto":
        sample = b"".join(m.data[:COMPRESS_SAMPLE_BYTES] for m in snap.memories)
        sample = sample[:COMPRESS_SAMPLE_BYTES] or b"".join(body)[:COMPRESS_SAMPLE_BYTES]
        probe = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(sample)
        if len(probe) > len(sample) * (1 - COMPRESS_MIN_SAVING):
            return body, "none"
    # One frame, fed segment by segment; its header records the content size, as
    # `compress()` would (`_decompress` checks it against the header's raw_bytes).
    stream = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(
        size=sum(len(s) for s in body))
    out: list[bytes | memoryview] = [stream.compress(segment) for segment in body]
    out.append(stream.flush())
    return [piece for piece in out if piece], "zstd"


def check_head(head: bytes | memoryview, total_bytes: int,
               max_bytes: int = MAX_SNAPSHOT_BYTES) -> dict[str, Any]:
    """The checked header of a snapshot of `total_bytes`, from its first HEAD_BYTES:
    what is not a snapshot, or is truncated or too large, is refused before anyone
    reads (or holds in memory) the rest of it."""
    header, start = _head(memoryview(head), total_bytes, max_bytes)
    if total_bytes - start != header["body_bytes"]:
        raise SnapshotCorrupt(f"snapshot is truncated: body has {total_bytes - start} of "
                              f"{header['body_bytes']} bytes")
    return header


def _head(data: memoryview, total_bytes: int, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The checked header of a snapshot of `total_bytes` whose first bytes are `data`,
    and where its body starts."""
    if total_bytes > max_bytes:
        raise SnapshotTooLarge(f"snapshot is {total_bytes} bytes; the limit is {max_bytes}")
    if len(data) < len(MAGIC) + _HEADER_LEN.size:
        raise SnapshotCorrupt("not a Cloudlet snapshot (too short)")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise SnapshotCorrupt("not a Cloudlet snapshot (bad magic)")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
        raise SnapshotCorrupt("snapshot header is truncated or corrupt")
    try:
        header = msgpack.unpackb(data[start : start + header_len])
    except (ValueError, msgpack.UnpackException) as exc:
        raise SnapshotCorrupt(f"snapshot header is corrupt: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotCorrupt("snapshot header is not a map")
    version = header.get("format")
    if type(version) is not int or version != FORMAT_VERSION:
        raise SnapshotVersionUnsupported(
            # reprlib: the value is anyone's, and repr of one nested 1,000 deep raises
            # RecursionError instead of this error.
            f"snapshot format version {reprlib.repr(version)}; this Cloudlet reads version "
            f"{FORMAT_VERSION}")
    for key, typ in (("compression", str), ("body_bytes", int), ("raw_bytes", int),
                     ("sha256", str)):
        if not isinstance(header.get(key), typ):
            raise SnapshotCorrupt(f"snapshot header field {key!r} is missing or not {typ.__name__}")
    if header["raw_bytes"] > max_bytes:
        raise SnapshotTooLarge(f"snapshot expands to {header['raw_bytes']} bytes; "
                               f"the limit is {max_bytes}")
    return header, start + header_len


def _split(data: memoryview, max_bytes: int) -> tuple[dict[str, Any], memoryview]:
    header, start = _head(data, len(data), max_bytes)
    body = data[start:]
    if len(body) != header["body_bytes"]:
        raise SnapshotCorrupt(f"snapshot is truncated: body has {len(body)} of "
                              f"{header['body_bytes']} bytes")
    return header, body


def _parse(data: memoryview, max_bytes: int) -> Snapshot:
    header, body = _split(data, max_bytes)
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise SnapshotCorrupt("snapshot digest does not match: the file is corrupted")
    if header["compression"] == "zstd":
        raw = _decompress(body, header["raw_bytes"])
    elif header["compression"] == "none":
        raw = bytes(body)
    else:
        raise SnapshotCorrupt(f"unknown compression {header['compression']!r}")
    if len(raw) != header["raw_bytes"]:
        raise SnapshotCorrupt("snapshot body has the wrong size after decompression")
    try:
        # Integer map keys are read, as written: the annex is any msgpack map, and a
        # live migration's final round carries the source's annex, decoded with them.
        d = msgpack.unpackb(raw, strict_map_key=False)
        return from_wire(d)
    except SnapshotCorrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        # Not repr(exc): msgpack's ExtraData carries the whole decoded body, and its
        # repr of a value nested 1,000 deep raises RecursionError (its str does not).
        raise SnapshotCorrupt(f"snapshot body is malformed: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None


def _decompress(body: memoryview, raw_bytes: int) -> bytes:
    """Decompress at most `raw_bytes` (+1 to detect a lie): a frame's own size claim
    is never trusted, so a small body cannot make us allocate gigabytes."""
    try:
        declared = zstandard.frame_content_size(body)
        if declared not in (-1, raw_bytes):
            raise SnapshotCorrupt(f"snapshot body expands to {declared} bytes, "
                                  f"but its header says {raw_bytes}")
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while len(out) <= raw_bytes:
                piece = reader.read(min(raw_bytes + 1 - len(out), 1 << 24))
                if not piece:
                    break
                out += piece
    except (zstandard.ZstdError, MemoryError) as exc:
        raise SnapshotCorrupt(f"snapshot body does not decompress: {exc}") from None
    return bytes(out)


def read_only_view(array: np.ndarray[Any, Any]) -> memoryview:
    """A flat, read-only byte view of a private (C-contiguous) array."""
    array = np.ascontiguousarray(array).reshape(-1)  # flat: also when it is empty
    array.flags.writeable = False
    return memoryview(array.data).cast("B")


def _want(d: Any, key: str, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise SnapshotCorrupt(f"snapshot field {key!r} is missing")
    value = d[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise SnapshotCorrupt(f"snapshot field {key!r} has the wrong type")
    return value


def _ids(raw: bytes, what: str) -> chunks.ChunkIds:
    if len(raw) % 4:
        raise SnapshotCorrupt(f"snapshot {what} is not a list of u32")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def from_wire(d: Any) -> Snapshot:
    kind = _want(d, "kind", str)
    if kind not in ("overlay", "delta"):
        raise SnapshotCorrupt(f"unknown snapshot kind {kind!r}")
    limits_d = _want(d, "limits", dict)
    try:
        limits = VMLimits.from_wire(limits_d)
    except (ValueError, KeyError) as exc:
        raise SnapshotCorrupt(f"snapshot limits are invalid: {exc}") from None
    host = _want(d, "host", dict)
    for key, typ in (("clock", str), ("monotonic_ns", int), ("virtual_ns", int),
                     ("random_key", bytes), ("random_counter", int), ("log", bytes),
                     ("log_dropped_bytes", int)):
        _want(host, key, typ)
    if (host["clock"] not in ("real", "virtual") or len(host["random_key"]) != 32
            or not 0 <= host["random_counter"] < 1 << 64 or not 0 <= host["virtual_ns"] < 1 << 64
            or not 0 <= host["monotonic_ns"] < 1 << 64 or host["log_dropped_bytes"] < 0
            or len(host["log"]) > LOG_CAP_BYTES):
        raise SnapshotCorrupt("snapshot host state is out of range")
    globals_ = _want(d, "globals", dict)
    memories = []
    for m in _want(d, "memories", list):
        pages = _want(m, "pages", int)
        if not 0 <= pages <= 65536:
            raise SnapshotCorrupt(f"memory size of {pages} pages is impossible for wasm32")
        memories.append(MemoryState(pages, _ids(_want(m, "chunk_ids", bytes), "chunk ids"),
                                    _ids(_want(m, "zero_ids", bytes), "zero ids"),
                                    _want(m, "data", (bytes, memoryview))))
    base_id = d.get("base_id")
    if kind == "delta" and not isinstance(base_id, str):
        raise SnapshotCorrupt("a delta snapshot must name its base")
    seq = _want(d, "seq", int)
    annex = d.get("annex", {})  # absent in files written before it existed
    if not isinstance(annex, dict):
        raise SnapshotCorrupt("snapshot field 'annex' has the wrong type")
    if not 0 <= seq < 1 << 63 or not 0 <= _want(d, "fuel_used", int) <= FUEL_USED_MAX:
        raise SnapshotCorrupt("sequence number or fuel used out of range")
    return Snapshot(
        image_digest=_want(d, "image", str),
        kind=kind,
        base_id=base_id,
        seq=seq,
        limits=limits,
        fuel_used=_want(d, "fuel_used", int),
        host=host,
        globals=globals_,
        memories=tuple(memories),
        vm_id=d.get("vm_id") if isinstance(d.get("vm_id"), str) else None,
        owner=d.get("owner") if isinstance(d.get("owner"), str) else None,
        snapshot_id=_want(d, "snapshot_id", str),
        created_unix_ms=_want(d, "created_unix_ms", int),
        annex=annex,
    )
