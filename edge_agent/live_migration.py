"""Live migration as a cloudlet carries it out: both ends of `cloudlet.migration`.

The protocol (pre-copy rounds while the VM serves, then stop-and-copy, then an
atomic commit) is `cloudlet.migration`'s pure state machines; this module only
connects them to the daemon: a peer WebSocket as the channel, the VM's locks as
the pause, the daemon's disk for what must survive a crash.

Who decides: the source, as it sends the final round (`decides_at_final`: every
earlier round is durable at the destination by then; a VM that grew past its
offer is decided at the destination's `Ready` instead). Before it sends
`Commit` it makes the tombstone durable: the migration's record, written
as pre-copy started (`STATE/vms/ID.moved.MIGRATION.prepared`), is marked decided
in place (edge_agent/tombstones.py), and the final round is written into the
same record, durable by the same flush. The destination makes every pre-copy
round durable before it acknowledges it (`STATE/incoming/MIGRATION/NNNN.snap`:
the overlay, then deltas) and writes its own copy of the final round after the
landing, over a zero-filled `final.snap`, off the downtime's path; a restart
that finds no whole one there fetches the source's copy (`GET
/v1/peer/migrations/ID/final`), and once its own is flushed it lets the source
drop that (`DELETE`, same route). So once the source decides, a crash of either
side cannot lose the VM. A destination that fails once a round is durable there
(a lost channel, a timeout, a bad message), or restarted with an incoming VM on
disk, asks the source (`GET /v1/peer/migrations/ID`), and restores the VM from
its rounds and the source's kept copy if the final round never arrived; the
source answers from its tombstones, and for
a migration still running that has not reached its decision it answers "no" and
refuses to commit it later, so the two can never disagree. Never both, never
neither.

Checkpoints and snapshot downloads of the VM wait while it migrates: each takes
a full snapshot, which would move the base the next delta round is taken
against.

Clients learn of a move before it happens: once the destination has accepted
the offer (and so holds streams for the VM, edge_agent/arrivals.py), the
source tells the VM's streams where it is `moving` (`on_moving`), and that it
is off again if the migration fails; their sessions open a standby stream to
the destination meanwhile, and at the commit the `moved` notice only switches
them onto it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from cloudlet.errors import (
    CloudletError,
    Forbidden,
    KeptRoundNotFound,
    MigrationAborted,
    MigrationChannelLost,
    MigrationProtocolError,
    SnapshotError,
)
from cloudlet.fsutil import atomic_write, fsync_dir, storage_errors
from cloudlet.migration import (
    BecomeTombstone,
    ChunkStore,
    MigrationStats,
    PersistRound,
    PreCopyPolicy,
    collections_off,
    run_destination,
    run_source,
)
from cloudlet.migration.chunkstore import chunk_digests
from cloudlet.migration.messages import Accept, Offer, decode
from cloudlet.protocol import Location
from cloudlet.tasks import own
from cloudlet.vm import VM, Snapshot
from cloudlet.vm.chunks import CHUNK_BYTES
from cloudlet.vm.machine import BIND_AHEAD_MAX
from cloudlet.vm.snapshot import MAX_SNAPSHOT_BYTES, encoded_length
from edge_agent import wake_latency
from edge_agent.arrivals import Arrivals
from edge_agent.peer_client import PeerClient
from edge_agent.replies import ANNEX_KEY, GENERATION_KEY, generation_of
from edge_agent.vm_host import HostedVM, VMHost
from edge_agent.wake_latency import Hold, WakeLatency

log = logging.getLogger(__name__)

LAST_CALL_KEY = "last_call_unix"  # in the annex: when the source served its last call
# In the annex: the exports the VM was called through at the source, which the
# destination binds while the source decides (`VM.bind_ahead`).
CALLED_KEY = "called"
FINAL_ROUND = "final.snap"  # sorts after the numbered rounds, as it must when restored
RESOLVE_RETRY_S = 1.0  # an in-doubt destination asks the source again this often
RESOLVE_TIMEOUT_S = 5.0
ANSWER_BYTES = 4096  # a source's answer to "did it commit?" is a few bytes of JSON
# Fetching a kept final round (a restart that lost its own copy): no total deadline
# (a round can be most of a large VM, over a slow link), but no silence this long.
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=RESOLVE_TIMEOUT_S,
                                      sock_read=RESOLVE_TIMEOUT_S * 6)
FETCH_SLACK_BYTES = 64 << 20  # a kept round's state and annex, beyond its memory
RELEASE_ATTEMPTS = 5  # telling the source it may drop its copy: 1, 2, 4, 8 s apart
# Filling the chunk store yields to the loop after this long: a slice of 1,024
# chunks took 1-5 ms, and a move of another VM (or this one, out again) whose pause
# fell on it waited that out (the series' outliers of 9-14 ms, against ~4).
CHUNK_STORE_SLICE_S = 0.0002
CHUNK_STORE_CHECK_EVERY = 32  # chunks between two looks at the clock
CHUNK_STORE_DELAY_S = 1.0  # hashing 64 MiB in a thread still contends for the GIL
# The final round's file at the destination, and the room the source's record keeps
# for it, are made this large, zero-filled, ahead of the pause: the final round is
# at most `PreCopyPolicy.max_final_bytes` (512 KiB) of chunks, plus its state and
# headers, unless pre-copy stopped for another reason (then writing it grows them).
FINAL_ROUND_BYTES = 1 << 20
# A final round of more chunk data than this is kept (encoded, hashed, written,
# flushed) by the source in a worker thread, and written by the destination in one:
# on the loop it would stall every other VM (~0.4 ms for 32 KiB here, on the loop).
INLINE_KEEP_BYTES = 256 << 10
# An arrival's rounds that a move out of its VM set aside (`supersede_arrival`):
# deleted later, never restored from.
SET_ASIDE = ".set-aside"
AFTER_MOVE_CLEANUP_S = 0.05  # a source's cleanup waits this long after the commit
# After the `Commit` and the clients' `moved` notices, the source stays off the CPU
# this long before its own work (letting the VM go, answering the move, closing
# the migration's stream): the client's switch and the destination's landing
# need a core each, and on a 2-core host a source that went on at once (~0.5 ms
# of its loop) left one of them waiting for a core that long (scheduler traces of
# the downtime series: `perf sched timehist`).
QUIET_AFTER_COMMIT_S = 0.003
# A landing's own work waits this long after the VM is served here: the held
# streams' first reads need a turn of the loop's I/O, and without the wait that
# work (the old tombstone's files, the migration's end: its stream, events,
# metrics, the chunk store) ran first, 0.1-0.5 ms of the loop that the client's
# first call at the destination waited out.
HELD_STREAMS_FIRST_S = 0.002
# The pause waits at most this long for the VM's next answer, so that it starts on
# a call boundary (`Outgoing.pause`): a 50 Hz client's call interval. A guest runs
# only inside calls, so what the wait adds to the final round is what the calls
# answered meanwhile dirtied: one call, for a session calling one at a time; every
# call in the socket read that woke it (and the next poll's), for a client that
# pipelines. The final round is captured after the wait, so nothing is missed.
PAUSE_ON_ANSWER_WAIT_S = 0.02
# A move's hold on low CPU wake-up latency (edge_agent/wake_latency.py) ends by this
# deadline whatever happens to the move (normally it ends within milliseconds: at the
# source's end, or once the destination served the held streams' first calls).
WAKE_HOLD_MAX_S = 1.0


class WebSocketChannel:
    """A migration `Channel` over an aiohttp WebSocket (client or server side)."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        if self.ws.closed:
            raise MigrationChannelLost("the peer's WebSocket is closed")
        await self.ws.send_bytes(data)

    async def recv(self) -> bytes:
        msg = await self.ws.receive()
        if msg.type == WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                        WSMsgType.ERROR):
            raise MigrationChannelLost(f"the peer's WebSocket ended ({msg.type.name})")
        raise MigrationProtocolError(f"unexpected WebSocket message {msg.type.name}")


