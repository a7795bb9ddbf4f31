"""A VM: one running instance of an image, with limits, a call sequence and its state.

Each VM has its own wasmtime Store, so a runaway or trapping guest can only
hurt itself: per-call fuel and a wall-clock epoch deadline stop loops, the
store's limiter caps memory, and a trap leaves the instance usable.

A call that entered the guest counts as applied, whatever its outcome (a trap
may leave writes behind): it advances `seq`. A call rejected before entering
(unknown function, wrong arguments) does not. `proc_exit` marks the VM failed.

The VM composes three parts and owns none of their insides: calls run through
`fastcall` (wasmtime's C API directly; why is there), memory is a
`GuestMemory`, and a snapshot is a value from `snapshot.py` that the VM
captures into and restores from.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import wasmtime

from cloudlet.errors import (
    BadCall,
    InvalidArgument,
    SnapshotImageMismatch,
    VMDeadlineExceeded,
    VMError,
    VMExited,
    VMFailed,
    VMMemoryLimit,
    VMOutOfFuel,
    VMStackOverflow,
    VMTrapped,
)
from cloudlet.vm import chunks, fastcall
from cloudlet.vm.compiled import FuncSig as FuncSig  # re-exported: callers import it from here
from cloudlet.vm.compiled import Image
from cloudlet.vm.fastcall import BoundFunc, RawTrap
from cloudlet.vm.hostfns import GuestExit, HostState
from cloudlet.vm.limits import MiB as MiB  # re-exported, as VMLimits is
from cloudlet.vm.limits import VMLimits as VMLimits
from cloudlet.vm.memory import GuestMemory
from cloudlet.vm.snapshot import (
    FUEL_USED_MAX,
    Snapshot,
    apply_memories,
    capture_memories,
    check_applicable,
    check_restorable,
    grow_memories,
)

INPUT_EXPORT = "cloudlet_input"  # bytes ABI: guest returns a buffer for `len` input bytes
INITIALIZE_EXPORT = "_initialize"  # WASI reactor convention: run once at boot
_BYTES_FUNC = FuncSig(("i32", "i32"), ("i64",))
_INPUT_FUNC = FuncSig(("i32",), ("i32",))
# Exports bound ahead at most (`VM.bind_ahead`): a VM is called through a handful, and
# each takes ~25 us of the destination's loop while its source decides.
BIND_AHEAD_MAX = 16


class VM:
    """A running instance of an image. Not thread-safe: one call at a time."""

    def __init__(self, image: Image, limits: VMLimits, vm_id: str | None,
                 owner: str | None) -> None:
        # Use VM.create / VM.restore; this only allocates.
        self.image = image
        self.id = vm_id or secrets.token_hex(8)
        self.owner = owner
        self.seq = 0
        self.failed: str | None = None
        self.host = HostState(clock="virtual",
                              random_key=hashlib.blake2b(image.digest.encode(),
                                                         digest_size=32).digest())
        self._store: wasmtime.Store | None = wasmtime.Store(image.runtime.engine, data=self.host)
        self._ctx = fastcall.context_of(self._store)
        self._calls = fastcall.FastCaller(self._store, image.runtime.ticker)
        self.limits = limits
        self._memory = GuestMemory(self._store, image.pristine)
        self._memory.serve(self.host)
        self._funcs: dict[str, BoundFunc] = {}
        self._globals: dict[str, wasmtime.Global] = {}
        self._instance: wasmtime.Instance | None = None
        # The last snapshot taken or restored: what a delta is taken against and
        # applies on (its chunk digests are the memory's `base_hashes`).
        self.last_snapshot_id: str | None = None
        self._base_seq = 0

    # --- construction -----------------------------------------------------------------

    @classmethod
    def create(cls, image: Image, limits: VMLimits | None = None, *, vm_id: str | None = None,
               owner: str | None = None, clock: str = "real",
               random_seed: bytes | None = None) -> VM:
        """Boot a fresh VM from `image`. `clock="virtual"` makes time deterministic."""
        if clock not in ("real", "virtual"):
            raise InvalidArgument("clock must be 'real' or 'virtual'")
        vm = cls.boot(image, limits or VMLimits(), vm_id, owner)
        vm.host.clock = clock
        vm.host.random_key = random_seed if random_seed is not None else os.urandom(32)
        vm.host.random_counter = 0
        vm.host.virtual_ns = 0
        return vm

    @classmethod
    def boot(cls, image: Image, limits: VMLimits, vm_id: str | None = None,
             owner: str | None = None) -> VM:
        """Instantiate and run `_initialize` with a fixed host state, so every boot of an
        image yields the same memory: the pristine state overlays are taken against
        (the image store records it; a restore starts from it)."""
        boot_limits = replace(limits, fuel_per_call=image.boot_fuel,
                              deadline_ms=image.boot_deadline_ms)
        vm = cls(image, boot_limits, vm_id, owner)
        store = vm._store
        assert store is not None
        store.set_limits(memory_size=limits.memory_bytes, instances=1,
                         memories=max(1, len(image.memories) + bool(image.dirty_export)))
        try:
            vm._calls.arm()  # start functions run under the boot limits too
            vm._instance = fastcall.instantiate(image.pre, store)
        except RawTrap as failure:
            vm.close()
            raise vm._boot_error(failure) from None
        memory = vm._memory
        try:
            memory.attach([vm._export_memory(m.export) for m in image.memories],
                          vm._export_memory(image.dirty_export) if image.dirty_export else None)
            if INITIALIZE_EXPORT in image.functions:
                vm._invoke(INITIALIZE_EXPORT, ())
        except BaseException:
            vm.close()
            raise
        booted = [memory.pages(i) for i in range(memory.count)]
        if image.pristine and booted != [p.pages for p in image.pristine]:
            # A cap can only change a boot by failing a memory.grow: then this VM is not
            # in the pristine state that overlays and tracking assume.
            vm.close()
            raise VMMemoryLimit(f"image {image.digest[:12]} needs {image.pristine_bytes} bytes "
                                f"of memory at boot; the cap of {limits.memory_bytes} is too small")
        if image.pristine:
            # Boot writes are the pristine state itself: track from here.
            memory.restart_tracking(memory.pristine_hashes)
        vm.limits = limits
        return vm

    def _export_memory(self, name: str) -> Any:
        assert self._instance is not None
        handle = fastcall.export_memory(self._ctx, self._instance, name)
        if handle is None:
            raise BadCall(f"image has no memory export {name!r}")
        return handle

    # --- calls ----------------------------------------------------------------------

    @property
    def limits(self) -> VMLimits:
        return self._limits

    @limits.setter
    def limits(self, value: VMLimits) -> None:
        # What every call needs, computed once per change rather than per call.
        self._limits = value
        self._calls.fuel = value.fuel
        self._calls.deadline_ticks = value.deadline_ticks

    @property
    def fuel_used(self) -> int:
        """Fuel all calls into this VM have burnt (restored with its snapshots)."""
        return self._calls.fuel_used

    @fuel_used.setter
    def fuel_used(self, value: int) -> None:
        self._calls.fuel_used = value

    def _bound(self, name: str) -> BoundFunc:
        bound = self._funcs.get(name)
        if bound is None:
            sig = self.image.functions.get(name)
            if sig is None:
                raise BadCall(f"image {self.image.digest[:12]} exports no function {name!r}")
            assert self._instance is not None
            func = fastcall.export_func(self._ctx, self._instance, name)
            if func is None:
                raise BadCall(f"image has no function export {name!r}")
            bound = self._funcs[name] = BoundFunc(name, func, sig.params, sig.results)
        return bound

    @property
    def called(self) -> tuple[str, ...]:
        """The exports bound in this VM since it booted or arrived: those it was called
        through (refused calls included), and those bound ahead (`bind_ahead`), so
        the list carries over a chain of moves. What a copy of it elsewhere will
        most likely be called through first; in first-bound order."""
        return tuple(name for name in self._funcs if name != INITIALIZE_EXPORT)  # (run once)

    def bind_ahead(self, names: Iterable[object], limit: int = BIND_AHEAD_MAX) -> int:
        """Look up these exports now, so that the first call through each skips it (a
        VM that just arrived by live migration: ~50 us of its first call, which the
        client's downtime waits for). Up to `limit` names; anything the image does
        not export as a callable function is skipped, not an error (the list comes
        from the peer the VM came from). Returns how many were bound."""
        bound = 0
        for name in itertools.islice(names, limit):
            if isinstance(name, str) and name not in self._funcs:
                try:
                    self._bound(name)  # BadCall for what the image does not export
                except BadCall:
                    continue
                bound += 1
        return bound

    def call(self, name: str, *args: int | float) -> Any:
        """Call a numeric export. Returns None, one value, or a tuple for multi-value."""
        # `_prepare`, inline: this is every numeric call's path.
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        fn = self._funcs.get(name) or self._bound(name)
        fn.load(args)
        try:
            return self._calls.enter(fn)  # not `_enter`: one frame less on the hot path
        except RawTrap as trap:
            raise self._trap_error(name, trap) from None
        finally:
            self.seq += 1

    def consume_seq(self) -> int:
        """Use up a sequence number for a call refused before it entered the guest.

        A session numbers its calls; a refused one (unknown function, bad
        arguments) is still that number's final outcome, so the VM's count moves
        on with the client's and the next call is not taken for a gap."""
        self.seq += 1
        return self.seq

    def call_bytes(self, name: str, data: bytes) -> bytes:
        """Bytes-in/bytes-out call (docs/abi.md): one applied call, one `seq` step."""
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        self._bound(name)
        sig = self.image.functions[name]
        if sig != _BYTES_FUNC:
            raise BadCall(f"{name!r} is not a bytes function: its type is "
                          f"{sig.params} -> {sig.results}, expected (i32, i32) -> i64")
        if self.image.functions.get(INPUT_EXPORT) != _INPUT_FUNC:
            raise BadCall(f"image exports no {INPUT_EXPORT!r} of type (i32) -> i32, so it takes "
                          "no bytes input")
        if len(data) > self.limits.memory_bytes:
            raise BadCall(f"input of {len(data)} bytes exceeds the VM's memory cap")
        alloc = self._prepare(INPUT_EXPORT, (len(data),))
        try:
            ptr = self._enter(alloc) & 0xFFFFFFFF
            view = self._memory.host_view()
            if ptr == 0 or ptr + len(data) > len(view):
                raise VMMemoryLimit(f"guest could not provide a {len(data)}-byte input buffer")
            view[ptr : ptr + len(data)] = data
            self._memory.mark_written(ptr, len(data))
            fn = self._prepare(name, (ptr, len(data)))
            packed = self._enter(fn) & 0xFFFFFFFFFFFFFFFF
        finally:
            self.seq += 1
        out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
        view = self._memory.host_view()
        if out_ptr + out_len > len(view):
            raise VMTrapped(f"{name!r} returned an output range outside memory "
                            f"({out_ptr}+{out_len} > {len(view)})")
        return bytes(view[out_ptr : out_ptr + out_len])

    def _invoke(self, name: str, args: tuple[int | float, ...]) -> Any:
        """Call without counting it (boot-time `_initialize`)."""
        return self._enter(self._prepare(name, args))

    def _prepare(self, name: str, args: tuple[int | float, ...]) -> BoundFunc:
        """Everything that can reject a call before the guest runs; loads the arguments."""
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        fn = self._bound(name)
        fn.load(args)
        return fn

    def _enter(self, fn: BoundFunc) -> Any:
        """Run the guest: from here on the call counts as applied."""
        try:
            return self._calls.enter(fn)
        except RawTrap as trap:
            raise self._trap_error(fn.name, trap) from None

    def _boot_error(self, failure: RawTrap) -> VMError:
        """The error `boot` raises when instantiating failed (a start function
        trapped or exited, or the memory cap was too small)."""
        image = f"image {self.image.digest[:12]}"
        host_exc = failure.host_exc
        if isinstance(host_exc, GuestExit):
            return VMExited(f"{image} exited while instantiating (status {host_exc.status})")
        if host_exc is not None:
            if not isinstance(host_exc, Exception):
                raise host_exc  # KeyboardInterrupt, SystemExit: not the guest's doing
            return VMTrapped(f"{image} trapped while instantiating: host function "
                             f"failed: {host_exc!r}")
        if failure.is_error:
            return VMMemoryLimit(f"cannot instantiate {image} within "
                                 f"{self.limits.memory_bytes} bytes: {failure.message}")
        return VMTrapped(f"{image} trapped while instantiating: {failure.message}")

    def _trap_error(self, name: str, trap: RawTrap) -> VMError:
        """The error a caller sees for a call that trapped (`proc_exit` fails the VM)."""
        host_exc = trap.host_exc
        if host_exc is not None and not isinstance(host_exc, Exception):
            raise host_exc  # KeyboardInterrupt, SystemExit: not the guest's doing
        if isinstance(host_exc, GuestExit):
            self.failed = f"guest exited with status {host_exc.status}"
            return VMExited(f"{name!r}: {self.failed}")
        if host_exc is not None:
            return VMTrapped(f"{name!r}: host function failed: {host_exc!r}")
        if trap.code == wasmtime.TrapCode.OUT_OF_FUEL:
            return VMOutOfFuel(f"{name!r} used all {self.limits.fuel_per_call} units of fuel")
        if trap.code == wasmtime.TrapCode.INTERRUPT:
            return VMDeadlineExceeded(
                f"{name!r} ran past its {self.limits.deadline_ms} ms deadline")
        if trap.code == wasmtime.TrapCode.STACK_OVERFLOW:
            return VMStackOverflow(f"{name!r} overflowed the wasm stack")
        first_line = _trap_reason(trap.message)
        memory = self._memory
        if any(memory.size_bytes(i) + chunks.WASM_PAGE_BYTES > self.limits.memory_bytes
               for i in range(memory.count)):
            first_line += (f" (memory is at its cap of {self.limits.memory_bytes} bytes: "
                           "a failed memory.grow is the likely cause)")
        return VMTrapped(f"{name!r} trapped: {first_line}")

    # --- memory ---------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        return self._memory.total_bytes

    def _memory_index(self, index: object) -> int:
        if self._store is None:
            raise VMFailed(f"VM {self.id} is closed")
        count = self._memory.count
        if type(index) is not int or not 0 <= index < count:
            raise BadCall(f"no memory {index!r}: the image has {count}")
        return index

    def memory_view(self, index: int = 0) -> memoryview:
        """Read-only zero-copy view of a linear memory (valid until it next grows).

        Read-only because writes that bypass `write_memory` would escape dirty
        tracking, and snapshots would miss them. The view keeps the VM's memory
        mapped even after `close()`.
        """
        return self._memory.view(self._memory_index(index)).toreadonly()

    def write_memory(self, offset: int, data: bytes, index: int = 0) -> None:
        """Write guest memory from the host, keeping dirty tracking exact."""
        self._memory.write(offset, data, self._memory_index(index))

    # --- globals --------------------------------------------------------------------

    def _live_store(self) -> wasmtime.Store:
        if self._store is None:
            raise VMFailed(f"VM {self.id} is closed")
        return self._store

    def _global(self, export: str) -> wasmtime.Global:
        g = self._globals.get(export)
        if g is None:
            assert self._instance is not None
            found = fastcall.export_global(self._ctx, self._instance, export)
            if found is None:
                raise BadCall(f"image has no global export {export!r}")
            g = self._globals[export] = found
        return g

    def globals_state(self) -> dict[str, int | float]:
        store = self._live_store()
        return {g.export: self._global(g.export).value(store) for g in self.image.globals}

    # --- chunks, snapshots ------------------------------------------------------------

    def chunk_hashes(self) -> list[chunks.Hashes]:
        """Digest of every chunk of every memory: one scan, skipping never-touched pages."""
        self._live_store()
        return self._memory.chunk_hashes()

    def dirty_chunks(self) -> list[chunks.ChunkIds]:
        """Chunks written since the last snapshot or restore (one scan, state unchanged)."""
        self._live_store()
        return self._memory.dirty_chunks()

    def snapshot(self, *, delta: bool = False) -> Snapshot:
        """Capture the whole state between calls.

        An overlay (default) holds the chunks that differ from the image's pristine
        boot state; a delta holds the chunks changed since this VM's last snapshot
        (`base_id`), and is applied on top of it.
        """
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        memories, hashes = capture_memories(self._memory, delta=delta)
        snap = Snapshot(
            image_digest=self.image.digest,
            kind="delta" if delta else "overlay",
            base_id=self.last_snapshot_id if delta else None,
            seq=self.seq,
            limits=self.limits,
            fuel_used=min(self.fuel_used, FUEL_USED_MAX),
            host=self.host.to_wire(),
            globals=self.globals_state(),
            memories=memories,
            vm_id=self.id,
            owner=self.owner,
        )
        self._memory.set_base(hashes)
        self._mark_base(snap.snapshot_id)
        return snap

    def _mark_base(self, snapshot_id: str) -> None:
        self.last_snapshot_id = snapshot_id
        self._base_seq = self.seq

    def _apply(self, snap: Snapshot) -> None:
        """Write `snap` into this VM (checked with `check_applicable`): limits first (the
        memory cap), then memory, globals, host state and counters."""
        if snap.limits != self.limits:
            self.set_limits(snap.limits)
        apply_memories(self._memory, snap)
        store = self._live_store()
        for name, value in snap.globals.items():
            self._global(name).set_value(store, value)
        self.host.load(snap.host)  # in place: the store's host functions hold this object
        self.seq = snap.seq
        self.fuel_used = snap.fuel_used
        self._mark_base(snap.snapshot_id)

    def _check_applicable(self, snap: Snapshot) -> None:
        check_applicable(self.image, self._memory, snap)

    @classmethod
    def restore(cls, image: Image, snapshot: Snapshot, *deltas: Snapshot,
                vm_id: str | None = None, owner: str | None = None) -> VM:
        """A new VM in exactly the state `snapshot` (then each delta) captured.

        Everything is checked before anything is applied, and the VM is only
        returned once whole: an error leaves nothing half-restored behind.
        """
        if snapshot.kind != "overlay":
            raise SnapshotImageMismatch("restore starts from an overlay snapshot, not a delta")
        check_restorable(image, snapshot)
        base_id = snapshot.snapshot_id
        for d in deltas:
            check_restorable(image, d)
            if d.kind != "delta" or d.base_id != base_id:
                raise SnapshotImageMismatch(
                    f"delta {d.snapshot_id[:12]} does not apply on {base_id[:12]}")
            base_id = d.snapshot_id
        vm: VM = cls.boot(image, snapshot.limits, vm_id or snapshot.vm_id,
                          owner if owner is not None else snapshot.owner)
        vm._restore_chain((snapshot, *deltas))
        return vm

    def _restore_chain(self, snaps: tuple[Snapshot, ...]) -> None:
        try:
            for snap in snaps:
                self._check_applicable(snap)
                self._apply(snap)
        except BaseException:
            self.close()
            raise

    @classmethod
    def prepare_restore(cls, image: Image, memory_bytes: int, *, vm_id: str | None = None,
                        owner: str | None = None) -> VM:
        """A booted VM whose memory is already grown to `memory_bytes`, for a restore
        whose state is still arriving (a migration's round 0): `prefault` its pages
        while the data travels, then `restore_into` only copies. For a 256 MiB guest
        the first-touch page faults cost ~0.6 s that would otherwise come after the
        last byte arrived. Single-memory images only (the split of a total across
        several memories is not known before the state arrives)."""
        if len(image.memories) != 1:
            raise InvalidArgument("prepare_restore needs a single-memory image")
        pages = -(-memory_bytes // chunks.WASM_PAGE_BYTES)
        cap = max(VMLimits().memory_bytes, pages * chunks.WASM_PAGE_BYTES)
        vm: VM = cls.boot(image, VMLimits(memory_bytes=cap), vm_id, owner)
        vm._grow_for_restore(pages)
        return vm

    def _grow_for_restore(self, pages: int) -> None:
        try:
            self._memory.grow_to(0, max(pages, self._memory.pages(0)))
            self._memory.hint_hugepages(0)
        except BaseException:
            self.close()
            raise

    def prefault(self, max_bytes: int) -> bool:
        """Touch the next `max_bytes` of memory 0 that no one touched yet (one write
        per 4 KiB page, of the byte already there); False once all of it is."""
        return self._memory.prefault(max_bytes)

    def restore_into(self, snapshot: Snapshot) -> None:
        """`restore` into this VM from `prepare_restore`: the same checks, the same
        state. On failure the VM is closed."""
        try:
            if snapshot.kind != "overlay":
                raise SnapshotImageMismatch("restore starts from an overlay snapshot, not a delta")
            self._check_applicable(snapshot)
            self._apply(snapshot)
        except BaseException:
            self.close()
            raise

    def apply_delta(self, delta: Snapshot) -> None:
        """Bring this VM forward by a delta taken against its current state."""
        self._check_delta(delta)
        try:
            self._apply(delta)
        except BaseException:
            self.failed = f"delta {delta.snapshot_id[:12]} failed midway: state unknown"
            raise

    def prepare_delta(self, delta: Snapshot) -> None:
        """Do ahead what in `apply_delta` can refuse `delta` or run out of memory: every
        check, the new limits, the memories' growth. Why: a migration's destination
        says it is ready once the final round is durable and known to apply, and
        writes it into the VM while the source decides (off the downtime's path);
        what is left then only copies into memory that is already there."""
        self._check_delta(delta)
        try:
            if delta.limits != self.limits:
                self.set_limits(delta.limits)
            grow_memories(self._memory, delta)
        except BaseException:
            self.failed = f"delta {delta.snapshot_id[:12]} failed while growing: state unknown"
            raise

    def _check_delta(self, delta: Snapshot) -> None:
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        self._check_applicable(delta)
        if self.seq != self._base_seq:
            raise SnapshotImageMismatch(
                f"VM {self.id} has applied calls since its last snapshot, so its state is no "
                f"longer the base of delta {delta.snapshot_id[:12]}")
        if delta.kind != "delta" or delta.base_id != self.last_snapshot_id:
            raise SnapshotImageMismatch(
                f"delta {delta.snapshot_id[:12]} does not apply on this VM's state "
                f"({(self.last_snapshot_id or 'none')[:12]})")

    # --- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Free the VM's store (memory, instance). The VM is unusable afterwards."""
        self._funcs.clear()
        self._globals.clear()
        self._memory.close()
        self.host.view = None
        self.host.on_write = None
        # Dropping our reference frees the store (memory, instance) at once unless
        # a memory view handed out still holds it; never free memory under a view.
        self._store = None
        if self.failed is None:
            self.failed = "closed"

    def set_limits(self, limits: VMLimits) -> None:
        """Change limits for later calls (the memory cap cannot go below current use)."""
        memory = self._memory
        if any(memory.size_bytes(i) > limits.memory_bytes for i in range(memory.count)):
            raise VMMemoryLimit("the new memory cap is below the memory the VM already uses")
        self._live_store().set_limits(memory_size=limits.memory_bytes)
        self.limits = limits


def _trap_reason(message: str) -> str:
    """The line of a wasmtime trap report that says why (it ends the report)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[-1] if lines else "trap"
