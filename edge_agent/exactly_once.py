"""Exactly-once admission of one VM's calls, as a pure object.

A session numbers its calls (1, 2, 3, ...; the number a call takes is the VM's
`seq` after it) and, when a connection drops, sends the unanswered ones again
under the same numbers (edge_agent/replies.py says why). Whether a call is run,
answered from the reply log, or refused follows from three things only: the
call's number and acknowledgement, the VM's applied `seq`, and the log. This
object holds the log and makes that decision; it never runs a guest, awaits or
touches a socket or a file, so every duplicate, gap and conflict is a unit test
of a few lines (tests/test_exactly_once.py), as the migration protocol's are.

The driver (`VMHost`, edge_agent/vm_host.py) does the I/O around it, with no
await between `admit` and `applied`/`failed` (or under the VM's lock), so two
connections racing to resend one number cannot both apply it:

    decision = gate.admit(call, vm.seq)
    Run     -> run the guest, then `applied(call, vm.seq, out, durable_seq)`
               (or `failed(...)` if it raised)
    Replay  -> answer `decision.answer()`: the kept answer (a kept error is raised)
    Refuse  -> a malformed numbered call: `failed(call, vm.seq, error)`; its
               error is its answer and it uses up its number
    Reject  -> raise `decision.error` (a gap, a conflict, an answer no longer kept);
               nothing is applied or kept

The log's byte count (`reply_bytes`) is what its owner's memory quota charges
for answers (edge_agent/quotas.py), and it travels in every checkpoint and
migration (`to_wire`, `from_wire`), so a restart or a move does not turn a
resent call into a second application.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudlet.errors import (
    CloudletError,
    ReplyExpired,
    SequenceConflict,
    SequenceGap,
    error_from_wire,
)
from edge_agent.replies import REPLY_WINDOW, ReplyLog, result_size
from edge_agent.requests import Call


@dataclass(frozen=True, slots=True)
class Run:
    """Run the call: it is unnumbered, or its number is the VM's next."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The call was applied already: answer what it was answered then."""

    reply: dict[str, Any]

    def answer(self) -> dict[str, Any]:
        """The kept answer; a kept error answer is raised again, as it was the first
        time (the client gets the same class and code)."""
        if "error" in self.reply:
            raise error_from_wire(self.reply["error"])
        return self.reply


@dataclass(frozen=True, slots=True)
class Refuse:
    """A malformed call: `error` is its answer. With a number, the number is used
    up like any other outcome (`failed` keeps the answer and says so)."""

    error: CloudletError


@dataclass(frozen=True, slots=True)
class Reject:
    """Neither run nor answered from the log: a number ahead of the VM (`SequenceGap`),
    a different call under a used number (`SequenceConflict`), or an applied call
    whose answer is no longer kept (`ReplyExpired`). Nothing is applied or kept."""

    error: CloudletError


Decision = Run | Replay | Refuse | Reject
RUN = Run()  # the common case costs no allocation on the call path


class ExactlyOnce:
    """The admission of one VM's calls and the answers it keeps for resends."""

    __slots__ = ("replies",)

    def __init__(self, replies: ReplyLog | None = None) -> None:
        self.replies = replies if replies is not None else ReplyLog()

    @classmethod
    def from_wire(cls, wire: Any) -> ExactlyOnce:
        """From a snapshot's annex (a checkpoint, a migration); a malformed log only
        costs a client `reply_expired` on a resend (`ReplyLog.from_wire`)."""
        return cls(ReplyLog.from_wire(wire))

    def to_wire(self) -> list[list[Any]]:
        return self.replies.to_wire()

    @property
    def reply_bytes(self) -> int:
        """What the kept answers weigh, as the owner's memory quota counts them."""
        return self.replies.size_bytes

    def set_cap(self, cap_bytes: int) -> None:
        """Keep at most `cap_bytes` of answers (the owner's share, edge_agent/quotas.py)."""
        self.replies.set_cap(cap_bytes)

    def admit(self, call: Call, applied_seq: int) -> Decision:
        """What to do with `call` on a VM that has applied calls up to `applied_seq`.

        An acknowledgement is taken first, whatever happens to the call: the
        client has those answers, so they go (never past `applied_seq`: a client
        cannot acknowledge answers that do not exist yet)."""
        if call.ack is not None:
            self.replies.acknowledge(min(call.ack, applied_seq))
        seq = call.seq
        if seq is not None and seq != applied_seq + 1:
            return self.resent(seq, applied_seq, call.identity())
        if call.refused is not None:
            return Refuse(call.refused)
        return RUN

    def resent(self, seq: int, applied_seq: int, identity: list[Any]) -> Replay | Reject:
        """A call numbered `seq` that is not the VM's next, whose identity
        (`Call.identity`) is `identity`: answered from the log, or rejected."""
        if seq > applied_seq + 1:
            return Reject(SequenceGap(
                f"call {seq} is ahead of this VM, which takes call {applied_seq + 1} next: "
                "calls in between were never applied here", expected=applied_seq + 1))
        kept = self.replies.get(seq)
        if kept is None:
            return Reject(ReplyExpired(
                f"call {seq} was applied (the VM is at {applied_seq}), but its answer is no "
                f"longer kept (acknowledged, or past the log's caps of {REPLY_WINDOW} "
                f"answers and {self.replies.cap_bytes} bytes)"))
        kept_identity, reply = kept
        if kept_identity != identity:
            return Reject(SequenceConflict(
                f"call number {seq} was used by a different call ({kept_identity[0]!r:.60}): "
                "another client numbers calls on this VM; this call was not applied",
                vm_seq=applied_seq))
        return Replay(reply)

    def applied(self, call: Call, applied_seq: int, out: Any,
                durable_seq: int) -> dict[str, Any]:
        """The answer to a call the VM just ran, which returned `out`; kept when the
        call is numbered. `durable_seq` is the VM's last checkpointed `seq`: the
        client may forget answered calls up to it, they survive a kill -9."""
        data = call.data
        if data is not None:
            reply: dict[str, Any] = {"data": out, "seq": applied_seq}
        else:
            reply = {"result": list(out) if isinstance(out, tuple) else out,
                     "seq": applied_seq}
        if call.seq is not None:
            reply["durable"] = durable_seq
            if data is None:
                # `call.identity()` and the log's sizing, inline: every numbered call.
                fn = call.fn
                self.replies.add(call.seq, [fn, list(call.args)], reply, result_size(fn))
            else:
                self.replies.add(call.seq, call.identity(), reply)
        return reply

    def failed(self, call: Call, applied_seq: int, error: CloudletError) -> bool:
        """A call's error is its answer: with a number, it is kept like a result.
        True if the VM must use up the number itself (the call never entered the
        guest, so the VM's `seq` did not move: a refusal, an unknown function)."""
        if call.seq is None:
            return False
        self.replies.add(call.seq, call.identity(), {"error": error.to_wire(), "seq": call.seq})
        return applied_seq < call.seq
