"""A session: a client's long-lived binding to one VM, which survives drops and moves.

Every call carries a sequence number, the VM's `seq` after it. The session
keeps every call it has sent and not had answered (`_pending`) and, until the
cloudlet says it has checkpointed them (`durable` in the answers), the calls it
had answered (`_journal`). That is all it needs to make each call apply exactly
once, whatever breaks:

- a dropped connection (either side): reconnect, resend what is pending; the
  daemon answers numbers it already applied from its reply log;
- the VM moved (a `moved` notice, or `410 vm_moved` from the old cloudlet, or
  its retained location): reconnect to the new cloudlet, resend;
- the cloudlet was killed and came back from an older checkpoint (its `seq` is
  behind calls already answered): resend those from the journal first, so the
  VM's state catches up to what the application was told.

The application sees latency, never an error, for all of these; it sees an
error only when a call's deadline passes (`CallTimeout`, and the call may
still apply later, exactly once) or when the VM's state is really gone
(`SessionLost`). A session's connection work is one task, owned by the session
and ended by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
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
from cloudlet.tasks import own
from mobile_client.transport import Http, Location

log = logging.getLogger(__name__)

# A call's deadline when the application gives none: long enough to ride out a
# reconnection and a move, short enough that a dead session is noticed.
DEFAULT_CALL_DEADLINE_MS = 10_000
# Reconnection backoff: quick first (a move takes milliseconds), capped so a
# cloudlet that comes back is found within a second.
BACKOFF_START_S = 0.02
BACKOFF_MAX_S = 1.0
# Answered calls kept until the cloudlet says they are checkpointed. Bounded, so
# a cloudlet that never checkpoints cannot make a session grow without end; past
# it, a rollback of the cloudlet is reported (`SessionLost`) rather than hidden.
JOURNAL_MAX_CALLS = 4096
JOURNAL_MAX_BYTES = 16 << 20
# Latencies kept for percentiles (a ring: recent interactions matter most).
LATENCY_WINDOW = 100_000
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

Locator = Callable[[str], Awaitable[Location | None]]


@dataclass
class _Pending:
    seq: int
    message: bytes
    future: asyncio.Future[Any]


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
        self.location = location
        self.budget_ms = budget_ms
        self.call_deadline_ms = call_deadline_ms
        self._http = http
        self._locate = locate
        self._next_seq = seq + 1
        self._acked = seq  # every answer up to here has arrived (sent as `ack`)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._pending: dict[int, _Pending] = {}
        self._journal: OrderedDict[int, bytes] = OrderedDict()
        self._journal_bytes = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._lost: CloudletError | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[bool]] = set()
        self._latencies_ms: list[float] = []
        self._over_budget = 0
        self._calls = 0
        self.reconnects = 0
        self._just_moved = False
        self._missing_since: float | None = None
        self._calls_answered = 0
        self.moves_followed = 0
        self.resent = 0  # unanswered calls sent again on a new connection
        self.replayed = 0  # answered calls sent again to a cloudlet that lost them

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(
                self._run(), name=f"cloudlet-session-{self.vm_id}")

    async def close(self) -> None:
        """Stop the connection task and close the stream. Calls still waiting fail."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        for task in list(self._closing):
            try:
                await task
            except Exception as exc:  # closing an old stream: logged, not fatal
                log.debug("closing an old stream of VM %s failed: %r", self.vm_id, exc)
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(SessionLost(f"session of VM {self.vm_id} was closed"))
        self._pending.clear()

    # --- calls ----------------------------------------------------------------------------

    async def call(self, fn: str, *args: int | float | bytes,
                   deadline_ms: float | None = None) -> Any:
        """Apply `fn` to the VM exactly once. Numeric arguments make a numeric call;
        a single `bytes` argument a bytes-in/bytes-out call, which returns bytes."""
        if self._lost is not None:
            raise self._lost
        if self._runner is None:
            raise SessionLost("the session is not started (use `async with`)")
        if deadline_ms is not None and not deadline_ms > 0:
            raise InvalidArgument(f"deadline_ms must be positive, not {deadline_ms!r}")
        body = self._body(fn, args)  # checked before it takes a number: a refusal uses none
        started = time.perf_counter()
        await self._slots.acquire()
        seq = self._next_seq
        self._next_seq += 1
        body["id"] = body["seq"] = seq
        body["ack"] = self._acked
        message: bytes = msgpack.packb(body)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._release_slot)
        self._pending[seq] = _Pending(seq, message, future)
        # Either `_resend` sees this call in `_pending` (the stream is not marked
        # connected until it has sent every pending call), or the stream is up and
        # this sends it. An uncompressed frame is written before `send_bytes` first
        # awaits, so frames leave in the order calls took their numbers.
        ws = self._ws
        if ws is not None and self._connected.is_set():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(message)  # a failure: the reconnect resends it
        deadline_s = (self.call_deadline_ms if deadline_ms is None else deadline_ms) / 1000
        try:
            async with asyncio.timeout(deadline_s):
                # On a timeout this future is cancelled, not the call: it stays in
                # `_pending`, is resent on reconnects, and its answer is dropped.
                result = await future
        except TimeoutError:
            raise CallTimeout(
                f"call {seq} ({fn}) to VM {self.vm_id} got no answer within "
                f"{deadline_s * 1000:.0f} ms; it stays queued and applies at most once"
            ) from None
        self._record((time.perf_counter() - started) * 1000)
        return result

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

    def _release_slot(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()

    def _record(self, latency_ms: float) -> None:
        self._calls += 1
        if latency_ms > self.budget_ms:
            self._over_budget += 1
        if len(self._latencies_ms) >= LATENCY_WINDOW:
            del self._latencies_ms[: LATENCY_WINDOW // 10]
        self._latencies_ms.append(latency_ms)

    def stats(self) -> SessionStats:
        ordered = sorted(self._latencies_ms)

        def pct(q: float) -> float:
            if not ordered:
                return float("nan")
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        within = 1 - self._over_budget / self._calls if self._calls else float("nan")
        return SessionStats(self._calls, within, pct(0.50), pct(0.95), pct(0.99),
                            self.reconnects, self.moves_followed, self.resent,
                            self.replayed)

    @property
    def seq(self) -> int:
        """The sequence number of the last call this session sent."""
        return self._next_seq - 1

    # --- connection ---------------------------------------------------------------------

    async def _run(self) -> None:
        """Stay connected to wherever the VM is, until closed."""
        backoff = BACKOFF_START_S
        failures = 0
        first = True
        while True:
            try:
                # Following a `moved` notice, the new place is known and holds the VM's
                # exact state: go straight to its stream (a round trip saved off the
                # downtime). Otherwise ask where the VM stands first.
                vm_seq = None if self._just_moved else await self._find_vm()
                self._just_moved = False
                ws = await self._http.ws_connect(self.location, self.vm_id)
            except (VMMoved, VMNotFound):
                continue  # `_find_vm` updated the location, or will give up
            except FINAL_ERRORS as exc:
                self._give_up(exc)
                return
            except CloudletError as exc:
                failures += 1
                if failures % LOCATE_AFTER_FAILURES == 0 and await self._relocate():
                    continue
                log.info("VM %s: cannot reach %s (%s); retrying in %.2f s", self.vm_id,
                         self.location.node, exc.message, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            failures = 0
            if not first:
                self.reconnects += 1
            first = False
            self._ws = ws
            opened = time.monotonic()
            answered_before = self._calls_answered
            ended = "closed"
            try:
                await self._resend(ws, vm_seq)
                ended = await self._read(ws)
            except FINAL_ERRORS as exc:
                self._give_up(exc)
                return
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                log.info("VM %s: stream to %s broke (%r); reconnecting", self.vm_id,
                         self.location.node, exc)
            finally:
                self._connected.clear()
                self._ws = None
                await ws.close()
            lived_s = time.monotonic() - opened
            if (ended == "closed" and lived_s < STABLE_STREAM_S
                    and self._calls_answered == answered_before):
                await asyncio.sleep(backoff)  # it closes at once: do not hammer it
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            else:
                backoff = BACKOFF_START_S

    async def _relocate(self) -> bool:
        """The VM's cloudlet keeps failing: is the VM somewhere else now?"""
        found = await self._locate(self.vm_id) if self._locate else None
        if found is None or found == self.location:
            return False
        self._move_to(found)
        return True

    async def _find_vm(self) -> int:
        """The VM's current `seq` at `self.location`, following moves; raises
        `VMMoved`/`VMNotFound` after updating the location, to be tried again."""
        try:
            info = await self._http.vm_info(self.location, self.vm_id)
        except VMMoved as moved:
            self._follow(moved.details)
            raise
        except VMNotFound:
            found = await self._locate(self.vm_id) if self._locate else None
            if found is None or found == self.location:
                # A VM in flight is briefly nowhere (a destination settling an in-doubt
                # migration with a restarting source): only a long absence is a loss.
                now = time.monotonic()
                self._missing_since = self._missing_since or now
                if now - self._missing_since > MISSING_GRACE_S:
                    raise SessionLost(f"VM {self.vm_id} is on no cloudlet this client knows "
                                      f"(last seen on {self.location.node})") from None
                raise NoCloudletAvailable(f"VM {self.vm_id} is not at {self.location.node} "
                                          "(yet)") from None
            self._move_to(found)
            raise
        self._missing_since = None
        seq = info.get("seq")
        cap = info.get("max_request_bytes")
        if type(cap) is int and cap > 0:
            self.max_message_bytes = cap
        if type(seq) is not int:
            raise SessionLost(f"cloudlet {self.location.node} described VM {self.vm_id} "
                              "without a sequence number")
        return seq

    def _follow(self, details: dict[str, Any]) -> None:
        """Follow the VM where the cloudlet it was on says it went (a `moved` notice on
        its stream, or its `410 vm_moved`). That cloudlet proved itself to this client,
        and it proved the destination before sending it the VM: its word vouches for
        the destination, so the reconnect needs no challenge of its own."""
        endpoint, node = details.get("endpoint"), details.get("node")
        if not isinstance(endpoint, str):
            raise SessionLost(f"VM {self.vm_id} moved, but the notice says not where")
        where = Location(str(node or endpoint), endpoint)
        self._http.vouch(where, by=self.location)
        self._move_to(where)

    def _move_to(self, where: Location) -> None:
        self._just_moved = True
        if where != self.location:
            log.info("VM %s: following it from %s to %s", self.vm_id, self.location.node,
                     where.node)
            self.location = where
            self.moves_followed += 1

    def notice_location(self, vm_id: str, where: Location) -> None:
        """The VM's retained location changed: if it is elsewhere now, reconnect there.
        (A stale location costs one round trip: the old cloudlet answers `vm_moved`.)"""
        if vm_id != self.vm_id or where == self.location:
            return
        self._move_to(where)
        ws = self._ws
        if ws is not None:
            # Ending the stream makes `_run` reconnect to the new location.
            own(self._closing, ws.close(), f"closing the stream of VM {self.vm_id}", log)

    async def _resend(self, ws: aiohttp.ClientWebSocketResponse, vm_seq: int | None) -> None:
        """Bring the VM up to date: journaled calls it lost (a rollback), then every
        call not yet answered, in order. Numbers it already applied are answered
        from its reply log, not applied again."""
        lowest_needed = min(self._pending, default=self._next_seq)
        if vm_seq is not None and vm_seq + 1 < lowest_needed:
            missing = range(vm_seq + 1, lowest_needed)
            if any(seq not in self._journal for seq in missing):
                raise SessionLost(
                    f"VM {self.vm_id} on {self.location.node} is at call {vm_seq}: it lost "
                    f"calls up to {lowest_needed - 1} that were answered and are no longer "
                    "kept by this client (it came back from an older checkpoint)")
            log.warning("VM %s rolled back to %d; replaying %d answered calls", self.vm_id,
                        vm_seq, len(missing))
            for seq in missing:
                await ws.send_bytes(self._journal[seq])
            self.replayed += len(missing)
        sent_upto = 0
        while todo := sorted(seq for seq in self._pending if seq > sent_upto):
            for seq in todo:  # calls made meanwhile are picked up by the next pass
                pending = self._pending.get(seq)
                if pending is not None:
                    await ws.send_bytes(pending.message)
                    self.resent += self.reconnects > 0  # a first connection sends, not resends
            sent_upto = todo[-1]
        # No await since the last look at `_pending`: every later call sends itself.
        self._connected.set()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Deliver answers until the stream ends; returns why: "moved" (go to the
        new place), "resync" (ask the VM where it is at), or "closed"."""
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            reply = msgpack.unpackb(msg.data)
            if not isinstance(reply, dict):
                continue
            moved = reply.get("moved")
            if isinstance(moved, dict):
                self._follow(moved)
                return "moved"
            seq = reply.get("id")
            if type(seq) is not int or seq not in self._pending:
                continue  # a replayed call's answer, or a duplicate: already delivered
            pending = self._pending.pop(seq)
            error = reply.get("error")
            if error is not None:
                exc = error_from_wire(error)
                if isinstance(exc, SequenceGap | VMNotFound):
                    # The cloudlet rolled back, or lost the VM: find where it stands.
                    self._pending[seq] = pending
                    return "resync"
                if isinstance(exc, VMMoved):
                    self._pending[seq] = pending
                    self._follow(exc.details)
                    return "moved"
                if isinstance(exc, SequenceConflict):
                    vm_seq = exc.details.get("vm_seq")
                    if type(vm_seq) is int and vm_seq >= self._next_seq:
                        self._next_seq = vm_seq + 1  # another writer: number after it
                self._answered(seq, pending)
                if not pending.future.done():
                    pending.future.set_exception(exc)
            else:
                self._answered(seq, pending)
                if not pending.future.done():
                    pending.future.set_result(reply.get("data", reply.get("result")))
            durable = reply.get("durable")
            if type(durable) is int:
                self._journal_trim(durable)
        return "closed"

    def _answered(self, seq: int, pending: _Pending) -> None:
        self._calls_answered += 1
        self._journal_add(seq, pending.message)
        while self._acked + 1 < self._next_seq and self._acked + 1 not in self._pending:
            self._acked += 1

    def _journal_add(self, seq: int, message: bytes) -> None:
        self._journal[seq] = message
        self._journal_bytes += len(message)
        while len(self._journal) > JOURNAL_MAX_CALLS or self._journal_bytes > JOURNAL_MAX_BYTES:
            _, old = self._journal.popitem(last=False)
            self._journal_bytes -= len(old)

    def _journal_trim(self, durable_seq: int) -> None:
        while self._journal:
            seq = next(iter(self._journal))
            if seq > durable_seq:
                break
            self._journal_bytes -= len(self._journal.pop(seq))

    def _give_up(self, exc: CloudletError) -> None:
        log.error("session of VM %s lost: %s", self.vm_id, exc.message)
        self._lost = exc
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()


