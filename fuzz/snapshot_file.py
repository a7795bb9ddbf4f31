"""Fuzz target: snapshot files, from bytes to a restored VM.

Outside snapshots arrive at `POST /v1/vms/synthesize` (any client), `POST
/v1/peer/vms` (peers) and from disk at start-up; each goes `Snapshot.from_bytes`
(with the daemon's cap), then `VM.restore` on the image it names. Both must
refuse bad bytes with a `CloudletError`. What this target checks, per input:

- `Snapshot.from_bytes` on the input as it is;
- the same with the header's sizes and digest fixed up to match the body: else
  nearly every mutation of the body would stop at the digest check, and the
  body's decoder would never be fuzzed;
- a snapshot that decodes re-encodes to one that decodes the same;
- if it names a workload's image, restoring it (a delta on the fixed base the
  seeds were taken against), a call, and a new snapshot of the restored VM
  (the daemon checkpoints what it adopts) raise nothing but typed errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import replace
from typing import Any

import msgpack
import zstandard

from cloudlet.errors import CloudletError
from cloudlet.vm import VM, Snapshot
from cloudlet.vm.snapshot import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES
from fuzz import fixtures, structure

MAX_INPUT_BYTES = 128 << 10
# The decode cap, as the daemon's `max_snapshot_mib`, but small: a zstd body that
# expands past it must be refused, and at 1 MiB each such input stays cheap.
CAP_BYTES = 1 << 20
# Restores touch guest memory; the workloads need 2-3 pages, and a larger claim
# is a matter of the VM's limits (checked on the way), not of decoding.
RESTORE_MAX_MEMORY_BYTES = 16 << 20
KEYS = ("format", "compression", "body_bytes", "raw_bytes", "sha256", "snapshot_id", "kind",
        "base_id", "image", "vm_id", "owner", "seq", "fuel_used", "limits", "memory_bytes",
        "fuel_per_call", "deadline_ms", "host", "clock", "monotonic_ns", "virtual_ns",
        "random_key", "random_counter", "log", "log_dropped_bytes", "globals", "memories",
        "pages", "chunk_ids", "zero_ids", "data", "created_unix_ms", "annex", "replies")
DICTIONARY = [MAGIC, b"\x28\xb5\x2f\xfd", *fixtures.msgpack_dictionary(
    *KEYS, "none", "zstd", "overlay", "delta", "real", "virtual")]
_LENGTH = struct.Struct("<I")


def TestOneInput(data: bytes) -> None:
    for candidate in (data, reframed(data)):
        if candidate is None:
            continue
        try:
            snap = Snapshot.from_bytes(candidate, CAP_BYTES)
        except CloudletError:
            continue
        check_round_trip(snap)
        with contextlib.suppress(CloudletError):
            restore(snap)


def reframed(data: bytes) -> bytes | None:
    """`data` with its header's `body_bytes` and `sha256` (and for an uncompressed
    body `raw_bytes`) made true of its body; None if it has no readable header."""
    split = _split(data)
    if split is None:
        return None
    header, body = split
    header["body_bytes"] = len(body)
    header["sha256"] = hashlib.sha256(body).hexdigest()
    if header.get("compression") == "none":
        header["raw_bytes"] = len(body)
    return _framed(header, body)


def body_of(data: bytes) -> bytes | None:
    """The msgpack body of a snapshot file, decompressed (for the structure-aware
    mutator); None if there is none to read."""
    split = _split(data)
    if split is None:
        return None
    header, body = split
    if header.get("compression") == "zstd":
        try:
            with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                raw: bytes = reader.read(CAP_BYTES)
        except zstandard.ZstdError:
            return None
        return raw
    return body


def file_of(body: bytes) -> bytes:
    """A well-formed snapshot file around `body`, uncompressed."""
    return _framed({"format": FORMAT_VERSION, "compression": "none", "body_bytes": len(body),
                    "raw_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}, body)


def _split(data: bytes) -> tuple[dict[Any, Any], bytes] | None:
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start or not data.startswith(MAGIC):
        return None
    (header_len,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or start + header_len > len(data):
        return None
    try:
        header = msgpack.unpackb(data[start : start + header_len])
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(header, dict):
        return None
    return header, data[start + header_len :]


def _framed(header: dict[Any, Any], body: bytes) -> bytes:
    packed: bytes = msgpack.packb(header)
    return MAGIC + _LENGTH.pack(len(packed)) + packed + body


# Half the mutations change the body's decoded value and write a well-formed file
# around it: the field checks of `from_wire` and the restore get fuzzed directly.
MUTATOR = structure.msgpack_mutator(KEYS, unwrap=body_of, wrap=file_of)


def check_round_trip(snap: Snapshot) -> None:
    """What was accepted can be written back, and reads back the same (compared as
    encodings: a NaN is not equal to itself, and a deep value is not comparable
    within Python's recursion limit)."""
    written = snap.to_bytes(compression="none")
    again = Snapshot.from_bytes(written, CAP_BYTES)
    assert again.to_bytes(compression="none") == written, "a snapshot does not read back"


def restore(snap: Snapshot) -> None:
    image = fixtures.image_by_digest(snap.image_digest)
    if image is None or snap.memory_bytes > RESTORE_MAX_MEMORY_BYTES:
        return
    if snap.kind == "delta":
        vm = VM.restore(image, fixtures.base_snapshot(image.digest), snap)
    else:
        vm = VM.restore(image, snap)
    try:
        with contextlib.suppress(CloudletError):
            vm.call("noop")
        vm.snapshot().to_bytes()
    finally:
        vm.close()


def seeds() -> dict[str, bytes]:
    """Real snapshots of every workload (overlays, zstd and not, a delta, one with
    a reply log in its annex), then damaged copies and hand-made oddities."""
    out: dict[str, bytes] = {}
    calls: dict[str, list[tuple[Any, ...]]] = {
        "kvstore": [("kv_put", 1, 10), ("kv_put", 2, 20)], "filter": [("filter_state",)],
        "vdi": [("vdi_init", 64, 48), ("vdi_click", 3, 4)], "memhog": [("hog_dirty", 3, 7)]}
    for name, todo in calls.items():
        vm = fixtures.boot(name)
        try:
            for fn, *args in todo:
                vm.call(fn, *args)
            snap = fixtures.fixed(vm.snapshot(), f"fuzz-{name}-overlay")
            out[f"{name}-overlay.snap"] = snap.to_bytes(compression="none")
            out[f"{name}-overlay-zstd.snap"] = snap.to_bytes(compression="zstd")
        finally:
            vm.close()
    image = fixtures.images()["kvstore"]
    vm = VM.restore(image, fixtures.base_snapshot(image.digest))
    try:
        vm.call("kv_put", 3, 30)
        vm.call_bytes("kv_set", b"greeting=hello")
        delta = fixtures.fixed(vm.snapshot(delta=True), "fuzz-kvstore-delta")
        out["kvstore-delta.snap"] = delta.to_bytes(compression="none")
        with_log = fixtures.fixed(vm.snapshot(), "fuzz-kvstore-annex")
    finally:
        vm.close()
    annex = {"replies": [[1, ["kv_put", [3, 30]], {"result": 1, "seq": 1, "durable": 0}],
                         [2, ["kv_get", [9]], {"error": {"code": "vm_trapped", "message": "x"},
                                               "seq": 2}]]}
    out["kvstore-annex.snap"] = replace(with_log, annex=annex).to_bytes(compression="none")
    for name in ("kvstore-overlay.snap", "memhog-overlay-zstd.snap"):
        out.update(fixtures.damaged(name, out[name]))
    body = b"\x81\xa4kind\xa7overlay"
    header = msgpack.packb({"format": 1, "compression": "none", "body_bytes": len(body),
                            "raw_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})
    out["missing-fields.snap"] = MAGIC + _LENGTH.pack(len(header)) + header + body
    # 64 MiB of zeros in a frame that does not say its size, claiming 64 bytes.
    stream = zstandard.ZstdCompressor().compressobj()
    bomb = stream.compress(bytes(64 << 20)) + stream.flush()
    header = msgpack.packb({"format": 1, "compression": "zstd", "body_bytes": len(bomb),
                            "raw_bytes": 64, "sha256": hashlib.sha256(bomb).hexdigest()})
    out["zstd-bomb.snap"] = MAGIC + _LENGTH.pack(len(header)) + header + bomb
    header = msgpack.packb({"format": 2})
    out["version-2.snap"] = MAGIC + _LENGTH.pack(len(header)) + header
    return out
