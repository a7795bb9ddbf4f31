"""Spacing calls into a VM apart: the actuator of auto-converge.

Why: pre-copy only converges when the guest dirties memory slower than the link
drains it. When it does not, QEMU's auto-converge throttles the vCPU; our guests
run per call, so the equivalent is to let calls in no closer together than an
interval. The VM keeps serving (slower) instead of being paused for a long
final round. One pacer per VM; the source's state machine picks the interval
(`Throttle` events), the gate in front of the VM's calls applies it.

Nothing is reserved ahead: waiting calls queue on a lock (in arrival order) and
the one at its head sleeps until the interval since the last admitted call has
passed, or until the interval changes. So lifting the spacing frees every
waiting call at once, and a call that gives up (cancelled, timed out) costs the
others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class CallPacer:
    """Admits calls at most one per `interval_s` (0: no spacing), in arrival order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.interval_s = 0.0
        self._last_admitted_s = float("-inf")
        self._queue = asyncio.Lock()  # FIFO: waiting calls keep their order
        # Calls inside `wait_turn` (waiting or about to go in): a plain count, so the
        # daemon's check before every inline call (`busy`) is two attribute reads.
        self.in_turn = 0
        self._changed = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.interval_s > 0.0

    @property
    def busy(self) -> bool:
        """Spacing calls, or still letting through calls that waited for it: a call
        that skips `wait_turn` now would overtake them."""
        return self.interval_s > 0.0 or self.in_turn > 0

    def set_interval(self, interval_s: float) -> None:
        """Change the spacing (0 lifts it); waiting calls see the change at once."""
        if interval_s < 0:
            raise ValueError(f"a call interval cannot be negative: {interval_s}")
        self.interval_s = interval_s
        self._changed.set()
        self._changed = asyncio.Event()

    def wait_s(self) -> float:
        """How long the next call would wait now (0 when it may go)."""
        if not self.active:
            return 0.0
        return max(0.0, self._last_admitted_s + self.interval_s - self._clock())

    async def wait_turn(self) -> None:
        """Wait until this call may go in; returns at once when nothing is spaced."""
        if not self.busy:
            return
        self.in_turn += 1
        try:
            async with self._queue:
                while (delay := self.wait_s()) > 0:
                    changed = self._changed
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await changed.wait()
                self._last_admitted_s = self._clock()
        finally:
            self.in_turn -= 1
