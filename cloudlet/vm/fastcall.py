"""The raw wasmtime fast path: the one module that touches wasmtime-py's private bindings.

Why it exists: speed. Calls go straight to wasmtime's C API
(`wasmtime_func_call_unchecked`) with argument arrays built once per export: the
stock Python wrapper spends most of a call converting arguments (~24 us for two
i32s here), the C call itself is ~2 us. Types are checked once, from the
export's signature, not per call. wasmtime-py's same-named wrappers of the
ctypes functions add a Python frame each, and a call makes four of them (~0.6 us
of a ~4 us call), so the ctypes functions are called directly.

Why here only: these are wasmtime-py's private names (`_bindings`, `_ffi`,
`_from_ptr`, `Store._context`, ...), free to change in any release; pyproject
pins wasmtime to one major version, and an upgrade is checked against this file
alone. Every private access is marked `# noqa: SLF001`; ruff flags one anywhere
else in `cloudlet/vm/`. The rest of the runtime sees plain functions and
objects: a store's context, raw export handles, memory addresses, a
`FastCaller` that runs a `BoundFunc` under fuel and an epoch deadline.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Protocol

import wasmtime
from wasmtime import _bindings as wasmtime_bindings
from wasmtime import _ffi as ffi
from wasmtime import _func as wasmtime_func
from wasmtime import _value as wasmtime_value

from cloudlet.errors import BadCall, VMError

# The ctypes functions themselves: wasmtime-py's same-named wrappers add a Python
# frame each, and a call makes four of them (~0.6 us of a ~4 us call).
_set_fuel_checked = wasmtime_bindings._wasmtime_context_set_fuel  # noqa: SLF001
_get_fuel_checked = wasmtime_bindings._wasmtime_context_get_fuel  # noqa: SLF001
_set_epoch_deadline_checked = (
    wasmtime_bindings._wasmtime_context_set_epoch_deadline)  # noqa: SLF001
_func_call_unchecked = wasmtime_bindings._wasmtime_func_call_unchecked  # noqa: SLF001


def _quick(checked: Any, *argtypes: Any) -> Any:
    """The same C function as `checked`, called without releasing the GIL and with an
    untyped error pointer: fuel and deadline setters return at once, so releasing
    and retaking the GIL around them (and wrapping a NULL error in a pointer object)
    is most of what they cost on the call path (~0.5 us each where ~0.35 us do).
    The guest call itself keeps releasing the GIL: it may run for its deadline."""
    address = ctypes.cast(checked, ctypes.c_void_p).value
    assert address is not None, "wasmtime's library lacks a function it declares"
    return ctypes.PYFUNCTYPE(ctypes.c_void_p, *argtypes)(address)


_set_fuel = _quick(_set_fuel_checked, ctypes.c_void_p, ctypes.c_uint64)
_get_fuel = _quick(_get_fuel_checked, ctypes.c_void_p, ctypes.c_void_p)
_set_epoch_deadline = _quick(_set_epoch_deadline_checked, ctypes.c_void_p, ctypes.c_uint64)


def _address(pointer: Any) -> int:
    """A ctypes pointer's (or function's) address, as the untyped callers here take it."""
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    assert address is not None, "a NULL pointer where wasmtime gave a live one"
    return address


# The guest call, untyped too. Every pointer on the call path (the store's context,
# the export, its argument array, the trap and fuel slots) is passed as a plain
# address taken once per store or export: ctypes converting a typed pointer object
# per argument per call was ~0.7 us of a ~2.5 us call. A CFUNCTYPE: it releases the
# GIL, as the guest may run for its deadline.
_func_call = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_void_p)(_address(_func_call_unchecked))


# Accepted integer arguments: signed or unsigned forms of the type's bit pattern.
_INT_RANGE = {"i32": (-(1 << 31), (1 << 32) - 1), "i64": (-(1 << 63), (1 << 64) - 1)}


# --- stores and errors -------------------------------------------------------------------


def context_of(store: wasmtime.Store) -> Any:
    """The store's `wasmtime_context_t` pointer, which every raw call takes."""
    return store._context()  # noqa: SLF001


