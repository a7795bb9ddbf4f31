"""The stream's message decoding, without a daemon: what `decode_stream_message`
makes of a client's bytes (the handler in edge_agent/app.py only moves them)."""

from __future__ import annotations

import msgpack
import pytest

from cloudlet.errors import MalformedRequest, RequestTooLarge
from edge_agent.requests import parse_call
from edge_agent.stream import decode_stream_message


def test_a_call_keeps_its_id_and_body() -> None:
    body = {"id": 7, "fn": "kv_put", "args": [1, 2], "seq": 3}
    decoded = decode_stream_message(msgpack.packb(body), 1024)
    assert decoded.req_id == 7 and decoded.body == body


@pytest.mark.parametrize("raw", [b"\xc1", b"", b"\x92\x01"], ids=["not-msgpack", "empty", "list"])
def test_what_is_not_a_map_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedRequest):
        decode_stream_message(raw, 1024)


def test_over_the_cap_keeps_only_id_seq_and_ack_and_is_refused() -> None:
    raw = msgpack.packb({"id": "a", "fn": "kv_put", "data": b"x" * 100, "seq": 5, "ack": 4})
    decoded = decode_stream_message(raw, 64)
    assert decoded.req_id == "a"
    assert decoded.body["seq"] == 5 and decoded.body["ack"] == 4 and "data" not in decoded.body
    call = parse_call(decoded.body)
    assert call.seq == 5 and isinstance(call.refused, RequestTooLarge)
