"""The VMs a cloudlet hosts: who owns them, how their calls run, and how none is lost.

Calls: a VM is not thread-safe, so each has an asyncio lock. Calls of VMs whose
deadline is short (interactive sessions) run right on the event loop: a
wasmtime call is microseconds, and a thread hand-off would cost more than the
call. Calls that may run long go to a small thread pool (wasmtime releases the
GIL while guest code runs), so they cannot stall every other client.

Exactly once: a call may carry a sequence number (`Call.seq`); the VM applies
it only if it is the VM's next, and answers a number it already applied from
its `ReplyLog` (edge_agent/replies.py). The check and the call happen with no
await in between, or under the VM's lock, so two connections racing to resend
the same call cannot both apply it.

Moves: a VM handed over to another cloudlet leaves a tombstone here (kept on
disk, `STATE/vms/ID.moved`) that answers `vm_moved` with the new address, so a
client that comes back here is sent on.

Nothing lost: every VM that applied calls since its last checkpoint is
snapshotted every `checkpoint_interval_s` and at shutdown, to
`STATE/vms/ID.snap`, atomically (write, fsync, rename). On start every
checkpoint is restored. So a clean restart loses nothing, and a kill -9 loses
at most the calls applied in the last checkpoint interval (docs/daemon.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from cloudlet.errors import (
    BadCall,
    CapacityExceeded,
    CloudletError,
    Forbidden,
    ImageInUse,
    ImageRejected,
    ShuttingDown,
    VMMoved,
    VMNotFound,
)
from cloudlet.fsutil import atomic_write, storage_full
from cloudlet.migration.messages import is_safe_id
from cloudlet.migration.pacing import CallPacer
from cloudlet.protocol import Location
from cloudlet.vm import VM, Image, ImageStore, Snapshot, VMLimits
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.replies import ANNEX_KEY, ReplyLog, call_identity
from edge_agent.storage import CheckpointRound, StorageHealth, write_probe

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """One call as a client asked for it. `refused` holds the reason a malformed
    request cannot run: with a sequence number, that is the call's final answer
    (it uses up its number like any other outcome)."""

    fn: str
    args: tuple[Any, ...] = ()
    data: bytes | None = None  # a bytes-in/bytes-out call when set
    seq: int | None = None
    refused: CloudletError | None = None
    ack: int | None = None  # the client has every answer up to this number

    def identity(self) -> list[Any]:
        return call_identity(self.fn, self.args, self.data)


@dataclass
class HostedVM:
    vm: VM
    owner: str
    inline: bool  # short deadline: calls run on the event loop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Serialises a checkpoint's snapshot-to-file and destroy: without it a write in
    # flight could resurrect a destroyed VM, or an older write land after a newer one.
    persist_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checkpointed_seq: int = -1
    checkpointed_at: float = field(default_factory=time.monotonic)
    calls: int = 0  # applied calls, for telemetry rates
    last_dirty_rate: float = 0.0
    replies: ReplyLog = field(default_factory=ReplyLog)
    # Arrived by live migration: when the source served its last call, until the
    # first call here, which turns it into the migration's downtime as users see it.
    arrived_last_call_unix: float = 0.0
    arrival_downtime_ms: float | None = None
    # Auto-converge: while a live migration outruns the link, calls are spaced apart.
    pacer: CallPacer = field(default_factory=CallPacer)

    @property
    def id(self) -> str:
        return self.vm.id

    def describe(self) -> dict[str, Any]:
        return {"vm": self.vm.id, "owner": self.owner, "image": self.vm.image.digest,
                "seq": self.vm.seq, "memory_bytes": self.vm.memory_bytes,
                "limits": self.vm.limits.to_wire()}


class VMHost:
    """Images and VMs of one cloudlet. Use as `async with VMHost(config) as host`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        state = config.state_path
        self.images = ImageStore(state / "images", max_image_bytes=config.max_image_mib << 20)
        self.vm_dir = state / "vms"
        self.vms: dict[str, HostedVM] = {}
        self.tombstones: dict[str, Location] = {}  # VMs moved away -> where they went
        self._moved_by: dict[str, str] = {}  # migration id -> the VM it moved away
        self.closing = False
        self.checkpoint_failures = 0
        self.storage = StorageHealth()  # what /health and the metrics say of the disk
        self._creating: dict[str, int] = {}  # image digest -> creates in flight
        self._pool = ThreadPoolExecutor(config.call_threads, thread_name_prefix="cloudlet-call")
        self.on_change: Callable[[str, HostedVM | None], None] = lambda vm_id, hosted: None
        # Told when a VM leaves for another cloudlet (the app tells its open streams).
        self.on_moved: Callable[[str, Location], None] = lambda vm_id, where: None

    async def __aenter__(self) -> VMHost:
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self._load_tombstones()  # first: a VM that moved away must not come back to life
        await self._restore_checkpoints()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # --- images ----------------------------------------------------------------------

    async def add_image(self, wasm: bytes, expected_digest: str | None) -> Image:
        from cloudlet.vm import image_digest

        if expected_digest is not None and image_digest(wasm) != expected_digest.lower():
            raise ImageRejected(f"the upload's SHA-256 is {image_digest(wasm)}, not the "
                                f"{expected_digest} it was announced as")
        # Compiling takes milliseconds to seconds: off the event loop.
        return await self._off_loop(self.images.add, wasm)

    def delete_image(self, digest: str) -> None:
        users = [h.id for h in self.vms.values() if h.vm.image.digest == digest]
        if self._creating.get(digest):
            users.append("(a VM being created)")
        if users:
            raise ImageInUse(f"image {digest[:12]} is used by {len(users)} VMs, e.g. {users[0]}")
        self.images.delete(digest)

    # --- VMs ----------------------------------------------------------------------------

    def get(self, vm_id: str, who: Principal) -> HostedVM:
        hosted = self.vms.get(vm_id)
        if hosted is None:
            self._raise_gone(vm_id)
        if not who.is_peer and hosted.owner != who.name:
            raise Forbidden(f"VM {vm_id} belongs to another client")
        return hosted

    def owned_by(self, who: Principal) -> list[HostedVM]:
        return [h for h in self.vms.values() if who.is_peer or h.owner == who.name]

    async def create(self, who: Principal, digest: str, limits: dict[str, Any] | None,
                     clock: str = "real") -> HostedVM:
        self._check_open()
        self._creating[digest] = self._creating.get(digest, 0) + 1
        try:
            return await self._create(who, digest, limits, clock)
        finally:
            self._creating[digest] -= 1

    async def _create(self, who: Principal, digest: str, limits: dict[str, Any] | None,
                      clock: str) -> HostedVM:
        image = await self._off_loop(self.images.get, digest)
        vm_limits = self._limits(limits)
        self._check_capacity(vm_limits)
        vm = VM.create(image, vm_limits, owner=who.name, clock=clock)
        hosted = await self._adopt_durably(vm)
        self.on_change(vm.id, hosted)
        return hosted

    async def _adopt_durably(self, vm: VM, replies: ReplyLog | None = None) -> HostedVM:
        """Host `vm` and checkpoint it before anyone hears of it: a kill -9 right after
        must not lose it (later calls are then bounded by the checkpoint interval, as
        promised). If the checkpoint fails, the VM is not hosted."""
        hosted = self._adopt(vm)
        if replies is not None:
            hosted.replies = replies
        try:
            await self._first_checkpoint(hosted)
        except BaseException:
            self.vms.pop(vm.id, None)
            vm.close()
            raise
        return hosted

    def _check_capacity(self, limits: VMLimits) -> None:
        if len(self.vms) >= self.config.max_vms:
            raise CapacityExceeded(f"this cloudlet hosts its maximum of {self.config.max_vms} VMs")
        committed = sum(h.vm.limits.memory_bytes for h in self.vms.values())
        if committed + limits.memory_bytes > self.config.max_memory_mib << 20:
            raise CapacityExceeded("this cloudlet's memory is fully committed")

    def _limits(self, given: dict[str, Any] | None) -> VMLimits:
        base = self.config.default_limits
        if not given:
            return base
        if not isinstance(given, dict) or set(given) - {"memory_bytes", "fuel_per_call",
                                                          "deadline_ms"}:
            raise BadCall("limits take memory_bytes, fuel_per_call and deadline_ms")
        limits = VMLimits.from_wire({**base.to_wire(), **given})
        longest_ms = int(self.config.request_deadline_s * 1000 * 0.9)
        if limits.deadline_ms > longest_ms:
            # A call must be able to answer within the request's deadline; otherwise
            # the client would get a timeout for a call that was applied.
            raise BadCall(f"deadline_ms {limits.deadline_ms} is over this cloudlet's longest "
                          f"call ({longest_ms} ms, 90% of its request deadline)")
        return limits

    def _adopt(self, vm: VM) -> HostedVM:
        hosted = HostedVM(vm, vm.owner or "",
                          inline=vm.limits.deadline_ms <= self.config.inline_deadline_ms)
        self.vms[vm.id] = hosted
        return hosted

    def can_call_now(self, hosted: HostedVM) -> bool:
        """True when `call_now` may run: an interactive VM nobody holds across an await."""
        return (hosted.inline and not hosted.lock.locked() and not hosted.pacer.busy
                and not self.closing)

    def call_now(self, hosted: HostedVM, call: Call) -> dict[str, Any]:
        """The fast path, synchronous: nothing awaits between the sequence check and
        the answer, so no other task can touch the VM meanwhile. The lock is only
        needed while someone holds it across an await (a thread-pool call, a
        checkpoint write, a move)."""
        replayed = self._admit(hosted, call)
        if replayed is not None:
            return replayed
        try:
            out = self._run(hosted, call)
        except Exception as exc:
            self._fail(hosted, call, exc)
        return self._answer(hosted, call, out)

    async def call(self, hosted: HostedVM, call: Call) -> dict[str, Any]:
        """One call: on the event loop for interactive VMs, else in the thread pool.
        Returns the answer `{"result" | "data", "seq"}`; errors are raised."""
        self._check_open()
        if self.can_call_now(hosted):
            return self.call_now(hosted, call)
        await hosted.pacer.wait_turn()  # at once unless auto-converge spaces calls
        async with hosted.lock:
            if hosted.inline:
                return self.call_now(hosted, call)
            replayed = self._admit(hosted, call)
            if replayed is not None:
                return replayed
            try:
                out = await self._run_guest(self._run, hosted, call)
            except Exception as exc:
                self._fail(hosted, call, exc)
            return self._answer(hosted, call, out)

    def _admit(self, hosted: HostedVM, call: Call) -> dict[str, Any] | None:
        """None if the call is to run now; a kept answer if it was applied already."""
        self.check_alive(hosted)
        if call.ack is not None:
            hosted.replies.acknowledge(min(call.ack, hosted.vm.seq))
        if call.seq is not None and call.seq != hosted.vm.seq + 1:
            return hosted.replies.replay(call.seq, hosted.vm.seq, call.identity())
        if call.refused is not None:
            self._fail(hosted, call, call.refused)
        return None

    @staticmethod
    def _run(hosted: HostedVM, call: Call) -> Any:
        if call.data is not None:
            return hosted.vm.call_bytes(call.fn, call.data)
        return hosted.vm.call(call.fn, *call.args)

    @staticmethod
    def _answer(hosted: HostedVM, call: Call, out: Any) -> dict[str, Any]:
        hosted.calls = hosted.vm.seq
        if hosted.arrived_last_call_unix:
            hosted.arrival_downtime_ms = (time.time() - hosted.arrived_last_call_unix) * 1000
            hosted.arrived_last_call_unix = 0.0
        if call.data is not None:
            reply = {"data": out, "seq": hosted.vm.seq}
        else:
            reply = {"result": list(out) if isinstance(out, tuple) else out,
                     "seq": hosted.vm.seq}
        if call.seq is not None:
            # The client may forget answered calls up to here: they survive a kill -9.
            reply["durable"] = hosted.checkpointed_seq
            hosted.replies.add(call.seq, call.identity(), reply)
        return reply

    @staticmethod
    def _fail(hosted: HostedVM, call: Call, exc: Exception) -> NoReturn:
        """A call's error is its answer: with a sequence number, it is kept like a
        result, and the number is used up even if the call never entered the guest."""
        hosted.calls = hosted.vm.seq
        if not isinstance(exc, CloudletError):
            log.exception("call %s on VM %s failed inside the cloudlet", call.fn, hosted.id)
            exc = CloudletError(f"the cloudlet failed running {call.fn!r}: {exc!r}")
        if call.seq is not None:
            if hosted.vm.seq < call.seq:
                hosted.vm.consume_seq()
            hosted.replies.add(call.seq, call.identity(),
                               {"error": exc.to_wire(), "seq": call.seq})
        raise exc

    async def snapshot_bytes(self, hosted: HostedVM) -> bytes:
        # The persist lock: not while the VM migrates (a full snapshot moves the base
        # of the migration's next delta round).
        async with hosted.persist_lock, hosted.lock:
            self.check_alive(hosted)
            snap = self.snapshot_with_annex(hosted)
        return await self._off_loop(snap.to_bytes)

    @staticmethod
    def snapshot_with_annex(hosted: HostedVM) -> Snapshot:
        """A full snapshot carrying the VM's reply log (call under the VM's lock)."""
        return replace(hosted.vm.snapshot(), annex={ANNEX_KEY: hosted.replies.to_wire()})

    async def dirty_rate(self, hosted: HostedVM) -> float:
        """Chunks written per second since the VM's last checkpoint (for the placer's
        migration-cost model). Cheap with write tracking: it reads the dirty bitmap."""
        if hosted.lock.locked():
            return hosted.last_dirty_rate  # busy (a long call): telemetry must not wait
        async with hosted.lock:
            if self.vms.get(hosted.id) is not hosted or hosted.vm.failed is not None:
                return 0.0
            dirty = sum(len(ids) for ids in hosted.vm.dirty_chunks())
        hosted.last_dirty_rate = dirty / max(time.monotonic() - hosted.checkpointed_at, 1e-3)
        return hosted.last_dirty_rate

    async def destroy(self, hosted: HostedVM) -> None:
        async with hosted.persist_lock, hosted.lock:
            if self.vms.pop(hosted.id, None) is None:
                return
            hosted.vm.close()
            await self._off_loop(self._checkpoint_path(hosted.id).unlink, missing_ok=True)
        self.on_change(hosted.id, None)

    def _check_open(self) -> None:
        if self.closing:
            raise ShuttingDown("this cloudlet is shutting down; its VMs will be back on restart")

    def check_alive(self, hosted: HostedVM) -> None:
        if self.vms.get(hosted.id) is not hosted:
            self._raise_gone(hosted.id)

    def admit(self, vm_id: str, memory_bytes: int) -> None:
        """May a VM of this size arrive here? (Raises why not, with a stable code.)"""
        self._check_open()
        if vm_id in self.vms:
            raise BadCall(f"a VM {vm_id} is already here")
        if len(self.vms) >= self.config.max_vms:
            raise CapacityExceeded(f"this cloudlet hosts its maximum of {self.config.max_vms} VMs")
        if memory_bytes > self.free_memory_bytes():
            raise CapacityExceeded("this cloudlet's memory is fully committed")

    def free_memory_bytes(self) -> int:
        committed = sum(h.vm.limits.memory_bytes for h in self.vms.values())
        return max(0, (self.config.max_memory_mib << 20) - committed)

    def _raise_gone(self, vm_id: str) -> NoReturn:
        where = self.tombstones.get(vm_id)
        if where is not None:
            raise VMMoved(f"VM {vm_id} moved to cloudlet {where.node} ({where.endpoint})",
                          vm=vm_id, **where.to_wire())
        raise VMNotFound(f"no VM {vm_id!r} on this cloudlet")

    # --- moves --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def paused(self, hosted: HostedVM) -> AsyncIterator[None]:
        """Hold the VM between calls: calls wait (and then follow it if it moved),
        no checkpoint runs. For the stop-and-copy phase of a move."""
        async with hosted.persist_lock, hosted.lock:
            self.check_alive(hosted)
            yield

    def record_move(self, vm_id: str, where: Location, migration_id: str | None) -> None:
        """Durably decide that the VM lives at `where` now (the commit point of a
        live migration): written before the destination is told to commit."""
        self._write_tombstone(vm_id, where, migration_id)

    def forget_move(self, vm_id: str) -> None:
        """Undo `record_move` for a move that did not happen (the destination refused
        the VM): the VM stays, and a restart must restore it, not drop it."""
        self.tombstones.pop(vm_id, None)
        self._tombstone_path(vm_id).unlink(missing_ok=True)

    def moved_by_migration(self, migration_id: str) -> bool:
        return migration_id in self._moved_by

    def activate(self, vm: VM, replies_wire: Any) -> HostedVM:
        """Serve a VM that arrived by live migration (already durable on disk)."""
        if vm.id in self.vms:
            raise BadCall(f"a VM {vm.id} is already here")
        hosted = self._adopt(vm)
        hosted.replies = ReplyLog.from_wire(replies_wire)
        if self.tombstones.pop(vm.id, None) is not None:  # it came back
            self._tombstone_path(vm.id).unlink(missing_ok=True)
        self.on_change(vm.id, hosted)
        return hosted

    async def hand_over(self, hosted: HostedVM, where: Location) -> None:
        """The destination committed: forget the VM here, durably, and leave a
        tombstone. Call while `paused`: no call can slip in after the last snapshot."""
        if self.tombstones.get(hosted.id) != where:
            self._write_tombstone(hosted.id, where, None)
        self.vms.pop(hosted.id, None)
        # Clients first (they are waiting to follow it), then the cleanup: freeing a
        # large VM's memory takes milliseconds that are not theirs to wait for.
        self.on_change(hosted.id, None)
        self.on_moved(hosted.id, where)
        await self._off_loop(hosted.vm.close)
        await self._off_loop(self._checkpoint_path(hosted.id).unlink, missing_ok=True)

    async def adopt_snapshot(self, data: bytes, max_bytes: int,
                             owner: str | None = None) -> HostedVM:
        """Take in a VM handed over by a peer: restore it with its id, owner,
        sequence number and reply log, and checkpoint it before answering, so once
        the peer hears "committed" a crash here loses nothing. With `owner` (VM
        synthesis by a client), the VM is new: a fresh id, that owner, no replies."""
        self._check_open()
        snap = await self._off_loop(Snapshot.from_bytes, data, max_bytes)
        if snap.kind != "overlay":
            raise BadCall("a VM starts from an overlay snapshot, not a delta")
        if owner is not None:
            snap = replace(snap, vm_id=secrets.token_hex(8), owner=owner, annex={})
        if snap.vm_id is None or snap.vm_id in self.vms:
            raise BadCall(f"a VM {snap.vm_id!r} is already here (or the snapshot names none)")
        if not is_safe_id(snap.vm_id):  # it names the VM's files here
            raise BadCall(f"a VM id is letters, digits, '-' or '_', not {snap.vm_id[:80]!r}")
        self._check_capacity(snap.limits)
        image = await self._off_loop(self.images.get, snap.image_digest)
        vm = await self._off_loop(VM.restore, image, snap)
        hosted = await self._adopt_durably(vm, ReplyLog.from_wire(snap.annex.get(ANNEX_KEY)))
        if self.tombstones.pop(vm.id, None) is not None:  # it came back
            await self._off_loop(self._tombstone_path(vm.id).unlink, missing_ok=True)
        self.on_change(vm.id, hosted)
        return hosted

    def _tombstone_path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}.moved"

    def _write_tombstone(self, vm_id: str, where: Location, migration_id: str | None) -> None:
        record = {**where.to_wire(), "migration": migration_id}
        atomic_write(self._tombstone_path(vm_id), json.dumps(record).encode())
        self.tombstones[vm_id] = where
        if migration_id:
            self._moved_by[migration_id] = vm_id

    def _load_tombstones(self) -> None:
        for path in self.vm_dir.glob("*.moved"):
            try:
                wire = json.loads(path.read_bytes())
                self.tombstones[path.stem] = Location(str(wire["node"]), str(wire["endpoint"]))
                if isinstance(wire.get("migration"), str):
                    self._moved_by[wire["migration"]] = path.stem
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable tombstone %s: %r", path.name, exc)

    # --- persistence ------------------------------------------------------------------

    async def _first_checkpoint(self, hosted: HostedVM) -> None:
        """A new VM's checkpoint, before anyone hears of it. A write the disk refused
        (any OSError) is `StorageFull`, said without the server's paths (it goes to
        the client, who may try another cloudlet). Shielded: a request deadline must
        not leave the write running unwatched, to land after the client was told
        the VM does not exist; it is waited for, and removed if it landed."""
        write = asyncio.ensure_future(self.checkpoint(hosted, force=True))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                self._checkpoint_path(hosted.id).unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise storage_full(exc, "cannot write the new VM's first checkpoint") from exc

    def _checkpoint_path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}.snap"

    async def checkpoint(self, hosted: HostedVM, *, force: bool = False) -> bool:
        """Snapshot `hosted` to disk if it applied calls since its last checkpoint."""
        async with hosted.persist_lock:
            async with hosted.lock:
                if self.vms.get(hosted.id) is not hosted or hosted.vm.failed is not None:
                    return False
                if not force and hosted.vm.seq == hosted.checkpointed_seq:
                    return False
                snap = self.snapshot_with_annex(hosted)
            # Written as segments: no joined copy of a big guest's memory.
            await self._off_loop(snap.write, self._checkpoint_path(hosted.id))
            hosted.checkpointed_seq = snap.seq
            hosted.checkpointed_at = time.monotonic()
            return True

    async def checkpoint_all(self, *, force: bool = False) -> CheckpointRound:
        """Checkpoint every VM that applied calls since its last checkpoint (every VM
        with `force`). A VM whose checkpoint cannot be written keeps serving and its
        checkpointed seq stays where it was (so no answer claims it durable, and the
        next round tries again); the round says which failed, and `storage` takes it
        in. While degraded, a round with nothing to write probes the disk instead."""
        written, failed = 0, {}
        for hosted in list(self.vms.values()):
            try:
                written += await self.checkpoint(hosted, force=force)
            except Exception as exc:  # a full disk must not stop the daemon: retry next round
                self.checkpoint_failures += 1
                failed[hosted.id] = exc
        probed, probe_error = False, None
        if not written and not failed and not self.storage.ok:
            probed = True
            try:
                await asyncio.to_thread(write_probe, self.vm_dir)  # rare, tiny: any thread
            except OSError as exc:
                probe_error = exc
        done = CheckpointRound(written, failed, probed, probe_error)
        self.storage.round_done(done, self.vms)
        return done

    async def _restore_checkpoints(self) -> None:
        # Halves of writes a kill interrupted. Safe to remove: the state directory's
        # lock (edge_agent.statelock) says no other process is writing here.
        for tmp in self.vm_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.vm_dir.glob("*.snap")):
            if path.stem in self.tombstones:
                # It moved: the destination owns it (we crashed before dropping it).
                await self._off_loop(path.unlink, missing_ok=True)
                continue
            try:
                snap = await self._off_loop(Snapshot.read, path)
                image = await self._off_loop(self.images.get, snap.image_digest)
                vm = VM.restore(image, snap)
            except CloudletError as exc:
                # Keep the file for a human to look at; never delete state we cannot read.
                aside = path.with_suffix(".unreadable")
                path.rename(aside)
                log.error("cannot restore %s (%s); moved aside to %s", path.name, exc, aside.name)
                continue
            hosted = self._adopt(vm)
            hosted.checkpointed_seq = vm.seq
            hosted.replies = ReplyLog.from_wire(snap.annex.get(ANNEX_KEY))
            log.info("restored VM %s (owner %s, seq %d)", vm.id, vm.owner, vm.seq)

    async def shutdown(self) -> list[str]:
        """Stop taking calls, let in-flight ones finish, checkpoint every VM, free them.

        Returns the VMs whose latest state could not be saved (a full disk): each
        keeps its last good checkpoint, which a restart brings back. A VM whose
        write failed but whose checkpoint on disk is already at its seq lost
        nothing and is not among them."""
        if self._pool is None:
            return []
        self.closing = True
        done = await self.checkpoint_all(force=True)
        unsaved = sorted(vm_id for vm_id in done.failed
                         if (h := self.vms.get(vm_id)) is not None
                         and h.checkpointed_seq != h.vm.seq)
        for vm_id in unsaved:
            hosted = self.vms[vm_id]
            log.error("VM %s was not saved: it applied calls up to seq %d, its last good "
                      "checkpoint (seq %d) stays on disk and comes back on restart",
                      vm_id, hosted.vm.seq, hosted.checkpointed_seq)
        level = logging.ERROR if unsaved else logging.WARNING if done.failed else logging.INFO
        log.log(level, "checkpointed %d VMs, %d failed%s", done.written, len(done.failed),
                f"; not saved: {', '.join(unsaved)}" if unsaved else "")
        for hosted in list(self.vms.values()):
            async with hosted.lock:
                hosted.vm.close()
        self.vms.clear()
        pool, self._pool = self._pool, None  # type: ignore[assignment]
        pool.shutdown(wait=True)
        return unsaved

    async def _run_guest(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a VM call in the pool. If the caller is cancelled (a request deadline),
        the guest still runs in its thread, so the VM's lock must stay held until it
        is done: a second thread in the same wasmtime store would corrupt it."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, lambda: fn(*args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
