"""The VMs a cloudlet hosts: who owns them, how their calls run, and where they are.

The host is the registry and the driver; each of its other jobs is a module of
its own: images and who holds them (edge_agent/images.py), exactly-once admission
of calls (edge_agent/exactly_once.py, a pure object this module drives),
tombstones of VMs that moved away (edge_agent/tombstones.py) and checkpoints,
written while serving and restored on start (edge_agent/checkpoints.py).

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

Exactly once: a call may carry a sequence number (`Call.seq`); the VM's
`ExactlyOnce` admits it only if it is the VM's next, and answers a number it
already applied from its reply log. The admission and the call happen with no
await in between, or under the VM's lock, so two connections racing to resend
the same call cannot both apply it.

Moves: a VM handed over to another cloudlet leaves a tombstone here that
answers `vm_moved` with the new address, so a client that comes back here is
sent on.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from cloudlet.errors import (
    BadCall,
    CapacityExceeded,
    CloudletError,
    Forbidden,
    ShuttingDown,
    VMMoved,
    VMNotFound,
)
from cloudlet.migration.messages import is_safe_id
from cloudlet.protocol import Location
from cloudlet.vm import VM, Image, ImageStore, Snapshot, VMLimits
from edge_agent.auth import Principal
from edge_agent.checkpoints import Checkpoints, read_snapshot
from edge_agent.config import NodeConfig
from edge_agent.exactly_once import RUN, Decision, ExactlyOnce, Refuse, Reject, Replay
from edge_agent.hosted import HostedVM as HostedVM  # the daemon's modules name it here
from edge_agent.images import Images
from edge_agent.quotas import Quotas, Usage
from edge_agent.replies import ANNEX_KEY, generation_of
from edge_agent.requests import Call
from edge_agent.storage import CheckpointRound, StorageHealth
from edge_agent.tombstones import Tombstones
from edge_agent.workers import FairPool, Workers

log = logging.getLogger(__name__)


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
        self.tombstones = Tombstones(self.vm_dir)
        self.closing = False
        self.quotas = Quotas(config)
        self.image_registry = Images(self.images, self.quotas, lambda: self.workers,
                                  self._users_of)
        self.checkpoints = Checkpoints(self.vm_dir, self.vms, lambda: self.workers,
                                       lambda: self.closing)
        self._admissions: list[Admission] = []
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
        self.tombstones.load()  # first: a VM that moved away must not come back to life
        self.quotas.load(self.images.list())
        async for vm, snap in self.checkpoints.restored(self.tombstones, self.images):
            hosted = self._adopt(vm)
            hosted.checkpointed_seq = vm.seq
            hosted.exactly_once = ExactlyOnce.from_wire(snap.annex.get(ANNEX_KEY))
            hosted.generation = generation_of(snap.annex)
            log.info("restored VM %s (owner %s, seq %d)", vm.id, vm.owner, vm.seq)
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

    @property
    def storage(self) -> StorageHealth:
        """What /health and the metrics say of the disk (edge_agent/checkpoints.py)."""
        return self.checkpoints.storage

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # --- images (edge_agent/images.py) ----------------------------------------------------

    async def add_image(self, who: Principal, wasm: bytes, expected_digest: str | None) -> Image:
        return await self.image_registry.add(who, wasm, expected_digest)

    def images_of(self, who: Principal) -> list[str]:
        return self.image_registry.of(who)

    async def delete_image(self, who: Principal, digest: str) -> None:
        await self.image_registry.delete(who, digest)

    def image(self, digest: str) -> Image:
        return self.image_registry.get(digest)

    def _users_of(self, digest: str) -> list[str]:
        return [h.id for h in self.vms.values() if h.vm.image.digest == digest]

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
        with self.image_registry.creating(digest):
            return await self._create(who, digest, limits, clock)

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
                             gate: ExactlyOnce | None = None, generation: int = 0) -> HostedVM:
        """Host `vm` and checkpoint it before anyone hears of it: a kill -9 right after
        must not lose it (later calls are then bounded by the checkpoint interval, as
        promised). If the checkpoint fails, the VM is not hosted."""
        hosted = self._adopt(vm)
        hosted.generation = generation
        self._admitted(admission)
        if gate is not None:
            hosted.exactly_once = gate
        self._share_reply_room(hosted.owner)
        try:
            await self.checkpoints.first(hosted)
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
                held = held.plus(Usage(1, h.vm.limits.memory_bytes, h.exactly_once.reply_bytes))
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
            h.exactly_once.set_cap(cap)

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
        hosted = self.vms[vm.id] = self._hosted(vm)
        return hosted

    def _hosted(self, vm: VM) -> HostedVM:
        return HostedVM(vm, vm.owner or "",
                        inline=vm.limits.deadline_ms <= self.config.inline_deadline_ms)

    # --- calls ----------------------------------------------------------------------------

    def can_call_now(self, hosted: HostedVM) -> bool:
        """True when `call_now` may run: an interactive VM nobody holds across an await."""
        pacer = hosted.pacer  # `pacer.busy`, inline: this runs before every call
        return (hosted.inline and not hosted.lock.locked() and not pacer.interval_s
                and not pacer.in_turn and not self.closing)

    def call_now(self, hosted: HostedVM, call: Call) -> dict[str, Any]:
        """The fast path, synchronous: nothing awaits between the admission and the
        answer, so no other task can touch the VM meanwhile. The lock is only
        needed while someone holds it across an await (a thread-pool call, a
        checkpoint write, a move).

        The steps of `_admit`, `_run` and `_answer`, inlined: this runs for every
        call a client streams, where each Python frame is a measurable share."""
        if self.vms.get(hosted.vm.id) is not hosted:
            self._raise_gone(hosted.vm.id)
        vm = hosted.vm
        decision = hosted.exactly_once.admit(call, vm.seq)
        if decision is not RUN:
            return self._decided(hosted, call, decision)
        fn = call.fn
        try:
            if fn[:1] == "_":
                self._run(hosted, call)  # refuses the runtime's own entry points
            out = (vm.call(fn, *call.args) if call.data is None
                   else vm.call_bytes(fn, call.data))
        except Exception as exc:
            if hosted.answered is not None:
                _answered(hosted)
            self._fail(hosted, call, exc)
        hosted.calls = seq = vm.seq
        if hosted.answered is not None:
            _answered(hosted)
        if hosted.arrived_last_call_unix:
            hosted.arrival_downtime_ms = (time.time() - hosted.arrived_last_call_unix) * 1000
            hosted.arrived_last_call_unix = 0.0
        return hosted.exactly_once.applied(call, seq, out, hosted.checkpointed_seq)

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
        """None if the call is to run now; a kept answer if it was applied already.
        What is refused is raised (and, with a number, kept as its answer)."""
        self.check_alive(hosted)
        decision = hosted.exactly_once.admit(call, hosted.vm.seq)
        if decision is RUN:
            return None
        return self._decided(hosted, call, decision)

    def _decided(self, hosted: HostedVM, call: Call, decision: Decision) -> dict[str, Any]:
        """A call that is not to run: its kept answer, or what refuses it, raised."""
        if isinstance(decision, Replay):
            return decision.answer()
        if isinstance(decision, Refuse):
            self._fail(hosted, call, decision.error)
        if isinstance(decision, Reject):
            raise decision.error
        raise AssertionError(f"a call to run is not decided: {decision!r}")

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
        return hosted.exactly_once.applied(call, hosted.vm.seq, out, hosted.checkpointed_seq)

    @staticmethod
    def _fail(hosted: HostedVM, call: Call, exc: Exception) -> NoReturn:
        """A call's error is its answer: with a sequence number, it is kept like a
        result, and the number is used up even if the call never entered the guest."""
        hosted.calls = hosted.vm.seq
        if not isinstance(exc, CloudletError):
            log.exception("call %s on VM %s failed inside the cloudlet", call.fn, hosted.id)
            exc = CloudletError(f"the cloudlet failed running {call.fn!r}: {exc!r}")
        if hosted.exactly_once.failed(call, hosted.vm.seq, exc):
            hosted.vm.consume_seq()
        raise exc

    # --- state --------------------------------------------------------------------------

    async def snapshot_bytes(self, hosted: HostedVM) -> bytes:
        # The persist lock: not while the VM migrates (a full snapshot moves the base
        # of the migration's next delta round). Captured off the loop: for a large
        # VM that is a scan of all its memory.
        async with hosted.persist_lock, hosted.lock:
            self.check_alive(hosted)
            snap = await self.boots.run(hosted.owner, hosted.snapshot)
        return await self.boots.run(hosted.owner, snap.to_bytes)

    @staticmethod
    def snapshot_with_annex(hosted: HostedVM, *, moving: bool = False) -> Snapshot:
        """A full snapshot carrying the VM's reply log (call under the VM's lock)."""
        return hosted.snapshot(moving=moving)

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

    async def checkpoint(self, hosted: HostedVM, *, force: bool = False,
                         wait: bool = True) -> bool:
        """Snapshot `hosted` to disk if it applied calls since its last checkpoint
        (`Checkpoints.write`)."""
        return await self.checkpoints.write(hosted, force=force, wait=wait)

    async def checkpoint_all(self, *, force: bool = False) -> CheckpointRound:
        """A checkpoint round over every hosted VM (`Checkpoints.round`)."""
        return await self.checkpoints.round(force=force)

    async def destroy(self, hosted: HostedVM) -> None:
        async with hosted.persist_lock, hosted.lock:
            if self.vms.pop(hosted.id, None) is None:
                return
            self._share_reply_room(hosted.owner)
            await self._forget(hosted)
        self.on_change(hosted.id, None)

    async def _forget(self, hosted: HostedVM) -> None:
        """Free a VM no longer hosted, and its checkpoint, on a checkpoint thread
        (unmapping a large memory takes milliseconds)."""
        path = self.checkpoints.path(hosted.id)

        def forget() -> None:
            hosted.vm.close()
            path.unlink(missing_ok=True)

        await self.workers.checkpoints.run(Workers.NODE, forget)

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
        self.tombstones.write(vm_id, where, migration_id)

    def forget_move(self, vm_id: str) -> None:
        """Undo `record_move` for a move that did not happen (the destination refused
        the VM): the VM stays, and a restart must restore it, not drop it."""
        self.tombstones.forget(vm_id)

    def moved_by_migration(self, migration_id: str) -> bool:
        return self.tombstones.moved_by_migration(migration_id)

    def prepare_activation(self, vm: VM, replies_wire: Any, generation: int = 0) -> HostedVM:
        """What will serve a VM arriving by live migration, built but not hosted:
        made while its source decides, so that `activate` at the commit only
        registers it (parsing its reply log took a share of the downtime).
        Nothing of it is seen until then; a move that does not commit drops it."""
        hosted = self._hosted(vm)
        hosted.exactly_once = ExactlyOnce.from_wire(replies_wire)
        hosted.generation = generation
        return hosted

    def activate(self, vm: VM, replies_wire: Any, generation: int = 0,
                 prepared: HostedVM | None = None) -> HostedVM:
        """Serve a VM that arrived by live migration (already durable on disk), from
        `prepared` (`prepare_activation` for this very VM) if given."""
        if vm.id in self.vms:
            raise BadCall(f"a VM {vm.id} is already here")
        if prepared is None or prepared.vm is not vm:
            prepared = self.prepare_activation(vm, replies_wire, generation)
        hosted = self.vms[vm.id] = prepared
        # Its owner's quotas were checked when it was offered; committed now, it is
        # never dropped for them (docs/daemon.md).
        self._share_reply_room(hosted.owner)
        if self.tombstones.pop(vm.id) is not None:  # it came back
            old_migrations = self.tombstones.migrations_of(vm.id)
            self.tombstones.remove_files(vm.id, old_migrations)
            self.tombstones.forget_migrations(old_migrations)
        self.on_change(vm.id, hosted)
        return hosted

    async def forget_tombstone(self, hosted: HostedVM, migration_ids: list[str]) -> None:
        """Remove the files of the tombstone `hosted` left when it went away (it came
        back: forgotten in memory already), on a worker thread, under its persist
        lock: every move out writes its tombstone under that lock, so none is being
        written meanwhile, and if the VM has left again by now, `ID.moved` is that
        move's and stays (the old migrations' records go in any case)."""
        tombstones = self.tombstones
        tombstones.forget_migrations(migration_ids)  # in memory now, on the loop
        async with hosted.persist_lock:
            gone_again = hosted.id in tombstones.where
            await self.workers.checkpoints.run(
                Workers.NODE, lambda: tombstones.remove_files(hosted.id, migration_ids,
                                                              tombstone=not gone_again))

    async def hand_over(self, hosted: HostedVM, where: Location) -> None:
        """The destination committed: forget the VM here, durably, and leave a
        tombstone. Call while `paused`: no call can slip in after the last snapshot."""
        await self.free_moved(hosted, self.let_go(hosted, where))

    def let_go(self, hosted: HostedVM, where: Location) -> Path | None:
        """`hand_over`'s first half: the VM is no longer hosted here (its tombstone
        written if it is not yet), its clients are told where it went, and its
        checkpoint is set aside (returned, for `free_moved`)."""
        if self.tombstones.get(hosted.id) != where:
            self.tombstones.write(hosted.id, where, None)
        self.vms.pop(hosted.id, None)
        self._share_reply_room(hosted.owner)
        self.on_change(hosted.id, None)
        self.on_moved(hosted.id, where)
        return self.checkpoints.retire(hosted.id)

    async def free_moved(self, hosted: HostedVM, retired: Path | None) -> None:
        """`hand_over`'s second half: free the VM's memory and delete its checkpoint
        set aside by `let_go`, on a checkpoint thread (unmapping a large memory
        takes milliseconds)."""

        def free() -> None:
            hosted.vm.close()
            if retired is not None:
                retired.unlink(missing_ok=True)

        await self.workers.checkpoints.run(Workers.NODE, free)

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
        gate = ExactlyOnce.from_wire(snap.annex.get(ANNEX_KEY))
        vm_owner = snap.owner or ""
        with self._admitting(vm_owner, snap.limits.memory_bytes, gate.reply_bytes) as admission:
            image = await self.boots.run(who.name, lambda: self.image(snap.image_digest))
            vm = await self.boots.run(who.name, lambda: VM.restore(image, snap),
                                      on_orphan=VM.close)
            hosted = await self._adopt_durably(vm, admission, gate, generation_of(snap.annex))
        if self.tombstones.pop(vm.id) is not None:  # it came back
            await self.forget_tombstone(hosted, self.tombstones.migrations_of(vm.id))
        self.on_change(vm.id, hosted)
        return hosted

    # --- shutdown -------------------------------------------------------------------------

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
        await self.checkpoints.drain()
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


def _answered(hosted: HostedVM) -> None:
    """A call into `hosted` ended: wake the move waiting to pause it (see
    `HostedVM.answered`). Its task runs on a later turn of the loop, after this
    call's answer has been written."""
    waiter, hosted.answered = hosted.answered, None
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
