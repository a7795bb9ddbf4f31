"""The daemon's exactly-once admission (edge_agent/exactly_once.py), without a VM,
a daemon or a socket: a call, the VM's applied `seq` and its reply log in, a
decision out. Each case is a row: the calls the VM applied before (and what they
answered), the call that arrives, what must be decided, and what the log keeps
after. The VM is played by the test: it runs a call by moving its `seq` on, as
`VMHost` does around the object."""

from __future__ import annotations

import ast
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from cloudlet.errors import (
    BadCall,
    CloudletError,
    MalformedRequest,
    ReplyExpired,
    RequestTooLarge,
    SequenceConflict,
    SequenceGap,
    VMTrapped,
)
from edge_agent import exactly_once
from edge_agent.exactly_once import ExactlyOnce, Refuse, Reject, Replay, Run
from edge_agent.replies import ANNEX_KEY, REPLY_BYTES_CAP, REPLY_WINDOW
from edge_agent.requests import Call

PUT = Call("kv_put", (1, 42))
GET = Call("kv_get", (1,))
SET = Call("kv_set", data=b"greeting=hello")


def numbered(call: Call, seq: int, ack: int | None = None) -> Call:
    return Call(call.fn, call.args, call.data, seq, call.refused, ack)


class FakeVM:
    """The VM's side of the protocol, as `VMHost` drives it: a call that runs moves
    `seq` on (a guest's trap too); a refusal does not, so the driver uses the
    number up when `failed` says so."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq

    def drive(self, gate: ExactlyOnce, call: Call, out: Any = 7,
              raises: CloudletError | None = None) -> dict[str, Any]:
        decision = gate.admit(call, self.seq)
        if isinstance(decision, Replay):
            return decision.answer()
        if isinstance(decision, Reject):
            raise decision.error
        if isinstance(decision, Refuse):
            self._fail(gate, call, decision.error)
        assert isinstance(decision, Run)
        self.seq += 1  # the guest ran
        if raises is not None:
            self._fail(gate, call, raises)
        return gate.applied(call, self.seq, out, durable_seq=self.seq - 1)

    def _fail(self, gate: ExactlyOnce, call: Call, error: CloudletError) -> None:
        if gate.failed(call, self.seq, error):
            self.seq += 1
        raise error


@dataclass
class Case:
    id: str
    before: list[Call]  # applied in order, each answered 7
    call: Call
    decided: type[Run | Replay | Refuse | Reject]
    error: type[CloudletError] | None = None  # of a Reject or Refuse
    kept_after: list[int] = field(default_factory=list)  # numbers the log keeps after
    details: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("unnumbered-runs-keeps-nothing", [], PUT, Run),
    Case("unnumbered-after-numbered-runs", [numbered(PUT, 1)], GET, Run, kept_after=[1]),
    Case("the-next-number-runs", [numbered(PUT, 1)], numbered(GET, 2), Run, kept_after=[1]),
    Case("the-first-number-runs", [], numbered(PUT, 1), Run),
    Case("a-duplicate-is-replayed", [numbered(PUT, 1), numbered(GET, 2)], numbered(PUT, 1),
         Replay, kept_after=[1, 2]),
    Case("a-duplicate-of-the-last-is-replayed", [numbered(PUT, 1)], numbered(PUT, 1), Replay,
         kept_after=[1]),
    Case("a-bytes-duplicate-is-replayed", [numbered(SET, 1)], numbered(SET, 1), Replay,
         kept_after=[1]),
    Case("a-gap-is-rejected", [numbered(PUT, 1)], numbered(GET, 3), Reject, SequenceGap,
         kept_after=[1], details={"expected": 2}),
    Case("a-gap-on-a-new-vm", [], numbered(GET, 5), Reject, SequenceGap,
         details={"expected": 1}),
    Case("a-different-call-under-a-used-number-conflicts", [numbered(PUT, 1)],
         numbered(GET, 1), Reject, SequenceConflict, kept_after=[1], details={"vm_seq": 1}),
    Case("different-args-under-a-used-number-conflict", [numbered(PUT, 1)],
         numbered(Call("kv_put", (1, 43)), 1), Reject, SequenceConflict, kept_after=[1]),
    Case("different-bytes-under-a-used-number-conflict", [numbered(SET, 1)],
         numbered(Call("kv_set", data=b"greeting=bye"), 1), Reject, SequenceConflict,
         kept_after=[1]),
    Case("an-acknowledged-answer-has-expired", [numbered(PUT, 1), numbered(GET, 2)],
         numbered(PUT, 1, ack=1), Reject, ReplyExpired, kept_after=[2]),
    Case("an-applied-number-never-kept-has-expired", [PUT, PUT], numbered(PUT, 1), Reject,
         ReplyExpired),
    Case("an-ack-trims-before-the-next-call-runs", [numbered(PUT, 1), numbered(GET, 2)],
         numbered(GET, 3, ack=2), Run),
    Case("an-ack-is-taken-from-a-duplicate-too", [numbered(PUT, 1), numbered(GET, 2)],
         numbered(GET, 2, ack=1), Replay, kept_after=[2]),
    Case("an-ack-is-taken-from-a-gap-too", [numbered(PUT, 1), numbered(GET, 2)],
         numbered(GET, 9, ack=1), Reject, SequenceGap, kept_after=[2]),
    Case("an-ack-is-taken-from-an-unnumbered-call", [numbered(PUT, 1)],
         Call("kv_get", (1,), ack=1), Run),
    Case("an-ack-past-the-vm-trims-only-what-exists", [numbered(PUT, 1)],
         numbered(GET, 2, ack=99), Run),
    Case("ack-zero-trims-nothing", [numbered(PUT, 1)], numbered(GET, 2, ack=0), Run,
         kept_after=[1]),
    Case("a-numbered-refusal-uses-its-number",
         [numbered(PUT, 1)], Call("5", seq=2, refused=MalformedRequest("bad fn")), Refuse,
         MalformedRequest, kept_after=[1]),
    Case("an-oversized-numbered-call-uses-its-number",
         [], Call("None", seq=1, refused=RequestTooLarge("big")), Refuse, RequestTooLarge),
    Case("a-resent-refusal-is-replayed-not-refused-again",
         [Call("5", seq=1, refused=MalformedRequest("bad fn"))],
         Call("5", seq=1, refused=MalformedRequest("bad fn")), Replay, kept_after=[1]),
    Case("a-refusal-under-a-used-number-conflicts", [numbered(PUT, 1)],
         Call("5", seq=1, refused=MalformedRequest("bad fn")), Reject, SequenceConflict,
         kept_after=[1]),
]


def applied(calls: list[Call]) -> tuple[ExactlyOnce, FakeVM]:
    gate, vm = ExactlyOnce(), FakeVM()
    for call in calls:
        with contextlib.suppress(CloudletError):  # a refusal, kept as its number's answer
            vm.drive(gate, call)
    return gate, vm


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_admission(case: Case) -> None:
    gate, vm = applied(case.before)
    seq_before = vm.seq
    decision = gate.admit(case.call, vm.seq)
    assert type(decision) is case.decided
    if isinstance(decision, Reject | Refuse):
        assert type(decision.error) is case.error
        assert decision.error.details.items() >= case.details.items()
    else:
        assert case.error is None
    assert vm.seq == seq_before, "admission alone never moves the VM"
    if not isinstance(decision, Run):
        kept = [seq for seq, _, _ in gate.to_wire()]
        assert kept == case.kept_after


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_driven_to_the_end(case: Case) -> None:
    """The whole exchange as the host drives it: what the client gets, and where the
    VM's `seq` ends. Only Run moves the VM; a numbered refusal uses its number."""
    gate, vm = applied(case.before)
    seq_before = vm.seq
    if case.decided is Run:
        reply = vm.drive(gate, case.call)
        assert reply["seq"] == seq_before + 1 and vm.seq == seq_before + 1
        kept = [seq for seq, _, _ in gate.to_wire()]
        assert kept == case.kept_after + ([case.call.seq] if case.call.seq else [])
    elif case.decided is Replay:
        first = gate.replies.get(case.call.seq or 0)
        assert first is not None
        if "error" in first[1]:
            with pytest.raises(CloudletError) as raised:
                vm.drive(gate, case.call)
            assert raised.value.to_wire() == first[1]["error"]
        else:
            assert vm.drive(gate, case.call) is first[1]  # the very answer, not a rerun
        assert vm.seq == seq_before
    else:
        assert case.error is not None
        with pytest.raises(case.error):
            vm.drive(gate, case.call)
        used_up = case.decided is Refuse and case.call.seq is not None
        assert vm.seq == seq_before + used_up


