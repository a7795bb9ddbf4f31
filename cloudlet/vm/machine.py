"""A VM: one running instance of an image, with limits, a call sequence and its state.

Calls go straight to wasmtime's C API (`wasmtime_func_call_unchecked`) with
argument arrays built once per export: the stock Python wrapper spends most of
a call converting arguments (~24 us for two i32s here), the C call itself is
~2 us. Types are checked once, from the export's signature, not per call.

Each VM has its own wasmtime Store, so a runaway or trapping guest can only
hurt itself: per-call fuel and a wall-clock epoch deadline stop loops, the
store's limiter caps memory, and a trap leaves the instance usable.

A call that entered the guest counts as applied, whatever its outcome (a trap
may leave writes behind): it advances `seq`. A call rejected before entering
(unknown function, wrong arguments) does not. `proc_exit` marks the VM failed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import wasmtime
from wasmtime import _bindings as wasmtime_bindings
from wasmtime import _ffi as ffi
from wasmtime import _func as wasmtime_func

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
from cloudlet.vm import chunks
from cloudlet.vm.engine import EPOCH_TICK_S
from cloudlet.vm.hostfns import GuestExit, HostState

if TYPE_CHECKING:
    from cloudlet.vm.image import Image
    from cloudlet.vm.snapshot import Snapshot

MiB = 1 << 20
INPUT_EXPORT = "cloudlet_input"  # bytes ABI: guest returns a buffer for `len` input bytes
INITIALIZE_EXPORT = "_initialize"  # WASI reactor convention: run once at boot
MAX_FUEL = (1 << 63) - 1
MIN_MEMORY_BYTES = MiB

# The ctypes functions themselves: wasmtime-py's same-named wrappers add a Python
# frame each, and a call makes four of them (~0.6 us of a ~4 us call).
_set_fuel = wasmtime_bindings._wasmtime_context_set_fuel
_get_fuel = wasmtime_bindings._wasmtime_context_get_fuel
_set_epoch_deadline = wasmtime_bindings._wasmtime_context_set_epoch_deadline
_func_call_unchecked = wasmtime_bindings._wasmtime_func_call_unchecked
MAX_MEMORY_BYTES = 1 << 32
MAX_DEADLINE_MS = 24 * 3600 * 1000  # a call running for a day is a bug, not a workload
# _initialize runs under its image's boot limits (these unless the image store was
# given others), not the VM's own: it already completed once at registration,
# and a snapshot's limits must never make its image unbootable.
BOOT_FUEL = 10_000_000_000
BOOT_DEADLINE_MS = 10_000


def _int_in(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


@dataclass(frozen=True)
class VMLimits:
    """Per-VM limits. Defaults suit an interactive session; each is documented in docs/abi.md."""

    # Cap on each linear memory; memory.grow fails past it. At least 1 MiB: the
    # write-tracking bitmap is a 1 MiB memory under the same per-memory cap.
    memory_bytes: int = 256 * MiB
    fuel_per_call: int | None = 10_000_000_000  # ~seconds of compute; None = unlimited
    deadline_ms: int = 2_000  # wall clock per call (resolution: the 10 ms epoch tick)

    def __post_init__(self) -> None:
        # bool is an int subclass; and ctypes would silently wrap values past 64 bits.
        if not _int_in(self.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES):
            raise InvalidArgument(
                f"memory_bytes must be an integer from {MIN_MEMORY_BYTES} (1 MiB) to "
                f"{MAX_MEMORY_BYTES} (4 GiB, all a wasm32 memory can address)")
        if self.fuel_per_call is not None and not _int_in(self.fuel_per_call, 1, MAX_FUEL):
            raise InvalidArgument(f"fuel_per_call must be an integer from 1 to {MAX_FUEL}, or None")
        if not _int_in(self.deadline_ms, 1, MAX_DEADLINE_MS):
            raise InvalidArgument(f"deadline_ms must be an integer from 1 to {MAX_DEADLINE_MS}")

    @property
    def deadline_ticks(self) -> int:
        # +1: the current tick may be about to end, so one tick is always partial.
        return -(-self.deadline_ms // int(EPOCH_TICK_S * 1000)) + 1

    def to_wire(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "fuel_per_call": self.fuel_per_call,
                "deadline_ms": self.deadline_ms}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> VMLimits:
        return cls(memory_bytes=d["memory_bytes"], fuel_per_call=d["fuel_per_call"],
                   deadline_ms=d["deadline_ms"])


@dataclass(frozen=True)
class FuncSig:
    params: tuple[str, ...]
    results: tuple[str, ...]


# Accepted integer arguments: signed or unsigned forms of the type's bit pattern.
_INT_RANGE = {"i32": (-(1 << 31), (1 << 32) - 1), "i64": (-(1 << 63), (1 << 64) - 1)}


class _BoundFunc:
    """An export resolved in one store, with its argument/result array built once."""

    __slots__ = ("fields", "func", "func_ref", "int_ranges", "name", "nparams", "raw",
                 "raw_len", "result_fields", "sig")

    def __init__(self, name: str, func: Any, sig: FuncSig) -> None:
        self.name = name
        self.sig = sig
        self.func = func
        self.func_ref = ctypes.byref(func)
        self.nparams = len(sig.params)
        self.raw_len = max(len(sig.params), len(sig.results), 1)
        self.raw = (ffi.wasmtime_val_raw * self.raw_len)()
        self.fields = sig.params  # the wasmtime_val_raw union's fields are named by type
        self.result_fields = sig.results
        self.int_ranges = tuple(_INT_RANGE.get(p) for p in sig.params)


class VM:
    """A running instance of an image. Not thread-safe: one call at a time."""

    def __init__(self, image: Image, limits: VMLimits, vm_id: str | None,
                 owner: str | None) -> None:
        # Use VM.create / VM.restore; this only allocates.
        self.image = image
        self._ticker = image.runtime.ticker
        self.limits = limits
        self.id = vm_id or secrets.token_hex(8)
        self.owner = owner
        self.seq = 0
        self.fuel_used = 0
        self.failed: str | None = None
        self.host = HostState(clock="virtual",
                              random_key=hashlib.blake2b(image.digest.encode(),
                                                         digest_size=32).digest())
        # wasmtime keeps a store's data (the HostState) in a process-wide table until the
        # store dies; hooks holding the VM strongly would keep it, and so the store,
        # alive forever. They hold it weakly instead.
        self_ref = weakref.ref(self)
        self.host.view = lambda: _live(self_ref)._memory0_view()
        self.host.on_write = lambda offset, length: _live(self_ref).mark_written(offset, length)
        self._store: wasmtime.Store | None = wasmtime.Store(image.runtime.engine, data=self.host)
        self._ctx = self._store._context()
        self._funcs: dict[str, _BoundFunc] = {}
        self._memories: list[Any] = []
        self._views: list[tuple[int, int, memoryview] | None] = []
        self._globals: dict[str, wasmtime.Global] = {}
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)
        self._fuel_left = ctypes.c_uint64(0)
        self._fuel_left_ref = ctypes.byref(self._fuel_left)
        # Chunk digests at the last snapshot (or restore): the base of `dirty_chunks`.
        self.last_snapshot_id: str | None = None
        self._last_hashes: list[chunks.Hashes] | None = None
        # Write tracking (images instrumented with a dirty bitmap): the digests of
        # memory 0 as of the last sync; marked chunks are rehashed on the next one.
        self._dirty_bitmap: Any = None
        self._prefaulted = 0  # bytes of memory 0 touched by `prefault`
        self._tracked_hashes: chunks.Hashes | None = None
        self._base_seq = 0
        self._instance: Any = None

    # --- construction -----------------------------------------------------------------

    @classmethod
    def create(cls, image: Image, limits: VMLimits | None = None, *, vm_id: str | None = None,
               owner: str | None = None, clock: str = "real",
               random_seed: bytes | None = None) -> VM:
        """Boot a fresh VM from `image`. `clock="virtual"` makes time deterministic."""
        if clock not in ("real", "virtual"):
            raise InvalidArgument("clock must be 'real' or 'virtual'")
        vm = cls._boot(image, limits or VMLimits(), vm_id, owner)
        vm.host.clock = clock
        vm.host.random_key = random_seed if random_seed is not None else os.urandom(32)
        vm.host.random_counter = 0
        vm.host.virtual_ns = 0
        return vm

    @classmethod
    def _boot(cls, image: Image, limits: VMLimits, vm_id: str | None,
              owner: str | None) -> VM:
        """Instantiate and run `_initialize` with a fixed host state, so every boot of an
        image yields the same memory: the pristine state overlays are taken against."""
        boot_limits = replace(limits, fuel_per_call=image.boot_fuel,
                              deadline_ms=image.boot_deadline_ms)
        vm = cls(image, boot_limits, vm_id, owner)
        store = vm._store
        assert store is not None
        store.set_limits(memory_size=limits.memory_bytes, instances=1,
                         memories=max(1, len(image.memories) + bool(image.dirty_export)))
        try:
            vm._arm()
            vm._instance = image.pre.instantiate(store)
        except wasmtime.Trap as exc:
            vm.close()
            raise VMTrapped(f"image {image.digest[:12]} trapped while instantiating: "
                            f"{exc.message}") from None
        except wasmtime.WasmtimeError as exc:
            vm.close()
            raise VMMemoryLimit(f"cannot instantiate image {image.digest[:12]} within "
                                f"{limits.memory_bytes} bytes: {exc}") from None
        except GuestExit as exc:  # proc_exit in a start function
            vm.close()
            raise VMExited(f"image {image.digest[:12]} exited while instantiating "
                           f"(status {exc.status})") from None
        try:
            for mem in image.memories:
                vm._memories.append(vm._export(mem.export, ffi.WASMTIME_EXTERN_MEMORY).of.memory)
                vm._views.append(None)
            if image.dirty_export:
                vm._dirty_bitmap = vm._export(image.dirty_export,
                                              ffi.WASMTIME_EXTERN_MEMORY).of.memory
            if INITIALIZE_EXPORT in image.functions:
                vm._invoke(INITIALIZE_EXPORT, ())
        except BaseException:
            vm.close()
            raise
        booted = [len(vm._view(i)) // chunks.WASM_PAGE_BYTES for i in range(len(vm._memories))]
        if image.pristine and booted != [p.pages for p in image.pristine]:
            # A cap can only change a boot by failing a memory.grow: then this VM is not
            # in the pristine state that overlays and tracking assume.
            vm.close()
            raise VMMemoryLimit(f"image {image.digest[:12]} needs {image.pristine_bytes} bytes "
                                f"of memory at boot; the cap of {limits.memory_bytes} is too small")
        if image.pristine and vm._dirty_bitmap is not None:
            # Boot writes are the pristine state itself: start tracking from here.
            vm._clear_bitmap()
            vm._tracked_hashes = image.pristine[0].hashes
        vm.limits = limits
        return vm

    def _export(self, name: str, kind: Any) -> Any:
        item = ffi.wasmtime_extern_t()
        raw = name.encode()
        found = ffi.wasmtime_instance_export_get(self._ctx, ctypes.byref(self._instance._instance),
                                                 raw, len(raw), ctypes.byref(item))
        if not found or item.kind != kind.value:
            raise BadCall(f"image has no export {name!r} of that kind")
        return item

    # --- calls ----------------------------------------------------------------------

    @property
    def limits(self) -> VMLimits:
        return self._limits

    @limits.setter
    def limits(self, value: VMLimits) -> None:
        # What every call needs, computed once per change rather than per call.
        self._limits = value
        self._fuel = value.fuel_per_call or MAX_FUEL
        self._deadline_ticks = value.deadline_ticks

    def _arm(self) -> None:
        """Refill per-call fuel and restart the wall-clock deadline."""
        self._ticker.ensure_started()  # deadlines need a running epoch clock
        err = _set_fuel(self._ctx, self._fuel)
        if err:
            raise VMError(str(wasmtime.WasmtimeError._from_ptr(err)))
        _set_epoch_deadline(self._ctx, self._deadline_ticks)

    def _bound(self, name: str) -> _BoundFunc:
        bound = self._funcs.get(name)
        if bound is None:
            sig = self.image.functions.get(name)
            if sig is None:
                raise BadCall(f"image {self.image.digest[:12]} exports no function {name!r}")
            item = self._export(name, ffi.WASMTIME_EXTERN_FUNC)
            bound = self._funcs[name] = _BoundFunc(name, item.of.func, sig)
        return bound

    def call(self, name: str, *args: int | float) -> Any:
        """Call a numeric export. Returns None, one value, or a tuple for multi-value."""
        fn = self._prepare(name, args)
        try:
            return self._enter(fn)
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
        fn = self._bound(name)
        if fn.sig != FuncSig(("i32", "i32"), ("i64",)):
            raise BadCall(f"{name!r} is not a bytes function: its type is "
                          f"{fn.sig.params} -> {fn.sig.results}, expected (i32, i32) -> i64")
        if self.image.functions.get(INPUT_EXPORT) != FuncSig(("i32",), ("i32",)):
            raise BadCall(f"image exports no {INPUT_EXPORT!r} of type (i32) -> i32, so it takes "
                          "no bytes input")
        if len(data) > self.limits.memory_bytes:
            raise BadCall(f"input of {len(data)} bytes exceeds the VM's memory cap")
        alloc = self._prepare(INPUT_EXPORT, (len(data),))
        try:
            ptr = self._enter(alloc) & 0xFFFFFFFF
            view = self._memory0_view()
            if ptr == 0 or ptr + len(data) > len(view):
                raise VMMemoryLimit(f"guest could not provide a {len(data)}-byte input buffer")
            view[ptr : ptr + len(data)] = data
            self.mark_written(ptr, len(data))
            fn = self._prepare(name, (ptr, len(data)))
            packed = self._enter(fn) & 0xFFFFFFFFFFFFFFFF
        finally:
            self.seq += 1
        out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
        view = self._memory0_view()
        if out_ptr + out_len > len(view):
            raise VMTrapped(f"{name!r} returned an output range outside memory "
                            f"({out_ptr}+{out_len} > {len(view)})")
        return bytes(view[out_ptr : out_ptr + out_len])

    def _invoke(self, name: str, args: tuple[int | float, ...]) -> Any:
        """Call without counting it (boot-time `_initialize`)."""
        return self._enter(self._prepare(name, args))

    def _prepare(self, name: str, args: tuple[int | float, ...]) -> _BoundFunc:
        """Everything that can reject a call before the guest runs; loads the arguments."""
        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        fn = self._bound(name)
        if len(args) != fn.nparams:
            raise BadCall(f"{name!r} takes {fn.nparams} arguments, got {len(args)}")
        raw = fn.raw
        try:
            for i, field in enumerate(fn.fields):
                value = args[i]
                bounds = fn.int_ranges[i]
                if bounds is not None and not bounds[0] <= value <= bounds[1]:
                    raise BadCall(f"argument {i} to {name!r} does not fit {field}: {value!r}")
                setattr(raw[i], field, value)
        except (TypeError, OverflowError):
            raise BadCall(f"arguments to {name!r} must be {fn.sig.params}, got {args!r}") from None
        return fn

    def _enter(self, fn: _BoundFunc) -> Any:
        """Run the guest: from here on the call counts as applied."""
        ctx = self._ctx
        raw = fn.raw
        self._arm()
        err = _func_call_unchecked(ctx, fn.func_ref, raw, fn.raw_len, self._trap_ref)
        _get_fuel(ctx, self._fuel_left_ref)
        self.fuel_used += self._fuel - self._fuel_left.value
        if err or self._trap:
            self._raise_trap(fn.name, err)
        nres = len(fn.result_fields)
        if nres == 1:
            return getattr(raw[0], fn.result_fields[0])
        if nres == 0:
            return None
        return tuple(getattr(raw[i], f) for i, f in enumerate(fn.result_fields))

    def _raise_trap(self, name: str, err: Any) -> None:
        host_exc = wasmtime_func.LAST_EXCEPTION
        wasmtime_func.LAST_EXCEPTION = None
        if err:
            message = str(wasmtime.WasmtimeError._from_ptr(err))
            code = None
        else:
            trap = wasmtime.Trap._from_ptr(self._trap)
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
            self._trap_ref = ctypes.byref(self._trap)
            message, code = trap.message, trap.trap_code
        if isinstance(host_exc, GuestExit):
            self.failed = f"guest exited with status {host_exc.status}"
            raise VMExited(f"{name!r}: {self.failed}")
        if host_exc is not None:
            raise VMTrapped(f"{name!r}: host function failed: {host_exc!r}")
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            raise VMOutOfFuel(f"{name!r} used all {self.limits.fuel_per_call} units of fuel")
        if code == wasmtime.TrapCode.INTERRUPT:
            raise VMDeadlineExceeded(f"{name!r} ran past its {self.limits.deadline_ms} ms deadline")
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            raise VMStackOverflow(f"{name!r} overflowed the wasm stack")
        first_line = _trap_reason(message)
        if any(len(self._view(i)) + chunks.WASM_PAGE_BYTES > self.limits.memory_bytes
               for i in range(len(self._memories))):
            first_line += (f" (memory is at its cap of {self.limits.memory_bytes} bytes: "
                           "a failed memory.grow is the likely cause)")
        raise VMTrapped(f"{name!r} trapped: {first_line}")

    # --- memory ---------------------------------------------------------------------

    def _view(self, index: int) -> memoryview:
        """Zero-copy view of linear memory `index`; rebuilt only after it grows (or moves)."""
        mem_ref = ctypes.byref(self._memories[index])
        size = ffi.wasmtime_memory_data_size(self._ctx, mem_ref)
        cached = self._views[index]
        if cached is not None and cached[1] == size:
            return cached[2]
        addr = ctypes.addressof(ffi.wasmtime_memory_data(self._ctx, mem_ref).contents)
        array = (ctypes.c_ubyte * size).from_address(addr)
        # The memory lives as long as the store: a view handed out must keep the
        # store alive, or reading it after close() would touch unmapped memory.
        array._cloudlet_store = self._store  # type: ignore[attr-defined]
        view = memoryview(array).cast("B")
        self._views[index] = (addr, size, view)
        return view

    def _memory0_view(self) -> memoryview:
        return self._view(0) if self._memories else memoryview(b"")

    @property
    def memory_bytes(self) -> int:
        return sum(len(self._view(i)) for i in range(len(self._memories)))

    def _memory_index(self, index: object) -> int:
        if self._store is None:
            raise VMFailed(f"VM {self.id} is closed")
        if type(index) is not int or not 0 <= index < len(self._memories):
            raise BadCall(f"no memory {index!r}: the image has {len(self._memories)}")
        return index

    def memory_view(self, index: int = 0) -> memoryview:
        """Read-only zero-copy view of a linear memory (valid until it next grows).

        Read-only because writes that bypass `write_memory` would escape dirty
        tracking, and snapshots would miss them. The view keeps the VM's memory
        mapped even after `close()`.
        """
        return self._view(self._memory_index(index)).toreadonly()

    def write_memory(self, offset: int, data: bytes, index: int = 0) -> None:
        """Write guest memory from the host, keeping dirty tracking exact."""
        view = self._view(self._memory_index(index))
        if type(offset) is not int or offset < 0 or offset + len(data) > len(view):
            raise BadCall(f"write of {len(data)} bytes at {offset} is outside memory {index} "
                          f"({len(view)} bytes)")
        view[offset : offset + len(data)] = data
        if index == 0:
            self.mark_written(offset, len(data))

    def _bitmap_region(self) -> tuple[int, int]:
        """(address, length) of the dirty bitmap's bytes for memory 0's current chunks."""
        mem_ref = ctypes.byref(self._dirty_bitmap)
        size = ffi.wasmtime_memory_data_size(self._ctx, mem_ref)
        addr = ctypes.addressof(ffi.wasmtime_memory_data(self._ctx, mem_ref).contents)
        return addr, min(size, len(self._view(0)) // chunks.CHUNK_BYTES)

    def _bitmap(self) -> npt.NDArray[np.uint8]:
        """The dirty bitmap as a writable array, one byte per chunk of memory 0."""
        addr, n = self._bitmap_region()
        arr: npt.NDArray[np.uint8] = np.ctypeslib.as_array(
            (ctypes.c_uint8 * n).from_address(addr))
        return arr

    def _clear_bitmap(self) -> None:
        addr, n = self._bitmap_region()
        ctypes.memset(addr, 0, n)  # cheaper than a numpy view for the boot-time clear

    def mark_written(self, offset: int, length: int) -> None:
        """Record a host write into memory 0 (a no-op without write tracking)."""
        if self._dirty_bitmap is None or length <= 0:
            return
        first = offset >> chunks.CHUNK_SHIFT
        last = (offset + length - 1) >> chunks.CHUNK_SHIFT
        self._bitmap()[first : last + 1] = 1

    def _grow_to(self, index: int, pages: int) -> None:
        current = len(self._view(index)) // chunks.WASM_PAGE_BYTES
        assert pages >= current, "check_applicable rules out shrinking"
        if pages == current:
            return
        prev = ctypes.c_uint64(0)
        err = ffi.wasmtime_memory_grow(self._ctx, ctypes.byref(self._memories[index]),
                                       pages - current, ctypes.byref(prev))
        if err:
            msg = str(wasmtime.WasmtimeError._from_ptr(err))
            raise VMMemoryLimit(f"cannot grow memory {index} to {pages} pages within the "
                                f"VM's cap of {self.limits.memory_bytes} bytes: {msg}")

    def hint_hugepages(self, index: int) -> None:
        """Ask for transparent huge pages before writing most of a memory: first-touch
        page faults dominate restoring a big, full memory, and huge pages cut them ~5x.
        (Not for sparse writes: each huge-page fault zeroes 2 MiB.)"""
        view = self._view(index)
        cached = self._views[index]
        assert cached is not None
        _madvise_hugepage(cached[0], len(view))

    # --- globals --------------------------------------------------------------------

    def _live_store(self) -> wasmtime.Store:
        if self._store is None:
            raise VMFailed(f"VM {self.id} is closed")
        return self._store

    def _global(self, export: str) -> wasmtime.Global:
        g = self._globals.get(export)
        if g is None:
            item = self._export(export, ffi.WASMTIME_EXTERN_GLOBAL)
            g = self._globals[export] = wasmtime.Global._from_raw(item.of.global_)
        return g

    def globals_state(self) -> dict[str, int | float]:
        store = self._live_store()
        return {g.export: self._global(g.export).value(store) for g in self.image.globals}

    # --- chunks, snapshots ------------------------------------------------------------

    def chunk_hashes(self) -> list[chunks.Hashes]:
        """Digest of every chunk of every memory: one scan, skipping never-touched pages."""
        self._live_store()
        return [self._memory_hashes(i) for i in range(len(self._memories))]

    def _memory_hashes(self, index: int) -> chunks.Hashes:
        if index == 0 and self._tracked_hashes is not None:
            return self._sync_tracked_hashes()
        view = self._view(index)
        cached = self._views[index]
        assert cached is not None
        touched = chunks.pagemap().touched(cached[0], len(view))
        if touched is None:
            return chunks.hash_chunks(view)
        # The boot image is a copy-on-write file mapping: its untouched pages are not
        # zero, so the pristine region is always hashed.
        pristine = self.image.pristine
        if index < len(pristine):
            touched[: pristine[index].pages * chunks.CHUNKS_PER_PAGE] = True
        else:
            touched[:] = True
        return chunks.hash_touched_chunks(view, touched)

    def _sync_tracked_hashes(self) -> chunks.Hashes:
        """Digests of memory 0 from the bitmap: rehash only the chunks marked since the
        last sync (new chunks from growth are zero), then clear their marks."""
        assert self._tracked_hashes is not None
        view = self._view(0)
        n = len(view) // chunks.CHUNK_BYTES
        hashes = chunks.extend_hashes(self._tracked_hashes, n).copy()
        bitmap = self._bitmap()
        marked = np.flatnonzero(bitmap)
        if len(marked):
            hashes[marked] = chunks.hash_chunk_ids(view, marked)
            bitmap[marked] = 0
        self._tracked_hashes = hashes
        return hashes.copy()  # callers keep theirs; ours changes on the next sync

    def dirty_chunks(self) -> list[chunks.ChunkIds]:
        """Chunks written since the last snapshot or restore (one scan, state unchanged)."""
        base = self._last_hashes or [p.hashes for p in self.image.pristine]
        return [np.flatnonzero(h != chunks.extend_hashes(b, len(h))).astype(np.uint32)
                for h, b in zip(self.chunk_hashes(), base, strict=True)]

    def snapshot(self, *, delta: bool = False) -> Snapshot:
        """Capture the whole state between calls.

        An overlay (default) holds the chunks that differ from the image's pristine
        boot state; a delta holds the chunks changed since this VM's last snapshot
        (`base_id`), and is applied on top of it.
        """
        from cloudlet.vm.snapshot import capture

        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        if delta and self._last_hashes is None:
            raise VMError("a delta needs an earlier snapshot of this VM as its base")
        return capture(self, delta=delta)

    def _restart_tracking(self, hashes: list[chunks.Hashes]) -> None:
        """After the host rewrote memory wholesale (restore): digests are known, no marks."""
        if self._dirty_bitmap is not None:
            self._clear_bitmap()
            self._tracked_hashes = hashes[0].copy()

    def _set_snapshot_base(self, snapshot_id: str, hashes: list[chunks.Hashes]) -> None:
        self.last_snapshot_id = snapshot_id
        self._last_hashes = hashes
        self._base_seq = self.seq

    @classmethod
    def restore(cls, image: Image, snapshot: Snapshot, *deltas: Snapshot,
                vm_id: str | None = None, owner: str | None = None) -> VM:
        """A new VM in exactly the state `snapshot` (then each delta) captured.

        Everything is checked before anything is applied, and the VM is only
        returned once whole: an error leaves nothing half-restored behind.
        """
        from cloudlet.vm.snapshot import apply_snapshot, check_applicable, check_restorable

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
        vm = cls._boot(image, snapshot.limits, vm_id or snapshot.vm_id,
                       owner if owner is not None else snapshot.owner)
        try:
            for snap in (snapshot, *deltas):
                check_applicable(vm, snap)
                apply_snapshot(vm, snap)
        except BaseException:
            vm.close()
            raise
        return vm

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
        vm = cls._boot(image, VMLimits(memory_bytes=cap), vm_id, owner)
        try:
            vm._grow_to(0, max(pages, len(vm._view(0)) // chunks.WASM_PAGE_BYTES))
            vm.hint_hugepages(0)
        except BaseException:
            vm.close()
            raise
        vm._prefaulted = 0
        return vm

    def prefault(self, max_bytes: int) -> bool:
        """Touch the next `max_bytes` of memory 0 that no one touched yet (one write
        per 4 KiB page, of the byte already there); False once all of it is."""
        view = self._view(0)
        start = self._prefaulted
        end = min(len(view), start + max_bytes)
        if start < end:
            arr = np.frombuffer(view, dtype=np.uint8)
            touched = arr[start:end:4096]
            np.bitwise_or(touched, 0, out=touched)  # a write (a plain self-copy is skipped)
            self._prefaulted = end
        return end < len(view)

    def restore_into(self, snapshot: Snapshot) -> None:
        """`restore` into this VM from `prepare_restore`: the same checks, the same
        state. On failure the VM is closed."""
        from cloudlet.vm.snapshot import apply_snapshot, check_applicable

        try:
            if snapshot.kind != "overlay":
                raise SnapshotImageMismatch("restore starts from an overlay snapshot, not a delta")
            check_applicable(self, snapshot)
            apply_snapshot(self, snapshot)
        except BaseException:
            self.close()
            raise

    def apply_delta(self, delta: Snapshot) -> None:
        """Bring this VM forward by a delta taken against its current state."""
        from cloudlet.vm.snapshot import apply_snapshot, check_applicable

        if self.failed is not None:
            raise VMFailed(f"VM {self.id} has failed: {self.failed}")
        check_applicable(self, delta)
        if self.seq != self._base_seq:
            raise SnapshotImageMismatch(
                f"VM {self.id} has applied calls since its last snapshot, so its state is no "
                f"longer the base of delta {delta.snapshot_id[:12]}")
        if delta.kind != "delta" or delta.base_id != self.last_snapshot_id:
            raise SnapshotImageMismatch(
                f"delta {delta.snapshot_id[:12]} does not apply on this VM's state "
                f"({(self.last_snapshot_id or 'none')[:12]})")
        try:
            apply_snapshot(self, delta)
        except BaseException:
            self.failed = f"delta {delta.snapshot_id[:12]} failed midway: state unknown"
            raise

    # --- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Free the VM's store (memory, instance). The VM is unusable afterwards."""
        self._funcs.clear()
        self._globals.clear()
        self._views = [None] * len(self._views)
        self._memories = []
        self.host.view = None
        self.host.on_write = None
        self._dirty_bitmap = None
        self._tracked_hashes = None
        # Dropping our reference frees the store (memory, instance) at once unless
        # a memory view handed out still holds it; never free memory under a view.
        self._store = None
        if self.failed is None:
            self.failed = "closed"

    def set_limits(self, limits: VMLimits) -> None:
        """Change limits for later calls (the memory cap cannot go below current use)."""
        if any(len(self._view(i)) > limits.memory_bytes for i in range(len(self._memories))):
            raise VMMemoryLimit("the new memory cap is below the memory the VM already uses")
        self._live_store().set_limits(memory_size=limits.memory_bytes)
        self.limits = limits


def _live(ref: weakref.ReferenceType[VM]) -> VM:
    vm = ref()
    if vm is None:  # only reachable if a store outlives its VM mid-call
        raise VMFailed("the VM of this host call is gone")
    return vm


def _trap_reason(message: str) -> str:
    """The line of a wasmtime trap report that says why (it ends the report)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[-1] if lines else "trap"


_MADV_HUGEPAGE = 14
_libc: Any = None


def _madvise_hugepage(addr: int, length: int) -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = 4096
    start = addr & ~(page - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + addr - start), _MADV_HUGEPAGE)
