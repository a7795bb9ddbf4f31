"""Spacing calls into a VM apart: the actuator of auto-converge.

Why: pre-copy only converges when the guest dirties memory slower than the link
drains it. When it does not, QEMU's auto-converge throttles the vCPU; our guests
run per call, so the equivalent is to let calls in no closer together than an
interval. The VM keeps serving (slower) instead of being paused for a long
final round. One pacer per VM; the source's state machine picks the interval
(`Throttle` events), the gate in front of the VM's calls applies it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class CallPacer:
    """Admits calls at most one per `interval_s` (0: no spacing), in arrival order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.interval_s = 0.0
        self._next_slot_s = 0.0

    @property
    def active(self) -> bool:
        return self.interval_s > 0.0

    def set_interval(self, interval_s: float) -> None:
        """Change the spacing; 0 lifts it (calls already waiting keep their slots)."""
        if interval_s < 0:
            raise ValueError(f"a call interval cannot be negative: {interval_s}")
        self.interval_s = interval_s
        if interval_s == 0.0:
            self._next_slot_s = 0.0

    def reserve(self) -> float:
        """Take the next slot; returns how long to wait for it (seconds, >= 0)."""
        if not self.active:
            return 0.0
        now = self._clock()
        slot = max(now, self._next_slot_s)
        self._next_slot_s = slot + self.interval_s
        return slot - now

    async def wait_turn(self) -> None:
        """Wait for this call's slot. Slots strictly increase, so calls keep their order."""
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
