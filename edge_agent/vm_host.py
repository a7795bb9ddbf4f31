"""The VMs a cloudlet hosts: who owns them, how their calls run, and how none is lost.

Calls: a VM is not thread-safe, so each has an asyncio lock. Calls of VMs whose
deadline is short (interactive sessions) run right on the event loop: a
wasmtime call is microseconds, and a thread hand-off would cost more than the
call. Calls that may run long go to a small thread pool (wasmtime releases the
GIL while guest code runs), so they cannot stall every other client.

Isolation: nothing else that can take long runs on the event loop either. Boots
(a guest's `_initialize`, bounded by the boot fuel and deadline), restores and
checkpoint captures run on worker threads, in pools of their own so that none
waits for another, and clients take turns on them (edge_agent/workers.py).
Every client is held to its quotas of VMs, memory and images
(edge_agent/quotas.py), whether its VMs are created here or arrive from peers.

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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from cloudlet.errors import (
    BadCall,
    CapacityExceeded,
    CloudletError,
    Forbidden,
    ImageInUse,
    ImageNotFound,
    ImageRejected,
    ImageTooLarge,
    ShuttingDown,
    SnapshotCorrupt,
    VMInterrupted,
    VMMoved,
    VMNotFound,
)
from cloudlet.fsutil import atomic_write, storage_full
from cloudlet.migration.messages import is_safe_id
from cloudlet.migration.pacing import CallPacer
from cloudlet.protocol import Location
from cloudlet.vm import VM, Image, ImageStore, Snapshot, VMLimits, image_digest
from cloudlet.vm.snapshot import HEAD_BYTES, check_head
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.quotas import Quotas, Usage
from edge_agent.replies import ANNEX_KEY, GENERATION_KEY, ReplyLog, call_identity, generation_of
from edge_agent.storage import CheckpointRound, StorageHealth, public_reason, write_probe
from edge_agent.workers import FairPool, Workers

log = logging.getLogger(__name__)

# A VM this small is captured right on the event loop: at most ~1 ms of hashing
# and copying, less than handing it to a thread would cost its owner (the hop
# needs the GIL back and forth while the loop is busy, and the VM's calls wait
# for the capture). Larger VMs are captured on a checkpoint thread.
INLINE_CAPTURE_MAX_BYTES = 2 << 20


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
    generation: int = 0  # moves between cloudlets so far (see replies.GENERATION_KEY)
    # Auto-converge: while a live migration outruns the link, calls are spaced apart.
    pacer: CallPacer = field(default_factory=CallPacer)

    @property
    def id(self) -> str:
        return self.vm.id

    def describe(self) -> dict[str, Any]:
        return {"vm": self.vm.id, "owner": self.owner, "image": self.vm.image.digest,
                "seq": self.vm.seq, "memory_bytes": self.vm.memory_bytes,
                "limits": self.vm.limits.to_wire()}


@dataclass(eq=False)
class Admission:
    """A VM on its way in (booting, restoring): counted against its owner's quota and
    the node's capacity until it is hosted, so concurrent admissions cannot
    together pass a limit that each passes alone."""

    owner: str
    caps_bytes: int
    reply_bytes: int = 0


class VMHost:
    """Images and VMs of one cloudlet. Use as `async with VMHost(config) as host`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        state = config.state_path
        self.images = ImageStore(state / "images", max_image_bytes=config.max_image_mib << 20,
                                 boot_fuel=config.boot_fuel,
                                 boot_deadline_ms=config.effective_boot_deadline_ms)
        self.vm_dir = state / "vms"
        self.upload_dir = state / "uploads"  # bodies too large to buffer, while they arrive
        self.vms: dict[str, HostedVM] = {}
        self.tombstones: dict[str, Location] = {}  # VMs moved away -> where they went
        self._moved_by: dict[str, str] = {}  # migration id -> the VM it moved away
        self.closing = False
        self.checkpoint_failures = 0
        self.storage = StorageHealth()  # what /health and the metrics say of the disk
        self._creating: dict[str, int] = {}  # image digest -> creates in flight
        self.quotas = Quotas(config)
        self._admissions: list[Admission] = []
        self._holders_lock = asyncio.Lock()
        # Checkpoints of VMs that were busy (a long call, a migration) when their round
        # came: each waits for its VM without holding up the round's other VMs.
        self._deferred: dict[str, asyncio.Task[None]] = {}
        self._workers: Workers | None = Workers(
            call_threads=config.call_threads,
            call_threads_per_client=config.call_threads_per_client,
            boot_threads=config.boot_threads, checkpoint_threads=config.checkpoint_threads)
        self.on_change: Callable[[str, HostedVM | None], None] = lambda vm_id, hosted: None
        # Told when a VM leaves for another cloudlet (the app tells its open streams).
        self.on_moved: Callable[[str, Location], None] = lambda vm_id, where: None

    async def __aenter__(self) -> VMHost:
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.upload_dir.iterdir():  # bodies a crash left half-received
            leftover.unlink(missing_ok=True)
        self._load_tombstones()  # first: a VM that moved away must not come back to life
        self.quotas.load(self.images.list())
        await self._restore_checkpoints()
        for owner in {h.owner for h in self.vms.values()}:
            self._share_reply_room(owner)
        return self

    @property
    def workers(self) -> Workers:
        if self._workers is None:
            raise ShuttingDown("this cloudlet is shutting down; its VMs will be back on restart")
        return self._workers

    @property
    def boots(self) -> FairPool:
        return self.workers.boots

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # --- images ----------------------------------------------------------------------

    async def add_image(self, who: Principal, wasm: bytes, expected_digest: str | None) -> Image:
        """Register an upload; it counts against its uploader's image quota (a peer's
        counts against nobody: it comes with a VM)."""
        if len(wasm) > self.images.max_image_bytes:
            raise ImageTooLarge(f"image is {len(wasm)} bytes; this cloudlet takes at most "
                                f"{self.images.max_image_bytes}")
        digest = await self.boots.run(who.name, lambda: image_digest(wasm))
        if expected_digest is not None and digest != expected_digest.lower():
            raise ImageRejected(f"the upload's SHA-256 is {digest}, not the "
                                f"{expected_digest} it was announced as")
        counted = not who.is_peer and self.quotas.hold_image(who.name, digest)
        try:
            # Compiling (and the boot that records the pristine state) takes
            # milliseconds to seconds: off the event loop, in the client's turn.
            image = await self.boots.run(who.name, lambda: self.images.add(wasm))
            if counted:
                await self._save_image_holders()
        except OSError as exc:  # the disk refused (StorageFull): said without our paths
            if counted:
                self.quotas.release_image(who.name, digest)
            raise storage_full(exc, "cannot store the image") from exc
        except BaseException:
            if counted:
                self.quotas.release_image(who.name, digest)
            raise
        return image

    def images_of(self, who: Principal) -> list[str]:
        """The images `who` may see: a client, those it uploaded; a peer, all."""
        if who.is_peer:
            return self.images.list()
        return self.quotas.held_by(who.name)

    async def delete_image(self, who: Principal, digest: str) -> None:
        """A client deletes only an image it uploaded; while other clients hold it too,
        only its own hold goes (the image stays theirs). A peer deletes any unused one."""
        if not who.is_peer:
            holders = self.quotas.holders(digest)
            if who.name not in holders:
                raise ImageNotFound(f"no image {digest[:16]!r} of this client here")
            if holders - {who.name}:
                self.quotas.release_image(who.name, digest)
                await self._save_image_holders()
                return
        users = [h.id for h in self.vms.values() if h.vm.image.digest == digest]
        if self._creating.get(digest):
            users.append("(a VM being created)")
        if users:
            raise ImageInUse(f"image {digest[:12]} is used by {len(users)} VMs, e.g. {users[0]}")
        self.images.delete(digest)
        self.quotas.forget_image(digest)
        await self._save_image_holders()

    async def _save_image_holders(self) -> None:
        async with self._holders_lock:  # one write at a time: the newest lands last
            record = self.quotas.record()
            try:
                await self.workers.checkpoints.run(Workers.NODE,
                                                   lambda: Quotas.write_record(record))
            except OSError as exc:  # said without our paths: it goes to the client
                raise storage_full(exc, "cannot record who uploaded which image") from exc

    def image(self, digest: str) -> Image:
        """An image of the store (call off the loop: it may compile). The error names
        no path of this machine: it goes to clients."""
        try:
            return self.images.get(digest)
        except ImageNotFound:
            raise ImageNotFound(f"no image {digest[:80]!r} on this cloudlet") from None

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
        vm_limits = self._limits(limits)
        owner = who.name
        with self._admitting(owner, vm_limits.memory_bytes) as admission:
            # Loading may compile; booting runs the guest's `_initialize`, which may burn
            # its whole boot fuel: both on the boot threads, in this client's turn.
            image = await self.boots.run(owner, lambda: self.image(digest))
            vm = await self.boots.run(
                owner, lambda: VM.create(image, vm_limits, owner=owner, clock=clock),
                on_orphan=VM.close)
            hosted = await self._adopt_durably(vm, admission)
        self.on_change(vm.id, hosted)
        return hosted

    async def _adopt_durably(self, vm: VM, admission: Admission,
                             replies: ReplyLog | None = None, generation: int = 0) -> HostedVM:
        """Host `vm` and checkpoint it before anyone hears of it: a kill -9 right after
        must not lose it (later calls are then bounded by the checkpoint interval, as
        promised). If the checkpoint fails, the VM is not hosted."""
        hosted = self._adopt(vm)
        hosted.generation = generation
        self._admitted(admission)
        if replies is not None:
            hosted.replies = replies
        self._share_reply_room(hosted.owner)
        try:
            await self._first_checkpoint(hosted)
        except BaseException:
            self.vms.pop(vm.id, None)
            await self._close_off_loop(vm)
            self._share_reply_room(hosted.owner)
            raise
        return hosted

    # --- capacity and quotas --------------------------------------------------------------

    def usage(self, owner: str) -> Usage:
        """What `owner` holds here: its VMs, and those on their way in."""
        held = Usage()
        for h in self.vms.values():
            if h.owner == owner:
                held = held.plus(Usage(1, h.vm.limits.memory_bytes, h.replies.size_bytes))
        for a in self._admissions:
            if a.owner == owner:
                held = held.plus(Usage(1, a.caps_bytes, a.reply_bytes))
        return held

    def _check_capacity(self, memory_bytes: int) -> None:
        if len(self.vms) + len(self._admissions) >= self.config.max_vms:
            raise CapacityExceeded(f"this cloudlet hosts its maximum of {self.config.max_vms} VMs")
        if memory_bytes > self.free_memory_bytes():
            raise CapacityExceeded("this cloudlet's memory is fully committed")

    def _check_admission(self, owner: str, memory_bytes: int, reply_bytes: int = 0) -> None:
        """Node capacity first (503: try another cloudlet), then the owner's quotas
        (429: this client holds its share here)."""
        self._check_capacity(memory_bytes)
        self.quotas.check_vm(owner, self.usage(owner), memory_bytes, reply_bytes)

    @contextlib.contextmanager
    def _admitting(self, owner: str, memory_bytes: int,
                   reply_bytes: int = 0) -> Iterator[Admission]:
        """Check, then hold the VM's place while it boots or restores (see `Admission`)."""
        self._check_admission(owner, memory_bytes, reply_bytes)
        admission = Admission(owner, memory_bytes, reply_bytes)
        self._admissions.append(admission)
        try:
            yield admission
        finally:
            self._admitted(admission)

    def _admitted(self, admission: Admission) -> None:
        with contextlib.suppress(ValueError):
            self._admissions.remove(admission)

    def _share_reply_room(self, owner: str) -> None:
        """Cap each of `owner`'s reply logs at its share of the memory its caps leave
        (edge_agent/quotas.py): what it holds in answers stays within its quota."""
        mine = [h for h in self.vms.values() if h.owner == owner]
        cap = self.quotas.reply_cap_bytes(Usage(len(mine),
                                                sum(h.vm.limits.memory_bytes for h in mine)))
        for h in mine:
            h.replies.set_cap(cap)

    def memory_room_bytes(self, who: Principal) -> int:
        """How much memory `who` could still be given here (its quota and the node's)."""
        return min(self.quotas.memory_room_bytes(self.usage(who.name)), self.free_memory_bytes())

    def _limits(self, given: dict[str, Any] | None) -> VMLimits:
        base = self.config.default_limits
        if not given:
            return base
        if not isinstance(given, dict) or set(given) - {"memory_bytes", "fuel_per_call",
                                                          "deadline_ms"}:
            raise BadCall("limits take memory_bytes, fuel_per_call and deadline_ms")
        limits = VMLimits.from_wire({**base.to_wire(), **given})
        longest_ms = self.config.longest_call_ms
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
                out = await self.workers.calls.run(hosted.owner, lambda: self._run(hosted, call))
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
        if call.fn.startswith("_"):
            # The runtime's own entry points (`_initialize`, `_start`): a guest's
            # boot is not a call a client may repeat.
            raise BadCall(f"{call.fn[:200]!r} is not callable: functions named with a "
                          "leading underscore belong to the runtime")
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
        # of the migration's next delta round). Captured off the loop: for a large
        # VM that is a scan of all its memory.
        async with hosted.persist_lock, hosted.lock:
            self.check_alive(hosted)
            snap = await self.boots.run(hosted.owner, lambda: self.snapshot_with_annex(hosted))
        return await self.boots.run(hosted.owner, snap.to_bytes)

    @staticmethod
    def snapshot_with_annex(hosted: HostedVM, *, moving: bool = False) -> Snapshot:
        """A full snapshot carrying the VM's reply log (call under the VM's lock)."""
        generation = hosted.generation + 1 if moving else hosted.generation
        return replace(hosted.vm.snapshot(), annex={ANNEX_KEY: hosted.replies.to_wire(),
                                                    GENERATION_KEY: generation})

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
            self._share_reply_room(hosted.owner)
            path = self._checkpoint_path(hosted.id)

            def forget() -> None:
                hosted.vm.close()  # unmapping a large memory takes milliseconds
                path.unlink(missing_ok=True)

            await self.workers.checkpoints.run(Workers.NODE, forget)
        self.on_change(hosted.id, None)

    async def _close_off_loop(self, vm: VM) -> None:
        await self.workers.checkpoints.run(Workers.NODE, vm.close)

    def _check_open(self) -> None:
        if self.closing:
            raise ShuttingDown("this cloudlet is shutting down; its VMs will be back on restart")

    def check_alive(self, hosted: HostedVM) -> None:
        if self.vms.get(hosted.id) is not hosted:
            self._raise_gone(hosted.id)

    def admit(self, vm_id: str, memory_bytes: int, owner: str | None = None) -> None:
        """May a VM of this size, of `owner`, arrive here? (Raises why not, with a
        stable code: the node's capacity, or the owner's quotas.)"""
        self._check_open()
        if vm_id in self.vms:
            raise BadCall(f"a VM {vm_id} is already here")
        self._check_admission(owner or "", memory_bytes)

    def free_memory_bytes(self) -> int:
        committed = (sum(h.vm.limits.memory_bytes for h in self.vms.values())
                     + sum(a.caps_bytes for a in self._admissions))
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

    def activate(self, vm: VM, replies_wire: Any, generation: int = 0) -> HostedVM:
        """Serve a VM that arrived by live migration (already durable on disk)."""
        if vm.id in self.vms:
            raise BadCall(f"a VM {vm.id} is already here")
        hosted = self._adopt(vm)
        hosted.replies = ReplyLog.from_wire(replies_wire)
        hosted.generation = generation
        # Its owner's quotas were checked when it was offered; committed now, it is
        # never dropped for them (docs/daemon.md).
        self._share_reply_room(hosted.owner)
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
        self._share_reply_room(hosted.owner)
        # Clients first (they are waiting to follow it), then the cleanup: freeing a
        # large VM's memory takes milliseconds that are not theirs to wait for.
        self.on_change(hosted.id, None)
        self.on_moved(hosted.id, where)
        path = self._checkpoint_path(hosted.id)

        def forget() -> None:
            hosted.vm.close()
            path.unlink(missing_ok=True)

        await self.workers.checkpoints.run(Workers.NODE, forget)

    async def adopt_snapshot(self, who: Principal, source: Path, max_bytes: int,
                             owner: str | None = None) -> HostedVM:
        """Take in a VM handed over by a peer (`who`), from a snapshot file: restore it
        with its id, owner, sequence number and reply log, and checkpoint it before
        answering, so once the peer hears "committed" a crash here loses nothing.
        With `owner` (VM synthesis by a client), the VM is new: a fresh id, that
        owner, no replies. Either way it counts against its owner's quotas."""
        self._check_open()
        snap = await self.boots.run(who.name, lambda: read_snapshot(source, max_bytes))
        if snap.kind != "overlay":
            raise BadCall("a VM starts from an overlay snapshot, not a delta")
        if owner is not None:
            # A client's snapshot brings its own limits: they pass the same checks as a
            # create's (a call may not outlast its request, a day per call would hold
            # a call thread for a day).
            snap = replace(snap, vm_id=secrets.token_hex(8), owner=owner, annex={},
                           limits=self._limits(snap.limits.to_wire()))
        if snap.vm_id is None or snap.vm_id in self.vms:
            raise BadCall(f"a VM {snap.vm_id!r} is already here (or the snapshot names none)")
        if not is_safe_id(snap.vm_id):  # it names the VM's files here
            raise BadCall(f"a VM id is letters, digits, '-' or '_', not {snap.vm_id[:80]!r}")
        replies = ReplyLog.from_wire(snap.annex.get(ANNEX_KEY))
        vm_owner = snap.owner or ""
        with self._admitting(vm_owner, snap.limits.memory_bytes, replies.size_bytes) as admission:
            image = await self.boots.run(who.name, lambda: self.image(snap.image_digest))
            vm = await self.boots.run(who.name, lambda: VM.restore(image, snap),
                                      on_orphan=VM.close)
            hosted = await self._adopt_durably(vm, admission, replies,
                                               generation_of(snap.annex))
        if self.tombstones.pop(vm.id, None) is not None:  # it came back
            await self.workers.checkpoints.run(
                Workers.NODE, lambda: self._tombstone_path(vm.id).unlink(missing_ok=True))
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
            try:
                await write
            except Exception as exc:  # the VM is going anyway; the write's fate is logged
                log.warning("checkpoint of VM %s during its removal failed: %r", hosted.id,
                            exc)
            if write.done() and not write.cancelled() and write.exception() is None:
                self._checkpoint_path(hosted.id).unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise storage_full(exc, "cannot write the new VM's first checkpoint") from exc

    def _checkpoint_path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}.snap"

    async def checkpoint(self, hosted: HostedVM, *, force: bool = False,
                         wait: bool = True) -> bool:
        """Snapshot `hosted` to disk if it applied calls since its last checkpoint.

        The capture (a scan of all the VM's memory if it wrote all of it) runs on a
        checkpoint thread unless the VM is small, and the write always does: the
        loop keeps serving every other VM meanwhile, and this VM's calls wait only
        for the capture. With `wait`
        false (the periodic round), a VM that is busy (a long call, a migration) is
        not waited for: its checkpoint follows on its own as soon as it is free."""
        if not wait and (hosted.lock.locked() or hosted.persist_lock.locked()):
            self._defer_checkpoint(hosted)
            return False
        pool = self.workers.checkpoints
        async with hosted.persist_lock:
            async with hosted.lock:
                if self.vms.get(hosted.id) is not hosted or hosted.vm.failed is not None:
                    return False
                if not force and hosted.vm.seq == hosted.checkpointed_seq:
                    return False
                if hosted.vm.memory_bytes <= INLINE_CAPTURE_MAX_BYTES:
                    snap = self.snapshot_with_annex(hosted)
                else:
                    snap = await pool.run(Workers.NODE,
                                          lambda: self.snapshot_with_annex(hosted))
            # Written as segments: no joined copy of a big guest's memory. The capture
            # is handed to the writing thread, which frees it too (unmapping a large
            # one takes milliseconds).
            path, seq, handed = self._checkpoint_path(hosted.id), snap.seq, [snap]
            del snap
            await pool.run(Workers.NODE, lambda: handed.pop().write(path))
            hosted.checkpointed_seq = seq
            hosted.checkpointed_at = time.monotonic()
            return True

    def _defer_checkpoint(self, hosted: HostedVM) -> None:
        if hosted.id in self._deferred or self.closing:
            return

        async def when_free() -> None:
            try:
                await self.checkpoint(hosted)
            except Exception as exc:  # as in a round: retried by the next one
                self.checkpoint_failures += 1
                log.error("checkpoint of VM %s failed: %r", hosted.id, exc)
                self.storage.write_failed("checkpoint", public_reason(exc, "checkpoints"))

        task = asyncio.get_running_loop().create_task(when_free())
        self._deferred[hosted.id] = task  # owned: shutdown waits for it
        task.add_done_callback(lambda _: self._deferred.pop(hosted.id, None))

    async def checkpoint_all(self, *, force: bool = False) -> CheckpointRound:
        """Checkpoint every VM that applied calls since its last checkpoint (every VM
        with `force`). A VM whose checkpoint cannot be written keeps serving and its
        checkpointed seq stays where it was (so no answer claims it durable, and the
        next round tries again); the round says which failed, and `storage` takes it
        in. While degraded, a round with nothing to write probes the disk instead.
        The periodic round (without `force`) waits for no busy VM (`checkpoint`)."""
        written, failed = 0, {}
        for hosted in list(self.vms.values()):
            try:
                written += await self.checkpoint(hosted, force=force, wait=force)
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
                if path.stem in self._moved_by.values():
                    # Moved live: the protocol settled who owns it (the destination).
                    path.unlink(missing_ok=True)
                else:
                    # Handed over by stop-and-copy, and stopped before the handover was
                    # confirmed: the destination probably holds it, but nothing says so.
                    # Not served here (never in two places), and not deleted either.
                    aside = path.with_suffix(".handed-over")
                    path.rename(aside)
                    log.warning("VM %s was being handed to %s when this cloudlet stopped; "
                                "its checkpoint is kept as %s until someone confirms the "
                                "destination holds it", path.stem,
                                self.tombstones[path.stem].node, aside.name)
                continue
            try:
                vm, snap = await self.boots.run(Workers.NODE, partial(self._restore_file, path))
            except VMInterrupted as exc:
                # Its image's boot overran this node's boot limits (lowered since, or a
                # loaded machine): nothing is wrong with the file. It stays where it is,
                # to come back on a start with limits it fits in.
                log.error("cannot boot %s within boot_fuel and boot_deadline_ms (%s); left "
                          "in place", path.name, exc)
                continue
            except CloudletError as exc:
                # Keep the file for a human to look at; never delete state we cannot read.
                aside = path.with_suffix(".unreadable")
                path.rename(aside)
                log.error("cannot restore %s (%s); moved aside to %s", path.name, exc, aside.name)
                continue
            hosted = self._adopt(vm)
            hosted.checkpointed_seq = vm.seq
            hosted.replies = ReplyLog.from_wire(snap.annex.get(ANNEX_KEY))
            hosted.generation = generation_of(snap.annex)
            log.info("restored VM %s (owner %s, seq %d)", vm.id, vm.owner, vm.seq)

    def _restore_file(self, path: Path) -> tuple[VM, Snapshot]:
        snap = Snapshot.read(path)
        return VM.restore(self.images.get(snap.image_digest), snap), snap

    async def shutdown(self) -> list[str]:
        """Stop taking calls, let in-flight ones finish, checkpoint every VM, free them.

        Returns the VMs whose latest state could not be saved (a full disk): each
        keeps its last good checkpoint, which a restart brings back. A VM whose
        write failed but whose checkpoint on disk is already at its seq lost
        nothing and is not among them."""
        if self._workers is None:
            return []
        self.closing = True
        done = await self.checkpoint_all(force=True)
        if self._deferred:
            await asyncio.gather(*self._deferred.values(), return_exceptions=True)
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
        workers, self._workers = self._workers, None
        workers.shutdown()
        return unsaved


def read_snapshot(path: Path, max_bytes: int) -> Snapshot:
    """A snapshot from a received file: its head is checked before the rest is read
    (what is not a snapshot costs no memory), and errors name no path of this
    machine (they go to clients)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            check_head(f.read(HEAD_BYTES), size, max_bytes)
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotCorrupt(f"cannot read the received snapshot: {exc.strerror}") from None
    return Snapshot.from_bytes(data, max_bytes)