def caller_data(caller: wasmtime.Caller) -> Any:
    """The Python object a host function's store was created with (`Store(data=...)`)."""
    data: Any = ffi.wasmtime_context_get_data(caller._context())  # noqa: SLF001
    return wasmtime_value._unintern(data)  # noqa: SLF001


# What a host function raised, per thread, with the store it ran in: wasmtime-py keeps
# one `LAST_EXCEPTION` for the whole process, so with guests running on several
# threads one VM's exit or failure could be read as another's. The host function
# runs on the thread of the guest call it serves, and records here before it raises.
_host_failures = threading.local()


def record_host_failure(caller: wasmtime.Caller, exc: BaseException) -> None:
    """Say that a host function called by `caller`'s guest raised `exc` (it is about
    to unwind the guest; `FastCaller` gives it to the call's `RawTrap`)."""
    _host_failures.last = (_address(caller._context()), exc)  # noqa: SLF001


def _host_failure_in(ctx: int) -> BaseException | None:
    """The exception a host function raised on this thread in the store at `ctx`,
    taken (so it cannot be read again), or None."""
    last = getattr(_host_failures, "last", None)
    _host_failures.last = None
    if last is None or last[0] != ctx:
        return None
    exc: BaseException = last[1]
    return exc


def error_text(err: Any) -> str:
    """The message of a `wasmtime_error_t` a raw call returned (and frees it); `err` is
    a typed pointer or, from the quick setters, its address."""
    if isinstance(err, int):
        err = ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t))
    return str(wasmtime.WasmtimeError._from_ptr(err))  # noqa: SLF001


# --- exports -----------------------------------------------------------------------------


def _export(ctx: Any, instance: wasmtime.Instance, name: str, kind: Any) -> Any:
    item = ffi.wasmtime_extern_t()
    raw = name.encode()
    found = ffi.wasmtime_instance_export_get(
        ctx, ctypes.byref(instance._instance), raw, len(raw),  # noqa: SLF001
        ctypes.byref(item))
    if not found or item.kind != kind.value:
        return None
    return item


def export_memory(ctx: Any, instance: wasmtime.Instance, name: str) -> Any | None:
    """The raw `wasmtime_memory_t` exported as `name`, or None."""
    item = _export(ctx, instance, name, ffi.WASMTIME_EXTERN_MEMORY)
    return None if item is None else item.of.memory


def export_func(ctx: Any, instance: wasmtime.Instance, name: str) -> Any | None:
    """The raw `wasmtime_func_t` exported as `name`, or None (see `BoundFunc`)."""
    item = _export(ctx, instance, name, ffi.WASMTIME_EXTERN_FUNC)
    return None if item is None else item.of.func


def export_global(ctx: Any, instance: wasmtime.Instance, name: str) -> wasmtime.Global | None:
    """The global exported as `name`, as wasmtime-py's public `Global`, or None."""
    item = _export(ctx, instance, name, ffi.WASMTIME_EXTERN_GLOBAL)
    return None if item is None else wasmtime.Global._from_raw(item.of.global_)  # noqa: SLF001


# --- memories ------------------------------------------------------------------------------


def memory_size(ctx: Any, memory: Any) -> int:
    """Bytes of a raw memory now."""
    size: int = ffi.wasmtime_memory_data_size(ctx, ctypes.byref(memory))
    return size


def memory_address(ctx: Any, memory: Any) -> int:
    """Where a raw memory's bytes start (moves when the memory grows)."""
    return ctypes.addressof(ffi.wasmtime_memory_data(ctx, ctypes.byref(memory)).contents)


def memory_grow(ctx: Any, memory: Any, delta_pages: int) -> str | None:
    """Grow a raw memory by `delta_pages`; the error's text if wasmtime refused."""
    prev = ctypes.c_uint64(0)
    err = ffi.wasmtime_memory_grow(ctx, ctypes.byref(memory), delta_pages, ctypes.byref(prev))
    return error_text(err) if err else None


# --- calls ---------------------------------------------------------------------------------


# The C types of the wasmtime_val_raw union's fields, which are named by wasm type.
_FIELD_TYPES: dict[str, Any] = {field[0]: field[1] for field in ffi.wasmtime_val_raw._fields_}
_RAW_BYTES = ctypes.sizeof(ffi.wasmtime_val_raw)


