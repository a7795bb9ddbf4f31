"""The SDK's exactly-once session protocol, case by case, without a socket.

`SessionProtocol` is fed what a driver would feed it (calls, frames, the
outcomes of describing the VM and opening its stream, a clock) and every case
checks what it gives back: the frames to write, in order, the answers and typed
errors, and where it goes next. The drops, moves and rollbacks that
tests/test_sdk*.py provoke on real daemons are here one table row each.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

import mobile_client.session_events as session_events
import mobile_client.session_protocol as session_protocol
from cloudlet.errors import (
    BadCall,
    CallTimeout,
    CloudletError,
    Forbidden,
    InvalidArgument,
    NoCloudletAvailable,
    ReplyExpired,
    RequestTooLarge,
    SequenceConflict,
    SessionLost,
    Unauthorized,
    VMMoved,
    VMNotFound,
    VMTrapped,
)
from cloudlet.protocol import Location
from mobile_client.session_events import (
    NEED_DATA,
    Answer,
    Backoff,
    CallFailed,
    CloseStream,
    DescribeVM,
    DropStandby,
    Event,
    Locate,
    Lost,
    OpenStandby,
    OpenStream,
    Send,
    UseStandby,
    Vouch,
)
from mobile_client.session_protocol import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    LOCATE_AFTER_FAILURES,
    MAX_IN_FLIGHT,
    MISSING_GRACE_S,
    STABLE_STREAM_S,
    LocalProtocolError,
    Phase,
    SessionProtocol,
)

EAST = Location("east", "http://127.0.0.1:8601")
WEST = Location("west", "http://127.0.0.1:8602")
VM_ID = "vm-1"
# Events the driver must answer before asking for the next one.
ASKING = (session_events.NeedData, DescribeVM, OpenStream, UseStandby, Locate, Lost)


class Clock:
    """The protocol's injected clock: a test moves it by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


# --- frames and driving ------------------------------------------------------------------


def frame(body: Any) -> bytes:
    data: bytes = msgpack.packb(body)
    return data


def answer(seq: int, result: Any = 0, **extra: Any) -> bytes:
    return frame({"id": seq, "result": result, **extra})


def error(seq: int, code: str, **details: Any) -> bytes:
    return frame({"id": seq, "error": {"code": code, "message": f"{code}!",
                                       "details": details}})


def moved_notice(where: Location) -> bytes:
    return frame({"moved": {"node": where.node, "endpoint": where.endpoint}})


def until_asked(p: SessionProtocol) -> list[Event]:
    """Every event up to (and with) the next one that waits for the driver."""
    out: list[Event] = []
    while True:
        ev = p.next_event()
        out.append(ev)
        if isinstance(ev, ASKING):
            return out


def sent(events: list[Event]) -> list[int]:
    """The sequence numbers of the frames the events write, in order."""
    return [msgpack.unpackb(e.data)["seq"] for e in events if isinstance(e, Send)]


def delivered(events: list[Event]) -> dict[int, Any]:
    return {e.seq: e.value if isinstance(e, Answer) else e.error
            for e in events if isinstance(e, Answer | CallFailed)}


def connect(p: SessionProtocol, vm_seq: int | None = None) -> list[Event]:
    """Drive the protocol onto a stream: describe (the VM is at `vm_seq`, or at the
    session's last number), open; returns the events from the open to `NeedData`."""
    events = until_asked(p)
    if isinstance(events[-1], DescribeVM):
        p.described({"seq": p.seq if vm_seq is None else vm_seq})
        events = until_asked(p)
    assert isinstance(events[-1], OpenStream), events
    p.stream_opened()
    return until_asked(p)


def streaming(seq: int = 0, clock: Clock | None = None) -> SessionProtocol:
    p = SessionProtocol(VM_ID, EAST, seq=seq, clock=clock or Clock())
    assert connect(p) == [NEED_DATA]
    return p


def calls(p: SessionProtocol, n: int) -> list[int]:
    return [p.call("kv_put", (k, k)).seq for k in range(n)]


# --- resends -------------------------------------------------------------------------------

# (calls made, answered before the stream drops, resent on the next stream)
RESENDS = [
    (5, set(), [1, 2, 3, 4, 5]),
    (5, {2, 4}, [1, 3, 5]),
    (5, {1, 2, 3}, [4, 5]),
    (5, {1, 2, 3, 4, 5}, []),
    (1, set(), [1]),
]


@pytest.mark.parametrize(("made", "answered", "resent"), RESENDS)
def test_a_reconnect_resends_what_is_pending_in_order(made: int, answered: set[int],
                                                      resent: list[int]) -> None:
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, made)
    for seq in sorted(answered):
        p.receive_data(answer(seq, seq * 10))
    assert delivered(until_asked(p)) == {seq: seq * 10 for seq in answered}
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    events = connect(p)
    assert sent(events) == resent
    assert p.pending == tuple(resent)
    assert (p.reconnects, p.resent) == (1, len(resent))


def test_calls_made_while_resending_follow_the_resends_and_later_ones_go_out_at_once(
        ) -> None:
    p = SessionProtocol(VM_ID, EAST)
    assert [c.data for c in (p.call("a", ()), p.call("b", ()))] == [None, None]
    assert isinstance(p.next_event(), DescribeVM)
    p.described({"seq": 0})
    assert isinstance(p.next_event(), OpenStream)
    p.stream_opened()
    first = p.next_event()
    late = p.call("c", ())  # the stream is up but a resend is still queued
    assert late.data is None
    rest = until_asked(p)
    assert sent([first, *rest]) == [1, 2, 3] and rest[-1] is NEED_DATA
    now = p.call("d", ())
    assert now.data is not None and msgpack.unpackb(now.data)["seq"] == 4
    assert p.resent == 0  # a first stream sends, it does not resend


