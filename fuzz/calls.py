"""What the daemon does with a decoded call before and after the VM runs it, minus
the VM: shared by the call-body and stream-message targets.

Why: a call's request map does not stop at `parse_call`. Its sequence number,
function name and arguments become the call's identity in the VM's reply log,
its refusal (if any) becomes the answer sent back and kept there, and the log
goes into every checkpoint and migration. All of that is outside bytes turned
into state, so it is fuzzed too: kept answers must encode, and a resend must be
answered from the log with the same answer or a typed error.
"""

from __future__ import annotations

from typing import Any

import msgpack

from edge_agent.exactly_once import ExactlyOnce, Replay
from edge_agent.replies import ANNEX_KEY, ReplyLog
from edge_agent.requests import Call

# Requests the seeds are made of: every field the data plane reads, each shape.
REQUESTS: dict[str, dict[str, Any]] = {
    "numeric": {"fn": "kv_put", "args": [1, 42]},
    "numeric-seq": {"fn": "kv_put", "args": [1, 42], "seq": 1},
    "numeric-seq-ack": {"fn": "kv_get", "args": [1], "seq": 7, "ack": 6},
    "float-args": {"fn": "add", "args": [1.5, -2], "seq": 2},
    "bytes": {"fn": "kv_set", "data": b"greeting=hello", "seq": 3},
    "no-args": {"fn": "kv_count"},
    "bad-fn": {"fn": 5, "seq": 4},
    "bad-args": {"fn": "kv_put", "args": [1, "x"], "seq": 5},
    "bad-data": {"fn": "kv_set", "data": "text", "seq": 6},
    "bad-seq": {"fn": "kv_put", "args": [], "seq": 0},
    "bool-arg": {"fn": "kv_put", "args": [True, 1], "seq": 8},
}


def keep_answer(call: Call) -> None:
    """The parts of `VMHost._admit`, `_answer` and `_fail` that depend on the call
    alone: the answer it gets, kept under its number, re-encoded for the wire and
    for a checkpoint, and replayed for a resend of the same call."""
    if call.seq is None:
        return
    if call.refused is not None:
        reply: dict[str, Any] = {"error": call.refused.to_wire(), "seq": call.seq}
    elif call.data is not None:
        reply = {"data": b"", "seq": call.seq, "durable": 0}
    else:
        reply = {"result": 0, "seq": call.seq, "durable": 0}
    log = ReplyLog()
    log.add(call.seq, call.identity(), reply)
    msgpack.packb({**reply, "id": 1})
    msgpack.packb({ANNEX_KEY: log.to_wire()})
    if call.ack is not None:
        log.acknowledge(min(call.ack, call.seq - 1))
    decision = ExactlyOnce(log).resent(call.seq, call.seq, call.identity())
    if isinstance(decision, Replay):
        decision.answer()