def test_an_answer_is_the_result_and_its_numbers() -> None:
    gate = ExactlyOnce()
    assert gate.applied(numbered(PUT, 1), 1, (3, 4), durable_seq=0) == {
        "result": [3, 4], "seq": 1, "durable": 0}
    assert gate.applied(numbered(SET, 2), 2, b"ok", durable_seq=1) == {
        "data": b"ok", "seq": 2, "durable": 1}
    assert gate.applied(GET, 3, 9, durable_seq=1) == {"result": 9, "seq": 3}  # no number
    assert [seq for seq, _, _ in gate.to_wire()] == [1, 2]


@pytest.mark.parametrize(("vm_seq_after", "must_consume"), [(4, True), (5, False)],
                         ids=["never-entered-the-guest", "trapped-in-the-guest"])
def test_a_failed_call_uses_its_number_once(vm_seq_after: int, must_consume: bool) -> None:
    """A refusal before the guest (the VM's seq did not move) is used up by the host;
    a trap already moved the VM's seq, so nothing more is used up."""
    gate = ExactlyOnce()
    call = numbered(Call("_initialize"), 5)
    error: CloudletError = (BadCall("runtime's") if must_consume else VMTrapped("unreachable"))
    assert gate.failed(call, vm_seq_after, error) is must_consume
    replay = gate.admit(call, 5)
    assert isinstance(replay, Replay)
    with pytest.raises(type(error)):
        replay.answer()