def test_resends_queued_for_a_stream_that_broke_go_out_on_the_next() -> None:
    p = SessionProtocol(VM_ID, EAST)
    calls(p, 3)
    p.next_event()
    p.described({"seq": 0})
    p.next_event()
    p.stream_opened()
    assert sent([p.next_event()]) == [1]
    p.stream_closed()  # writing call 1 failed
    events = until_asked(p)
    assert not sent(events) and CloseStream() in events
    assert isinstance(events[-1], DescribeVM)
    p.described({"seq": 0})
    until_asked(p)
    p.stream_opened()
    assert sent(until_asked(p)) == [1, 2, 3]


# --- duplicates ----------------------------------------------------------------------------

# Frames after call 1 was answered with 10: none of them reaches the application.
DUPLICATES = [
    ("the same answer again", answer(1, 10)),
    ("another answer for the same number", answer(1, 99)),
    ("an error for an answered number", error(1, "vm_trapped")),
    ("an answer for a number never used", answer(7, 70)),
    ("a number that is not an int", msgpack.packb({"id": "1", "result": 5})),
    ("a frame that is not a map", msgpack.packb([1, 10])),
    ("bytes that are not msgpack", b"\xc1\xc1"),
]


@pytest.mark.parametrize(("case", "frame"), DUPLICATES, ids=[c for c, _ in DUPLICATES])
def test_answers_for_answered_numbers_are_dropped(case: str, frame: bytes) -> None:
    p = streaming()
    calls(p, 2)
    p.receive_data(answer(1, 10))
    assert until_asked(p) == [Answer(1, 10), NEED_DATA]
    p.receive_data(frame)
    assert until_asked(p) == [NEED_DATA]
    assert p.pending == (2,) and p.acked == 1 and p.phase is Phase.STREAMING


def test_the_answer_of_a_replayed_call_is_not_delivered_twice() -> None:
    """After a reconnect the cloudlet answers resent numbers from its reply log: the
    application already had the first answer."""
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, 2)
    p.receive_data(answer(1, 10))
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    assert sent(connect(p, vm_seq=0)) == [1, 2]  # rolled back to 0: 1 from the journal
    p.receive_data(answer(1, 10))
    p.receive_data(answer(2, 20))
    assert delivered(until_asked(p)) == {2: 20}
    assert p.replayed == 1 and p.resent == 1


# --- the journal ---------------------------------------------------------------------------

# (answered, `durable` in the last answer, the journal after it)
TRIMS = [
    ([1, 2, 3, 4], None, (1, 2, 3, 4)),
    ([1, 2, 3, 4], 2, (3, 4)),
    ([1, 2, 3, 4], 4, ()),
    ([1, 2, 3, 4], 0, (1, 2, 3, 4)),
    ([4, 3, 2, 1], 3, (4,)),  # answered out of order (replays): trimmed by number
]


@pytest.mark.parametrize(("order", "durable", "journal"), TRIMS)
def test_durable_trims_the_journal(order: list[int], durable: int | None,
                                   journal: tuple[int, ...]) -> None:
    p = streaming()
    calls(p, 4)
    for seq in order[:-1]:
        p.receive_data(answer(seq))
    extra = {} if durable is None else {"durable": durable}
    p.receive_data(answer(order[-1], **extra))
    assert tuple(sorted(p.journal)) == tuple(sorted(journal))


# (answered calls, durable, pending calls, the VM's seq at the reconnect,
#  frames resent in order, or None: the session is lost)
ROLLBACKS = [
    (5, None, 2, 3, [4, 5, 6, 7]),  # lost 4 and 5: the journal has them
    (5, None, 2, 0, [1, 2, 3, 4, 5, 6, 7]),  # back to the VM's birth
    (5, None, 2, 5, [6, 7]),  # nothing lost
    (5, None, 2, 7, [6, 7]),  # it applied the pending ones: answered from its log
    (5, 3, 2, 3, [4, 5, 6, 7]),  # checkpointed at 3, came back from 3
    (5, 4, 2, 2, None),  # checkpointed 4, came back from 2: 3 and 4 are gone
    (5, 5, 0, 4, None),
    (5, 5, 0, 5, []),
]


@pytest.mark.parametrize(("answered", "durable", "waiting", "vm_seq", "resent"), ROLLBACKS)
def test_a_cloudlet_behind_the_journal_gets_it_first(
        answered: int, durable: int | None, waiting: int, vm_seq: int,
        resent: list[int] | None) -> None:
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, answered + waiting)
    for seq in range(1, answered + 1):
        checkpointed = {"durable": durable} if durable is not None and seq == answered else {}
        p.receive_data(answer(seq, seq, **checkpointed))
    until_asked(p)
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    events = connect(p, vm_seq=vm_seq) if resent is not None else []
    if resent is None:
        until_asked(p)
        p.described({"seq": vm_seq})
        until_asked(p)
        p.stream_opened()
        events = until_asked(p)
        assert isinstance(events[-1], Lost) and isinstance(events[-1].error, SessionLost)
        assert CloseStream() in events
        failed = delivered(events)
        assert sorted(failed) == list(range(answered + 1, answered + waiting + 1))
        assert all(isinstance(e, SessionLost) for e in failed.values())
        with pytest.raises(SessionLost):
            p.call("kv_get", (1,))
        return
    assert sent(events) == resent
    assert p.replayed == max(0, min(answered, answered + waiting) - vm_seq)