class AnnouncingChannel(WebSocketChannel):
    """The source's channel, which calls `on_accepted` once, when the destination's
    `Accept` comes back: from then on it holds streams for the VM, so the clients
    can be told where it is moving. A channel adapter, not a protocol event: the
    migration's state machines know nothing of client streams."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse,
                 on_accepted: Callable[[], None]) -> None:
        super().__init__(ws)
        self._on_accepted: Callable[[], None] | None = on_accepted

    async def recv(self) -> bytes:
        data = await super().recv()
        if self._on_accepted is not None:
            on_accepted, self._on_accepted = self._on_accepted, None
            with contextlib.suppress(CloudletError):  # the state machine says what is wrong
                if isinstance(decode(data), Accept):
                    on_accepted()
        return data


class Outgoing:
    """Source hooks for one migration of a hosted VM: its locks are the pause."""

    def __init__(self, host: VMHost, hosted: HostedVM, where: Location,
                 migration_id: str, wake: WakeLatency | None = None) -> None:
        self.host, self.hosted, self.where = host, hosted, where
        self.migration_id = migration_id
        self.wake = wake or WakeLatency(enabled=False)
        # From the pause on: the source's last steps (the decision's flush) wake fast.
        self.wake_hold: Hold | None = None
        # Told once the move is decided (durably) and the Commit written: the VM's
        # clients may go at once.
        self.on_decided: Callable[[], None] = lambda: None
        self.state = "running"  # -> "committing" -> "committed", or "refused"
        self.durable = asyncio.Event()
        self.paused = False
        self.last_call_unix = 0.0
        # The tombstone's record, written (and fsynced) while pre-copy runs: only one
        # byte's overwrite is left for the commit point (`Tombstones.decide`), once
        # the final round is in it (`keep_final`).
        self._prepared: asyncio.Task[Path] | None = None
        self._keeping: asyncio.Task[None] | None = None  # a large round written ahead
        self._kept = False
        # Clients told (`committed`), and collections held: until the quiet period ends.
        self.holds_collections = False

    @contextlib.asynccontextmanager
    async def access(self) -> AsyncIterator[None]:
        """While pre-copy reads the VM, no call may run in it (a thread-pool call
        would race the read). Once paused, the pause already holds the lock."""
        if self.paused:
            yield
        else:
            async with self.hosted.lock:
                yield

    def prepare(self) -> None:
        """Write the tombstone's record ahead, in a worker thread, as pre-copy starts:
        its fsyncs then never queue on the disk with the destination's inside the
        pause."""
        if self._prepared is None:
            self._prepared = asyncio.get_running_loop().create_task(asyncio.to_thread(
                functools.partial(self.host.tombstones.prepare, self.hosted.id, self.where,
                                  self.migration_id, keep_bytes=FINAL_ROUND_BYTES)))

    def keep_final(self, final_round: Snapshot) -> None:
        """Write the final round into the record now, while the destination takes it
        in (the source's loop only waits for `Ready` meanwhile): ~0.2 ms less
        between `Ready` and the `Commit`. A large round (pre-copy stopped on its
        round or byte budget) is encoded and written in a worker thread, which the
        decision waits for: hashing and copying it would stall every VM here. Not
        if the record is not written yet: then the decision writes it."""
        task = self._prepared
        if task is None or not task.done() or task.cancelled() or task.exception():
            return
        prepared = task.result()
        if _data_bytes(final_round) > INLINE_KEEP_BYTES:
            self._keeping = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._keep, prepared, final_round))
        else:
            self._keep(prepared, final_round)

    def _keep(self, prepared: Path, final_round: Snapshot) -> None:
        try:
            self.host.tombstones.keep(prepared, final_round.to_segments("none"))
        except OSError as exc:
            log.warning("migration %s: the final round could not be written ahead (%r); "
                        "the decision writes it", self.migration_id, exc)
            return
        self._kept = True

    async def pause(self) -> None:
        """Stop calls, right after an answer when one comes soon. A call that finds
        the VM paused waits out the rest of the pause; paused just as an answer
        left, the session's next call comes a whole call interval into it, not at a
        random moment (on loopback, with a call every millisecond, ~0.5-1 ms less
        of the downtime a client sees; a client calling less often than the pause
        lasts may not see it at all). A VM whose calls run in worker threads
        pauses as before: its lock already waits for the running call. So does
        a VM whose calls auto-converge spaces apart: its next call would carry
        a whole interval's dirtying into the final round (at 100 Mbit/s, 10
        MiB/s, calls 80 ms apart, the pause went from ~4 to ~19 ms)."""
        hosted = self.hosted
        if hosted.inline:
            # Its calls are short (`inline_deadline_ms`), so the wait below is too:
            # held from now, the CPUs already poll when the pause begins (taken at
            # the pause instead, pooled p50 went 2.68 -> 3.04 ms in alternated
            # series: the last steps started before every CPU had left its halt).
            self._hold_wake()
        if hosted.inline and not hosted.pacer.active:
            waiter = hosted.answered = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait((waiter,), timeout=PAUSE_ON_ANSWER_WAIT_S)
            finally:
                if hosted.answered is waiter:
                    hosted.answered = None
        await hosted.lock.acquire()
        self.paused = True
        self.last_call_unix = time.time()
        # A VM whose calls run in worker threads only once paused: a long call that
        # the lock waited for must not have kept the host's CPUs polling meanwhile.
        self._hold_wake()

    def _hold_wake(self) -> None:
        if self.wake_hold is None:
            self.wake_hold = self.wake.hold(WAKE_HOLD_MAX_S)

    async def resume(self) -> None:
        if self.paused and self.state != "committed":
            self.paused = False
            self.hosted.lock.release()

    async def tombstone(self, event: BecomeTombstone) -> None:
        if self.state == "refused":
            # The destination asked, in doubt, and was told "not committed".
            raise MigrationAborted("the destination was told this migration did not commit")
        self.state = "committing"
        try:
            if event.final_round is None:  # the record says it keeps one: never without
                raise MigrationAborted("no final round to keep with the decision")
            self.prepare()  # a no-op unless never prepared: then written now
            assert self._prepared is not None
            prepared = await self._prepared
            if self._keeping is not None:
                await self._keeping
            # The final round is kept with the decision (the destination did not flush
            # its copy). On this thread: a few blocks' fdatasync (~0.2-0.9 ms here)
            # inside the pause, where a worker thread's hop costs more than the write;
            # a large round's in a worker thread.
            kept = () if self._kept else event.final_round.to_segments("none")
            decide = functools.partial(self.host.tombstones.decide, prepared, self.hosted.id,
                                       self.where, self.migration_id, kept)
            if _data_bytes(event.final_round) > INLINE_KEEP_BYTES:
                await asyncio.to_thread(decide)
            else:
                decide()
        except BaseException:
            # No decision on disk (a full disk, say): it did not commit, and a
            # destination asking in doubt must hear so rather than wait forever.
            self.state = "refused"
            self.durable.set()
            raise
        self.state = "committed"
        self.durable.set()

    def committed(self) -> None:
        """Decided, durably: the VM is the destination's whatever fails from here (a
        lost Commit is settled by the destination asking). So the clients are told
        now, before the Commit is written: their resends reach the destination
        beside it, and wait there, on the streams it holds, for the VM to land (at
        once, from inside its driver). Clients first: switching to their standby
        streams is the longer path, and on a small host the one that waits for a
        core. Once, whoever calls it."""
        if self.holds_collections:
            return
        # No collection until the source's quiet period ends (`QUIET_AFTER_COMMIT_S`):
        # taken inside the driver's own hold, so none can start in between.
        collections_off.hold()
        self.holds_collections = True
        self.on_decided()

    def annex(self) -> dict[str, Any]:
        return {ANNEX_KEY: self.hosted.replies.to_wire(), LAST_CALL_KEY: self.last_call_unix,
                GENERATION_KEY: self.hosted.generation + 1,
                CALLED_KEY: list(self.hosted.vm.called[:BIND_AHEAD_MAX])}

    def throttle(self, call_interval_s: float) -> None:
        if call_interval_s:
            log.info("auto-converge: calls into VM %s at most every %.0f ms",
                     self.hosted.id, call_interval_s * 1000)
        self.hosted.pacer.set_interval(call_interval_s)

    def release(self) -> None:
        if self.paused:
            self.paused = False
            self.hosted.lock.release()

    async def discard_prepared(self) -> None:
        """The migration did not commit: the record written ahead goes (a restart
        would drop it anyway: it is no tombstone)."""
        task, self._prepared = self._prepared, None
        if task is None or self.state == "committed":
            return
        try:
            prepared = await task
        except Exception:  # it was never written (a full disk): nothing to remove
            return
        await asyncio.to_thread(prepared.unlink, True)


class LiveMigrations:
    """Both ends of live migration for one cloudlet."""

    def __init__(self, host: VMHost, policy: PreCopyPolicy | None = None,
                 chunk_store: ChunkStore | None = None) -> None:
        self.host = host
        self.policy = policy or PreCopyPolicy(
            auto_converge=host.config.migration_auto_converge)
        self.chunks = chunk_store or ChunkStore()
        self.incoming_dir = host.config.state_path / "incoming"
        self.wake_latency = WakeLatency(enabled=host.config.migration_low_wake_latency)
        self._outgoing: dict[str, Outgoing] = {}
        # VMs whose arrival's rounds are still on disk (until their first checkpoint
        # here replaces them): VM id -> that arrival's migration.
        self._arrived: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.arrivals = Arrivals()
        # Told when a VM's move is under way (where to), and when it is off (None):
        # the app tells the VM's streams (`moving`).
        self.on_moving: Callable[[str, Location | None], None] = lambda vm_id, where: None

    # --- source ---------------------------------------------------------------------

    async def send(self, hosted: HostedVM, where: Location, ws: aiohttp.ClientWebSocketResponse,
                   migration_id: str) -> MigrationStats:
        """Migrate `hosted` over `ws` (connected to `where`'s peer route). On
        "committed" the VM is gone from here; on "aborted" it serves here again."""
        # Checkpoints wait while the VM migrates, so make what it has applied so far
        # durable first: a source killed mid-migration restarts from here.
        await self.host.checkpoint(hosted)
        await self.supersede_arrival(hosted)
        hooks = Outgoing(self.host, hosted, where, migration_id, self.wake_latency)
        hooks.on_decided = lambda: self.host.on_moved(hosted.id, where)
        self._outgoing[migration_id] = hooks
        digest = hosted.vm.image.digest
        announced = False

        def announce() -> None:
            nonlocal announced
            announced = True
            self.on_moving(hosted.id, where)

        committed = False
        try:
            # Checkpoints and downloads take full snapshots, which would move the base
            # the next round is diffed against: they wait for the migration.
            async with hosted.persist_lock:
                self.host.check_alive(hosted)
                hooks.prepare()  # only now: a second move asked meanwhile waits above
                # A refusal at the commit point (`tombstone` raises) is the driver's to
                # settle: it aborts and resumes the VM, as for a failed decision.
                stats = await run_source(
                    hosted.vm, AnnouncingChannel(ws, announce), hooks=hooks, keeps_final=True,
                    decides_at_final=True, vm_access=hooks.access,
                    policy=self.policy, migration_id=migration_id,
                    deadline_s=self.host.config.migration_deadline_s,
                    image_wasm=lambda: self.host.images.wasm_bytes(digest))
                if stats.outcome == "committed":
                    committed = True
                    try:
                        await asyncio.sleep(QUIET_AFTER_COMMIT_S)
                    finally:  # cancelled or not: the VM is the destination's
                        self._hand_over(hosted, where, hooks)
                return stats
        finally:
            # Held from the pause through the handover: the calls that waited out the
            # pause here are told where the VM went by then.
            wake_latency.release(hooks.wake_hold)
            try:
                self._outgoing.pop(migration_id, None)
                if announced and hooks.state != "committed":
                    self.on_moving(hosted.id, None)  # it stays: standby streams are dropped
                elif hooks.state == "committed" and not committed:
                    # Decided, then stopped before the handover (cancelled while the
                    # Commit was being written): the VM is the destination's. Its
                    # clients hear where it went, not that the move is off, and it
                    # is let go here as after any commit.
                    hooks.committed()
                    self._hand_over(hosted, where, hooks)
                if not committed:
                    await hooks.discard_prepared()
            finally:
                if hooks.holds_collections:
                    hooks.holds_collections = False
                    collections_off.release()

    def _hand_over(self, hosted: HostedVM, where: Location, hooks: Outgoing) -> None:
        """The move committed: the VM is no longer served here, the calls waiting for
        it learn where it went, and its memory and checkpoint go a little later."""
        try:
            retired = self.host.let_go(hosted, where)
        finally:
            hooks.release()  # waiting calls now learn where it went
        # The client's switch and the destination's first calls (a few ms) come
        # first: unmapping a large memory and deleting its checkpoint keep a core
        # busy, which a small host has few of. In the background, so the move's
        # answer does not wait. (The checkpoint was renamed aside by `let_go`: if
        # the VM comes back meanwhile, its new checkpoint is not the file deleted
        # here.)
        self._spawn(self._clean_up_moved(hosted, retired))

    async def _clean_up_moved(self, hosted: HostedVM, retired: Path | None) -> None:
        await asyncio.sleep(AFTER_MOVE_CLEANUP_S)
        await self.host.free_moved(hosted, retired)

    async def committed(self, migration_id: str) -> bool:
        """The source's answer to "did migration X commit?". Authoritative: a
        migration that has not decided yet is refused, so it never will."""
        if self.host.moved_by_migration(migration_id):
            return True
        hooks = self._outgoing.get(migration_id)
        if hooks is None:
            return False
        if hooks.state == "running":
            hooks.state = "refused"
            return False
        if hooks.state == "committing":
            await hooks.durable.wait()
        return hooks.state == "committed"

    # --- destination ----------------------------------------------------------------

    async def receive(self, ws: web.WebSocketResponse, source: Location,
                      peers: PeerClient) -> dict[str, Any]:
        """Take in one VM over `ws`. Returns what happened (for the events topic)."""
        incoming = Incoming(self, source, peers)
        loop = asyncio.get_running_loop()

        def admit(offer: Offer) -> None:
            self.host.admit(offer.vm_id, offer.memory_bytes, offer.owner)
            # Its owner's streams may wait from now on. A large offer is read in a
            # worker thread: registered on the loop, before the driver, which resumes
            # after this thread's result, sends the `Accept`.
            # Keyed by this attempt: its end settles its own arrival, not a newer one's.
            loop.call_soon_threadsafe(self.arrivals.expect, offer.vm_id, offer.owner or "",
                                      incoming)
            incoming.vm_id = offer.vm_id

        def ready(vm: VM, annex: dict[str, Any]) -> None:
            incoming.prepared = self.host.prepare_activation(vm, annex.get(ANNEX_KEY),
                                                             generation_of(annex))
            called = annex.get(CALLED_KEY)
            if isinstance(called, list):  # its first calls here skip the lookups
                vm.bind_ahead(called)

        def activate(vm: VM, annex: dict[str, Any]) -> None:
            # At the Commit, inside the driver: the held streams are served from the
            # loop's next turn, not after the driver's ending and this task's return.
            # Nothing is collected from here until the landing's end (`_activate`).
            collections_off.hold()
            try:
                incoming.landing = self._land_now(vm, annex, incoming.migration_id, incoming)
            except BaseException:
                collections_off.release()
                raise  # logged by the driver; `_activate` below lands it, or says why not

        settling = False
        try:
            try:
                got = await run_destination(
                    WebSocketChannel(ws), self.host.images, self.chunks,
                    resolve=incoming.must_ask_source, persist=incoming.persist,
                    max_memory_bytes=self.host.free_memory_bytes(),
                    deadline_s=self.host.config.migration_deadline_s, admit=admit,
                    ready=ready, activate=activate)
            except Exception:
                # The driver failed (out of memory taking a round in, say) with rounds
                # on disk that the source may have decided on: settled as a restart
                # would, by asking it, not left for the next restart.
                if incoming.vm_id is not None and incoming.migration_id \
                        and incoming.folder.exists() \
                        and self.host.vms.get(incoming.vm_id) is None:  # not landed
                    self._spawn(self._recover_one(incoming.folder, incoming.vm_id,
                                                  incoming.source, incoming.peers))
                raise
            if got.outcome == "committed" and got.vm is not None:
                landing, incoming.landing = incoming.landing, None
                await self._activate(got.vm, got.annex, incoming.migration_id, incoming,
                                     landing)
                wake_latency.release(incoming.wake_hold)  # the first calls are served
                self._spawn(self._remember_chunks(incoming.chunk_data))
            elif got.outcome == "in_doubt" and got.migration is not None:
                migration = got.migration
                settling = True  # its held streams wait for the answer (bounded)
                self._spawn(self._settle(incoming, migration.vm, migration.annex,
                                         whole=migration.has_final))
                migration.vm = None  # ours now: `_settle` activates or closes it
            else:
                incoming.discard()
        finally:
            wake_latency.release(incoming.wake_hold)
            if incoming.landing is not None:  # never: nothing awaits between the two
                incoming.landing = None
                collections_off.release()
            if incoming.vm_id is not None and not settling:
                # A no-op once it landed, or once a newer attempt took its place.
                self.arrivals.not_coming(incoming.vm_id, incoming)
        return {"outcome": got.outcome, **got.stats.to_dict()}

    async def _activate(self, vm: VM, annex: dict[str, Any], migration_id: str | None,
                        incoming: Incoming | None = None,
                        landing: Landing | None = None) -> None:
        """Serve an arrived VM, unless `landing` says it is served already (landed at
        the Commit, from inside the driver); then the landing's own work."""
        # No garbage collection while the VM lands and its held streams' first calls
        # are served (collections_off): it runs after that, when it will. (An early
        # landing took its hold then.)
        if landing is None:
            collections_off.hold()
        try:
            if landing is None:
                landing = self._land_now(vm, annex, migration_id, incoming)
            await asyncio.sleep(HELD_STREAMS_FIRST_S)  # the held streams' calls go first
        finally:
            collections_off.release()
        self._spawn(self._after_landing(landing.hosted, landing.came_back,
                                        landing.old_migrations, migration_id, incoming))

    def _land_now(self, vm: VM, annex: dict[str, Any], migration_id: str | None,
                  incoming: Incoming | None) -> Landing:
        """Host the arrived VM and wake the streams held for it: nothing awaits here."""
        # A VM that comes back finds its old tombstone here. `activate` would unlink
        # its file on the loop, which on a busy disk stalls the VM's first calls for
        # milliseconds: forgotten in memory now, its file removed off the loop later
        # (before the incoming rounds go: a restart in between restores it from them).
        where_before = self.host.tombstones.pop(vm.id)
        old_migrations = self.host.tombstones.migrations_of(vm.id) if where_before else []
        try:
            hosted = self.host.activate(vm, annex.get(ANNEX_KEY), generation_of(annex),
                                        prepared=incoming.prepared if incoming else None)
        except BaseException:
            if where_before is not None:
                self.host.tombstones.where[vm.id] = where_before
            raise
        if migration_id:
            self._arrived[hosted.id] = migration_id  # before anyone can move it out
        last_call = annex.get(LAST_CALL_KEY)
        if isinstance(last_call, float) and last_call > 0:
            hosted.arrived_last_call_unix = last_call
        self.arrivals.landed(hosted.id, hosted)
        return Landing(hosted, where_before is not None, old_migrations)

    async def _after_landing(self, hosted: HostedVM, came_back: bool,
                             old_migrations: list[str], migration_id: str | None,
                             incoming: Incoming | None) -> None:
        """The final round goes to disk here first (the source keeps a copy until
        then), then the old tombstone's files (by name, under the VM's persist lock:
        `VMHost.forget_tombstone`), then, later, the incoming rounds: a restart in
        between restores the VM from them, never finds a tombstone beside them."""
        if incoming is not None and await incoming.keep_final():
            # Its own task: the source may be slow or down, and the old tombstone's
            # files must go now (a restart must not find them beside a later move's).
            self._spawn(incoming.release_at_source())
        if came_back:
            await self.host.forget_tombstone(hosted, old_migrations)
        if migration_id:
            await self._checkpoint_then_forget(hosted, migration_id)

    async def _remember_chunks(self, chunk_data: list[bytes | memoryview]) -> None:
        """Put what arrived into the chunk store, so later migrations of similar VMs
        send references instead. Never on the downtime's path: digests are computed
        in a thread (over the rounds' own bytes, not the live VM), and the store is
        filled in slices that leave the event loop to the calls."""
        await asyncio.sleep(CHUNK_STORE_DELAY_S)  # the VM's first calls come first
        clock, put = time.perf_counter, self.chunks.put
        for data in chunk_data:
            digests = await asyncio.to_thread(chunk_digests, data)
            view = memoryview(data)
            until = clock() + CHUNK_STORE_SLICE_S
            for i, digest in enumerate(digests):
                put(digest, bytes(view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]))
                if i % CHUNK_STORE_CHECK_EVERY == 0 and clock() >= until:
                    await asyncio.sleep(0)
                    until = clock() + CHUNK_STORE_SLICE_S

    async def supersede_arrival(self, hosted: HostedVM) -> None:
        """Before `hosted` moves out again: if it arrived here by live migration and
        that arrival's rounds may still be on disk (its first checkpoint here, one
        interval after the landing, replaces them), checkpoint it now and set them
        aside. Otherwise a restart would find the rounds of a committed migration
        beside the decided record of this later move, and bring the VM back to life
        here while it lives at its destination. MigrationAborted if the VM cannot
        be checkpointed (the move would open that window)."""
        if hosted.id not in self._arrived:
            return
        if hosted.checkpointed_seq < 0:  # never checkpointed here
            await self.host.checkpoint(hosted, force=True)
        if hosted.checkpointed_seq < 0:
            raise MigrationAborted(f"VM {hosted.id} arrived moments ago and has no "
                                   "checkpoint here yet; it stays here")
        await self.forget_arrival(hosted.id)

    async def forget_arrival(self, vm_id: str) -> None:
        """Set aside, durably, the rounds VM `vm_id` arrived with, if they may still
        be on disk: before it moves out (`supersede_arrival`) or is deleted, either
        of which a restart that restored it from them would undo. Deleted later
        (`_checkpoint_then_forget`, or a restart)."""
        migration_id = self._arrived.get(vm_id)
        if migration_id is not None:
            await self._set_arrival_aside(vm_id, migration_id)

    async def _set_arrival_aside(self, vm_id: str, migration_id: str) -> Path:
        """`_set_aside` the rounds VM `vm_id` arrived with by `migration_id`, and stop
        tracking them; returns where they are now."""
        aside = await asyncio.to_thread(_set_aside, self.incoming_dir / migration_id)
        if self._arrived.get(vm_id) == migration_id:
            del self._arrived[vm_id]
        return aside

    async def _drop_arrival(self, vm_id: str, migration_id: str) -> None:
        """Set aside first, then delete: a crash in the middle of the delete must not
        leave a committed migration with rounds missing."""
        aside = await self._set_arrival_aside(vm_id, migration_id)
        await asyncio.to_thread(shutil.rmtree, aside, True)

    async def _checkpoint_then_forget(self, hosted: HostedVM, migration_id: str) -> None:
        """The VM's own checkpoint replaces the incoming rounds on disk. Not at once:
        a full snapshot of a large VM holds it for a while, and its first calls here
        are what the user feels; the rounds on disk already make it durable."""
        await asyncio.sleep(self.host.config.checkpoint_interval_s)
        try:
            # Forced: written whatever its calls since the landing. False when none
            # was written (the VM failed, or is gone): then the rounds are all there
            # is of it (a VM failed by its final round's copy is restored from them
            # at a restart), and moves out and deletes set them aside themselves.
            landed = await self.host.checkpoint(hosted, force=True)
        except Exception as exc:
            log.error("first checkpoint of arrived VM %s failed: %r", hosted.id, exc)
            return  # the incoming rounds stay: a restart recovers from them
        if not landed:
            if hosted.vm.failed is not None:
                log.error("arrived VM %s failed (%s); its incoming rounds are kept for a "
                          "restart to restore it from", hosted.id, hosted.vm.failed)
            return
        await self._drop_arrival(hosted.id, migration_id)

    async def _settle(self, incoming: Incoming, vm: VM | None, annex: dict[str, Any], *,
                      whole: bool = True) -> None:
        """In doubt: ask the source until it answers, then activate or discard. Not
        `whole` (the source decided as it sent the final round, which never arrived
        here): if it committed, the VM is restored as after a restart, from the
        rounds on disk and the final round the source kept."""
        if vm is not None and not whole:
            vm.close()  # restored again from disk if it committed: not held meanwhile
            vm = None
        while True:
            answer = await incoming.ask_source(incoming.migration_id or "")
            if answer is not None:
                break
            await asyncio.sleep(RESOLVE_RETRY_S)
        if answer and vm is not None and whole:
            await self._activate(vm, annex, incoming.migration_id, incoming)
        elif answer and incoming.vm_id is not None and incoming.migration_id:
            vm_id = incoming.vm_id
            try:
                await self._recover_one(incoming.folder, vm_id, incoming.source,
                                        incoming.peers)
            finally:
                if self.host.vms.get(vm_id) is None:  # not restored: never kept waiting
                    self.arrivals.not_coming(vm_id, incoming)
        else:
            if incoming.vm_id is not None:
                self.arrivals.not_coming(incoming.vm_id, incoming)
            if vm is not None:
                vm.close()
            incoming.discard()

    def _spawn(self, coro: Any) -> None:
        own(self._tasks, coro, "a migration's background step", log)  # `close()` cancels

    async def close(self) -> None:
        self.wake_latency.close()
        self.arrivals.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- recovery after a restart ---------------------------------------------------

    async def recover(self, peers: PeerClient) -> None:
        """VMs that were arriving when this cloudlet stopped: ask their sources."""
        if not self.incoming_dir.exists():
            return
        for folder in sorted(p for p in self.incoming_dir.iterdir() if p.is_dir()):
            if folder.name.endswith(SET_ASIDE):  # superseded by a later move out
                self._spawn(asyncio.to_thread(shutil.rmtree, folder, True))
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
                vm_id = str(meta["vm"])
                source = Location(str(meta["node"]), str(meta["endpoint"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("incoming migration %s is unreadable (%r); left for a human",
                          folder.name, exc)
                continue
            if self.host.vms.get(vm_id) is not None:
                # Restored from its own checkpoint, written after it arrived: these
                # rounds are stale, and dropped without asking their source. Known
                # at once (no await before a move of the VM can start), so a move
                # out sets them aside before it decides.
                self._arrived[vm_id] = folder.name
                self._spawn(self._drop_arrival(vm_id, folder.name))
                # Its checkpoint has the final round too: the source's copy may go.
                self._spawn(Incoming(self, source, peers, folder.name).release_at_source())
            else:
                self._spawn(self._recover_one(folder, vm_id, source, peers))

    async def _recover_one(self, folder: Path, vm_id: str, source: Location,
                           peers: PeerClient) -> None:
        migration_id = folder.name
        incoming = Incoming(self, source, peers, migration_id=migration_id)
        while (answer := await incoming.ask_source(migration_id)) is None:
            await asyncio.sleep(RESOLVE_RETRY_S)
        if not folder.exists():
            return  # set aside meanwhile
        if not answer:
            log.info("migration %s did not commit; dropping what arrived", migration_id)
            incoming.discard()
            return
        if self.host.vms.get(vm_id) is not None:
            incoming.discard()  # it arrived here again meanwhile
            return
        snaps = [await asyncio.to_thread(Snapshot.read, p)
                 for p in sorted(folder.glob("[0-9]*.snap"))]
        if not snaps:
            log.error("migration %s committed but its rounds are incomplete", migration_id)
            return
        final = (snaps.pop() if snaps[-1].annex  # no pre-copy round: round 0 was final
                 else await asyncio.to_thread(read_final, folder / FINAL_ROUND))
        fetched = final is None
        if final is None:
            # Never written, or lost with the page cache: the source kept it with its
            # decision. Until it answers (or if what it sends is not this VM's final
            # round), the VM is not restored: a human can see why in the log.
            final = await incoming.fetch_final(snaps[-1])
            if final is None:
                return
        image = await asyncio.to_thread(self.host.images.get, snaps[0].image_digest)
        try:
            # Restored before the fetched round is written here: what does not restore
            # is never stored as this VM's final round, and the source keeps its copy.
            vm = await asyncio.to_thread(VM.restore, image, *snaps, final)
        except CloudletError as exc:
            log.error("migration %s committed, but its rounds do not restore (%s); left "
                      "for a human", migration_id, exc)
            return
        if fetched:
            await asyncio.to_thread(write_over, folder / FINAL_ROUND, final.to_segments("none"))
        else:  # written after the landing, perhaps never flushed: flushed now
            await asyncio.to_thread(sync_file, folder / FINAL_ROUND)
        log.info("recovered VM %s from committed migration %s", vm.id, migration_id)
        await self._activate(vm, final.annex, migration_id)
        self._spawn(incoming.release_at_source())


@dataclass(frozen=True)
class Landing:
    """An arrived VM just served here, and what its landing has left to do."""

    hosted: HostedVM
    came_back: bool  # it had left here before: its old tombstone's files go
    old_migrations: list[str]


class Incoming:
    """One arriving VM: where its rounds go on disk, and how to ask its source."""

    def __init__(self, owner: LiveMigrations, source: Location, peers: PeerClient,
                 migration_id: str | None = None) -> None:
        self.owner, self.source, self.peers = owner, source, peers
        self.migration_id = migration_id
        self.vm_id: str | None = None  # once offered: streams held for it wait
        # What arrived, for the chunk store afterwards.
        self.chunk_data: list[bytes | memoryview] = []
        self.final_round: Snapshot | None = None  # until written here (`keep_final`)
        # Built while the source decides (`VMHost.prepare_activation`); and the
        # landing done at the Commit, until `receive` takes it over.
        self.prepared: HostedVM | None = None
        self.landing: Landing | None = None
        self.wake_hold: Hold | None = None  # from the final round to the first calls served

    @property
    def folder(self) -> Path:
        return self.owner.incoming_dir / (self.migration_id or "unknown")

    async def persist(self, event: PersistRound) -> None:
        self.migration_id = event.migration_id
        if event.final and self.wake_hold is None:
            # The final round is in: the Commit's arrival, the landing and the held
            # streams' first calls wake fast from here (edge_agent/wake_latency.py).
            self.wake_hold = self.owner.wake_latency.hold(WAKE_HOLD_MAX_S)
        if event.source_keeps and event.round > 0:
            # Not written now: the source keeps the final round with its decision, in
            # the same flush, so this copy is written after the landing (`keep_final`),
            # off the downtime's path (its write and flush took 0.4-1 ms of it here).
            self.final_round = event.snapshot
            self.chunk_data.extend(m.data for m in event.snapshot.memories if m.data)
        elif event.final and _data_bytes(event.snapshot) <= INLINE_KEEP_BYTES:
            # A source that does not keep it: durable before `Ready`, inside the pause,
            # where a worker thread's hop (waiting for the GIL) costs more than the write.
            self._write(event)
        else:
            await asyncio.to_thread(self._write, event)

    async def keep_final(self) -> bool:
        """After the landing: the final round onto this cloudlet's disk, durably; True
        when the source may drop its copy now. A VM that moved on or was deleted
        meanwhile has its rounds set aside (after a checkpoint, for a move): nothing
        to write then, and nothing the source's copy is needed for."""
        snap, self.final_round = self.final_round, None
        if snap is None:
            return False
        try:
            await asyncio.to_thread(write_over, self.folder / FINAL_ROUND,
                                    snap.to_segments("none"))
        except FileNotFoundError:
            pass  # set aside (moved on, checkpointed first; or deleted): never restored
        except OSError as exc:
            # The source still has it: a restart fetches it from there.
            log.error("migration %s: cannot write the final round here (%r); the source "
                      "keeps its copy", self.migration_id, exc)
            return False
        return True

    async def release_at_source(self) -> None:
        """Tell the source its kept copy of the final round may go, a few times over a
        minute if it cannot be reached (if it never hears, the copy stays there, a
        megabyte on its disk, and does no harm)."""
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                await self._peer_request("DELETE", "/final", max_bytes=ANSWER_BYTES)
                return
            except KeptRoundNotFound:
                return  # released already, or the VM came back there
            except (aiohttp.ClientError, TimeoutError, CloudletError) as exc:
                if attempt + 1 == RELEASE_ATTEMPTS:
                    log.info("migration %s: could not release the source's copy of the "
                             "final round (%r); it stays there", self.migration_id, exc)
                    return
            await asyncio.sleep(RESOLVE_RETRY_S * 2 ** attempt)

    async def fetch_final(self, last: Snapshot) -> Snapshot | None:
        """The final round the source kept with its decision (asked until it answers
        whole), checked to be this VM's and rebased onto `last`, the last round on
        disk here; None if the source has none, refuses, or sends something that is
        not this VM's final round (logged: the rounds stay for a human)."""
        # No more than the VM's whole memory and a generous annex (its reply log).
        max_bytes = min(MAX_SNAPSHOT_BYTES, last.memory_bytes + FETCH_SLACK_BYTES)
        while True:
            try:
                data = await self._peer_request("GET", "/final", max_bytes=max_bytes,
                                                timeout=FETCH_TIMEOUT)
                break
            except (KeptRoundNotFound, Forbidden, MigrationProtocolError) as exc:
                log.error("migration %s committed, its final round is not on disk here, "
                          "and its source does not give it: %s", self.migration_id, exc)
                return None
            except (aiohttp.ClientError, TimeoutError, CloudletError) as exc:
                log.warning("migration %s: cannot fetch the final round from %s yet (%r)",
                            self.migration_id, self.source.node, exc)
                await asyncio.sleep(RESOLVE_RETRY_S)
        try:
            final = kept_round_onto(last, Snapshot.from_bytes(data, max_bytes))
        except (CloudletError, ValueError) as exc:
            log.error("migration %s: the final round from %s is refused: %s",
                      self.migration_id, self.source.node, exc)
            return None
        log.info("migration %s: fetched the final round from %s (none was on disk here)",
                 self.migration_id, self.source.node)
        return final

    async def _peer_request(self, method: str, suffix: str, *, max_bytes: int,
                            timeout: aiohttp.ClientTimeout | None = None) -> bytes:
        """`method` on this migration's peer route at the source (which proves itself
        first); the whole body of a 2xx answer, at most `max_bytes` (more is a
        `MigrationProtocolError`; a body cut short, a `MigrationChannelLost`)."""
        url = f"{self.source.endpoint}/v1/peer/migrations/{self.migration_id}{suffix}"
        source = await self.peers.prove(self.source, self.source.node)
        async with self.peers.http.request(
                method, url, headers=self.peers.headers(source.node), allow_redirects=False,
                timeout=timeout or aiohttp.ClientTimeout(total=RESOLVE_TIMEOUT_S)) as resp:
            if resp.status == 404:
                raise KeptRoundNotFound(f"{self.source.node} answered 404")
            if resp.status == 403:
                raise Forbidden(f"{self.source.node} refused (403)")
            if resp.status // 100 != 2:
                raise MigrationChannelLost(f"{self.source.node} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise MigrationProtocolError(f"an answer of {resp.content_length} bytes; "
                                             f"the limit is {max_bytes}")
            body = bytearray()
            async for piece in resp.content.iter_any():
                body += piece
                if len(body) > max_bytes:
                    raise MigrationProtocolError(f"an answer over {max_bytes} bytes")
            if resp.content_length is not None and len(body) != resp.content_length:
                raise MigrationChannelLost(f"{self.source.node}'s answer was cut short")
            return bytes(body)

    def _write(self, event: PersistRound) -> None:
        folder = self.folder
        final_path = folder / FINAL_ROUND
        if event.round == 0:
            folder.mkdir(parents=True, exist_ok=True)
            if not event.final:
                # Made now, zero-filled and durable (its name by the directory fsync of
                # the write below): the final round, inside the pause, then overwrites
                # blocks the file has, and its fdatasync writes no metadata (~0.2 ms
                # here, against ~0.4-1 ms for a file that grows).
                zero_fill(final_path, FINAL_ROUND_BYTES)
            atomic_write(folder / "meta.json", json.dumps({
                "vm": event.vm_id, "node": self.source.node,
                "endpoint": self.source.endpoint}).encode())
        if event.final and final_path.exists():  # from a source that does not keep it
            write_over(final_path, event.snapshot.to_segments("none"))
            self.chunk_data.extend(m.data for m in event.snapshot.memories if m.data)
            return
        # Rounds are zstd'd when a sample says it pays (~1 GB/s, and a compressible
        # 256 MiB round 0 then writes a few MiB instead of taking ~0.7 s of disk). A
        # final round is on the downtime's path: written as it is. (A source that
        # sends no pre-copy round at all has its whole VM written here before
        # `Ready`: its kept copy, a whole overlay, is never fetched.)
        event.snapshot.write(folder / f"{event.round:04d}.snap",
                             compression="none" if event.final else "auto")
        self.chunk_data.extend(m.data for m in event.snapshot.memories if m.data)

    async def ask_source(self, migration_id: str) -> bool | None:
        """True/False from the source; None if it could not be asked. The source's
        endpoint proves it is that cloudlet before it gets a token (for it alone)."""
        self.migration_id = migration_id
        try:
            body = json.loads(await self._peer_request("GET", "", max_bytes=ANSWER_BYTES))
        except (aiohttp.ClientError, TimeoutError, ValueError, CloudletError):
            return None
        committed = body.get("committed") if isinstance(body, dict) else None
        return committed if isinstance(committed, bool) else None

    async def must_ask_source(self, migration_id: str) -> bool:
        answer = await self.ask_source(migration_id)
        if answer is None:
            raise MigrationChannelLost(f"cannot ask {self.source.node} about {migration_id}")
        return answer

    def discard(self) -> None:
        if self.migration_id:
            shutil.rmtree(self.folder, ignore_errors=True)


def _set_aside(folder: Path) -> Path:
    """Rename an arrival's rounds out of recovery's way, durably: one rename and a
    directory fsync; returns the new name. Deleting them there and then (a megabyte
    or more of blocks to free) put the file system's work a few hundred
    milliseconds before a move's pause; in alternated series of 24 moves the worst
    move was ~1-1.5 ms slower that way. Idempotent: rounds set aside already (two
    moves asked at once) or deleted are no error, and the directory is synced
    anyway, so no caller goes on before the rename is durable."""
    aside = folder.with_name(folder.name + SET_ASIDE)
    with storage_errors(folder.name):
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder, aside)
        fsync_dir(folder.parent)
    return aside


def zero_fill(path: Path, size: int) -> None:
    """Make `path` `size` zero bytes long, durably (its name is the caller's to sync)."""
    _write_synced(path, "wb", [bytes(size)], os.fsync)


def write_over(path: Path, segments: list[bytes | memoryview]) -> None:
    """Write `segments` over the start of the zero-filled file `path`, durably. Not
    atomic, and need not be: a restart that finds no whole snapshot at its start
    (`read_final`: never written, or torn) fetches the copy the source kept with
    its decision. A final round larger than the file grows it (and its sync then
    writes metadata too)."""
    _write_synced(path, "r+b", segments, os.fdatasync)


def sync_file(path: Path) -> None:
    """Flush `path`'s data (a final round written before a restart, maybe never
    flushed: the process died, the page cache did not)."""
    _write_synced(path, "r+b", (), os.fdatasync)


def _write_synced(path: Path, mode: str, parts: Sequence[bytes | memoryview],
                  sync: Callable[[int], None]) -> None:
    with storage_errors(path.name), path.open(mode) as f:
        for part in parts:
            f.write(part)
        f.flush()
        sync(f.fileno())


def read_final(path: Path) -> Snapshot | None:
    """The final round written by `write_over`, or None if there is no whole one:
    the file is missing, still zero-filled at its start, or its write was torn
    (the snapshot's digest does not match)."""
    try:
        data = path.read_bytes()
        length = encoded_length(data)
        return None if length is None else Snapshot.from_bytes(memoryview(data)[:length])
    except FileNotFoundError:
        return None
    except SnapshotError as exc:
        log.warning("%s is not a whole snapshot (%s): its write was cut short", path, exc)
        return None


def kept_round_onto(last: Snapshot, kept: Snapshot) -> Snapshot:
    """`kept`, a final round a source kept with its decision, checked to follow `last`
    (the last round this destination has of the same VM) and rebased onto it (the
    source's snapshots have their own ids). MigrationProtocolError if it is not
    such a round: from a source that is who it says, but wrong all the same."""
    if kept.kind != "delta" or not kept.annex:
        raise MigrationProtocolError("not a final round (a delta with its annex)")
    if (kept.vm_id, kept.owner, kept.image_digest) != (last.vm_id, last.owner,
                                                       last.image_digest):
        raise MigrationProtocolError(f"a round of VM {kept.vm_id} ({kept.owner}), not of "
                                     f"{last.vm_id} ({last.owner})")
    if kept.limits != last.limits:
        raise MigrationProtocolError("a round with other limits than the last one here")
    if (kept.seq < last.seq or len(kept.memories) != len(last.memories)
            or any(k.pages < m.pages for k, m in zip(kept.memories, last.memories,
                                                      strict=True))):
        raise MigrationProtocolError("a round that does not follow the last one here")
    return replace(kept, base_id=last.snapshot_id)


def _data_bytes(snapshot: Snapshot) -> int:
    return sum(len(m.data) for m in snapshot.memories)


def new_migration_id() -> str:
    return secrets.token_hex(8)


def peer_of(name: str) -> str:
    """A peer principal's node name (`peer:NODE` -> NODE)."""
    return name.split(":", 1)[1] if name.startswith("peer:") else name