def test_an_unnumbered_failure_keeps_nothing() -> None:
    gate = ExactlyOnce()
    assert gate.failed(GET, 0, VMTrapped("x")) is False
    assert len(gate.replies) == 0 and gate.reply_bytes == 0


def test_reply_bytes_follow_what_is_kept() -> None:
    gate, vm = ExactlyOnce(), FakeVM()
    assert gate.reply_bytes == 0
    vm.drive(gate, numbered(SET, 1), out=b"x" * 1000)
    one = gate.reply_bytes
    assert one > 1000
    vm.drive(gate, numbered(SET, 2), out=b"y" * 1000)
    assert gate.reply_bytes > 2 * 1000 and gate.reply_bytes == 2 * one
    gate.admit(numbered(GET, 3, ack=1), vm.seq)
    assert gate.reply_bytes == one
    gate.admit(numbered(GET, 3, ack=2), vm.seq)
    assert gate.reply_bytes == 0


def test_a_lowered_cap_drops_the_oldest_answers() -> None:
    gate, vm = ExactlyOnce(), FakeVM()
    for seq in range(1, 4):
        vm.drive(gate, numbered(SET, seq), out=b"z" * 1000)
    gate.set_cap(gate.reply_bytes - 1)
    assert [seq for seq, _, _ in gate.to_wire()] == [2, 3]
    decision = gate.admit(numbered(SET, 1), vm.seq)
    assert isinstance(decision, Reject) and isinstance(decision.error, ReplyExpired)
    gate.set_cap(REPLY_BYTES_CAP * 2)
    assert gate.replies.cap_bytes == REPLY_BYTES_CAP  # never raised past the log's own


