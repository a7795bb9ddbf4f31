"""Fuzz target: the reply log a VM carries in its snapshot's annex (and a live
migration's final message), `ReplyLog.from_wire` over msgpack-decoded bytes.

The log comes from a snapshot file or a peer, and the daemon keeps serving
from it: resends are answered from it, acknowledgments trim it, and every
checkpoint writes it back. `from_wire` promises to drop what is malformed and
never refuse a restore, so nothing may escape it at all; after it, a replay may
raise only the typed error the kept answer names, and the log must behave as one
the daemon built itself: it re-encodes, and acknowledging its newest answer
leaves it empty, at zero bytes.
"""

from __future__ import annotations

import contextlib

import msgpack

from cloudlet.errors import CloudletError
from edge_agent.exactly_once import ExactlyOnce, Replay
from edge_agent.replies import ReplyLog
from fuzz import fixtures, structure

MAX_INPUT_BYTES = 16 << 10
KEYS = ("result", "data", "seq", "durable", "error", "code", "message", "details", "expected",
        "vm_seq")
DICTIONARY = fixtures.msgpack_dictionary(*KEYS)
MUTATOR = structure.msgpack_mutator(KEYS)


def TestOneInput(data: bytes) -> None:
    try:
        # As a live migration's final message decodes it (the looser of the two
        # decoders: a snapshot body refuses integer map keys).
        wire = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return  # refused before any log is read
    log = ReplyLog.from_wire(wire)
    kept = log.to_wire()
    msgpack.packb({"replies": kept})
    gate = ExactlyOnce(log)
    for seq, identity, _ in kept:
        with contextlib.suppress(CloudletError):
            decision = gate.resent(seq, seq, identity)
            if isinstance(decision, Replay):
                msgpack.packb({**decision.answer(), "id": 1})
    if kept:
        log.acknowledge(max(seq for seq, _, _ in kept))
    assert len(log) == 0 and log.size_bytes == 0, (
        f"acknowledging every answer left {len(log)} answers, {log.size_bytes} bytes")


def seeds() -> dict[str, bytes]:
    log = ReplyLog()
    log.add(1, ["kv_put", [1, 42]], {"result": 1, "seq": 1, "durable": 0})
    log.add(2, ["kv_set", b"\x01" * 16], {"data": b"ok", "seq": 2, "durable": 1})
    log.add(3, ["kv_get", [9]], {"error": {"code": "vm_trapped", "message": "unreachable"},
                                 "seq": 3})
    log.add(4, ["kv_put", []], {"error": {"code": "sequence_gap", "message": "gap",
                                          "details": {"expected": 4}}, "seq": 4})
    log.add(5, ["add", [1.5, 2]], {"result": [3], "seq": 5, "durable": 4})
    return {
        "daemon-log.msgpack": msgpack.packb(log.to_wire()),
        "empty.msgpack": msgpack.packb([]),
        "not-a-list.msgpack": msgpack.packb({"replies": 1}),
        "short-entry.msgpack": msgpack.packb([[1, ["noop", []]]]),
        "unknown-error.msgpack": msgpack.packb(
            [[1, ["noop", []], {"error": {"code": "no_such_code", "message": 5}}]]),
        "deepest-reply.msgpack": b"\x91\x93\x01\x92\xa4noop\x90\x81\xa4data"
                                 + fixtures.deepest(b"\xc4\x00"),
    }
