"""Call slots: at most N calls of a session wait for answers; more callers queue.

Why not `asyncio.Semaphore`: its `acquire` is a coroutine, made and run on every
call even when a slot is free, a measurable share of the SDK's per-call cost. Here
a free slot is a counter's decrement (`try_take`), and only a caller that must
wait makes a future (`wait`). A slot given back goes to the first caller still
waiting; one cancelled while waiting, even after it was handed a slot, never
takes that slot with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class CallSlots:
    """`n` slots, taken by `try_take` or `wait`, each given back once by `give`."""

    __slots__ = ("_waiters", "free")

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Callers queued for a slot (a cancelled one may count until it leaves)."""
        return len(self._waiters)

    def try_take(self) -> bool:
        """Take a free slot now, unless none is free or others wait for one first."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        """Wait, in turn, until a slot is handed over."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.give()  # handed one, then cancelled: it goes to the next
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(slot)
            raise

    def give(self) -> None:
        """A slot is free: to the first caller still waiting, else back to the pool."""
        waiters = self._waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.free += 1