class BoundFunc:
    """An export resolved in one store, with its argument/result array built once.

    Arguments and results are read and written through typed views of the array's
    slots, made once: indexing the array would build a union object per slot on
    every call."""

    __slots__ = ("arg_views", "func", "func_address", "int_ranges", "name", "nparams",
                 "params", "raw", "raw_address", "raw_len", "result_views")

    def __init__(self, name: str, func: Any, params: tuple[str, ...],
                 results: tuple[str, ...]) -> None:
        self.name = name
        self.params = params
        self.func = func
        self.nparams = len(params)
        self.raw_len = max(len(params), len(results), 1)
        self.raw = (ffi.wasmtime_val_raw * self.raw_len)()
        # Kept alive by `func` and `raw`, which this object holds.
        self.func_address = ctypes.addressof(func)
        self.raw_address = ctypes.addressof(self.raw)
        self.arg_views = self._views(params)
        self.result_views = self._views(results)
        self.int_ranges = tuple(_INT_RANGE.get(p) for p in params)

    def _views(self, types: tuple[str, ...]) -> tuple[Any, ...]:
        return tuple(_FIELD_TYPES[t].from_buffer(self.raw, i * _RAW_BYTES)
                     for i, t in enumerate(types))

    def load(self, args: tuple[int | float, ...]) -> None:
        """Check `args` against the signature and write them into the argument array."""
        if len(args) != self.nparams:
            raise BadCall(f"{self.name!r} takes {self.nparams} arguments, got {len(args)}")
        ranges = self.int_ranges
        try:
            for i, view in enumerate(self.arg_views):
                value = args[i]
                bounds = ranges[i]
                if bounds is not None and not bounds[0] <= value <= bounds[1]:
                    raise BadCall(f"argument {i} to {self.name!r} does not fit "
                                  f"{self.params[i]}: {value!r}")
                view.value = value
        except (TypeError, OverflowError):
            raise BadCall(f"arguments to {self.name!r} must be {self.params}, "
                          f"got {args!r}") from None

    def results(self) -> Any:
        """What the last call returned: None, one value or a tuple."""
        views = self.result_views
        if len(views) == 1:
            return views[0].value
        if not views:
            return None
        return tuple(view.value for view in views)


