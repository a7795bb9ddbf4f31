"""The migration protocol's messages and their wire encoding.

Why a module of its own: the state machines speak in these frozen dataclasses and
never see bytes, and the wire format (msgpack, with a schema version) lives in one
place, where every field of every message is checked on the way in. A malformed,
unknown or wrong-version message costs a `MigrationProtocolError`, never a crash.

Wire form: one msgpack map per message, ``{"v": SCHEMA_VERSION, "t": <type>, ...}``
with the dataclass's fields by name. Arrays (chunk ids, digests) travel as raw
little-endian bytes, not msgpack lists: a 64 MiB round has 16,384 ids, and a list
would cost ~10x the bytes and time.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import msgpack

from cloudlet.errors import MigrationProtocolError, MigrationVersionUnsupported

SCHEMA_VERSION = 1
DIGEST_BYTES = 16  # see chunkstore.py: SHA-256 truncated to 128 bits
# The largest message a peer accepts. A batch carries at most `batch_bytes` of
# chunk data (1 MiB by default) plus ids; an Offer carries 16 bytes per overlay
# chunk (16 MiB covers a full 4 GiB guest); an image is at most 16 MiB.
MAX_MESSAGE_BYTES = 32 << 20
# Ids a peer sends become file names where they arrive (`STATE/incoming/<migration>`,
# `STATE/vms/<vm>.snap`): letters, digits, '-' and '_' only, so never a path
# separator, never '..', never an absolute path. Ours are 16 hex digits.
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_safe_id(value: object) -> bool:
    """True if `value` may name a file: see `SAFE_ID`."""
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    migration_id: str


@dataclass(frozen=True)
class Offer(Message):
    """Source -> destination: what would move, and the digests of the overlay's chunks
    (unique, non-zero), so the destination can say which it already holds."""

    TYPE: ClassVar[str] = "offer"
    vm_id: str
    owner: str | None
    image_digest: str
    memory_bytes: int  # the VM's memory size now (for the destination's admission)
    overlay_bytes: int  # the overlay's chunk data, before any dedup or compression
    digests: bytes  # DIGEST_BYTES each
    # The source may pass its commit point as it sends `Final`, before `Ready` (its
    # decision keeps the final round, and every earlier round is durable here by
    # then): from the first round on, a destination that loses the source must ask
    # it, never discard on its own. False from a source that decides at `Ready`.
    decides_at_final: bool = False


@dataclass(frozen=True)
class Accept(Message):
    """Destination -> source: whether it holds the image, and a bitmap (numpy
    `packbits`, big-endian bit order) over `Offer.digests` of the chunks it holds."""

    TYPE: ClassVar[str] = "accept"
    has_image: bool
    held: bytes


@dataclass(frozen=True)
class ImageData(Message):
    """Source -> destination, only if the destination lacks the image: its module."""

    TYPE: ClassVar[str] = "image"
    wasm: bytes


@dataclass(frozen=True)
class Chunks(Message):
    """Source -> destination: one batch of a round, for one memory.

    `data_ids` have their content in `payload` (after decompression, 4 KiB each, in
    order); `ref_ids` name content the destination holds, by digest; `zero_ids`
    are all-zero now. Ids are little-endian u32 chunk indexes.
    """

    TYPE: ClassVar[str] = "chunks"
    round: int
    batch: int
    memory: int
    data_ids: bytes
    ref_ids: bytes
    ref_digests: bytes
    zero_ids: bytes
    compression: str  # "none" or "zstd"
    payload: bytes


ROUND_END_BATCH = (1 << 31) - 1


@dataclass(frozen=True)
class Ack(Message):
    """Destination -> source: batch `batch` of round `round` is applied; with `batch`
    ROUND_END_BATCH, the whole round is applied and durable at the destination (the
    source starts no next round, and above all no stop-and-copy, before that: the
    destination's restore and its disk write must not land inside the downtime)."""

    TYPE: ClassVar[str] = "ack"
    round: int
    batch: int


@dataclass(frozen=True)
class RoundEnd(Message):
    """Source -> destination: a pre-copy round is complete. Carries the rest of the
    VM's state as of the round's capture, so the destination can keep a restored
    copy current round by round and the stop-and-copy round has little left to do."""

    TYPE: ClassVar[str] = "round_end"
    round: int
    batches: int
    pages: list[int]
    seq: int
    fuel_used: int
    limits: dict[str, Any]
    globals: dict[str, int | float]
    host: dict[str, Any]


@dataclass(frozen=True)
class Final(RoundEnd):
    """Source -> destination: the end of the stop-and-copy round (taken with the VM
    paused), with the source driver's opaque annex for the destination's driver."""

    TYPE: ClassVar[str] = "final"
    annex: dict[str, Any] = field(default_factory=dict)
    # The source keeps this round durable with its decision (and serves it to this
    # destination if it loses its copy): the destination may then write its own
    # after the landing instead of before `Ready`. False from a source that does not.
    source_keeps: bool = False


@dataclass(frozen=True)
class Ready(Message):
    """Destination -> source: the VM is restored and held, not serving yet."""

    TYPE: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Commit(Message):
    """Source -> destination: the commit point has passed (at `Ready`, or already
    at `Final` for a source that `decides_at_final`); serve the VM."""

    TYPE: ClassVar[str] = "commit"


@dataclass(frozen=True)
class Abort(Message):
    """Either way, before the commit: stop; the VM stays (or resumes) at the source.
    A destination whose source may have passed its commit point already says so
    and asks the source instead of discarding; a source past it ignores one."""

    TYPE: ClassVar[str] = "abort"
    code: str
    reason: str


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Offer, Accept, ImageData, Chunks, Ack, RoundEnd, Final, Ready, Commit, Abort)
}


