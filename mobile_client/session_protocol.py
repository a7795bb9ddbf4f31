"""The exactly-once session as a pure protocol object: calls and frames in, frames
and answers out.

Every call carries a sequence number, the VM's `seq` after it, and `ack`, the
number up to which every answer has arrived. The protocol keeps every call it
numbered and has no answer for (pending) and, until the cloudlet says it has
checkpointed them (`durable` in the answers), the calls it had answered (the
journal). That is all it needs to make each call apply exactly once, whatever
breaks:

- a dropped stream (either side): reconnect, resend what is pending, in order;
  the daemon answers numbers it already applied from its reply log, and an
  answer for a number already answered is a duplicate, dropped;
- the VM moved (a `moved` notice, `410 vm_moved` from the old cloudlet, or a
  new retained location): reconnect to the new cloudlet, resend;
- the VM is moving (a `moving` notice on the current stream, as its live
  migration starts): a standby stream to the destination is opened beside the
  current one, and the destination holds it until the VM arrives; when the move
  commits, the resends go out on it (the switch is a write, not a connect). A
  standby carries nothing before that, so it changes nothing of the above: if
  the migration fails it is dropped and the session simply stays;
- the cloudlet came back from an older checkpoint (its `seq` is behind calls
  already answered): resend those from the journal first, so the VM's state
  catches up to what the application was told; when the journal no longer
  holds them, the VM's state is gone (`SessionLost`), and that is said.

Why a protocol object: these rules used to be woven into aiohttp reads and
reconnects, so none could be tested without sockets. Here nothing touches a
socket, a task or the event loop, and time is an injected clock: the driver
(`mobile_client.session.Session`) moves the bytes and does what each event of
`mobile_client.session_events` says. Frames are msgpack maps; encoding and
decoding them is pure and stays here with the rules that read them.

Driving it: call `next_event()` and act on what it returns, feeding outcomes
back (`described()`, `stream_opened()`, `receive_data()`, `stream_closed()`,
...); `call()` numbers a call, `deadline_passed()`/`caller_gone()` say its
caller stopped waiting (the call stays queued and applies later, at most once).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from cloudlet.errors import (
    CallTimeout,
    CloudletError,
    Forbidden,
    InvalidArgument,
    NoCloudletAvailable,
    RequestTooLarge,
    SequenceConflict,
    SequenceGap,
    SessionLost,
    Unauthorized,
    VMMoved,
    VMNotFound,
    error_from_wire,
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
    Numbered,
    OpenStandby,
    OpenStream,
    Send,
    UseStandby,
    Vouch,
)

log = logging.getLogger(__name__)

# Reconnection backoff: quick first (a move takes milliseconds), capped so a
# cloudlet that comes back is found within a second.
BACKOFF_START_S = 0.02
BACKOFF_MAX_S = 1.0
# Answered calls kept until the cloudlet says they are checkpointed. Bounded, so
# a cloudlet that never checkpoints cannot make a session grow without end; past
# it, a rollback of the cloudlet is reported (`SessionLost`) rather than hidden.
JOURNAL_MAX_CALLS = 4096
JOURNAL_MAX_BYTES = 16 << 20
# Calls in flight at most: past it, `call` waits. Bounds what a reconnect resends
# and what the cloudlet must keep answers for (it keeps them until acknowledged).
MAX_IN_FLIGHT = 64
# The largest call a cloudlet takes unless it says otherwise (its max_request_kib).
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MESSAGE_OVERHEAD_BYTES = 128  # id, seq, ack and the map around the call
# A stream that ends sooner than this without a single answer counts as a failed
# connection (backoff applies): else a cloudlet that closes every stream at once
# would be hammered.
STABLE_STREAM_S = 1.0
LOCATE_AFTER_FAILURES = 3  # connects to one cloudlet in a row, then ask where the VM is
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what a wasm i64 (signed or not) can take
FINAL_ERRORS = (SessionLost, Unauthorized, Forbidden)  # retrying cannot help
# How long a VM may be found nowhere before its session is lost: longer than a
# destination takes to settle an in-doubt migration with a restarting source.
MISSING_GRACE_S = 15.0


class LocalProtocolError(RuntimeError):
    """The driver broke the protocol's contract (h11's name for it): an event's
    outcome fed when none was asked, or a call past `MAX_IN_FLIGHT`. A bug in the
    driver, never a cloudlet's fault."""


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"  # the next event starts a connection
    DESCRIBING = "describing"  # DescribeVM out, waiting for described()/describe_failed()
    LOCATING = "locating"  # Locate out, waiting for located()
    OPENING = "opening"  # OpenStream out, waiting for stream_opened()/open_failed()
    RESENDING = "resending"  # a stream is up; the resends are queued as `Send`s
    STREAMING = "streaming"  # every resend handed out: new calls are written at once
    LOST = "lost"  # over: `lost` says why
    CLOSED = "closed"


