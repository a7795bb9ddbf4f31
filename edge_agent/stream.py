"""How one WebSocket stream message becomes a call's request map.

Why a module of its own: the stream handler in `edge_agent/app.py` only moves
bytes; deciding what a client's bytes mean is a pure function, so it can be
tested and fuzzed without a daemon or a socket (`fuzz/stream_message.py`). The
handler then calls `parse_call` on the map, as the HTTP route does.

A message is a msgpack map `{"id", "fn", "args" | "data", "seq"?, "ack"?}`.
One over the endpoint's size cap is still read (up to twice the cap, where the
WebSocket itself stops) and becomes a stand-in that keeps only its `id`, `seq`
and `ack`: the refusal answers the client's `id` and uses up its sequence number
like any other outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from cloudlet.errors import MalformedRequest


@dataclass(frozen=True)
class StreamRequest:
    """A decoded stream message: the client's `id` (echoed in the answer) and the
    request map that `parse_call` reads."""

    req_id: Any
    body: dict[str, Any]


def decode_stream_message(raw: bytes, cap_bytes: int) -> StreamRequest:
    """The request in one binary stream message; MalformedRequest if it is not a
    msgpack map (then its id is unknown, and the answer carries `"id": None`)."""
    try:
        body = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedRequest(f"message is not msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise MalformedRequest("a message must be a msgpack map")
    req_id = body.get("id")
    if len(raw) > cap_bytes:
        body = _too_large(body, len(raw), cap_bytes)
    return StreamRequest(req_id, body)


def _too_large(body: dict[str, Any], size_bytes: int, cap_bytes: int) -> dict[str, Any]:
    """A stand-in for a call over the size cap: it keeps the call's number (so the
    refusal uses it up) and nothing else, so `parse_call` refuses it."""
    return {"seq": body.get("seq"), "ack": body.get("ack"), "fn": None,
            "too_large": f"message of {size_bytes} bytes; the cap is {cap_bytes}"}
