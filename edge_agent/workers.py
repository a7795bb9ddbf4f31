"""Worker threads for what must not run on the event loop, shared fairly by clients.

The event loop serves every client's interactive calls, so nothing that can take
milliseconds runs on it: not a VM's boot (a guest's `_initialize` may burn its
whole boot fuel), not a checkpoint's capture of a large VM, not a restore.
Threads can run them beside the loop because wasmtime releases the GIL while
guest code runs, and hashing, compression and file writes release it for their
bulk work.

Three pools, each for one kind of work, so that no kind can hold up another:

- `calls`: guest calls of VMs whose deadline is too long to run inline;
- `boots`: VM boots, restores, image compiles and snapshot downloads;
- `checkpoints`: capturing and writing checkpoints (and dropping their files).

A spinning call can then never delay a checkpoint (the promise that a kill -9
loses at most one checkpoint interval holds while every call thread spins), and
a client booting VMs in a loop never delays either.

Within a pool, clients take turns (`FairPool`): a client holds at most
`per_client` threads at once, and when a thread frees, it goes to the next
client in turn that has work waiting (FIFO within a client). So no client can
take every thread, and a waiting client waits at most for one job of each client
ahead of it in turn, each bounded by its deadline. This was chosen over more
pools (one per kind of call, or per deadline class): a pool of its own does not
stop one client from filling it, and a pool per client would need a thread per
client. Fair turns bound every client's wait with a fixed set of threads.

All bookkeeping happens on the event loop's thread (admission, and release from
the job's completion callback), so it needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Call and boot threads run at a lower CPU priority than the event loop's thread
# (Linux applies a thread's nice value to that thread alone): on a busy core, the
# loop that answers every client's interactive calls runs first, and a long call
# or a burning boot takes the time left over. 5 is a weight of about a third of
# the loop's, enough for the loop to win wake-ups without starving the workers.
WORKER_NICE = 5


def _lower_priority(nice: int) -> None:
    """Thread initializer: this worker thread yields the CPU to the event loop (by
    `nice` more than the thread that started it, whatever that one runs at)."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))


class FairPool:
    """`threads` worker threads; each client holds at most `per_client` of them, and
    waiting clients are served in turn. Use from one event loop only."""

    def __init__(self, threads: int, per_client: int, name: str, *,
                 nice: int = WORKER_NICE) -> None:
        if not 1 <= per_client <= threads:
            raise ValueError("per_client must be from 1 to threads")
        self.name = name
        self.threads = threads
        self.per_client = per_client
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name,
                                            initializer=_lower_priority, initargs=(nice,))
        self._free = threads
        self._running: dict[str, int] = {}
        # Clients with jobs waiting, in turn order; each with its waiting jobs, FIFO.
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def running(self, client: str) -> int:
        return self._running.get(client, 0)

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def run(self, client: str, fn: Callable[[], T], *,
                  on_orphan: Callable[[T], object] | None = None) -> T:
        """Run `fn()` on a thread when `client`'s turn comes; its result or error.

        If the caller is cancelled (a request deadline) while `fn` runs, the job
        still runs to its end and the cancellation waits for it: whatever the
        caller holds (a VM's lock) must stay held while a thread uses it. A result
        nobody will receive is given to `on_orphan` (a booted VM is closed)."""
        await self._admit(client)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, fn)
        except BaseException:
            self._release(client)
            raise
        future.add_done_callback(lambda _: self._release(client))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            try:
                result = await future
                if on_orphan is not None:
                    on_orphan(result)
            except Exception as exc:  # nobody waits for it any more: say it failed
                log.warning("work abandoned by its caller failed: %r", exc)
            raise

    async def _admit(self, client: str) -> None:
        # After every admission and release, either no thread is free or no waiting
        # job may take one; so a job that may run now is never ahead of a waiting one.
        if self._free > 0 and self.running(client) < self.per_client:
            self._take(client)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(client)  # admitted as it was cancelled: hand the thread on
            else:
                self._forget(client, waiter)
            raise

    def _take(self, client: str) -> None:
        self._free -= 1
        self._running[client] = self._running.get(client, 0) + 1

    def _release(self, client: str) -> None:
        self._free += 1
        left = self._running.get(client, 0) - 1
        if left > 0:
            self._running[client] = left
        else:
            self._running.pop(client, None)
        self._dispatch()

    def _forget(self, client: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiting[client]

    def _dispatch(self) -> None:
        """Give free threads to waiting clients, in turn."""
        while self._free > 0:
            client = next((c for c in self._waiting if self.running(c) < self.per_client), None)
            if client is None:
                return
            queue = self._waiting[client]
            waiter = queue.popleft()
            if queue:
                self._waiting.move_to_end(client)  # its next job waits for its next turn
            else:
                del self._waiting[client]
            if waiter.done():  # cancelled while waiting
                continue
            self._take(client)
            waiter.set_result(None)

    def shutdown(self) -> None:
        """Wait for running jobs to end; later `run`s fail."""
        for queue in self._waiting.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=True)


class Workers:
    """The daemon's three pools (see the module docstring)."""

    NODE = ""  # the client name of the node's own work (checkpoints, restores at start)

    def __init__(self, *, call_threads: int, call_threads_per_client: int, boot_threads: int,
                 checkpoint_threads: int) -> None:
        self.calls = FairPool(call_threads, call_threads_per_client, "cloudlet-call")
        self.boots = FairPool(boot_threads, 1, "cloudlet-boot")
        # The node's own work: no clients to take turns between. At the loop's own
        # priority: a checkpoint holds its VM's lock while it captures, and the
        # promise that a kill -9 loses at most one checkpoint interval depends on
        # checkpoints keeping pace however busy the loop is (at nice 5 beside a busy
        # loop, a 1 GiB checkpoint took 15 s instead of 1.5 s).
        self.checkpoints = FairPool(checkpoint_threads, checkpoint_threads,
                                    "cloudlet-checkpoint", nice=0)

    def shutdown(self) -> None:
        for pool in (self.calls, self.boots, self.checkpoints):
            pool.shutdown()