def encode(msg: Message) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "t": msg.TYPE}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode(data: bytes | bytearray | memoryview,
           max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """The message in `data`, every field type-checked; else MigrationProtocolError."""
    if len(data) > max_bytes:
        raise MigrationProtocolError(f"message of {len(data)} bytes; the limit is {max_bytes}")
    try:
        # Integer keys are allowed: the annex (a reply cache) is keyed by sequence number.
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MigrationProtocolError(f"message is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise MigrationProtocolError("message is not a map")
    version = body.pop("v", None)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise MigrationVersionUnsupported(
            # reprlib: repr of a peer's value nested 1,000 deep raises RecursionError.
            f"migration schema version {reprlib.repr(version)}; this Cloudlet speaks "
            f"{SCHEMA_VERSION}")
    kind = body.pop("t", None)
    cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None  # not str(kind): any value
    if cls is None:
        raise MigrationProtocolError("unknown message type")
    kwargs: dict[str, Any] = {}
    for name, optional, fits in _field_checks(cls):
        if name not in body:
            if optional:
                continue
            raise MigrationProtocolError(f"{cls.TYPE}: field {name!r} is missing")
        value = body.pop(name)
        if not fits(value):
            raise MigrationProtocolError(f"{cls.TYPE}: field {name!r} has the wrong type")
        kwargs[name] = value
    if body:
        raise MigrationProtocolError(f"{cls.TYPE}: unknown fields {sorted(map(str, body))}")
    return cls(**kwargs)


Check = Callable[[Any], bool]
_FIELD_CHECKS: dict[type, tuple[tuple[str, bool, Check], ...]] = {}


def _field_checks(cls: type) -> tuple[tuple[str, bool, Check], ...]:
    """Each field's name, whether it may be left out, and its wire check; built once
    per message type. Why: walking `typing`'s objects for every field of every
    message cost ~40% of decoding a `final` (~0.1 ms), on the migration's pause."""
    checks = _FIELD_CHECKS.get(cls)
    if checks is None:
        hints = get_type_hints(cls)
        checks = _FIELD_CHECKS[cls] = tuple(
            (f.name,
             f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
             _check_of(hints[f.name]))
            for f in dataclasses.fields(cls))
    return checks


def _check_of(hint: Any) -> Check:
    """A shallow check of a decoded value against a field's annotation."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        arms = tuple(_check_of(arm) for arm in get_args(hint))
        return lambda value: any(arm(value) for arm in arms)
    if hint is type(None):
        return lambda value: value is None
    if hint is Any:
        return lambda value: True
    if hint in (int, float, str, bytes, bool):
        return lambda value: type(value) is hint
    if origin is list:
        (item,) = get_args(hint)
        item_fits = _check_of(item)
        return lambda value: isinstance(value, list) and all(item_fits(v) for v in value)
    if origin is dict:
        key, item = get_args(hint)
        key_fits, item_fits = _check_of(key), _check_of(item)
        return lambda value: isinstance(value, dict) and all(
            key_fits(k) and item_fits(v) for k, v in value.items())
    raise TypeError(f"no wire check for {hint!r}")  # a programming error, caught by tests