@pytest.mark.parametrize("bound", ["JOURNAL_MAX_CALLS", "JOURNAL_MAX_BYTES"])
def test_past_the_journal_bound_a_rollback_is_session_lost(
        bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cloudlet that never checkpoints cannot make the journal grow without end;
    the price is that a rollback past what it holds is reported, not hidden."""
    one_call_bytes = len(msgpack.packb({"fn": "kv_put", "args": [0, 0], "id": 1, "seq": 1,
                                        "ack": 0}))
    monkeypatch.setattr(session_protocol, bound, 3 if bound.endswith("CALLS")
                        else 3 * one_call_bytes + 2)
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, 5)
    for seq in range(1, 6):
        p.receive_data(answer(seq))
    assert p.journal == (3, 4, 5)
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    assert sent(connect(p, vm_seq=2)) == [3, 4, 5]  # still within the journal
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    until_asked(p)
    p.described({"seq": 1})  # 2 is no longer kept
    until_asked(p)
    p.stream_opened()
    events = until_asked(p)
    assert isinstance(events[-1], Lost) and "older checkpoint" in events[-1].error.message


# --- moves ---------------------------------------------------------------------------------


def _notice_on_the_stream(p: SessionProtocol) -> None:
    p.receive_data(moved_notice(WEST))


def _vm_moved_answer(p: SessionProtocol) -> None:
    p.receive_data(error(2, "vm_moved", node=WEST.node, endpoint=WEST.endpoint))


def _retained_location(p: SessionProtocol) -> None:
    assert p.location_noticed(WEST) is True  # the driver closes the stream it reads


def _gone_then_410(p: SessionProtocol) -> None:
    p.stream_closed()  # dropped; asked, the old cloudlet says 410 vm_moved
    assert isinstance(until_asked(p)[-1], DescribeVM)
    p.describe_failed(VMMoved("moved", node=WEST.node, endpoint=WEST.endpoint))


def _gone_then_located(p: SessionProtocol) -> None:
    p.stream_closed()  # dropped; the old cloudlet does not know it; its location does
    assert isinstance(until_asked(p)[-1], DescribeVM)
    p.describe_failed(VMNotFound("no such VM"))
    assert until_asked(p) == [Locate(VM_ID)]
    p.located(WEST)


def test_only_a_stream_the_vm_left_is_closed_without_waiting() -> None:
    """Left because the VM moved (its notice, a `vm_moved` answer), the old stream is
    closed in the background: the next stream's resends need not wait for the close
    handshake, as that place takes no more calls for the VM. Left for a gap, its
    close is waited for: the old place has then handled every call written there
    before the next stream resends them."""
    for learn in (_notice_on_the_stream, _vm_moved_answer):
        p = streaming()
        calls(p, 2)
        learn(p)
        assert CloseStream(in_background=True) in until_asked(p), learn.__name__
    p = streaming()
    calls(p, 2)
    p.receive_data(error(2, "sequence_gap", vm_seq=0))
    events = until_asked(p)
    assert CloseStream(in_background=False) in events
    assert CloseStream(in_background=True) not in events


# (how the move is learnt, whether the old cloudlet's word vouches for the new one)
MOVES: list[tuple[Callable[[SessionProtocol], None], bool]] = [
    (_notice_on_the_stream, True),
    (_vm_moved_answer, True),
    (_retained_location, False),
    (_gone_then_410, True),
    (_gone_then_located, False),
]


@pytest.mark.parametrize(("learn", "vouched"), MOVES, ids=[m.__name__ for m, _ in MOVES])
def test_a_move_reconnects_to_the_new_place_and_resends(
        learn: Callable[[SessionProtocol], None], vouched: bool) -> None:
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, 3)
    p.receive_data(answer(1, 10))
    until_asked(p)
    clock.now_s += STABLE_STREAM_S
    learn(p)
    events = until_asked(p)
    assert events[-1] == OpenStream(WEST)  # straight to the stream: no describe, no backoff
    assert (Vouch(WEST, EAST) in events) is vouched
    assert not any(isinstance(e, Backoff | DescribeVM) for e in events)
    assert p.location == WEST and p.moves_followed == 1
    p.stream_opened()
    assert sent(until_asked(p)) == [2, 3]
    assert p.pending == (2, 3)


def test_a_moved_notice_that_says_not_where_loses_the_session() -> None:
    p = streaming()
    calls(p, 1)
    p.receive_data(msgpack.packb({"moved": {"node": "west"}}))
    events = until_asked(p)
    assert isinstance(events[-1], Lost) and "not where" in events[-1].error.message
    assert isinstance(delivered(events)[1], SessionLost)


def test_a_location_noticed_while_describing_wins_over_the_old_description() -> None:
    p = SessionProtocol(VM_ID, EAST)
    assert until_asked(p) == [DescribeVM(EAST)]
    assert p.location_noticed(WEST) is False  # no stream to close
    p.described({"seq": 0})  # EAST's word, about a VM that left it
    assert until_asked(p) == [OpenStream(WEST)]


def test_a_location_noticed_that_is_the_current_one_changes_nothing() -> None:
    p = streaming()
    assert p.location_noticed(EAST) is False
    assert until_asked(p) == [NEED_DATA] and p.moves_followed == 0


# --- moving: a standby stream opened before the move commits -----------------------------


def moving_notice(where: Location | None, **extra: Any) -> bytes:
    body = None if where is None else {"vm": VM_ID, **where.to_wire(), **extra}
    return frame({"id": None, "moving": body})


def standing_by(clock: Clock | None = None) -> SessionProtocol:
    """Streaming at EAST, three calls out (1 answered), a standby up at WEST."""
    p = streaming(clock=clock)
    calls(p, 3)
    p.receive_data(answer(1, 10))
    p.receive_data(moving_notice(WEST))
    assert until_asked(p) == [Answer(1, 10), OpenStandby(WEST), NEED_DATA]
    assert p.standby is None  # asked for, not up yet
    assert p.standby_opened(WEST) is True
    assert p.standby == WEST and p.location == EAST and p.moves_followed == 0
    return p


def _moved_notice(p: SessionProtocol) -> None:
    p.receive_data(moved_notice(WEST))


def _moved_answer(p: SessionProtocol) -> None:
    p.receive_data(error(2, "vm_moved", node=WEST.node, endpoint=WEST.endpoint))


def _moved_location(p: SessionProtocol) -> None:
    assert p.location_noticed(WEST) is True


def _moved_while_away(p: SessionProtocol) -> None:
    p.stream_closed()  # dropped; asked, the old cloudlet says it moved
    assert isinstance(until_asked(p)[-1], DescribeVM)
    p.describe_failed(VMMoved("moved", node=WEST.node, endpoint=WEST.endpoint))


STANDBY_MOVES = [_moved_notice, _moved_answer, _moved_location, _moved_while_away]


@pytest.mark.parametrize("learn", STANDBY_MOVES, ids=[m.__name__ for m in STANDBY_MOVES])
def test_a_move_to_where_the_standby_is_switches_onto_it_and_resends_there(
        learn: Callable[[SessionProtocol], None]) -> None:
    """However the move is learnt, the resends go out on the stream opened while the
    VM was on its way: no connect, no describe, no backoff at the commit."""
    clock = Clock()
    p = standing_by(clock)
    clock.now_s += STABLE_STREAM_S
    learn(p)
    events = until_asked(p)
    assert events[-1] == UseStandby(WEST)
    assert not any(isinstance(e, OpenStream | DescribeVM | Backoff | DropStandby)
                   for e in events)
    assert p.location == WEST and p.moves_followed == 1 and p.standby is None
    p.stream_opened()
    assert sent(until_asked(p)) == [2, 3]
    assert (p.standby_switches, p.reconnects, p.resent) == (1, 1, 2)
    p.receive_data(answer(2, 20))
    p.receive_data(answer(3, 30))
    assert delivered(until_asked(p)) == {2: 20, 3: 30}
    assert p.call("kv_get", (1,)).data is not None  # later calls go out at once, there


def test_moving_vouches_for_nothing_the_standby_proves_its_place_itself() -> None:
    """A `moving` notice only says where to open a stream; the stream's own connect
    challenges the place before the token goes there (a `moved` vouches, as before)."""
    p = standing_by()
    p.receive_data(moving_notice(WEST))  # told again: one standby is enough
    assert until_asked(p) == [NEED_DATA]
    p.receive_data(moved_notice(WEST))
    assert Vouch(WEST, EAST) in until_asked(p)


# (a frame that is not a believable `moving` notice, the phase it arrives in)
NOT_MOVING = [
    ("a place with no node", frame({"id": None, "moving": {"endpoint": WEST.endpoint}})),
    ("an endpoint that is not http(s)", moving_notice(Location("west", "ftp://10.0.0.9"))),
    ("a node with no endpoint", frame({"id": None, "moving": {"node": "west"}})),
    ("another VM's move", moving_notice(WEST, vm="vm-2")),
    ("a notice that is not a map", frame({"id": None, "moving": ["west", WEST.endpoint]})),
    ("where it already is", moving_notice(EAST)),
    ("a call's answer that says moving", frame({"id": 1, "result": 5, "moving": WEST.to_wire()})),
]


@pytest.mark.parametrize(("case", "notice"), NOT_MOVING, ids=[c for c, _ in NOT_MOVING])
def test_a_moving_notice_that_names_no_good_place_is_ignored(case: str, notice: bytes) -> None:
    p = streaming()
    calls(p, 2)
    p.receive_data(notice)
    events = until_asked(p)
    assert not any(isinstance(e, OpenStandby | OpenStream | CloseStream) for e in events)
    assert p.location == EAST and p.standby is None and p.phase is Phase.STREAMING


def test_a_moving_notice_is_heard_only_from_the_current_stream() -> None:
    """Not while describing or opening (a frame read from a stream just left), and an
    outsider's place from a stream that is not current is never opened."""
    clock = Clock()
    p = streaming(clock=clock)
    clock.now_s += STABLE_STREAM_S
    p.stream_closed()
    assert isinstance(until_asked(p)[-1], DescribeVM)
    p.receive_data(moving_notice(Location("mallory", "http://10.6.6.6:80")))
    p.described({"seq": 0})
    assert until_asked(p) == [OpenStream(EAST)]
    p.receive_data(moving_notice(Location("mallory", "http://10.6.6.6:80")))
    p.stream_opened()
    assert until_asked(p) == [NEED_DATA] and p.standby is None


# (what ends the standby before the commit, then how the move goes)
def _aborted_by_the_source(p: SessionProtocol) -> None:
    p.receive_data(moving_notice(None))  # `moving: null`: the migration failed
    assert until_asked(p) == [DropStandby(), NEED_DATA]


def _closed_by_the_destination(p: SessionProtocol) -> None:
    p.standby_closed(WEST)  # it dropped the stream (the VM is not coming), or it died
    assert until_asked(p) == [NEED_DATA]


@pytest.mark.parametrize("end", [_aborted_by_the_source, _closed_by_the_destination],
                         ids=["moving-null", "closed-by-the-destination"])
def test_a_standby_that_ends_before_the_commit_leaves_the_session_where_it_is(
        end: Callable[[SessionProtocol], None]) -> None:
    clock = Clock()
    p = standing_by(clock)
    end(p)
    assert p.standby is None and p.location == EAST and p.phase is Phase.STREAMING
    p.receive_data(answer(2, 20))  # the source goes on serving
    assert delivered(until_asked(p)) == {2: 20}
    p.standby_closed(WEST)  # a late report of the same end changes nothing
    clock.now_s += STABLE_STREAM_S
    p.receive_data(moved_notice(WEST))  # a later move connects the usual way
    events = until_asked(p)
    assert events[-1] == OpenStream(WEST) and p.standby_switches == 0


def test_a_move_elsewhere_than_announced_drops_the_standby() -> None:
    north = Location("north", "http://127.0.0.1:8603")
    p = standing_by()
    p.receive_data(moved_notice(north))
    events = until_asked(p)
    assert DropStandby() in events and events[-1] == OpenStream(north)
    assert p.standby_opened(WEST) is False  # a late open is closed by the driver


def test_a_second_moving_notice_replaces_the_first_standby() -> None:
    north = Location("north", "http://127.0.0.1:8603")
    p = standing_by()
    p.receive_data(moving_notice(north))
    assert until_asked(p) == [DropStandby(), OpenStandby(north), NEED_DATA]
    assert p.standby is None and p.standby_opened(WEST) is False
    assert p.standby_opened(north) is True and p.standby == north


def test_a_move_before_the_standby_is_up_connects_as_before() -> None:
    p = streaming()
    calls(p, 1)
    p.receive_data(moving_notice(WEST))
    until_asked(p)
    p.receive_data(moved_notice(WEST))
    events = until_asked(p)
    assert DropStandby() in events and events[-1] == OpenStream(WEST)
    assert p.standby_opened(WEST) is False


def test_a_standby_gone_at_the_switch_is_replaced_by_a_connect_at_once() -> None:
    """It ended between the notice and the switch: no failure of the VM's place, so no
    backoff; a plain connect to the same place follows."""
    p = standing_by()
    p.receive_data(moved_notice(WEST))
    assert until_asked(p)[-1] == UseStandby(WEST)
    p.open_failed(NoCloudletAvailable("the standby stream ended"))
    events = until_asked(p)
    assert events == [OpenStream(WEST)]
    p.stream_opened()
    assert sent(until_asked(p)) == [2, 3] and p.standby_switches == 0


def test_closing_the_session_drops_the_standby() -> None:
    p = standing_by()
    p.close()
    events = until_asked(p)
    assert DropStandby() in events and CloseStream() in events
    assert p.standby_opened(WEST) is False


# --- sequence conflicts and gaps -----------------------------------------------------------

# (the error for call 2, the VM's seq it carries, the number the next call takes)
CONFLICTS = [
    (10, 11),  # another writer is ahead: number after it
    (3, 4),  # the same as ours: nothing to skip
    (1, 4),  # behind ours: keep ours
]


@pytest.mark.parametrize(("vm_seq", "next_seq"), CONFLICTS)
def test_a_sequence_conflict_fails_the_call_and_numbers_after_the_vm(
        vm_seq: int, next_seq: int) -> None:
    p = streaming()
    calls(p, 3)
    p.receive_data(error(2, "sequence_conflict", vm_seq=vm_seq))
    failed = delivered(until_asked(p))
    assert isinstance(failed[2], SequenceConflict)
    assert p.call("kv_get", (1,)).seq == next_seq
    assert p.pending == (1, 3, next_seq)


@pytest.mark.parametrize("code", ["sequence_gap", "vm_not_found"])
def test_a_gap_or_a_lost_vm_resyncs_and_keeps_the_call(code: str) -> None:
    """The cloudlet rolled back (or lost the VM): the call was not applied there, so
    it stays, and the session asks where the VM stands before resending."""
    p = streaming()
    calls(p, 3)
    p.receive_data(answer(1))
    p.receive_data(error(2, code, expected=1))
    events = until_asked(p)
    assert 2 not in delivered(events)
    assert CloseStream() in events and events[-1] == DescribeVM(EAST)
    assert not any(isinstance(e, Backoff) for e in events)
    assert p.pending == (2, 3)
    p.described({"seq": 1})
    until_asked(p)
    p.stream_opened()
    assert sent(until_asked(p)) == [2, 3]


# --- the in-flight bound -------------------------------------------------------------------


def _answered(p: SessionProtocol, seq: int) -> None:
    p.receive_data(answer(seq))


def _failed(p: SessionProtocol, seq: int) -> None:
    p.receive_data(error(seq, "vm_trapped"))


def _timed_out(p: SessionProtocol, seq: int) -> None:
    p.deadline_passed(seq, 1.0)


def _cancelled(p: SessionProtocol, seq: int) -> None:
    p.caller_gone(seq)


# (how a slot frees, whether the call stays queued for resending)
SLOT_FREES = [(_answered, False), (_failed, False), (_timed_out, True), (_cancelled, True)]


@pytest.mark.parametrize(("free", "stays"), SLOT_FREES, ids=[f.__name__ for f, _ in SLOT_FREES])
def test_at_most_max_in_flight_calls_wait(free: Callable[[SessionProtocol, int], None],
                                          stays: bool) -> None:
    p = streaming()
    calls(p, MAX_IN_FLIGHT)
    assert p.in_flight == MAX_IN_FLIGHT
    with pytest.raises(LocalProtocolError):
        p.call("kv_get", (1,))
    assert p.seq == MAX_IN_FLIGHT  # the refused call took no number
    free(p, 5)
    free(p, 5)  # twice: a slot frees once
    assert p.in_flight == MAX_IN_FLIGHT - 1
    assert (5 in p.pending) is stays
    assert p.call("kv_get", (1,)).seq == MAX_IN_FLIGHT + 1
    with pytest.raises(LocalProtocolError):
        p.call("kv_get", (1,))


# --- deadlines -----------------------------------------------------------------------------


@pytest.mark.parametrize("answered_on", ["the same stream", "the next stream"])
def test_a_call_past_its_deadline_still_applies_exactly_once(answered_on: str) -> None:
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, 2)
    timeout = p.deadline_passed(1, 300)
    assert isinstance(timeout, CallTimeout)
    assert "call 1 (kv_put)" in timeout.message and "300 ms" in timeout.message
    assert p.pending == (1, 2) and p.in_flight == 1
    if answered_on == "the next stream":
        clock.now_s += STABLE_STREAM_S
        p.stream_closed()
        assert sent(connect(p)) == [1, 2]  # it is resent, not forgotten
    p.receive_data(answer(1, 10))
    p.receive_data(answer(2, 20))
    assert delivered(until_asked(p)) == {2: 20}  # nobody waits for call 1's answer
    assert not p.pending and p.acked == 2 and set(p.journal) == {1, 2}


