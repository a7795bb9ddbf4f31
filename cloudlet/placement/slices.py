"""Run a compiled per-row loop on slices of its rows, one slice per core.

The placer's heaviest loops (the nearest cloudlet along each path, the backhaul's
pair lookups, predictive's value) treat each session on its own and release the
GIL (kernels.py compiles them with nogil), so slices of their rows can run in
threads at once: on two cores a 100,000-session round spends about half as long in
them. Slices are contiguous and results are concatenated in order, so the answers
are the same as one call's.

numba's own parallel loops are not used: its default threading layer aborts the
process when two threads enter parallel code at once, which a daemon's placer
thread and a simulation running beside it could do.

`CLOUDLET_PLACER_THREADS` sets the number of threads (1: no threads); by default
the cores this process may run on, at most four. A forked child starts its own
pool (the parent's threads do not survive a fork).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

# Below this many rows a loop runs in one call: a thread's hand-off costs ~50 us.
MIN_ROWS_PER_THREAD = 8192
MAX_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def threads() -> int:
    """How many threads a loop may use: `CLOUDLET_PLACER_THREADS`, or the cores. A
    value that is not a whole number >= 1 is logged and ignored: a placement round
    must not fail on it (an orchestrator would stop deciding)."""
    raw = os.environ.get("CLOUDLET_PLACER_THREADS")
    if raw is not None:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n >= 1:
            return min(n, MAX_THREADS)
        _warn_once(raw)
    return threads_default()


def threads_default() -> int:
    """The cores this process may run on, at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


_warned: set[str] = set()


def _warn_once(raw: str) -> None:
    if raw not in _warned:
        _warned.add(raw)
        log.warning("CLOUDLET_PLACER_THREADS=%r is not a whole number >= 1: using %d "
                    "threads", raw, threads_default())


def _executor(workers: int) -> ThreadPoolExecutor:
    """One pool for the process, grown when more threads are asked for."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool = ThreadPoolExecutor(max_workers=workers,
                                       thread_name_prefix="cloudlet-placer")
            _pool_size = workers
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's pool has no threads here, and a task submitted
    to it would wait forever. The child starts its own."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


Slice = Callable[[int, int], Sequence[NDArray[Any]]]


def by_rows(rows: int, run: Slice) -> list[NDArray[Any]]:
    """`run(lo, hi)` on consecutive slices of `rows` (several threads when there are
    enough rows), each result array concatenated along its first axis."""
    n = rows // MIN_ROWS_PER_THREAD
    if n > 1:
        n = min(n, threads())
    if n <= 1:
        return list(run(0, rows))
    bounds = [rows * k // n for k in range(n + 1)]
    pool = _executor(n - 1)
    futures = [pool.submit(run, bounds[k], bounds[k + 1]) for k in range(1, n)]
    first = run(bounds[0], bounds[1])
    parts = [first] + [f.result() for f in futures]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(first))]