@dataclass
class _Pending:
    seq: int
    fn: str
    message: bytes
    waiting: bool = True  # a caller waits for its answer (it counts as in flight)


class SessionProtocol:
    """One session's exactly-once state. See the module docstring for how to drive it."""

    def __init__(self, vm_id: str, location: Location, *, seq: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vm_id = vm_id
        self._packer = msgpack.Packer()  # reused: `msgpack.packb` makes one per call
        self.location = location
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._clock = clock
        self._phase = Phase.DISCONNECTED
        self._lost: CloudletError | None = None
        self._events: deque[Event] = deque()
        self._next_seq = seq + 1
        self._acked = seq  # every answer up to here has arrived (sent as `ack`)
        self._pending: dict[int, _Pending] = {}
        self._in_flight = 0
        # Answered calls by number, in order: the oldest go first past the bound, and
        # a `durable` trims from the front.
        self._journal: OrderedDict[int, bytes] = OrderedDict()
        self._journal_top = seq  # the highest number it ever held
        self._journal_bytes = 0
        self._durable_seq = seq  # the highest `durable` heard: the journal holds none below
        # Connecting: where the outcome being waited for was asked, the VM's `seq`
        # there (None: not asked, the VM was followed to a place that holds it
        # exactly), and why a Locate went out.
        self._asked = location
        self._vm_seq: int | None = None
        self._just_moved = False
        self._locating_missing = False
        self._failures = 0
        self._failure: CloudletError | None = None
        # Where the VM is moving (a `moving` notice): a standby stream is being opened
        # there (up: it is open), and whether the current OpenStream is that stream.
        self._standby: Location | None = None
        self._standby_up = False
        self._via_standby = False
        self._backoff_s = BACKOFF_START_S
        self._missing_since_s: float | None = None
        self._first_stream = True
        self._opened_s = 0.0
        self._answered_before = 0
        self.calls_answered = 0
        self.reconnects = 0
        self.moves_followed = 0
        self.resent = 0
        self.replayed = 0
        self.standby_switches = 0  # moves followed onto a stream opened beforehand

    # --- what the driver and the application read -----------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def lost(self) -> CloudletError | None:
        """Why the session is over, or None while it is not."""
        return self._lost

    @property
    def seq(self) -> int:
        """The sequence number of the last call numbered."""
        return self._next_seq - 1

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def pending(self) -> tuple[int, ...]:
        """The numbers of the calls sent and not answered yet, in order."""
        return tuple(sorted(self._pending))

    @property
    def standby(self) -> Location | None:
        """Where a standby stream is open, waiting for the VM's move to commit."""
        return self._standby if self._standby_up else None

    @property
    def journal(self) -> tuple[int, ...]:
        """The numbers of the answered calls kept until the cloudlet checkpoints them."""
        return tuple(self._journal)

    @property
    def in_flight(self) -> int:
        """Calls whose caller still waits for the answer (at most `MAX_IN_FLIGHT`)."""
        return self._in_flight

    # --- calls ----------------------------------------------------------------------

    def call(self, fn: str, args: tuple[Any, ...]) -> Numbered:
        """Number a call of `fn`. Numeric arguments make a numeric call; a single
        `bytes` argument a bytes-in/bytes-out call. Refusals (`InvalidArgument`,
        `RequestTooLarge`) are raised before the call takes a number."""
        if self._lost is not None:
            raise self._lost
        if self._in_flight >= MAX_IN_FLIGHT:
            raise LocalProtocolError(f"{MAX_IN_FLIGHT} calls already wait for an answer")
        body = self._body(fn, args)
        seq = self._next_seq
        self._next_seq = seq + 1
        body["id"] = body["seq"] = seq
        body["ack"] = self._acked
        message: bytes = self._packer.pack(body)
        self._pending[seq] = _Pending(seq, fn, message)
        self._in_flight += 1
        if self._phase is Phase.STREAMING:
            return Numbered(seq, message)
        if self._phase is Phase.RESENDING:
            # After the resends already queued: frames leave in the order of their numbers.
            self._events.append(Send(message))
        return Numbered(seq, None)

    def _body(self, fn: str, args: tuple[Any, ...]) -> dict[str, Any]:
        if type(fn) is not str:
            raise InvalidArgument(f"a function name is a str, not {type(fn).__name__}")
        if len(args) == 1 and isinstance(args[0], bytes | bytearray):
            data = bytes(args[0])
            size = len(data) + len(fn) + MESSAGE_OVERHEAD_BYTES
            if size > self.max_message_bytes:
                raise RequestTooLarge(f"a call of {size} bytes; cloudlet {self.location.node} "
                                      f"takes at most {self.max_message_bytes}")
            return {"fn": fn, "data": data}
        for a in args:
            if type(a) is int:
                if not INT_MIN <= a <= INT_MAX:
                    raise InvalidArgument(f"{fn}: {a} does not fit a 64-bit integer")
            elif type(a) is not float:
                raise InvalidArgument(f"{fn}: arguments are numbers or one bytes value, not "
                                      f"{type(a).__name__}")
        return {"fn": fn, "args": list(args)}

    def caller_gone(self, seq: int) -> None:
        """Nobody waits for call `seq` any more (its caller was cancelled, or got its
        answer). The call stays queued: it is resent, applies at most once, and its
        answer is taken but handed to no one. Idempotent."""
        pending = self._pending.get(seq)
        if pending is not None and pending.waiting:
            pending.waiting = False
            self._in_flight -= 1

    def deadline_passed(self, seq: int, deadline_ms: float) -> CallTimeout:
        """Call `seq`'s deadline passed: its caller stops waiting (see `caller_gone`).
        Returns the error to raise to that caller."""
        pending = self._pending.get(seq)
        self.caller_gone(seq)
        fn = pending.fn if pending is not None else "?"
        return CallTimeout(f"call {seq} ({fn}) to VM {self.vm_id} got no answer within "
                           f"{deadline_ms:.0f} ms; it stays queued and applies at most once")

    # --- the driver's loop ----------------------------------------------------------

    def next_event(self) -> Event:
        """What the driver must do next (call again after doing it)."""
        if self._events:
            return self._events.popleft()
        phase = self._phase
        if phase is Phase.STREAMING:
            return NEED_DATA
        if phase is Phase.RESENDING:
            # Every resend has been handed out, in order: later calls write themselves.
            self._phase = Phase.STREAMING
            return NEED_DATA
        if phase is Phase.DISCONNECTED:
            self._connect()
            return self._events.popleft()
        if self._lost is not None:
            return Lost(self._lost)
        raise LocalProtocolError(f"next_event() while {phase.value}: feed the outcome first")

    def _connect(self) -> None:
        """Start a connection. Following a `moved` notice, the new place is known and
        holds the VM's exact state: open its stream straight away (a round trip saved
        off the downtime). Otherwise ask where the VM stands first."""
        self._asked = self.location
        if self._just_moved:
            self._just_moved = False
            self._vm_seq = None
            self._phase = Phase.OPENING
            if self._standby == self.location and self._standby_up:
                # Opened while the VM was on its way: the stream is already there.
                self._standby, self._standby_up = None, False
                self._via_standby = True
                self._events.append(UseStandby(self.location))
            else:
                self._drop_standby()  # still opening: a fresh connect is as quick
                self._events.append(OpenStream(self.location))
        else:
            self._phase = Phase.DESCRIBING
            self._events.append(DescribeVM(self.location))

    def _expect(self, phase: Phase) -> bool:
        """Check an outcome is the one asked for; False when the VM was followed
        elsewhere meanwhile (the outcome is about the old place: start again)."""
        if self._phase is not phase:
            if self._phase in (Phase.LOST, Phase.CLOSED):
                return False
            raise LocalProtocolError(f"a {phase.value} outcome while {self._phase.value}")
        if self.location != self._asked:
            self._phase = Phase.DISCONNECTED
            return False
        return True

    def described(self, info: dict[str, Any]) -> None:
        """The cloudlet's description of the VM (`DescribeVM`'s answer)."""
        if not self._expect(Phase.DESCRIBING):
            return
        self._missing_since_s = None
        cap = info.get("max_request_bytes")
        if type(cap) is int and cap > 0:
            self.max_message_bytes = cap
        seq = info.get("seq")
        if type(seq) is not int:
            self._give_up(SessionLost(f"cloudlet {self.location.node} described VM "
                                      f"{self.vm_id} without a sequence number"))
            return
        self._vm_seq = seq
        self._phase = Phase.OPENING
        self._events.append(OpenStream(self.location))

    def describe_failed(self, error: CloudletError) -> None:
        """`DescribeVM` got a typed error."""
        if not self._expect(Phase.DESCRIBING):
            return
        if isinstance(error, VMMoved):
            self._phase = Phase.DISCONNECTED
            self._follow(error.details)
        elif isinstance(error, VMNotFound):
            self._locate(missing=True)
        elif isinstance(error, FINAL_ERRORS):
            self._give_up(error)
        else:
            self._failed(error)

    def located(self, where: Location | None) -> None:
        """`Locate`'s outcome: where the VM is, or None when no one said."""
        if not self._expect(Phase.LOCATING):
            return
        if where is not None and where != self.location:
            self._phase = Phase.DISCONNECTED
            self._move_to(where)
            return
        if not self._locating_missing:
            assert self._failure is not None
            self._back_off(self._failure)
            return
        # A VM in flight is briefly nowhere (a destination settling an in-doubt
        # migration with a restarting source): only a long absence is a loss.
        now_s = self._clock()
        if self._missing_since_s is None:
            self._missing_since_s = now_s
        if now_s - self._missing_since_s > MISSING_GRACE_S:
            self._give_up(SessionLost(f"VM {self.vm_id} is on no cloudlet this client knows "
                                      f"(last seen on {self.location.node})"))
            return
        self._failed(NoCloudletAvailable(f"VM {self.vm_id} is not at {self.location.node} "
                                         "(yet)"))

    def stream_opened(self) -> None:
        """`OpenStream` succeeded: bring the VM up to date, then stream."""
        if not self._expect(Phase.OPENING):
            self._events.append(CloseStream())  # opened at the old place, or too late
            return
        self._failures = 0
        if self._via_standby:
            self._via_standby = False
            self.standby_switches += 1
        if not self._first_stream:
            self.reconnects += 1
        self._first_stream = False
        self._opened_s = self._clock()
        self._answered_before = self.calls_answered
        self._phase = Phase.RESENDING
        self._resend()

    def open_failed(self, error: CloudletError) -> None:
        """`OpenStream` got a typed error."""
        if not self._expect(Phase.OPENING):
            return
        if self._via_standby:
            # The standby ended just before it was needed: open one the usual way,
            # at once (the VM is known to be there; this is no failure of it).
            self._via_standby = False
            self._phase = Phase.DISCONNECTED
            self._just_moved = True
        elif isinstance(error, VMMoved | VMNotFound):
            self._phase = Phase.DISCONNECTED  # ask the cloudlet where the VM went
        elif isinstance(error, FINAL_ERRORS):
            self._give_up(error)
        else:
            self._failed(error)

    def _resend(self) -> None:
        """Bring the VM up to date: journaled calls it lost (a rollback), then every
        call not yet answered, in order. Numbers it already applied are answered
        from its reply log, not applied again."""
        lowest_needed = min(self._pending, default=self._next_seq)
        vm_seq = self._vm_seq
        if vm_seq is not None and vm_seq + 1 < lowest_needed:
            missing = range(vm_seq + 1, lowest_needed)
            if any(seq not in self._journal for seq in missing):
                self._give_up(SessionLost(
                    f"VM {self.vm_id} on {self.location.node} is at call {vm_seq}: it lost "
                    f"calls up to {lowest_needed - 1} that were answered and are no longer "
                    "kept by this client (it came back from an older checkpoint)"))
                return
            log.warning("VM %s rolled back to %d; replaying %d answered calls", self.vm_id,
                        vm_seq, len(missing))
            self._events.extend(Send(self._journal[seq]) for seq in missing)
            self.replayed += len(missing)
        for seq in sorted(self._pending):
            self._events.append(Send(self._pending[seq].message))
            self.resent += self.reconnects > 0  # a first stream sends, not resends

    def receive_data(self, data: bytes) -> None:
        """One frame the stream delivered. Answers are taken from any stream (a frame
        read from a stream just left is still the VM's answer); what a frame says of
        the stream itself (moved, resync) is heard only from the current one."""
        if self._phase in (Phase.LOST, Phase.CLOSED):
            return
        try:
            reply = msgpack.unpackb(data)
        except (ValueError, msgpack.UnpackException):
            return  # not a frame of the protocol: nothing in it to act on
        if not isinstance(reply, dict):
            return
        seq = reply.get("id")
        if type(seq) is int and "error" not in reply:
            # The common frame, first: an answer (notices carry no number).
            pending = self._pending.pop(seq, None)
            if pending is not None:  # else a replayed call's answer, or a duplicate
                self._answered(pending, reply, Answer(seq, reply.get("data", reply.get("result"))))
            return
        moved = reply.get("moved")
        if isinstance(moved, dict):
            if self._phase in (Phase.RESENDING, Phase.STREAMING):
                self._leave_stream(stable=True, moved=True)
                self._follow(moved)
            return
        if "moving" in reply and seq is None:
            if self._phase in (Phase.RESENDING, Phase.STREAMING):
                self._moving(reply["moving"])
            return
        if type(seq) is not int:
            return
        pending = self._pending.pop(seq, None)
        if pending is None:
            return  # a replayed call's answer, or a duplicate: already delivered
        error = reply.get("error")
        if error is not None:
            exc = error_from_wire(error)
            if isinstance(exc, SequenceGap | VMNotFound | VMMoved):
                self._pending[seq] = pending  # not applied there: it stays to resend
                if self._phase in (Phase.RESENDING, Phase.STREAMING):
                    # A gap: the cloudlet rolled back, or lost the VM: find where it
                    # stands. Moved: go where it went.
                    self._leave_stream(stable=True, moved=isinstance(exc, VMMoved))
                    if isinstance(exc, VMMoved):
                        self._follow(exc.details)
                return
            if isinstance(exc, SequenceConflict):
                vm_seq = exc.details.get("vm_seq")
                if type(vm_seq) is int and vm_seq >= self._next_seq:
                    self._next_seq = vm_seq + 1  # another writer: number after it
            self._answered(pending, reply, CallFailed(seq, exc))
        else:
            self._answered(pending, reply, Answer(seq, reply.get("data", reply.get("result"))))

    def answer_in(self, data: bytes) -> tuple[int, Any] | None:
        """`receive_data` for the frame a streaming session reads most: the answer to
        a call whose caller waits, with no event queued before it. Returns the call's
        number and value, having done all `receive_data` would except queue the
        `Answer`: the driver hands the value over itself. For any other frame it
        returns None having changed nothing, and the frame goes to `receive_data`.

        Why a second entry: an answer read by the waiting caller itself (the SDK's
        back-to-back calls) took an `Answer` object, a trip through the event queue
        and two `next_event` calls, a measurable share of a call's client-side cost."""
        if self._events or self._phase is not Phase.STREAMING:
            return None
        try:
            reply = msgpack.unpackb(data)
        except (ValueError, msgpack.UnpackException):
            return None
        if type(reply) is not dict:
            return None
        seq = reply.get("id")
        if type(seq) is not int or "error" in reply:
            return None
        pending = self._pending.get(seq)
        if pending is None or not pending.waiting:
            return None
        del self._pending[seq]
        self._in_flight -= 1
        self._book(pending, reply)
        return seq, reply.get("data", reply.get("result"))

    def stream_closed(self) -> None:
        """The stream ended or broke (either side). Idempotent."""
        if self._phase not in (Phase.RESENDING, Phase.STREAMING):
            return
        lived_s = self._clock() - self._opened_s
        self._leave_stream(stable=lived_s >= STABLE_STREAM_S
                           or self.calls_answered != self._answered_before)

    def location_noticed(self, where: Location) -> bool:
        """The VM's retained location changed. If it is elsewhere now, go there;
        True when the open stream must be closed for that (the driver closes it; a
        stale location costs one round trip: the old cloudlet answers `vm_moved`)."""
        if self._phase in (Phase.LOST, Phase.CLOSED) or where == self.location:
            return False
        on_stream = self._phase in (Phase.RESENDING, Phase.STREAMING)
        if on_stream:
            self._leave_stream(stable=True)
        self._move_to(where)
        return on_stream

    def standby_opened(self, where: Location) -> bool:
        """The standby stream to `where` (`OpenStandby`) is open. True: keep it aside
        for the switch; False: it is no longer wanted (the VM went elsewhere, or the
        session ended meanwhile): close it."""
        if where != self._standby or self._phase in (Phase.LOST, Phase.CLOSED):
            return False
        self._standby_up = True
        return True

    def standby_closed(self, where: Location) -> None:
        """The standby stream to `where` could not be opened, or ended before it was
        used (the migration failed, the destination died, it refused to hold it).
        Nothing was sent on it: forget it; the session stays where it is."""
        if where == self._standby:
            self._standby, self._standby_up = None, False

    def close(self) -> None:
        """The application closed the session: every waiting call fails."""
        if self._phase is Phase.CLOSED:
            return
        self._end(SessionLost(f"session of VM {self.vm_id} was closed"), Phase.CLOSED)

    # --- inside ---------------------------------------------------------------------

    def _leave_stream(self, *, stable: bool, moved: bool = False) -> None:
        """Stop using the current stream. Its queued resends are dropped (the next
        stream resends them). A stream that ended at once without an answer counts
        as a failed connection: back off before the next (do not hammer). One left
        because the VM `moved` is closed in the background (`CloseStream`)."""
        self._drop_sends()
        self._events.append(CloseStream(in_background=moved))
        self._phase = Phase.DISCONNECTED
        if stable:
            self._backoff_s = BACKOFF_START_S
        else:
            self._events.append(Backoff(self._backoff_s, None))
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _drop_sends(self) -> None:
        if any(isinstance(e, Send) for e in self._events):
            self._events = deque(e for e in self._events if not isinstance(e, Send))

    def _failed(self, error: CloudletError) -> None:
        """A connection attempt failed: retry with backoff; every few failures in a
        row, ask whether the VM is somewhere else now."""
        self._failures += 1
        self._failure = error
        if self._failures % LOCATE_AFTER_FAILURES == 0:
            self._locate(missing=False)
        else:
            self._back_off(error)

    def _back_off(self, error: CloudletError) -> None:
        self._phase = Phase.DISCONNECTED
        self._events.append(Backoff(self._backoff_s, error))
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _locate(self, *, missing: bool) -> None:
        self._locating_missing = missing
        self._phase = Phase.LOCATING
        self._events.append(Locate(self.vm_id))

    def _follow(self, details: dict[str, Any]) -> None:
        """Follow the VM where the cloudlet it was on says it went (a `moved` notice on
        its stream, or its `410 vm_moved`). That cloudlet proved itself to this client,
        and it proved the destination before sending it the VM: its word vouches for
        the destination, so the reconnect needs no challenge of its own."""
        endpoint, node = details.get("endpoint"), details.get("node")
        if not isinstance(endpoint, str):
            self._give_up(SessionLost(f"VM {self.vm_id} moved, but the notice says not where"))
            return
        where = Location(str(node or endpoint), endpoint)
        self._events.append(Vouch(where, self.location))
        self._move_to(where)

    def _moving(self, details: Any) -> None:
        """A `moving` notice on the current stream: the cloudlet serving the VM says
        it is migrating it to `details` (a node and its endpoint). Believed only
        from the current stream, like `moved`; unlike `moved`, it vouches for
        nothing: the standby stream's own connect makes the destination prove it is
        a cloudlet of this cluster before the token goes there, off the downtime's
        path. A notice that names no node, or another VM, is ignored; `null` says
        the move is off (the standby is dropped)."""
        if details is None:
            self._drop_standby()
            return
        where = Location.from_wire(details)
        if (where is None or not isinstance(details, dict)
                or details.get("vm", self.vm_id) != self.vm_id or where == self.location):
            return
        if where == self._standby:
            return  # told again: the standby is already on its way
        self._drop_standby()
        self._standby, self._standby_up = where, False
        self._events.append(OpenStandby(where))

    def _drop_standby(self) -> None:
        if self._standby is not None:
            self._standby, self._standby_up = None, False
            self._events.append(DropStandby())

    def _move_to(self, where: Location) -> None:
        if where != self._standby:
            self._drop_standby()  # the VM went elsewhere than announced
        self._just_moved = True
        if where != self.location:
            log.info("VM %s: following it from %s to %s", self.vm_id, self.location.node,
                     where.node)
            self.location = where
            self.moves_followed += 1

    def _answered(self, pending: _Pending, reply: dict[str, Any],
                  event: Answer | CallFailed) -> None:
        """Call `pending` got its answer (`reply`): book it and hand `event` to its
        caller if one waits."""
        if pending.waiting:
            self._in_flight -= 1
            self._events.append(event)
        self._book(pending, reply)

    def _book(self, pending: _Pending, reply: dict[str, Any]) -> None:
        """Call `pending` got its answer (`reply`, taken out of `_pending`): journal it,
        move the acknowledgement up, and forget what the reply says is durable."""
        self.calls_answered += 1
        seq, message = pending.seq, pending.message
        journal = self._journal
        if seq > self._journal_top:
            # `_journal_add`'s common case, inline: the next number goes last; a full
            # journal (the usual state between checkpoints) drops its oldest.
            journal[seq] = message
            self._journal_top = seq
            self._journal_bytes += len(message)
            if len(journal) > JOURNAL_MAX_CALLS:
                self._journal_bytes -= len(journal.popitem(last=False)[1])
            if self._journal_bytes > JOURNAL_MAX_BYTES:
                self._journal_add_trimmed()
        else:
            self._journal_add(seq, message)
        pending_calls = self._pending
        while self._acked + 1 < self._next_seq and self._acked + 1 not in pending_calls:
            self._acked += 1
        durable = reply.get("durable")
        if type(durable) is int and durable > self._durable_seq:
            # Trimmed when it moves (at the cloudlet's checkpoints), not looked at on
            # every answer: what it covers was trimmed when it was first heard.
            self._durable_seq = durable
            self._journal_trim(durable)

    def _journal_add(self, seq: int, message: bytes) -> None:
        journal = self._journal
        journal[seq] = message
        if seq > self._journal_top:
            self._journal_top = seq
        else:  # replays answered out of order (rare): keep it by number
            self._journal = journal = OrderedDict(sorted(journal.items()))
        self._journal_bytes += len(message)
        self._journal_add_trimmed()

    def _journal_add_trimmed(self) -> None:
        """Drop the oldest answered calls until the journal is within its bounds."""
        journal = self._journal
        while len(journal) > JOURNAL_MAX_CALLS or self._journal_bytes > JOURNAL_MAX_BYTES:
            _, old = journal.popitem(last=False)
            self._journal_bytes -= len(old)

    def _journal_trim(self, durable_seq: int) -> None:
        journal = self._journal
        while journal:
            seq = next(iter(journal))
            if seq > durable_seq:
                break
            self._journal_bytes -= len(journal.pop(seq))

    def _give_up(self, error: CloudletError) -> None:
        self._end(error, Phase.LOST)

    def _end(self, error: CloudletError, phase: Phase) -> None:
        """Fail every waiting call with `error`; nothing more goes out."""
        opened = self._phase in (Phase.RESENDING, Phase.STREAMING, Phase.OPENING)
        self._lost = error
        self._phase = phase
        self._drop_sends()
        if opened:
            self._events.append(CloseStream())
        self._drop_standby()
        for seq in sorted(self._pending):
            if self._pending[seq].waiting:
                self._events.append(CallFailed(seq, error))
        self._pending.clear()
        self._in_flight = 0
