"""What a client's request means: typed request objects, parsed from the wire.

Why a module of its own: a handler in `edge_agent/app.py` should only read the
request, hand a typed object to the core and answer; deciding what a client's
bytes mean is a pure function, tested and fuzzed without a daemon or a socket
(`fuzz/call_body.py`, `fuzz/stream_message.py`). Every refusal is a typed error
with a stable code (`malformed_request`, `request_too_large`), never a bare
`KeyError` or `TypeError` from deep in a handler.

Only what the client asked for is in a request's body: a call's body is the
call (`fn`, `args` | `data`) and its exactly-once numbers (`seq`, `ack`,
docs/daemon.md). What the daemon itself concludes about a request, such as "this
stream message was over the size cap", is a field of the typed object it makes
(`OversizedMessage`), never a key added to the client's map: a client cannot
send a conclusion of the daemon.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from cloudlet import errors
from cloudlet.errors import CloudletError
from cloudlet.trust import proof
from edge_agent.replies import call_identity

_new = tuple.__new__
# Exact types: bool is an int subclass, and not a number.
NUMBERS = frozenset({int, float})


class Call(NamedTuple):
    """One call as a client asked for it. `refused` holds the reason a malformed
    request cannot run: with a sequence number, that is the call's final answer
    (it uses up its number like any other outcome).

    A named tuple rather than a frozen dataclass: as immutable, and built once per
    call on the daemon's hottest path, where a frozen dataclass's `__init__`
    (one `object.__setattr__` per field) costs several times a tuple's. `parse_call`
    builds it with `tuple.__new__`, every field given: that skips the named tuple's
    own Python-level `__new__` (0.09 against 0.22 µs)."""

    fn: str
    args: tuple[Any, ...] = ()
    data: bytes | None = None  # a bytes-in/bytes-out call when set
    seq: int | None = None
    refused: CloudletError | None = None
    ack: int | None = None  # the client has every answer up to this number

    def identity(self) -> list[Any]:
        return call_identity(self.fn, self.args, self.data)


class OversizedMessage(Mapping[str, Any]):
    """What is left of a stream message over the size cap (edge_agent/stream.py):
    its exactly-once numbers and its function's name, nothing else, so that
    `parse_call` refuses it with `request_too_large` and the refusal uses up its
    number. Read like the request map it stands for (`seq`, `ack`, `fn`); why it
    was cut is `reason`."""

    __slots__ = ("_numbers", "reason")

    def __init__(self, seq: Any, ack: Any, reason: str, fn: Any = None) -> None:
        # `fn` names the refusal in the reply log (bounded, `_name_of`), so two
        # different oversized calls under one number conflict as any two calls do.
        self._numbers = {"seq": seq, "ack": ack, "fn": fn}
        self.reason = reason

    def __getitem__(self, key: str) -> Any:
        return self._numbers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._numbers)

    def __len__(self) -> int:
        return len(self._numbers)

    def __repr__(self) -> str:
        return f"OversizedMessage({self._numbers!r}, reason={self.reason!r})"


@dataclass(frozen=True, slots=True)
class CreateVM:
    """`POST /v1/vms`: a VM of `image`, with `limits` over the node's defaults."""

    image: str
    limits: dict[str, Any] | None = None
    clock: str = "real"


@dataclass(frozen=True, slots=True)
class MoveVM:
    """`POST /v1/vms/{vm}/migrate`: to cloudlet `to` (known from presence) or to
    `endpoint` (peers and the operator only), live or by stop-and-copy."""

    to: str | None = None
    endpoint: str | None = None
    mode: str = "live"


