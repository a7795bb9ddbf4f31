"""A session: a client's long-lived binding to one VM, which survives drops and moves.

The exactly-once rules (sequence numbers, acks, the journal, resync, following
moves) are `mobile_client.session_protocol.SessionProtocol`, a pure object; this
module is its aiohttp driver, the one place a session touches the network: it
opens and reads the VM's WebSocket stream, asks the cloudlet about the VM, waits
out backoffs and call deadlines, and hands answers to the callers that wait.

A live migration announces itself (`moving`): the session then opens a standby
stream to the destination in a task of its own, so the reads and writes of the
current stream never wait for that connect, and at the commit it writes its
resends on the standby instead of connecting.

Answers reach their callers without a hand-over where they can: a call made
while the session's task is between reads (as it is right after answering the
previous call) reads the stream itself until its answer comes, handing out any
other answer it reads, so back-to-back calls cost one task wake-up each, as a
bare WebSocket client's do; a call made while that task is inside a read waits
for it to hand the answer over (a read is never cancelled to take it over).
Call deadlines share one timer per session.

The application sees latency, never an error, for drops, moves and a cloudlet
that came back from an older checkpoint; it sees an error only when a call's
deadline passes (`CallTimeout`, and the call may still apply later, exactly
once) or when the VM's state is really gone (`SessionLost`). A session's
connection work is one task, owned by the session and ended by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from cloudlet.errors import CloudletError, InvalidArgument, NoCloudletAvailable, SessionLost
from cloudlet.tasks import own
from mobile_client.session_events import (
    Answer,
    Backoff,
    CallFailed,
    CloseStream,
    DescribeVM,
    DropStandby,
    Event,
    Locate,
    Lost,
    NeedData,
    OpenStandby,
    OpenStream,
    Send,
    UseStandby,
    Vouch,
)
from mobile_client.session_protocol import MAX_IN_FLIGHT, SessionProtocol
from mobile_client.slots import CallSlots
from mobile_client.transport import Http, Location

__all__ = ["DEFAULT_CALL_DEADLINE_MS", "MAX_IN_FLIGHT", "Session", "SessionStats"]

log = logging.getLogger(__name__)

# A call's deadline when the application gives none: long enough to ride out a
# reconnection and a move, short enough that a dead session is noticed.
DEFAULT_CALL_DEADLINE_MS = 10_000
# Latencies kept for percentiles (a ring: recent interactions matter most).
LATENCY_WINDOW = 100_000
# What a failing stream raises while it is read or written: the stream is over.
_STREAM_ERRORS = (ConnectionError, RuntimeError, aiohttp.ClientError)
_STREAM_ENDS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR)
_BINARY = aiohttp.WSMsgType.BINARY
# A stream left because its VM moved is closed this long after: its close handshake
# (a frame each way, a turn of both loops) otherwise ran between the resends on the
# new stream and their answers, and kept the old cloudlet busy meanwhile (~0.2 ms
# of the downtime a client saw, on a 2-core host running all three).
MOVED_STREAM_CLOSE_DELAY_S = 0.01
_DELIVERED = (Answer, CallFailed)  # a tuple: `Answer | CallFailed` is built anew each time

Locator = Callable[[str], Awaitable[Location | None]]


class _Expired(Exception):
    """A call's deadline passed before its answer came (never leaves `call`)."""


@dataclass(frozen=True)
class SessionStats:
    """What a session measured: interaction latencies against its budget."""

    calls: int
    within_budget: float  # share of calls answered within the budget
    p50_ms: float
    p95_ms: float
    p99_ms: float
    reconnects: int
    moves_followed: int
    resent: int
    replayed: int