# --- error frames --------------------------------------------------------------------------

# (the wire error, the class the application catches)
ERRORS: list[tuple[Any, type[CloudletError]]] = [
    ({"code": "vm_trapped", "message": "unreachable"}, VMTrapped),
    ({"code": "bad_call", "message": "no such function"}, BadCall),
    ({"code": "reply_expired", "message": "too old"}, ReplyExpired),
    ({"code": "unauthorized", "message": "expired"}, Unauthorized),
    ({"code": "forbidden", "message": "not yours"}, Forbidden),
    ({"code": "a_code_from_the_future", "message": "?"}, CloudletError),
    ("not a map", CloudletError),
]


@pytest.mark.parametrize(("wire", "cls"), ERRORS, ids=[str(w)[:30] for w, _ in ERRORS])
def test_error_frames_become_typed_errors_that_use_up_the_number(
        wire: Any, cls: type[CloudletError]) -> None:
    p = streaming()
    calls(p, 2)
    p.receive_data(msgpack.packb({"id": 1, "error": wire}))
    failed = delivered(until_asked(p))
    assert type(failed[1]) is cls
    assert p.pending == (2,) and p.acked == 1 and p.phase is Phase.STREAMING
    assert p.lost is None  # one call's error, not the session's


def test_bytes_answers_are_delivered_as_data() -> None:
    p = streaming()
    calls(p, 1)
    p.receive_data(msgpack.packb({"id": 1, "data": b"k=v", "seq": 1}))
    assert until_asked(p) == [Answer(1, b"k=v"), NEED_DATA]


