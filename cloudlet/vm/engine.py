"""The one wasmtime Engine a process uses, its host-function Linker, and the epoch clock.

An Engine's configuration decides how code is compiled, so it is shared by all
VMs and is part of the compiled-image cache key. Both limits are compiled in:
fuel (deterministic: a guest runs out at the same instruction on every cloudlet
that uses the same instrumentation mode) and epoch interruption (wall-clock
deadlines). Epochs only advance when someone
increments them, so `EpochTicker` does that from a background thread every
`EPOCH_TICK_S`; a call's wall-clock deadline is a number of ticks.
"""

from __future__ import annotations

import threading
from typing import Any

import wasmtime

from cloudlet.vm import fastcall
from cloudlet.vm.hostfns import ALLOWED_IMPORTS, HOST_FUNCTIONS, WASI_MODULE, HostState

# 10 ms: fine enough for deadlines of tens of milliseconds, coarse enough that
# the ticker thread's wake-ups (100/s) cost nothing measurable.
EPOCH_TICK_S = 0.010

_VALTYPES = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64,
             "f32": wasmtime.ValType.f32, "f64": wasmtime.ValType.f64}


def _config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    return config


class EpochTicker:
    """Advances the engine's epoch every tick while started. Owned by `Runtime`.

    `ticks` counts the ticks (and stops): a caller that armed a deadline at one
    count needs to re-arm it only once the count has changed (fastcall.FastCaller).
    It moves before the epoch does, so a count read never lags the epoch."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self.ticks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                thread = threading.Thread(target=self._run, name="cloudlet-epoch", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.ticks += 1
            self._engine.increment_epoch()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self.ticks += 1  # the next call re-arms, and so restarts the clock
        if thread is not None:
            thread.join()


def host_state_of(caller: Any) -> HostState:
    """The HostState a store was created with (see `Store(engine, data=...)`)."""
    state = fastcall.caller_data(caller)
    assert isinstance(state, HostState)
    return state


def _bind(fn: Any) -> Any:
    def host_call(caller: Any, *args: Any) -> Any:
        try:
            return fn(host_state_of(caller), *args)
        except BaseException as exc:  # unwinds the guest: its call says why (`RawTrap`)
            fastcall.record_host_failure(caller, exc)
            raise

    return host_call


class Runtime:
    """Process-wide wasmtime state: engine, linker with our host functions, ticker."""

    def __init__(self) -> None:
        self.engine = wasmtime.Engine(_config())
        self.linker = wasmtime.Linker(self.engine)
        for name, (params, results) in ALLOWED_IMPORTS.items():
            ty = wasmtime.FuncType([_VALTYPES[p]() for p in params],
                                   [_VALTYPES[r]() for r in results])
            self.linker.define_func(WASI_MODULE, name, ty, _bind(HOST_FUNCTIONS[name]),
                                    access_caller=True)
        self.ticker = EpochTicker(self.engine)
        # Compiled code depends on this configuration: part of the image cache key.
        self.fingerprint = "fuel-epoch-speed-v1"

    def close(self) -> None:
        self.ticker.stop()


_default: Runtime | None = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Runtime()
    return _default