class Session:
    """Calls to one VM. Made by `CloudletClient.session()`; use as `async with`."""

    def __init__(self, http: Http, vm_id: str, location: Location, *, budget_ms: float,
                 seq: int = 0, locate: Locator | None = None,
                 call_deadline_ms: float = DEFAULT_CALL_DEADLINE_MS) -> None:
        self.vm_id = vm_id
        self.budget_ms = budget_ms
        self.call_deadline_ms = call_deadline_ms
        self._protocol = SessionProtocol(vm_id, location, seq=seq)
        self._http = http
        self._locate = locate
        # Callers wait here for a slot; the protocol counts the same calls (its
        # bound is the contract, this is how waiting for it looks on asyncio).
        self._slots = CallSlots(MAX_IN_FLIGHT)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # Call deadlines, by number, on the loop's clock. One timer per session, armed
        # for the earliest of them, rather than one per call: a timer handle made and
        # cancelled on every call was a measurable share of the SDK's per-call cost,
        # and deadlines are long, so the armed one is rarely moved.
        self._deadlines_s: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_s = 0.0
        # Who reads the current stream. The connection task does while it waits for
        # data (`_stream`), unless a caller leads: a call that finds that task between
        # reads (not inside `receive`) reads its own answer itself, saving the second
        # task wake-up of a hand-over, and hands others the answers it reads. The
        # connection task parks meanwhile, and takes back what the protocol asks for
        # beyond answers (`_stashed`, the first such event). A reader inside `receive`
        # is never cancelled for this: a call arriving then simply waits its answer.
        self._in_stream = False  # the connection task is in `_stream`
        self._reading = False  # ... and inside `receive`
        self._leader: asyncio.Task[Any] | None = None
        self._leader_seq = 0
        self._leader_expired = False  # the deadline timer cancelled the leader
        self._park: asyncio.Future[None] | None = None
        self._stashed: Event | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        # The stream opened ahead of a move (`OpenStandby`), and the task that opens
        # and then watches it (it must not read the current stream's turn).
        self._standby: aiohttp.ClientWebSocketResponse | None = None
        self._standby_task: asyncio.Task[None] | None = None
        self._retired: asyncio.Task[None] | None = None  # its watcher, being cancelled
        self._runner: asyncio.Task[None] | None = None
        # The loop the session started on, kept: on Python 3.11 every
        # `asyncio.get_running_loop()` (and `current_task()` without a loop) makes a
        # getpid() system call, three per call on the call path.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[bool]] = set()
        self._latencies_ms: list[float] = []
        self._over_budget = 0
        self._calls = 0

    # --- what the protocol knows --------------------------------------------------------

    @property
    def location(self) -> Location:
        """Where the VM is, as far as this session knows."""
        return self._protocol.location

    @property
    def max_message_bytes(self) -> int:
        """The largest call the VM's cloudlet takes."""
        return self._protocol.max_message_bytes

    @property
    def seq(self) -> int:
        """The sequence number of the last call this session sent."""
        return self._protocol.seq

    @property
    def pending(self) -> tuple[int, ...]:
        """The numbers of the calls sent and not answered yet (also those whose
        deadline passed: they stay queued until answered), in order."""
        return self._protocol.pending

    @property
    def reconnects(self) -> int:
        return self._protocol.reconnects

    @property
    def moves_followed(self) -> int:
        return self._protocol.moves_followed

    @property
    def standby(self) -> Location | None:
        """Where a standby stream is open (the VM is moving there), if anywhere."""
        return self._protocol.standby

    @property
    def standby_switches(self) -> int:
        """Moves followed onto a stream opened while the VM was on its way."""
        return self._protocol.standby_switches

    @property
    def resent(self) -> int:
        """Unanswered calls sent again on a new connection."""
        return self._protocol.resent

    @property
    def replayed(self) -> int:
        """Answered calls sent again to a cloudlet that lost them."""
        return self._protocol.replayed

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._runner is None:
            self._loop = loop = asyncio.get_running_loop()
            self._runner = loop.create_task(self._run(), name=f"cloudlet-session-{self.vm_id}")

    async def close(self) -> None:
        """Stop the connection task and close the stream. Calls still waiting fail.
        A stream left because its VM moved is closed `MOVED_STREAM_CLOSE_DELAY_S`
        after it was left, so closing right after a move waits up to that long."""
        runner, self._runner = self._runner, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        await self._drop_standby()
        await self._reap_standby_watcher()
        for task in list(self._closing):
            try:
                await task
            except Exception as exc:  # closing an old stream: logged, not fatal
                log.debug("closing an old stream of VM %s failed: %r", self.vm_id, exc)
        protocol = self._protocol
        if protocol.lost is None:
            protocol.close()
        while not isinstance(ev := protocol.next_event(), Lost):
            if isinstance(ev, _DELIVERED):
                self._deliver(ev)

    # --- calls ----------------------------------------------------------------------------

    async def call(self, fn: str, *args: int | float | bytes,
                   deadline_ms: float | None = None) -> Any:
        """Apply `fn` to the VM exactly once. Numeric arguments make a numeric call;
        a single `bytes` argument a bytes-in/bytes-out call, which returns bytes."""
        protocol = self._protocol
        if protocol.lost is not None:
            raise protocol.lost
        if self._runner is None:
            raise SessionLost("the session is not started (use `async with`)")
        if deadline_ms is not None and not deadline_ms > 0:
            raise InvalidArgument(f"deadline_ms must be positive, not {deadline_ms!r}")
        started = time.perf_counter()
        slots = self._slots
        if not slots.try_take():
            await slots.wait()
        try:
            numbered = protocol.call(fn, args)  # a refusal takes no number
        except BaseException:
            slots.give()
            raise
        seq = numbered.seq
        loop = self._loop
        assert loop is not None  # set with the runner, checked above
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[seq] = future
        deadline_s = (self.call_deadline_ms if deadline_ms is None else deadline_ms) / 1000
        gone = True  # the caller leaves without the answer (deadline, cancel)
        try:
            ws = self._ws
            if numbered.data is not None and ws is not None:
                # The stream is up and every resend went out before this call: an
                # uncompressed frame is written before `send_bytes` first awaits, so
                # frames leave in the order calls took their numbers.
                try:  # noqa: SIM105 (a plain `try` costs less than `suppress` per call)
                    await ws.send_bytes(numbered.data)
                except (ConnectionError, RuntimeError):
                    pass  # the reconnect resends it
            # On the deadline only this wait ends, not the call: it stays queued, is
            # resent on reconnects, and its answer is taken but handed to no one.
            if not future.done():
                at_s = loop.time() + deadline_s
                self._deadlines_s[seq] = at_s
                if self._timer is None or at_s < self._timer_at_s:
                    self._arm(loop, at_s)
                if (numbered.data is not None and ws is not None and ws is self._ws
                        and self._in_stream and not self._reading
                        and self._leader is None and self._stashed is None):
                    await self._lead(ws, seq, future)
            # Led, the answer is here: no trip through the future's `__await__`.
            result = future.result() if future.done() else await future
            gone = False  # answered: the protocol forgot the call as it took the answer
        except _Expired:
            raise protocol.deadline_passed(seq, deadline_s * 1000) from None
        finally:
            self._deadlines_s.pop(seq, None)
            del self._waiting[seq]
            if gone:
                protocol.caller_gone(seq)
            slots.give()
        # `_record`, inline: every call's path.
        latency_ms = (time.perf_counter() - started) * 1000
        self._calls += 1
        if latency_ms > self.budget_ms:
            self._over_budget += 1
        latencies = self._latencies_ms
        if len(latencies) >= LATENCY_WINDOW:
            del latencies[: LATENCY_WINDOW // 10]
        latencies.append(latency_ms)
        return result

    async def _lead(self, ws: aiohttp.ClientWebSocketResponse, seq: int,
                    future: asyncio.Future[Any]) -> None:
        """Read the stream until `future` has its answer, handing out every answer read
        on the way; stop early, leaving the rest to the connection task, when the
        protocol asks for more than answers. Returns, not raises, when the call's own
        deadline ended the read (`future` then holds that)."""
        protocol = self._protocol
        answer_in, waiting = protocol.answer_in, self._waiting
        loop = self._loop
        assert loop is not None
        task = asyncio.current_task(loop)
        assert task is not None
        self._leader, self._leader_seq = task, seq
        try:
            while not future.done():
                # `_receive_into`'s steps, here: one coroutine frame less per call.
                try:
                    msg = await ws.receive()
                except _STREAM_ERRORS as exc:
                    self._stream_broke(exc)
                else:
                    if msg.type is _BINARY:
                        answered = answer_in(msg.data)  # the common frame, first
                        if answered is not None:
                            waiter = waiting.get(answered[0])
                            if waiter is not None and not waiter.done():
                                waiter.set_result(answered[1])
                            continue
                    self._take_frame(msg)
                ev = protocol.next_event()
                while isinstance(ev, _DELIVERED):
                    self._deliver(ev)
                    ev = protocol.next_event()
                if not isinstance(ev, NeedData):
                    self._stashed = ev  # the connection task's to do, first
                    return
        except asyncio.CancelledError:
            # Cancelled by this call's deadline (the timer ended the wait too), and by
            # nothing else: carry on as a call whose deadline passed.
            if not self._leader_expired or task.uncancel() > 0:
                raise
        finally:
            self._leader = None
            self._leader_expired = False
            park = self._park
            if park is not None and not park.done():
                if self._stashed is not None:
                    park.set_result(None)
                else:
                    # Back-to-back calls lead one after another: the connection task
                    # is woken only if no call leads by the loop's next turn (each
                    # wake-up of it that finds a new leader is a task step wasted).
                    loop.call_soon(self._unpark_unled, park)

    def _unpark_unled(self, park: asyncio.Future[None]) -> None:
        """Nobody leads: the connection task reads the stream again."""
        if self._leader is None and not park.done():
            park.set_result(None)

    def _arm(self, loop: asyncio.AbstractEventLoop, at_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at_s, self._expire_due)
        self._timer_at_s = at_s

    def _expire_due(self) -> None:
        """The session's deadline timer fired: end the waits whose deadline passed and
        arm the timer for the earliest one left, if any."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        earliest_s = float("inf")
        for seq, at_s in self._deadlines_s.items():
            if at_s <= now_s:
                future = self._waiting.get(seq)
                if future is not None and not future.done():
                    future.set_exception(_Expired())
                    leader = self._leader
                    if leader is not None and self._leader_seq == seq:
                        self._leader_expired = True
                        leader.cancel()
            elif at_s < earliest_s:
                earliest_s = at_s
        if earliest_s != float("inf"):
            self._arm(loop, earliest_s)

    def _deliver(self, ev: Answer | CallFailed) -> None:
        future = self._waiting.get(ev.seq)
        if future is None or future.done():
            return
        if isinstance(ev, Answer):
            future.set_result(ev.value)
        else:
            future.set_exception(ev.error)

    def stats(self) -> SessionStats:
        ordered = sorted(self._latencies_ms)

        def pct(q: float) -> float:
            if not ordered:
                return float("nan")
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        within = 1 - self._over_budget / self._calls if self._calls else float("nan")
        p = self._protocol
        return SessionStats(self._calls, within, pct(0.50), pct(0.95), pct(0.99),
                            p.reconnects, p.moves_followed, p.resent, p.replayed)

    # --- connection ---------------------------------------------------------------------

    def notice_location(self, vm_id: str, where: Location) -> None:
        """The VM's retained location changed: if it is elsewhere now, reconnect there.
        (A stale location costs one round trip: the old cloudlet answers `vm_moved`.)"""
        if vm_id != self.vm_id:
            return
        ws = self._ws
        if self._protocol.location_noticed(where) and ws is not None:
            # The connection task is reading this stream: ending it wakes the task,
            # which then goes where the protocol says.
            own(self._closing, ws.close(), f"closing the stream of VM {self.vm_id}", log)

    async def _run(self) -> None:
        """Do what the protocol says, until it says the session is over: the one
        place a session reads and writes its stream and asks cloudlets about its VM."""
        protocol = self._protocol
        try:
            while True:
                ev = protocol.next_event()
                if isinstance(ev, NeedData):
                    if self._retired is not None:
                        await self._reap_standby_watcher()
                    ev = await self._stream()
                if isinstance(ev, _DELIVERED):
                    self._deliver(ev)
                elif isinstance(ev, Send):
                    await self._send(ev.data)
                elif isinstance(ev, DescribeVM):
                    try:
                        info = await self._http.vm_info(ev.location, self.vm_id)
                    except CloudletError as exc:
                        protocol.describe_failed(exc)
                    else:
                        protocol.described(info)
                elif isinstance(ev, OpenStream):
                    try:
                        self._ws = await self._http.ws_connect(ev.location, self.vm_id)
                    except CloudletError as exc:
                        protocol.open_failed(exc)
                    else:
                        protocol.stream_opened()
                elif isinstance(ev, CloseStream):
                    if ev.in_background:
                        # The close handshake is a round trip with the old place, which
                        # the standby's resends must not wait for (`close()` does).
                        ws, self._ws = self._ws, None
                        if ws is not None:
                            own(self._closing, _close_later(ws, MOVED_STREAM_CLOSE_DELAY_S),
                                f"closing a stream of VM {self.vm_id}", log)
                    else:
                        await self._close_stream()
                elif isinstance(ev, UseStandby):
                    ws = self._switch_to_standby()
                    if ws is None:
                        protocol.open_failed(NoCloudletAvailable(
                            f"the standby stream to {ev.location.node} ended"))
                    else:
                        self._ws = ws
                        protocol.stream_opened()
                elif isinstance(ev, OpenStandby):
                    await self._drop_standby()
                    self._standby_task = asyncio.get_running_loop().create_task(
                        self._open_standby(ev.location),
                        name=f"cloudlet-standby-{self.vm_id}")
                elif isinstance(ev, DropStandby):
                    await self._drop_standby()
                elif isinstance(ev, Vouch):
                    self._http.vouch(ev.where, by=ev.by)
                elif isinstance(ev, Locate):
                    protocol.located(await self._find(ev.vm_id))
                elif isinstance(ev, Backoff):
                    if ev.cause is not None:
                        log.info("VM %s: cannot reach %s (%s); retrying in %.2f s",
                                 self.vm_id, protocol.location.node, ev.cause.message,
                                 ev.delay_s)
                    await asyncio.sleep(ev.delay_s)
                elif isinstance(ev, Lost):
                    log.error("session of VM %s lost: %s", self.vm_id, ev.error.message)
                    return
        finally:
            await self._close_stream()
            await self._drop_standby()

    async def _stream(self) -> Event:
        """Read frames and hand out their answers for as long as the protocol asks for
        nothing else (the hot path: no trip through `_run`'s dispatch per answer);
        returns the first event that is not `NeedData`."""
        self._in_stream = True
        try:
            return await self._read()
        finally:
            self._in_stream = False
            self._park = None

    async def _read(self) -> Event:
        protocol, waiting = self._protocol, self._waiting
        loop = asyncio.get_running_loop()
        while True:
            if self._leader is not None:  # a caller reads: wait until it stops
                self._park = park = loop.create_future()
                await park
                continue
            stashed, self._stashed = self._stashed, None
            if stashed is not None:
                return stashed
            ws = self._ws
            if ws is None:  # closed under the protocol's feet (a location notice)
                protocol.stream_closed()
            else:
                self._reading = True
                try:
                    await self._receive_into(ws)
                finally:
                    self._reading = False
            ev = protocol.next_event()
            if isinstance(ev, Answer):
                while isinstance(ev, Answer):
                    future = waiting.get(ev.seq)
                    if future is not None and not future.done():
                        future.set_result(ev.value)
                    ev = protocol.next_event()
                if isinstance(ev, NeedData):
                    # Let the callers just answered run before reading again: a caller
                    # that calls again at once then finds this task between reads and
                    # reads its answer itself (see `_lead`).
                    await asyncio.sleep(0)
                    continue
            if not isinstance(ev, NeedData):
                return ev

    async def _receive_into(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read one frame of the VM's stream into the protocol: its data, or the
        stream's end (a break is logged; the protocol then reconnects)."""
        try:
            msg = await ws.receive()
        except _STREAM_ERRORS as exc:
            self._stream_broke(exc)
        else:
            self._take_frame(msg)

    def _take_frame(self, msg: aiohttp.WSMessage) -> None:
        if msg.type is _BINARY:
            self._protocol.receive_data(msg.data)
        elif msg.type in _STREAM_ENDS:
            self._protocol.stream_closed()

    def _stream_broke(self, exc: BaseException) -> None:
        """Reading or writing the stream failed: it is over (logged; the protocol
        then reconnects)."""
        log.info("VM %s: stream to %s broke (%r); reconnecting", self.vm_id,
                 self._protocol.location.node, exc)
        self._protocol.stream_closed()

    async def _send(self, data: bytes) -> None:
        ws = self._ws
        if ws is None:
            self._protocol.stream_closed()
            return
        try:
            await ws.send_bytes(data)
        except _STREAM_ERRORS as exc:
            self._stream_broke(exc)

    async def _close_stream(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # --- the standby stream (owned by `_standby_task` until taken) ------------------------

    async def _open_standby(self, where: Location) -> None:
        """Open the VM's stream at `where` (proving it first, as any stream does), keep
        it if the protocol still wants it, then watch it until it is taken or ends:
        the destination closes it if the VM will not arrive."""
        protocol = self._protocol
        try:
            ws = await self._http.ws_connect(where, self.vm_id)
        except CloudletError as exc:
            log.info("VM %s: no standby stream to %s (%s)", self.vm_id, where.node, exc.message)
            protocol.standby_closed(where)
            return
        if not protocol.standby_opened(where):
            await ws.close()
            return
        self._standby = ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type in _STREAM_ENDS:
                    break
                # Nothing was sent on it, so nothing it says is an answer, and what it
                # might say of places is not heard from a stream that is not current.
        except _STREAM_ERRORS:
            pass
        self._standby = None
        protocol.standby_closed(where)
        await ws.close()

    def _switch_to_standby(self) -> aiohttp.ClientWebSocketResponse | None:
        """The standby stream, taken over at once (None if it ended): the resends go
        out on it before its watcher has finished, which `_run` awaits before the
        stream is read. Safe to write first: the watcher's cancellation is queued to
        run before the loop next polls for I/O, so it cannot read an answer to them."""
        task, self._standby_task = self._standby_task, None
        if task is not None:
            task.cancel()
            self._retired = task
        ws, self._standby = self._standby, None
        if ws is not None and ws.closed:
            return None
        return ws

    async def _reap_standby_watcher(self) -> None:
        task, self._retired = self._retired, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _take_standby(self) -> aiohttp.ClientWebSocketResponse | None:
        """Stop watching the standby stream and hand it over; None if it ended."""
        task, self._standby_task = self._standby_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ws, self._standby = self._standby, None
        if ws is not None and ws.closed:
            return None
        return ws

    async def _drop_standby(self) -> None:
        ws = await self._take_standby()
        if ws is not None:
            await ws.close()

    async def _find(self, vm_id: str) -> Location | None:
        """Where the VM is when its cloudlet keeps failing or does not know it."""
        if self._locate is None:
            return None
        try:
            return await self._locate(vm_id)
        except CloudletError as exc:  # asking failed: as good as no answer
            log.info("VM %s: locating it failed (%s)", vm_id, exc.message)
            return None


async def _close_later(ws: aiohttp.ClientWebSocketResponse, delay_s: float) -> bool:
    """Close `ws` after `delay_s` (a stream nobody reads or writes any more)."""
    await asyncio.sleep(delay_s)
    return await ws.close()
