"""Async drivers: run a migration's state machine over a `Channel`, with deadlines.

Why: the daemon should only have to adapt its peer WebSocket to a `Channel`
(`send(bytes)`, `recv() -> bytes`) and supply a few hooks; the loop that moves
bytes, the deadline on every wait, and what a failure means (before the commit:
abort, and the VM resumes at the source) live here, once, tested over memory
and over real TCP.

Hooks, source side (`SourceHooks`): `pause()` stops calls into the VM and
returns once none is running; `resume()` lets them in again; `tombstone()`
records durably that the VM moved, before the `Commit` goes out; `annex()` is the
opaque state that travels with the VM (e.g. the reply cache); `throttle(s)`
spaces calls at least `s` apart (auto-converge; 0 lifts it, as the driver does
when the migration ends); `committed()`, if the hooks have it, is called once
the decision is durable, before the `Commit` is written (to tell the VM's
clients where it went);
`keep_final(snapshot)`, if they have it, gets the final round while the
destination takes it in (to write it ahead where the decision keeps it). `VMGate`
is a ready-made gate for VMs called from the event loop's thread.

Hooks, destination side (`run_destination`'s arguments): `persist(round)` makes a
round durable; `resolve(id)` asks the source, in doubt, whether it committed;
`ready(vm, annex)` and `activate(vm, annex)` let a daemon build the VM's hosting
while the source decides, and serve it at the `Commit` without waiting for the
driver to end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from cloudlet.errors import CloudletError, MigrationChannelLost, MigrationProtocolError, VMMoved
from cloudlet.migration import collections_off
from cloudlet.migration.chunkstore import ChunkStore
from cloudlet.migration.destination import DestinationMigration, DestinationState, ImageSource
from cloudlet.migration.events import (
    ActivateVM,
    BecomeTombstone,
    DiscardVM,
    Done,
    KeepFinal,
    NeedData,
    PauseVM,
    PersistRound,
    ResumeVM,
    Send,
    Throttle,
)
from cloudlet.migration.messages import MAX_MESSAGE_BYTES, Offer
from cloudlet.migration.pacing import CallPacer
from cloudlet.migration.source import PreCopyPolicy, SourceMigration
from cloudlet.migration.stats import MigrationStats
from cloudlet.vm import VM

# Every wait on the peer: a round's window of 4 MiB needs ~1.3 s at 25 Mbit/s;
# ten seconds of silence means the peer or the path is gone.
DEFAULT_DEADLINE_S = 10.0
# The steps that touch a large VM's memory run in a worker thread, so a daemon's
# other VMs keep answering while it migrates: round 0's capture at the source (the
# whole overlay, of a VM of this size or more) and, at the destination, staging a
# message of this size or more (a round's chunks). The rest runs inline: the final
# round and the commit are small, and on the downtime's path a thread hop costs
# more than the work (the worker waits for the loop's thread to give up the GIL,
# up to Python's 5 ms switch interval when the loop is busy).
OFF_LOOP_MEMORY_BYTES = 2 << 20
OFF_LOOP_MESSAGE_BYTES = 256 << 10
ABORT_NOTICE_DEADLINE_S = 1.0  # telling the peer we gave up is best effort
FREE_AFTER_S = 0.05  # a finished migration's state is freed this long after the end
# What a failing channel raises (a protocol error here is a channel's framing check).
_CHANNEL_ERRORS = (MigrationChannelLost, MigrationProtocolError, ConnectionError, OSError,
                   EOFError, asyncio.IncompleteReadError)

log = logging.getLogger(__name__)


class Channel(Protocol):
    """One ordered, reliable, message-framed connection to the peer."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """The next message; raises (MigrationChannelLost, OSError, ...) once closed."""
        ...


class SourceHooks(Protocol):
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def tombstone(self, event: BecomeTombstone) -> None: ...
    def annex(self) -> dict[str, Any]: ...
    def throttle(self, call_interval_s: float) -> None: ...


class VMGate:
    """Source hooks for a VM called from the event loop: calls go through `call()`,
    which waits while the VM is paused; `pause()` waits for the running call.
    Once the VM has moved, waiting and later calls raise `VMMoved`."""

    def __init__(self, annex: dict[str, Any] | None = None) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._lock = asyncio.Lock()
        self._annex = annex or {}
        self.tombstoned: BecomeTombstone | None = None
        self.pacer = CallPacer()

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        await self.pacer.wait_turn()
        while True:
            await self._open.wait()
            await self._lock.acquire()
            if self.tombstoned is not None:
                self._lock.release()
                raise VMMoved(f"VM {self.tombstoned.vm_id} has moved", vm=self.tombstoned.vm_id)
            if self._open.is_set():
                break
            self._lock.release()
        try:
            yield
        finally:
            self._lock.release()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    async def pause(self) -> None:
        self._open.clear()
        async with self._lock:  # the running call, if any, has finished
            pass

    async def resume(self) -> None:
        if self.tombstoned is None:
            self._open.set()

    async def tombstone(self, event: BecomeTombstone) -> None:
        self.tombstoned = event
        self._open.set()  # wake waiting calls: they learn that the VM moved

    def annex(self) -> dict[str, Any]:
        return self._annex

    def throttle(self, call_interval_s: float) -> None:
        self.pacer.set_interval(call_interval_s)


async def run_source(vm: VM, channel: Channel, *, hooks: SourceHooks | None = None,
                     vm_access: Callable[[], AbstractAsyncContextManager[None]] | None = None,
                     policy: PreCopyPolicy | None = None,
                     image_wasm: bytes | Callable[[], bytes] | None = None,
                     migration_id: str | None = None, deadline_s: float = DEFAULT_DEADLINE_S,
                     clock: Callable[[], float] = time.monotonic,
                     keeps_final: bool = False,
                     decides_at_final: bool = False) -> MigrationStats:
    """Migrate `vm` out over `channel`. Returns the stats; `stats.outcome` is
    "committed" (the VM is the destination's now: drop it) or "aborted" (it
    serves here again, `hooks.resume()` was called). Never raises for a peer's
    or the channel's failure; a cancellation resumes the VM and propagates.
    `keeps_final`: `hooks.tombstone` keeps `event.final_round` durable with the
    decision (so the destination need not flush it before `Ready`).
    `decides_at_final` (with `keeps_final`): the decision is made as `Final` goes,
    while the destination takes it in, not after its `Ready` (see
    `cloudlet.migration.source`); the clients' `committed` hook runs then too.
    Only for a destination that persists its rounds and can fetch the kept final
    round from these hooks (a daemon's `Outgoing` serves it to its peer): one whose
    `Final` never arrives is in doubt without it, and lands the VM from those."""
    hooks = hooks or VMGate()
    access = vm_access or _no_lock
    mig = SourceMigration(vm, migration_id=migration_id, policy=policy, image_wasm=image_wasm,
                          keeps_final=keeps_final, decides_at_final=decides_at_final,
                          clock=clock)
    large = vm.memory_bytes >= OFF_LOOP_MEMORY_BYTES
    holding = False
    async with access():
        await _step(mig.start, large)  # round 0: the whole overlay is captured
    try:
        while True:
            async with access():  # the machine reads the VM: no call may run meanwhile
                ev = mig.next_event()
            try:
                if isinstance(ev, Done):
                    return mig.stats
                if isinstance(ev, Send | NeedData):
                    data = await _exchange(ev, channel, deadline_s)
                    if data is not None:
                        async with access():
                            mig.receive(data)
                elif isinstance(ev, PauseVM):
                    if not holding:  # none inside the pause (collections_off)
                        collections_off.hold()
                        holding = True
                    async with asyncio.timeout(deadline_s):
                        await hooks.pause()
                    mig.paused(hooks.annex())
                elif isinstance(ev, ResumeVM):
                    await hooks.resume()
                    mig.stats.mark_resumed(clock())
                    return mig.stats
                elif isinstance(ev, Throttle) and hasattr(hooks, "throttle"):
                    hooks.throttle(ev.call_interval_s)
                elif isinstance(ev, KeepFinal) and hasattr(hooks, "keep_final"):
                    hooks.keep_final(ev.final_round)
                elif isinstance(ev, BecomeTombstone):
                    await _decide(mig, hooks, ev)
                    if mig.outcome == "committed":
                        _committed(hooks)
            except TimeoutError:
                if mig.outcome == "committed":
                    return mig.stats  # the Commit may be late; the destination will ask
                mig.abort("migration_timeout", f"no progress within {deadline_s} s")
                await _notify_abort(mig, channel)
            except _CHANNEL_ERRORS as exc:
                if mig.outcome == "committed":
                    return mig.stats
                mig.abort("migration_channel_lost", f"channel lost: {exc!r}", tell_peer=False)
    except BaseException:
        if mig.outcome != "committed":  # cancelled or a hook failed: never strand the VM
            mig.abort("migration_aborted", "the source driver stopped", tell_peer=False)
            await hooks.resume()
        raise
    finally:
        lift = getattr(hooks, "throttle", None)  # hooks written before throttling existed
        if lift is not None:
            lift(0.0)  # the spacing was for this migration only
        if holding:
            collections_off.release()
        _free_later(mig)


async def _decide(mig: SourceMigration, hooks: SourceHooks, ev: BecomeTombstone) -> None:
    """The commit point: `hooks.tombstone`. If it fails, nothing was decided, whatever
    the error (a full disk's is an OSError, like a lost channel's, but the channel is
    fine): the `Commit` must not go, and the VM serves here again. (Taken for a lost
    channel after the machine's commit, it returned "committed": the source dropped
    the VM, the destination, never told, asked and heard "no": the VM was nowhere.)

    Never cut short: the decision runs as its own task, and a cancellation of the
    driver meanwhile waits for it, then propagates. What the driver does next
    (resume the VM, or leave it moved) then follows what is on disk: a decision
    written by a worker thread after its awaiter was cancelled used to count as
    none, and one refused by a cancellation left the VM paused for good."""
    decision = asyncio.ensure_future(hooks.tombstone(ev))
    cancelled = False
    while not decision.done():
        try:
            await asyncio.wait((decision,))
        except asyncio.CancelledError:
            cancelled = True
    try:
        decision.result()
    except (Exception, asyncio.CancelledError) as exc:
        code = exc.code if isinstance(exc, CloudletError) else "migration_decision_failed"
        log.error("migration %s: the decision could not be made durable (%r); the VM "
                  "stays here", mig.migration_id, exc)
        mig.decision_failed(code, f"the decision could not be made durable: {exc!r}")
    if cancelled:
        raise asyncio.CancelledError


def _committed(hooks: SourceHooks) -> None:
    """The decision is durable: hooks that tell others the VM moved (its clients) do
    it now, before the `Commit` is written. Of the two paths that follow, the
    clients' switch to their standby streams and the `Commit`'s trip with the
    landing, the destination's is the shorter since it lands at once
    (`run_destination`'s `activate`), and the clients' needs a core of its own:
    it goes first."""
    committed = getattr(hooks, "committed", None)  # optional, as `throttle`
    if committed is None:
        return
    try:
        committed()
    except Exception:  # the decision stands: the Commit must still go
        log.exception("the source's committed hook failed")


LandingHook = Callable[[VM, dict[str, Any]], None]


def _landing_hook(hook: LandingHook | None, name: str, vm: VM, annex: dict[str, Any]) -> None:
    """Call a destination's `ready` or `activate`: a failure there is the caller's
    (it still gets the VM), never the migration's."""
    if hook is None:
        return
    try:
        hook(vm, annex)
    except Exception:
        log.exception("the destination's %s hook failed for VM %s", name, vm.id)


def _free_later(mig: SourceMigration | DestinationMigration) -> None:
    """Keep a finished migration's state alive a little longer: freeing it (the
    digests of every chunk offered, a round's buffers) takes a millisecond of a
    core, which right after the commit the VM's first calls at the destination
    and its clients' switch are waiting for."""
    with suppress(RuntimeError):  # no running loop: freed now
        asyncio.get_running_loop().call_later(FREE_AFTER_S, _keep, mig)


def _keep(_: object) -> None:
    """Holds its argument until called (see `_free_later`)."""


async def _step(step: Callable[[], None], large: bool) -> None:
    """Run one state-machine step: in a worker thread when it may touch a large VM's
    memory (the machine is only ever driven by one task, so this is safe)."""
    if large:
        await asyncio.to_thread(step)
    else:
        step()


async def _exchange(ev: Send | NeedData, channel: Channel, deadline_s: float) -> bytes | None:
    """Carry out a Send (None back) or a NeedData (the peer's next message), each
    within the deadline: the one place both drivers touch the channel."""
    async with asyncio.timeout(deadline_s):
        if isinstance(ev, Send):
            await channel.send(ev.data)
            return None
        return await channel.recv()


def _no_lock() -> AbstractAsyncContextManager[None]:
    return nullcontext()


async def _notify_abort(mig: SourceMigration | DestinationMigration, channel: Channel) -> None:
    """Send the queued Abort best effort, leaving the other events queued."""
    ev = mig.next_send()
    if ev is not None:
        with suppress(TimeoutError, *_CHANNEL_ERRORS):
            async with asyncio.timeout(ABORT_NOTICE_DEADLINE_S):
                await channel.send(ev.data)


@dataclass
class Received:
    """What `run_destination` ends with."""

    outcome: str  # "committed", "aborted" or "in_doubt"
    stats: MigrationStats
    vm: VM | None = None  # committed: serve it
    annex: dict[str, Any] = field(default_factory=dict)
    migration: DestinationMigration | None = None  # in doubt: `resolve()` it later


async def run_destination(channel: Channel, images: ImageSource, store: ChunkStore, *,
                          resolve: Callable[[str], Awaitable[bool]] | None = None,
                          persist: Callable[[PersistRound], Awaitable[None]] | None = None,
                          admit: Callable[[Offer], None] | None = None,
                          max_memory_bytes: int | None = None,
                          deadline_s: float = DEFAULT_DEADLINE_S,
                          clock: Callable[[], float] = time.monotonic,
                          ready: LandingHook | None = None,
                          activate: LandingHook | None = None) -> Received:
    """Receive one VM over `channel`. If the channel fails between `Ready` and
    `Commit`, `resolve(migration_id)` asks the source whether it committed; without
    it (or if it fails) the outcome is "in_doubt" and the held VM is in
    `migration.vm` until someone calls `migration.resolve()`. From a source that
    decides at `Final`, a failure before the final round arrived is "in_doubt"
    too, with `migration.has_final` false: the driver does not ask, and if the
    source committed the caller restores the VM from the rounds `persist` wrote
    and the final round the source kept.

    `ready(vm, annex)` is called once the VM is whole and held, while the source
    decides (a daemon builds what will serve it then); `activate(vm, annex)` at the
    `Commit`, from inside the driver (a daemon serves the VM from there, before
    the driver's own ending). Both are synchronous, and what they raise is logged
    and ignored: the VM is still returned, and the caller lands it the usual way."""
    kwargs: dict[str, Any] = {"clock": clock, "admit": admit}
    if max_memory_bytes is not None:
        kwargs["max_memory_bytes"] = max_memory_bytes
    mig = DestinationMigration(images, store, **kwargs)
    activated: ActivateVM | None = None
    holding = False  # collections held off from the final round on
    readied = False
    try:
        while True:
            ev = mig.next_event()
            try:
                if isinstance(ev, Done):
                    # In doubt without the final round, "committed" is the caller's to
                    # act on (from the rounds it persisted and the source's copy).
                    if (mig.state.value == "in_doubt" and resolve is not None
                            and mig.has_final):
                        try:
                            async with asyncio.timeout(deadline_s):
                                mig.resolve(await resolve(mig.migration_id))
                            continue
                        except Exception as exc:  # it stays in doubt; said, not hidden
                            log.warning("migration %s stays in doubt: asking its source "
                                        "failed (%r); it is asked again at restart",
                                        mig.migration_id, exc)
                    break
                if isinstance(ev, Send | NeedData):
                    if (isinstance(ev, NeedData) and not readied and mig.vm is not None
                            and mig.state is DestinationState.READY):
                        readied = True  # the final round is in: waiting for the Commit
                        _landing_hook(ready, "ready", mig.vm, mig.annex)
                    data = await _exchange(ev, channel, deadline_s)
                    if data is not None:
                        # Staging a round's chunks; the small final round stays inline.
                        # No collection while a message is taken in: a `final` may be
                        # this one, and from it on the VM is paused at the source.
                        if not holding:
                            collections_off.hold()
                        try:
                            await _step(functools.partial(mig.receive, data),
                                        len(data) >= OFF_LOOP_MESSAGE_BYTES)
                        finally:
                            holding = mig.state.value in ("ready", "in_doubt", "committed")
                            if not holding:
                                collections_off.release()
                elif isinstance(ev, PersistRound):
                    if persist is not None:
                        try:
                            await persist(ev)
                        except Exception as exc:  # a full disk: refuse, the source keeps it
                            mig.persist_failed(repr(exc))
                elif isinstance(ev, ActivateVM):
                    activated = ev
                    mig.stats.mark_resumed(clock())
                    _landing_hook(activate, "activate", ev.vm, ev.annex)
                elif isinstance(ev, DiscardVM):
                    pass  # the machine dropped everything already
            except TimeoutError:
                mig.abort("migration_timeout", f"no progress within {deadline_s} s")
                await _notify_abort(mig, channel)
            except _CHANNEL_ERRORS as exc:
                mig.abort("migration_channel_lost", f"channel lost: {exc!r}", tell_peer=False)
    except BaseException:
        mig.abort("migration_aborted", "the destination driver stopped", tell_peer=False)
        raise
    finally:
        if holding:  # a daemon holds it on over the landing itself, if it wants
            collections_off.release()
        _free_later(mig)
    if activated is not None:
        return Received("committed", mig.stats, activated.vm, activated.annex)
    if mig.outcome == "in_doubt":
        return Received("in_doubt", mig.stats, migration=mig)
    return Received(mig.outcome, mig.stats)


# --- channels ------------------------------------------------------------------------


class MemoryChannel:
    """One end of an in-process channel pair (for tests and same-process moves)."""

    _CLOSED = b""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self._inbox, self._outbox = inbox, outbox
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise MigrationChannelLost("channel is closed")
        await self._outbox.put(bytes(data))

    async def recv(self) -> bytes:
        if self.closed:
            raise MigrationChannelLost("channel is closed")
        data = await self._inbox.get()
        if data == self._CLOSED:
            self.closed = True
            raise MigrationChannelLost("the peer closed the channel")
        return data

    def close(self) -> None:
        """Close both directions, as a dropped connection would."""
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(self._CLOSED)
            self._inbox.put_nowait(self._CLOSED)


def memory_channel_pair() -> tuple[MemoryChannel, MemoryChannel]:
    a: asyncio.Queue[bytes] = asyncio.Queue()
    b: asyncio.Queue[bytes] = asyncio.Queue()
    return MemoryChannel(a, b), MemoryChannel(b, a)


class StreamChannel:
    """A channel over an asyncio stream (TCP): each message is a u32 length + bytes."""

    _LEN = struct.Struct(">I")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.reader, self.writer = reader, writer
        self.max_message_bytes = max_message_bytes

    async def send(self, data: bytes) -> None:
        self.writer.write(self._LEN.pack(len(data)))
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        (n,) = self._LEN.unpack(await self.reader.readexactly(self._LEN.size))
        if n > self.max_message_bytes:
            raise MigrationProtocolError(f"message of {n} bytes; the limit is "
                                         f"{self.max_message_bytes}")
        return await self.reader.readexactly(n)

    async def close(self) -> None:
        self.writer.close()
        with suppress(*_CHANNEL_ERRORS):
            await self.writer.wait_closed()
