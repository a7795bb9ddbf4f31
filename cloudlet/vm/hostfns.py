"""The only host functions a guest may import: a small WASI preview1 subset.

Why our own and not wasmtime's WASI: a VM must resume elsewhere exactly as it
was, so every bit of host-side state a guest can observe has to be ours to
capture. Here that is a clock (real, with an offset that keeps `monotonic` from
ever going backwards across a migration, or virtual and fully deterministic),
a counter-mode random generator (key + counter), and a bounded per-VM log that
`fd_write` appends to. There is no filesystem, no socket, no environment.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WASI_MODULE = "wasi_snapshot_preview1"

# errno values (wasi preview1 `errno`)
ESUCCESS, EBADF, EINVAL, ESPIPE, EFAULT = 0, 8, 28, 70, 21

LOG_CAP_BYTES = 64 * 1024  # enough for a guest's diagnostics, small enough to snapshot always
VIRTUAL_TICK_NS = 1_000  # a virtual clock advances 1 us per reading: deterministic, monotonic
RANDOM_BLOCK_BYTES = 64  # one blake2b output

# name -> (params, results); the types wasmtime checks the import against.
ALLOWED_IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "args_get": (("i32", "i32"), ("i32",)),
    "args_sizes_get": (("i32", "i32"), ("i32",)),
    "environ_get": (("i32", "i32"), ("i32",)),
    "environ_sizes_get": (("i32", "i32"), ("i32",)),
    "clock_res_get": (("i32", "i32"), ("i32",)),
    "clock_time_get": (("i32", "i64", "i32"), ("i32",)),
    "random_get": (("i32", "i32"), ("i32",)),
    "fd_write": (("i32", "i32", "i32", "i32"), ("i32",)),
    "fd_close": (("i32",), ("i32",)),
    "fd_seek": (("i32", "i64", "i32", "i32"), ("i32",)),
    "fd_fdstat_get": (("i32", "i32"), ("i32",)),
    "proc_exit": (("i32",), ()),
    "sched_yield": ((), ("i32",)),
}


class GuestExit(Exception):
    """Raised inside `proc_exit` to unwind the guest; the VM turns it into VMExited."""

    def __init__(self, status: int) -> None:
        super().__init__(f"guest called proc_exit({status})")
        self.status = status


@dataclass
class HostState:
    """Everything host-side that a guest can observe. Captured in every snapshot."""

    clock: str = "real"  # "real" or "virtual"
    monotonic_offset_ns: int = 0
    virtual_ns: int = 0
    random_key: bytes = b"\x00" * 32
    random_counter: int = 0
    log: bytearray | None = None
    log_dropped_bytes: int = 0
    # Set by the VM: a zero-copy view of memory 0 (host functions read and write it),
    # and the hook that records host writes for dirty tracking.
    view: Callable[[], memoryview] | None = None
    on_write: Callable[[int, int], None] | None = None

    # --- clock ------------------------------------------------------------------
    def now_ns(self, clock_id: int) -> int:
        if self.clock == "virtual":
            self.virtual_ns += VIRTUAL_TICK_NS
            return self.virtual_ns
        if clock_id == 0:
            return time.time_ns()
        return time.monotonic_ns() + self.monotonic_offset_ns

    def monotonic_reading_ns(self) -> int:
        """The guest's monotonic clock now, without advancing a virtual clock."""
        if self.clock == "virtual":
            return self.virtual_ns
        return time.monotonic_ns() + self.monotonic_offset_ns

    def resume_monotonic_at(self, reading_ns: int) -> None:
        """After a restore: continue the guest's monotonic clock from `reading_ns`."""
        if self.clock == "real":
            self.monotonic_offset_ns = reading_ns - time.monotonic_ns()

    # --- random -----------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        blocks = []
        for _ in range(-(-n // RANDOM_BLOCK_BYTES)):
            blocks.append(hashlib.blake2b(self.random_counter.to_bytes(16, "little"),
                                          key=self.random_key).digest())
            self.random_counter += 1
        return b"".join(blocks)[:n]

    # --- log --------------------------------------------------------------------
    def append_log(self, data: bytes) -> None:
        if self.log is None:
            self.log = bytearray()
        self.log += data
        excess = len(self.log) - LOG_CAP_BYTES
        if excess > 0:
            del self.log[:excess]
            self.log_dropped_bytes += excess

    # --- capture ----------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "monotonic_ns": self.monotonic_reading_ns(),
            "virtual_ns": self.virtual_ns,
            "random_key": self.random_key,
            "random_counter": self.random_counter,
            "log": bytes(self.log or b""),
            "log_dropped_bytes": self.log_dropped_bytes,
        }

    def load(self, d: dict[str, Any]) -> None:
        """Take on captured state (in place: the VM's store refers to this object)."""
        self.clock = d["clock"]
        self.virtual_ns = d["virtual_ns"]
        self.random_key = d["random_key"]
        self.random_counter = d["random_counter"]
        self.log = bytearray(d["log"]) if d["log"] else None
        self.log_dropped_bytes = d["log_dropped_bytes"]
        self.resume_monotonic_at(d["monotonic_ns"])


# --- the functions ------------------------------------------------------------------
# Each takes the HostState first; `hostfn_table` binds them for the linker.

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IOVEC = struct.Struct("<II")
# fdstat: filetype u8 (2 = character device), pad, flags u16, pad, rights u64 x2
_FDSTAT = struct.Struct("<BxHxxxxQQ")


def _mem(state: HostState) -> memoryview:
    assert state.view is not None, "host state not bound to a VM"
    return state.view()


def _store(state: HostState, packer: struct.Struct, ptr: int, *values: int) -> int:
    mem = _mem(state)
    ptr &= 0xFFFFFFFF
    if ptr + packer.size > len(mem):
        return EFAULT
    packer.pack_into(mem, ptr, *values)
    if state.on_write is not None:
        state.on_write(ptr, packer.size)
    return ESUCCESS


def _zero_sizes(state: HostState, count_ptr: int, size_ptr: int) -> int:
    return _store(state, _U32, count_ptr, 0) or _store(state, _U32, size_ptr, 0)


def _nothing(state: HostState, a: int, b: int) -> int:
    return ESUCCESS


def _clock_res_get(state: HostState, clock_id: int, res_ptr: int) -> int:
    if not 0 <= clock_id <= 3:
        return EINVAL
    return _store(state, _U64, res_ptr, 1)


def _clock_time_get(state: HostState, clock_id: int, precision: int, time_ptr: int) -> int:
    if not 0 <= clock_id <= 3:
        return EINVAL
    return _store(state, _U64, time_ptr, state.now_ns(clock_id) & 0xFFFFFFFFFFFFFFFF)


def _random_get(state: HostState, buf: int, length: int) -> int:
    mem = _mem(state)
    buf &= 0xFFFFFFFF
    length &= 0xFFFFFFFF
    if buf + length > len(mem):
        return EFAULT
    mem[buf : buf + length] = state.random_bytes(length)
    if state.on_write is not None:
        state.on_write(buf, length)
    return ESUCCESS


def _fd_write(state: HostState, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
    if fd not in (1, 2):
        return EBADF
    mem = _mem(state)
    total = 0
    iovs &= 0xFFFFFFFF
    for i in range(iovs_len & 0xFFFF):
        at = iovs + i * _IOVEC.size
        if at + _IOVEC.size > len(mem):
            return EFAULT
        base, length = _IOVEC.unpack_from(mem, at)
        if base + length > len(mem):
            return EFAULT
        state.append_log(bytes(mem[base : base + length]))
        total += length
    return _store(state, _U32, nwritten_ptr, total)


def _fd_close(state: HostState, fd: int) -> int:
    return EBADF


def _fd_seek(state: HostState, fd: int, offset: int, whence: int, new_ptr: int) -> int:
    return ESPIPE if fd in (0, 1, 2) else EBADF


def _fd_fdstat_get(state: HostState, fd: int, stat_ptr: int) -> int:
    if fd not in (0, 1, 2):
        return EBADF
    return _store(state, _FDSTAT, stat_ptr, 2, 0, 0, 0)


def _proc_exit(state: HostState, status: int) -> None:
    raise GuestExit(status)


def _sched_yield(state: HostState) -> int:
    return ESUCCESS


HOST_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "args_get": _nothing,
    "args_sizes_get": _zero_sizes,
    "environ_get": _nothing,
    "environ_sizes_get": _zero_sizes,
    "clock_res_get": _clock_res_get,
    "clock_time_get": _clock_time_get,
    "random_get": _random_get,
    "fd_write": _fd_write,
    "fd_close": _fd_close,
    "fd_seek": _fd_seek,
    "fd_fdstat_get": _fd_fdstat_get,
    "proc_exit": _proc_exit,
    "sched_yield": _sched_yield,
}
assert HOST_FUNCTIONS.keys() == ALLOWED_IMPORTS.keys()