# --- acks ----------------------------------------------------------------------------------

# (the session's first seq, the order answers arrive, `ack` after each)
ACKS = [
    (0, [1, 2, 3], [1, 2, 3]),
    (0, [2, 1, 3], [0, 2, 3]),
    (0, [3, 2, 1], [0, 0, 3]),
    (10, [12, 11, 13], [10, 12, 13]),
]


@pytest.mark.parametrize(("start", "order", "acks"), ACKS)
def test_ack_is_the_number_up_to_which_every_answer_arrived(
        start: int, order: list[int], acks: list[int]) -> None:
    p = streaming(seq=start)
    calls(p, 3)
    for seq, acked in zip(order, acks, strict=True):
        p.receive_data(answer(seq))
        assert p.acked == acked
        frame = p.call("kv_get", (1,)).data
        assert frame is not None and msgpack.unpackb(frame)["ack"] == acked
        p.caller_gone(p.seq)


def test_a_timed_out_call_holds_back_the_ack_until_it_is_answered() -> None:
    p = streaming()
    calls(p, 2)
    p.deadline_passed(1, 10)
    p.receive_data(answer(2))
    assert p.acked == 0
    p.receive_data(answer(1))
    assert p.acked == 2


# --- connecting, backoff, giving up --------------------------------------------------------