def unpack_map(raw: bytes) -> dict[str, Any]:
    """A request body that must be a msgpack map."""
    try:
        body = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise errors.MalformedRequest(f"body is not msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise errors.MalformedRequest("body must be a msgpack map")
    return body


def _field(body: Mapping[str, Any], key: str, typ: type | tuple[type, ...],
           default: Any = ...) -> Any:
    if key not in body:
        if default is ...:
            raise errors.MalformedRequest(f"missing field {key!r}")
        return default
    value = body[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise errors.MalformedRequest(f"field {key!r} has the wrong type")
    return value


def parse_create(raw: bytes) -> CreateVM:
    """A create request from its body `{"image", "limits"?, "clock"?}`. The limits'
    values and the clock's name are checked where they are used (VMHost, VM)."""
    body = unpack_map(raw)
    return CreateVM(_field(body, "image", str), _field(body, "limits", (dict, type(None)), None),
                    _field(body, "clock", str, "real"))


def parse_move(raw: bytes) -> MoveVM:
    """A move request from its body `{"to"?, "endpoint"?, "mode"?}`. Who may name an
    endpoint, and whether the mode is one there is, the mover decides."""
    body = unpack_map(raw)
    return MoveVM(_field(body, "to", (str, type(None)), None),
                  _field(body, "endpoint", (str, type(None)), None),
                  _field(body, "mode", str, "live"))


def parse_call(body: Mapping[str, Any]) -> Call:
    """A call from its request map `{"fn", "args" | "data", "seq"?, "ack"?}`, or from
    the stand-in of a stream message over the cap (`OversizedMessage`).

    A malformed call that carries a valid sequence number is not refused here:
    it becomes a `Call` whose answer is that error, so it uses up its number like
    any other outcome (edge_agent/exactly_once.py). Keys a call does not take are
    ignored, as they always were."""
    seq, ack = body.get("seq"), body.get("ack")
    if seq is not None and (type(seq) is not int or seq < 1):
        raise errors.MalformedRequest("field 'seq' must be a positive integer")
    if ack is not None and (type(ack) is not int or ack < 0):
        raise errors.MalformedRequest("field 'ack' must be a non-negative integer")
    fn = body.get("fn")
    try:
        # `type(...) is`, not isinstance: OversizedMessage is a Mapping, and an ABC's
        # isinstance check costs more than the rest of parsing a call.
        if type(body) is OversizedMessage:
            raise errors.RequestTooLarge(body.reason)
        if type(fn) is not str:
            raise errors.MalformedRequest("field 'fn' must be a function name")
        if "data" in body:
            data = body["data"]
            if type(data) is not bytes:
                raise errors.MalformedRequest("field 'data' must be bytes")
            return _new(Call, (fn, (), data, seq, None, ack))
        args = body.get("args", [])
        if type(args) is not list:
            raise errors.MalformedRequest("args must be a list of numbers")
        for arg in args:
            if type(arg) not in NUMBERS:
                raise errors.MalformedRequest("args must be a list of numbers")
        return _new(Call, (fn, tuple(args), None, seq, None, ack))
    except (errors.MalformedRequest, errors.RequestTooLarge) as exc:
        if seq is None:
            raise
        return Call(_name_of(fn), seq=seq, refused=exc, ack=ack)


def _name_of(fn: Any) -> str:
    """A refused call's function as its identity in the reply log: the name if it is
    one, else a bounded repr (`str` of a client's value nested 1,000 deep raises
    RecursionError, and of a long one costs its whole length for 200 characters)."""
    return fn[:200] if type(fn) is str else reprlib.repr(fn)[:200]


def parse_challenge(value: str | None) -> bytes | None:
    """`GET /health?challenge=HEX`: the challenge a proof of identity answers."""
    if value is None:
        return None
    try:
        return proof.parse_challenge(value)
    except errors.TrustError as exc:
        raise errors.MalformedRequest(exc.message) from None


def source_endpoint(known: str | None, asked: str | None) -> str:
    """Where a peer migrating a VM here can be asked, in doubt, whether the migration
    committed: from its signed presence when known, else from `?endpoint=`."""
    endpoint = known or asked or ""
    if not endpoint.startswith(("http://", "https://")):
        raise errors.MalformedRequest("say where the source is: ?endpoint=URL")
    return endpoint
