"""Keep idle CPUs polling, not halted, for the few milliseconds a move's last steps take.

Why: a live migration's downtime is a chain of wake-ups (the decision's flush
completing, which on a filesystem without a journal is three device round
trips; the `Commit` arriving; the held client call answered). A thread woken
on a CPU that went idle waits for that CPU to leave its idle state, and on a
virtual machine whose idle vCPUs halt that is the host scheduling the vCPU again:
up to ~1 ms each on the 2-vCPU hosts measured here (`perf` block and scheduler
traces of the downtime series: the decision's `fdatasync` took ~1 ms inside the
pause against ~0.25 ms on a quiet host). Linux's PM QoS interface lets a process
ask for a CPU wake-up latency bound while it holds `/dev/cpu_dma_latency` open
(kernel documentation: power/pm_qos_interface); asking for 0 makes idle CPUs
poll instead of halting. Held from a move's pause to its landing, a few
milliseconds per move, never longer than each hold's deadline.

It is machine-wide, and needs write access to the device (root, or a udev rule
granting the daemon's user): without it the daemon says so once and moves as
before. Who can make a daemon hold it: whoever can start a move it takes part
in (the VM's owner, or a peer with an operator-signed token), and only for the
move's last steps: the source from its pause (a VM whose calls may run long, in
worker threads, only once paused, not while the pause waits for the running
call; one with short inline calls from the start of that wait, at most its
call deadline), the destination from the final round's arrival;
each hold ends by its deadline whatever happens to the move, so a move costs at
most that much polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEVICE = Path("/dev/cpu_dma_latency")
# The PM QoS request: a CPU may take at most this many microseconds to wake.
LATENCY_US = 0


class Hold:
    """One holder's share of the bound; `release` is idempotent, and the deadline
    (`max_s`, None for an empty hold) releases it if the holder never does."""

    def __init__(self, on_release: Callable[[Hold], None], max_s: float | None) -> None:
        self._on_release = on_release
        self.released = max_s is None
        self._deadline = (None if max_s is None
                          else asyncio.get_running_loop().call_later(max_s, self.release))

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._on_release(self)


def release(hold: Hold | None) -> None:
    """End `hold` if one was taken (a holder's field is None until it takes one)."""
    if hold is not None:
        hold.release()


class WakeLatency:
    """The daemon's one request on the device, open while any `Hold` is held."""

    def __init__(self, enabled: bool = True, device: Path = DEVICE) -> None:
        self.enabled = enabled
        self.device = device
        self._fd: int | None = None
        self._holds: set[Hold] = set()
        self._said = False

    @property
    def active(self) -> bool:
        """Whether the request is in force (the device is open with the bound)."""
        return self._fd is not None

    def hold(self, max_s: float) -> Hold:
        """Ask for the bound until the hold is released, or `max_s` seconds at most.
        Never raises: a device that cannot be opened leaves the request off (said
        once in the log), and the hold is then an empty one."""
        if not self.enabled:
            return Hold(self._released, None)
        hold = Hold(self._released, max_s)  # first: its deadline needs the running loop
        if not self._open():
            hold.release()
            return hold
        self._holds.add(hold)
        return hold

    def close(self) -> None:
        """Drop the request now, whoever holds it (the daemon's shutdown)."""
        holds, self._holds = self._holds, set()
        for hold in holds:
            hold.release()
        self._close_fd()

    def _open(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._cannot(exc)
            return False
        try:
            # The request is a native 32-bit integer; it lasts while the file is open.
            os.write(fd, struct.pack("=i", LATENCY_US))
        except OSError as exc:
            os.close(fd)
            self._cannot(exc)
            return False
        self._fd = fd
        return True

    def _cannot(self, exc: OSError) -> None:
        if isinstance(exc, PermissionError | FileNotFoundError):
            self.enabled = False  # not retried on every move (a full fd table is)
        if not self._said:
            self._said = True
            log.warning("cannot ask for low CPU wake-up latency during moves (%s: %s); "
                        "their downtime may be up to ~1 ms longer on hosts whose idle "
                        "CPUs halt (set migration_low_wake_latency = false to not try)",
                        self.device, exc.strerror or exc)

    def _released(self, hold: Hold) -> None:
        self._holds.discard(hold)
        if not self._holds:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # never in the way of a move's own end
                os.close(fd)