def test_a_failing_cloudlet_is_retried_with_backoff_then_located() -> None:
    p = SessionProtocol(VM_ID, EAST)
    calls(p, 1)
    delays: list[float] = []
    for attempt in range(1, 2 * LOCATE_AFTER_FAILURES + 1):
        assert until_asked(p)[-1] == DescribeVM(EAST)
        p.describe_failed(NoCloudletAvailable("connection refused"))
        if attempt % LOCATE_AFTER_FAILURES == 0:
            assert until_asked(p) == [Locate(VM_ID)]
            p.located(EAST if attempt == LOCATE_AFTER_FAILURES else None)  # nowhere else
        backoff = p.next_event()
        assert isinstance(backoff, Backoff) and isinstance(backoff.cause, NoCloudletAvailable)
        delays.append(backoff.delay_s)
    assert delays == [min(BACKOFF_START_S * 2 ** k, BACKOFF_MAX_S) for k in range(6)]
    assert until_asked(p)[-1] == DescribeVM(EAST)
    p.described({"seq": 0})
    until_asked(p)
    p.stream_opened()
    assert sent(until_asked(p)) == [1]
    assert p.reconnects == 0  # the first stream, however long it took


def test_a_located_vm_elsewhere_ends_the_retries() -> None:
    p = SessionProtocol(VM_ID, EAST)
    for _ in range(LOCATE_AFTER_FAILURES):
        until_asked(p)
        p.open_failed(NoCloudletAvailable("refused")) if p.phase is Phase.OPENING \
            else p.describe_failed(NoCloudletAvailable("refused"))
        if p.phase is Phase.DISCONNECTED:
            assert isinstance(p.next_event(), Backoff)
    assert p.phase is Phase.LOCATING
    assert p.next_event() == Locate(VM_ID)
    p.located(WEST)
    assert until_asked(p) == [OpenStream(WEST)]
    assert p.moves_followed == 1


