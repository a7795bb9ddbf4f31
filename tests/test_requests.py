"""The data plane's request parsing (edge_agent/requests.py), without a daemon:
what each body becomes, and the typed error each malformed one gets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from cloudlet.errors import MalformedRequest, RequestTooLarge
from edge_agent.requests import (
    Call,
    CreateVM,
    MoveVM,
    OversizedMessage,
    parse_call,
    parse_challenge,
    parse_create,
    parse_move,
    source_endpoint,
    unpack_map,
)
from edge_agent.stream import decode_stream_message


@pytest.mark.parametrize(("body", "call"), [
    ({"fn": "add", "args": [1, 2]}, Call("add", (1, 2))),
    ({"fn": "add", "args": [1.5], "seq": 4, "ack": 3}, Call("add", (1.5,), seq=4, ack=3)),
    ({"fn": "kv_set", "data": b"k=v", "seq": 1}, Call("kv_set", (), b"k=v", 1)),
    ({"fn": "kv_count"}, Call("kv_count")),
    ({"fn": "f", "seq": None, "ack": None}, Call("f")),
    ({"fn": "f", "id": 9, "too_large": "said the client"}, Call("f")),  # not the call's
], ids=["numeric", "numbered", "bytes", "no-args", "null-numbers", "keys-it-does-not-take"])
def test_a_call_body_is_the_call(body: dict[str, Any], call: Call) -> None:
    assert parse_call(unpack_map(msgpack.packb(body))) == call


@pytest.mark.parametrize("body", [
    {"fn": 5}, {"fn": "f", "args": [1, "x"]}, {"fn": "f", "args": [True]},
    {"fn": "f", "data": "text"}, {"args": [1]}, {"fn": "f", "args": 1},
], ids=["fn-not-str", "str-arg", "bool-arg", "str-data", "no-fn", "args-not-list"])
def test_a_malformed_call_is_refused_and_with_a_number_uses_it(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedRequest):
        parse_call(body)
    call = parse_call({**body, "seq": 7, "ack": 6})
    assert call.seq == 7 and call.ack == 6 and isinstance(call.refused, MalformedRequest)
    assert len(call.fn) <= 200


@pytest.mark.parametrize("body", [
    {"fn": "f", "seq": 0}, {"fn": "f", "seq": "1"}, {"fn": "f", "seq": True},
    {"fn": "f", "ack": -1}, {"fn": "f", "ack": 1.0},
], ids=["seq-zero", "seq-str", "seq-bool", "ack-negative", "ack-float"])
def test_bad_numbers_are_refused_outright(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedRequest):
        parse_call(body)


@pytest.mark.parametrize("raw", [b"\xc1", msgpack.packb([1]), b""],
                         ids=["not-msgpack", "not-a-map", "empty"])
def test_a_body_that_is_not_a_map_is_malformed(raw: bytes) -> None:
    for parse in (unpack_map, parse_create, parse_move):
        with pytest.raises(MalformedRequest):
            parse(raw)


def test_the_stream_marks_an_oversized_message_by_type_not_by_a_key() -> None:
    big = msgpack.packb({"id": 1, "fn": "kv_set", "data": b"x" * 200, "seq": 3, "ack": 2})
    decoded = decode_stream_message(big, 64)
    assert isinstance(decoded.body, OversizedMessage)
    assert dict(decoded.body) == {"seq": 3, "ack": 2, "fn": "kv_set"}  # its name, no data
    call = parse_call(decoded.body)
    assert isinstance(call.refused, RequestTooLarge) and call.seq == 3 and call.ack == 2
    assert call.refused.message == f"message of {len(big)} bytes; the cap is 64"
    # Under the cap, the same key sent by the client refuses nothing.
    small = decode_stream_message(msgpack.packb({"id": 2, "fn": "f", "seq": 4,
                                                 "too_large": "yes"}), 1024)
    assert parse_call(small.body) == Call("f", seq=4)


def test_an_oversized_message_with_a_bad_number_is_malformed() -> None:
    big = msgpack.packb({"fn": "f", "data": b"x" * 200, "seq": "one"})
    with pytest.raises(MalformedRequest):
        parse_call(decode_stream_message(big, 64).body)


@pytest.mark.parametrize(("body", "asked"), [
    ({"image": "ab"}, CreateVM("ab")),
    ({"image": "ab", "limits": {"memory_bytes": 65536}, "clock": "virtual"},
     CreateVM("ab", {"memory_bytes": 65536}, "virtual")),
    ({"image": "ab", "limits": None}, CreateVM("ab")),
], ids=["image", "everything", "null-limits"])
def test_a_create_body(body: dict[str, Any], asked: CreateVM) -> None:
    assert parse_create(msgpack.packb(body)) == asked


@pytest.mark.parametrize("body", [{}, {"image": 5}, {"image": "ab", "limits": [1]},
                                  {"image": "ab", "clock": True}],
                         ids=["no-image", "image-int", "limits-list", "clock-bool"])
def test_a_malformed_create_body(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedRequest):
        parse_create(msgpack.packb(body))


@pytest.mark.parametrize(("body", "asked"), [
    ({}, MoveVM()),
    ({"to": "b", "mode": "stop_and_copy"}, MoveVM("b", None, "stop_and_copy")),
    ({"endpoint": "http://x", "to": None}, MoveVM(None, "http://x")),
], ids=["empty", "to-and-mode", "endpoint"])
def test_a_move_body(body: dict[str, Any], asked: MoveVM) -> None:
    assert parse_move(msgpack.packb(body)) == asked


@pytest.mark.parametrize("body", [{"to": 1}, {"endpoint": b"x"}, {"mode": None}],
                         ids=["to-int", "endpoint-bytes", "mode-null"])
def test_a_malformed_move_body(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedRequest):
        parse_move(msgpack.packb(body))


def test_a_health_challenge() -> None:
    assert parse_challenge(None) is None
    assert parse_challenge("00" * 32) == bytes(32)
    with pytest.raises(MalformedRequest):
        parse_challenge("not hex")


@pytest.mark.parametrize(("known", "asked", "endpoint"), [
    ("https://a", "http://b", "https://a"),  # signed presence wins
    (None, "http://b", "http://b"),
], ids=["known", "asked"])
def test_a_migration_source_endpoint(known: str | None, asked: str | None,
                                     endpoint: str) -> None:
    assert source_endpoint(known, asked) == endpoint


@pytest.mark.parametrize("asked", [None, "", "ftp://b", "b:8000"])
def test_a_migration_source_must_say_where_it_is(asked: str | None) -> None:
    with pytest.raises(MalformedRequest):
        source_endpoint(None, asked)


def test_two_oversized_calls_under_one_number_conflict_as_any_two_calls_do() -> None:
    """An oversized message keeps its function's name as its identity in the reply
    log: another call under the same number is a conflict, not a replay of the
    refusal (and the conflict names the function, not None)."""
    from cloudlet.errors import SequenceConflict
    from edge_agent.exactly_once import ExactlyOnce, Refuse, Reject, Replay

    cap = 64
    big = [1] * 100

    def oversized(fn: str) -> Call:
        decoded = decode_stream_message(msgpack.packb({"id": 1, "fn": fn, "args": big,
                                                       "seq": 1}), cap)
        return parse_call(decoded.body)

    admission = ExactlyOnce()
    first = oversized("kv_set")
    decision = admission.admit(first, 0)
    assert isinstance(decision, Refuse) and isinstance(decision.error, RequestTooLarge)
    assert admission.failed(first, 0, decision.error)  # the number is used up
    again = admission.admit(oversized("kv_set"), 1)
    assert isinstance(again, Replay) and again.reply["error"]["code"] == "request_too_large"
    other = admission.admit(oversized("whatever"), 1)
    assert isinstance(other, Reject) and isinstance(other.error, SequenceConflict)
    normal = admission.admit(parse_call({"fn": "kv_get", "args": [1], "seq": 1}), 1)
    assert isinstance(normal, Reject) and "'kv_set'" in normal.error.message