class RawTrap(Exception):
    """A call that entered the guest and did not return normally, as wasmtime said it.

    `host_exc` is what a host function raised (it unwound the guest), if one did;
    `code` is the trap's code when wasmtime gave one. The VM turns this into the
    error a caller sees.
    """

    def __init__(self, message: str, code: wasmtime.TrapCode | None,
                 host_exc: BaseException | None, *, is_error: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.host_exc = host_exc
        self.is_error = is_error  # wasmtime returned an error (a limit, say), not a trap


def instantiate(pre: wasmtime.InstancePre, store: wasmtime.Store) -> wasmtime.Instance:
    """`pre.instantiate(store)`, running start functions, minus wasmtime-py's one
    exception slot for the whole process: a host function's exception is this
    store's own record on this thread (`record_host_failure`), never another
    thread's. Raises RawTrap if a start function trapped or wasmtime refused."""
    instance = ffi.wasmtime_instance_t()
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    ctx = context_of(store)
    err = ffi.wasmtime_instance_pre_instantiate(
        pre.ptr(), ctx, ctypes.byref(instance), ctypes.byref(trap))
    if err or trap:
        raise raw_trap(_address(ctx), err, trap)
    return wasmtime.Instance._from_raw(instance)  # noqa: SLF001


def raw_trap(ctx: int, err: Any, trap: Any) -> RawTrap:
    """What ended guest code in the store at `ctx`: wasmtime's error `err`, else the
    trap `trap` points to (the returned RawTrap's `Trap` now owns that pointer),
    with the exception a host function of this store raised on this thread.
    wasmtime-py's one slot for every thread is dropped, not read (`_host_failures`)."""
    wasmtime_func.LAST_EXCEPTION = None
    host_exc = _host_failure_in(ctx)
    if err:
        return RawTrap(error_text(err), None, host_exc, is_error=True)
    caught = wasmtime.Trap._from_ptr(trap)  # noqa: SLF001
    return RawTrap(caught.message, caught.trap_code, host_exc)


class EpochClock(Protocol):
    """The engine's epoch clock as a caller sees it (`engine.EpochTicker`): `ticks`
    changes whenever the epoch may have advanced (and when the clock stops), and
    `ensure_started` starts it."""

    ticks: int

    def ensure_started(self) -> None: ...


class FastCaller:
    """Runs bound functions in one store, each under a fresh fuel budget and deadline.

    Keeps the total fuel the store's calls used. The deadline is re-armed only when
    the epoch clock has ticked since it was last armed (a tick is 10 ms; thousands
    of calls fit in one): a deadline set within the same tick ends no sooner, and
    it is armed one tick longer than `deadline_ticks` so that a tick landing while
    it is being armed takes nothing from the call (so a call may get up to one tick
    more, within the clock's resolution, never less).
    """

    __slots__ = ("_armed_tick", "_clock", "_ctx", "_deadline_ticks", "_fuel_left",
                 "_fuel_left_address", "_trap", "_trap_address", "fuel", "fuel_used")

    def __init__(self, store: wasmtime.Store, clock: EpochClock) -> None:
        # Plain addresses. `_fuel_left` and `_trap` are held here; the store belongs
        # to the same VM, which frees it on close and from then on refuses calls
        # before they reach this object (`VM.failed`). Never re-entered: one call
        # at a time per store (the VM's lock), and no host function calls a guest.
        self._ctx = _address(context_of(store))
        self._clock = clock
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._trap_address = ctypes.addressof(self._trap)
        self._fuel_left = ctypes.c_uint64(0)
        self._fuel_left_address = ctypes.addressof(self._fuel_left)
        self._armed_tick = -1  # the clock's `ticks` when the deadline was armed; -1: not armed
        self.fuel = 1  # per call; set from the VM's limits
        self._deadline_ticks = 1
        self.fuel_used = 0

    @property
    def deadline_ticks(self) -> int:
        return self._deadline_ticks

    @deadline_ticks.setter
    def deadline_ticks(self, value: int) -> None:
        self._deadline_ticks = value
        self._armed_tick = -1  # the next call arms the new deadline

    def arm(self) -> None:
        """Refill per-call fuel and restart the wall-clock deadline (instantiation runs
        start functions under them too)."""
        clock = self._clock
        clock.ensure_started()
        err = _set_fuel(self._ctx, self.fuel)
        if err:
            raise VMError(error_text(err))
        self._armed_tick = clock.ticks
        _set_epoch_deadline(self._ctx, self._deadline_ticks + 1)

    def enter(self, fn: BoundFunc) -> Any:
        """Run the guest with the arguments `fn.load` left: None, one value or a tuple.

        Raises RawTrap if it trapped; the fuel it burnt is counted either way.
        """
        ctx = self._ctx
        fuel = self.fuel
        # `arm`, inline: one Python frame less per call.
        err = _set_fuel(ctx, fuel)
        if err:
            raise VMError(error_text(err))
        ticks = self._clock.ticks
        if ticks != self._armed_tick:
            self._clock.ensure_started()
            self._armed_tick = ticks
            _set_epoch_deadline(ctx, self._deadline_ticks + 1)
        err = _func_call(ctx, fn.func_address, fn.raw_address, fn.raw_len, self._trap_address)
        _get_fuel(ctx, self._fuel_left_address)
        self.fuel_used += fuel - self._fuel_left.value
        if err or self._trap:
            self._armed_tick = -1  # a deadline that ran out is re-armed for the next call
            raise self._trap_of(err)
        views = fn.result_views
        if len(views) == 1:  # `fn.results()`, inline for the common case
            return views[0].value
        return fn.results()

    def _trap_of(self, err: Any) -> RawTrap:
        failure = raw_trap(self._ctx, err, self._trap)
        if not err:  # the Trap now owns the pointer: the next call needs a fresh one
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
            self._trap_address = ctypes.addressof(self._trap)
        return failure