# (how long the stream lived, answers on it, whether the next connect backs off)
STREAM_ENDS = [
    (0.0, 0, True),  # closed at once, nothing answered: do not hammer it
    (STABLE_STREAM_S, 0, False),
    (0.0, 1, False),
]


@pytest.mark.parametrize(("lived_s", "answers", "backs_off"), STREAM_ENDS)
def test_a_stream_that_closes_at_once_backs_off(lived_s: float, answers: int,
                                                backs_off: bool) -> None:
    clock = Clock()
    p = streaming(clock=clock)
    calls(p, 1)
    for seq in range(1, answers + 1):
        p.receive_data(answer(seq))
    until_asked(p)
    clock.now_s += lived_s
    p.stream_closed()
    p.stream_closed()  # the driver may say it twice
    events = until_asked(p)
    assert events[0] == CloseStream() and events[-1] == DescribeVM(EAST)
    assert [e.delay_s for e in events if isinstance(e, Backoff)] == \
        ([BACKOFF_START_S] if backs_off else [])


@pytest.mark.parametrize("final", [Unauthorized("expired"), Forbidden("not yours"),
                                   SessionLost("gone")], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("step", ["describe", "open"])
def test_errors_retrying_cannot_help_end_the_session(final: CloudletError, step: str) -> None:
    p = SessionProtocol(VM_ID, EAST)
    calls(p, 2)
    p.deadline_passed(1, 10)  # its caller is gone: nothing to tell it
    until_asked(p)
    if step == "open":
        p.described({"seq": 0})
        until_asked(p)
        p.open_failed(final)
    else:
        p.describe_failed(final)
    events = until_asked(p)
    assert events[-1] == Lost(final) and delivered(events) == {2: final}
    assert p.next_event() == Lost(final)  # and stays over
    with pytest.raises(type(final)):
        p.call("kv_get", (1,))


def test_a_vm_found_nowhere_is_lost_only_after_the_grace() -> None:
    """A VM in flight is briefly nowhere (a destination settling an in-doubt
    migration): the session keeps looking, and gives up only after the grace."""
    clock = Clock()
    p = SessionProtocol(VM_ID, EAST, clock=clock)
    calls(p, 1)
    looked = 0
    while True:
        events = until_asked(p)
        if isinstance(events[-1], Lost):
            break
        if isinstance(events[-1], Locate):
            p.located(None)
            continue
        assert events[-1] == DescribeVM(EAST)
        p.describe_failed(VMNotFound("no such VM"))
        assert until_asked(p) == [Locate(VM_ID)]
        p.located(None)
        looked += 1
        clock.now_s += 4.0
    assert looked == int(MISSING_GRACE_S // 4.0) + 2  # lost at the look past the grace
    assert "on no cloudlet" in events[-1].error.message
    assert isinstance(delivered(events)[1], SessionLost)


def test_a_vm_that_reappears_within_the_grace_is_found() -> None:
    clock = Clock()
    p = SessionProtocol(VM_ID, EAST, clock=clock)
    until_asked(p)
    p.describe_failed(VMNotFound("no such VM"))
    until_asked(p)
    p.located(None)
    clock.now_s += MISSING_GRACE_S - 1
    assert until_asked(p)[-1] == DescribeVM(EAST)  # after its backoff
    p.described({"seq": 0})
    assert until_asked(p) == [OpenStream(EAST)]


def test_a_description_without_a_seq_loses_the_session() -> None:
    p = SessionProtocol(VM_ID, EAST)
    until_asked(p)
    p.described({"vm": VM_ID})
    assert isinstance(until_asked(p)[-1], Lost)


def test_an_open_refused_with_moved_or_not_found_asks_again_without_backoff() -> None:
    p = SessionProtocol(VM_ID, EAST)
    until_asked(p)
    p.described({"seq": 0})
    until_asked(p)
    p.open_failed(VMNotFound("gone"))
    assert until_asked(p) == [DescribeVM(EAST)]


def test_outcomes_fed_out_of_turn_are_a_driver_bug() -> None:
    p = streaming()
    with pytest.raises(LocalProtocolError):
        p.described({"seq": 0})
    q = SessionProtocol(VM_ID, EAST)
    until_asked(q)
    with pytest.raises(LocalProtocolError):
        q.next_event()  # DescribeVM's outcome was never fed


# --- calls the protocol refuses, and closing -----------------------------------------------

REFUSED: list[tuple[str, tuple[Any, ...], type[CloudletError]]] = [
    ("kv_put", (1, "2"), InvalidArgument),
    ("kv_put", (1 << 64,), InvalidArgument),
    ("kv_put", (-(1 << 63) - 1,), InvalidArgument),
    ("kv_put", (True,), InvalidArgument),
    ("kv_set", (b"x" * 2000,), RequestTooLarge),  # over the cap the cloudlet described
]


@pytest.mark.parametrize(("fn", "args", "cls"), REFUSED)
def test_refused_calls_take_no_number(fn: str, args: tuple[Any, ...],
                                      cls: type[CloudletError]) -> None:
    p = SessionProtocol(VM_ID, EAST)
    until_asked(p)
    p.described({"seq": 0, "max_request_bytes": 1024})
    with pytest.raises(cls):
        p.call(fn, args)
    assert p.seq == 0 and p.pending == ()
    assert p.call("kv_put", ((1 << 64) - 1, -(1 << 63))).seq == 1


def test_closing_fails_every_waiting_call() -> None:
    p = streaming()
    calls(p, 3)
    p.receive_data(answer(1, 10))
    p.deadline_passed(2, 10)
    p.close()
    events = until_asked(p)
    assert delivered(events) == {1: 10, 3: events[-1].error}  # type: ignore[union-attr]
    assert isinstance(events[-1], Lost) and "closed" in events[-1].error.message
    with pytest.raises(SessionLost):
        p.call("kv_get", (1,))
    assert p.pending == ()


def test_the_protocol_does_no_io() -> None:
    """Nothing here may wait on a socket or a loop: that is the driver's job."""
    for module in (session_protocol, session_events):
        tree = ast.parse(inspect.getsource(module))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not imported & {"asyncio", "aiohttp", "socket", "mobile_client.transport"}
        assert "mobile_client.transport" not in inspect.getsource(module)


# --- the answer fast path ----------------------------------------------------------------


def state(p: SessionProtocol) -> tuple[Any, ...]:
    return (p.phase, p.pending, p.journal, p.acked, p.in_flight, p.calls_answered, p.seq)


def test_answer_in_takes_a_waited_for_answer_as_receive_data_would() -> None:
    """The fast path gives the value back itself; every other state is as if the
    frame went through `receive_data` and its `Answer` through `next_event`."""
    slow, fast = streaming(), streaming()
    for p in (slow, fast):
        calls(p, 3)
    for seq, durable in ((1, None), (2, 1), (3, 1)):
        extra = {} if durable is None else {"durable": durable}
        slow.receive_data(answer(seq, seq * 10, **extra))
        assert until_asked(slow) == [Answer(seq, seq * 10), NEED_DATA]
        assert fast.answer_in(answer(seq, seq * 10, **extra)) == (seq, seq * 10)
        assert fast.next_event() == NEED_DATA  # nothing queued: the value was handed back
        assert state(fast) == state(slow)
    assert fast.journal == (2, 3) and fast.acked == 3 and fast.in_flight == 0


def test_answer_in_bytes_answers_carry_their_data() -> None:
    p = streaming()
    p.call("echo", (b"hi",))
    assert p.answer_in(frame({"id": 1, "data": b"ih", "seq": 1})) == (1, b"ih")


NOT_FAST = {
    "an error": error(1, "vm_trapped"),
    "a moved notice": moved_notice(WEST),
    "a moving notice": frame({"id": None, "moving": {"node": "west",
                                                     "endpoint": WEST.endpoint}}),
    "an unknown call": answer(7),
    "not msgpack": b"\xc1",
    "not a map": frame([1, 2]),
    "a string id": frame({"id": "1", "result": 0}),
}


@pytest.mark.parametrize("data", NOT_FAST.values(), ids=NOT_FAST.keys())
def test_answer_in_leaves_every_other_frame_to_receive_data(data: bytes) -> None:
    p = streaming()
    calls(p, 1)
    before = state(p)
    assert p.answer_in(data) is None
    assert state(p) == before


def test_answer_in_leaves_answers_nobody_waits_for_and_queued_events_alone() -> None:
    gone = streaming()
    calls(gone, 1)
    gone.caller_gone(1)  # its deadline passed: the answer is taken, handed to no one
    before = state(gone)
    assert gone.answer_in(answer(1)) is None and state(gone) == before
    queued = streaming()
    calls(queued, 2)
    queued.receive_data(answer(1))  # its `Answer` not taken yet: nothing overtakes it
    before = state(queued)
    assert queued.answer_in(answer(2)) is None and state(queued) == before
    offline = SessionProtocol(VM_ID, EAST, clock=Clock())
    offline.call("kv_get", (1,))  # no stream yet
    assert offline.answer_in(answer(1)) is None
