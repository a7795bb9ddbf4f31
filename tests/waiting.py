"""Waiting for a condition, instead of sleeping for a guessed time.

A test that sleeps "long enough" for something to happen is slow on a fast
machine and flaky on a slow one. These poll the condition itself and return as
soon as it holds; the timeout is only a bound for a test that would otherwise
hang, so it is generous and says, when it expires, which condition never held.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

# Generous: a loaded CI machine may take seconds where a laptop takes milliseconds,
# and a condition that holds returns at once however long the bound is.
TIMEOUT_S = 15.0
# Between two checks: the sync predicates often make an HTTP request, the async ones
# mostly read memory.
SYNC_POLL_S = 0.05
ASYNC_POLL_S = 0.01


def wait_until(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S,
               poll_s: float = SYNC_POLL_S, *, what: str = "") -> bool:
    """True once `predicate()` holds; TimeoutError, naming it (or saying `what`), if
    it never does within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(_never(predicate, timeout_s, what))
        time.sleep(poll_s)
    return True


async def async_wait_until(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S,
                           poll_s: float = ASYNC_POLL_S, *, what: str = "") -> bool:
    """`wait_until` for a coroutine: the loop keeps running between checks."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(_never(predicate, timeout_s, what))
        await asyncio.sleep(poll_s)
    return True


def _never(predicate: Callable[[], bool], timeout_s: float, what: str) -> str:
    if what:
        return f"not within {timeout_s} s: {what}"
    code = getattr(predicate, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"not within {timeout_s} s: {getattr(predicate, '__qualname__', predicate)!r}{where}"


def live_threads() -> int:
    """Threads alive now, less the wasm engine's epoch ticker: started by the first
    VM a process makes and kept for its life, it is no session's leak (a test run
    alone starts it itself)."""
    return sum(1 for t in threading.enumerate() if t.name != "cloudlet-epoch")
