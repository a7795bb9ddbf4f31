"""Fuzz target: WebSocket stream messages (`GET /v1/vms/{vm}/stream`), as the
stream handler decodes them: `decode_stream_message` (msgpack map, the client's
id, the stand-in for a message over the cap), then `parse_call` and the reply
log, as for an HTTP body (see `fuzz/calls.py`). Only `CloudletError` may escape.
"""

from __future__ import annotations

import contextlib

import msgpack

from cloudlet.errors import CloudletError
from edge_agent.requests import parse_call
from edge_agent.stream import decode_stream_message
from fuzz import calls, fixtures, structure

MAX_INPUT_BYTES = 16 << 10
# Each input is decoded at the daemon's default cap (`max_request_kib`) and at one
# far below it, so that the over-the-cap path (a refusal that keeps the call's
# number) is reached by small inputs too.
CAPS_BYTES = (1 << 20, 256)
KEYS = ("id", "fn", "args", "data", "seq", "ack", "too_large")
DICTIONARY = fixtures.msgpack_dictionary(*KEYS)
MUTATOR = structure.msgpack_mutator(KEYS)


def TestOneInput(data: bytes) -> None:
    for cap_bytes in CAPS_BYTES:
        with contextlib.suppress(CloudletError):
            decoded = decode_stream_message(data, cap_bytes)
            calls.keep_answer(parse_call(decoded.body))


def seeds() -> dict[str, bytes]:
    out = {f"{name}.msgpack": msgpack.packb({"id": i, **body})
           for i, (name, body) in enumerate(calls.REQUESTS.items())}
    out["over-the-cap.msgpack"] = msgpack.packb(
        {"id": "big", "fn": "kv_set", "data": bytes(CAPS_BYTES[1]), "seq": 9, "ack": 8})
    out["string-id.msgpack"] = msgpack.packb({"id": "a", "fn": "noop", "args": []})
    out["no-id.msgpack"] = msgpack.packb({"fn": "noop"})
    out["text.bin"] = b"kv_put 1 2"
    out["deepest-id.msgpack"] = b"\x83\xa3seq\x01\xa2fn\xa1f\xa2id" + fixtures.deepest()
    return out