def test_past_the_window_the_oldest_answer_expires() -> None:
    gate, vm = ExactlyOnce(), FakeVM()
    for seq in range(1, REPLY_WINDOW + 2):
        vm.drive(gate, numbered(GET, seq))
    assert len(gate.replies) == REPLY_WINDOW
    first = gate.admit(numbered(GET, 1), vm.seq)
    assert isinstance(first, Reject) and isinstance(first.error, ReplyExpired)
    assert isinstance(gate.admit(numbered(GET, 2), vm.seq), Replay)


@pytest.mark.parametrize("resent", [numbered(PUT, 1), numbered(SET, 2),
                                    Call("5", seq=3, refused=MalformedRequest("bad"))],
                         ids=["numeric", "bytes", "refusal"])
def test_restored_from_a_checkpoint_a_resend_gets_the_same_answer(resent: Call) -> None:
    """The log goes into the snapshot's annex (msgpack) at every checkpoint and move;
    the restored object answers resends as the one that was running."""
    gate, vm = applied([numbered(PUT, 1), numbered(SET, 2),
                        Call("5", seq=3, refused=MalformedRequest("bad"))])
    annex = msgpack.unpackb(msgpack.packb({ANNEX_KEY: gate.to_wire()}))
    restored = ExactlyOnce.from_wire(annex[ANNEX_KEY])
    assert restored.to_wire() == gate.to_wire()
    assert restored.reply_bytes == gate.reply_bytes
    before, after = gate.admit(resent, vm.seq), restored.admit(resent, vm.seq)
    assert isinstance(before, Replay) and isinstance(after, Replay)
    assert after.reply == before.reply
    conflict = restored.admit(numbered(GET, 1), vm.seq)
    assert isinstance(conflict, Reject) and isinstance(conflict.error, SequenceConflict)
    assert isinstance(restored.admit(numbered(GET, 4), vm.seq), Run)


def test_restored_from_a_checkpoint_an_ack_still_trims() -> None:
    gate, vm = applied([numbered(PUT, 1), numbered(GET, 2)])
    restored = ExactlyOnce.from_wire(gate.to_wire())
    restored.admit(numbered(GET, 3, ack=1), vm.seq)
    assert [seq for seq, _, _ in restored.to_wire()] == [2]


@pytest.mark.parametrize("wire", [None, 5, "replies", [[1, "x", {}]], [[1, ["f"], {}]]],
                         ids=["absent", "int", "str", "bad-identity", "short-identity"])
def test_a_malformed_log_restores_empty_and_a_resend_expires(wire: Any) -> None:
    restored = ExactlyOnce.from_wire(wire)
    assert len(restored.replies) == 0 and restored.reply_bytes == 0
    decision = restored.admit(numbered(PUT, 1), 1)
    assert isinstance(decision, Reject) and isinstance(decision.error, ReplyExpired)


def test_a_checkpoint_before_the_answer_was_kept_expires_the_resend() -> None:
    """A restart from a checkpoint taken at seq 1, whose log was then empty: a resend
    of call 1 must not run again (its number is applied) and gets reply_expired."""
    restored = ExactlyOnce.from_wire([])
    decision = restored.admit(numbered(PUT, 1), 1)
    assert isinstance(decision, Reject) and isinstance(decision.error, ReplyExpired)


def test_the_object_is_pure() -> None:
    """No asyncio, no wasmtime, no sockets or files: the driver does the I/O."""
    tree = ast.parse(inspect.getsource(exactly_once))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"asyncio", "wasmtime", "aiohttp", "socket", "os", "pathlib",
                           "threading"}, imported


def test_an_ack_past_the_vm_leaves_answers_ahead_of_it() -> None:
    """A log from the wire may hold an answer numbered past the VM's seq (a peer's
    log is not believed); a client's ack never reaches past what the VM applied."""
    restored = ExactlyOnce.from_wire([[1, ["kv_put", [1, 42]], {"result": 7, "seq": 1}],
                                      [5, ["kv_get", [1]], {"result": 7, "seq": 5}]])
    restored.admit(numbered(GET, 3, ack=99), 2)
    assert [seq for seq, _, _ in restored.to_wire()] == [5]
