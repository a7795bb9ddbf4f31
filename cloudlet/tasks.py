"""Tasks with an owner, whose failures are seen.

A task created and forgotten loses its exception (asyncio says so only when it
is garbage-collected, if ever). Every background task here belongs to a set its
owner cancels and awaits on close, and one that fails is logged when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


def own(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], what: str,
        logger: logging.Logger = log) -> asyncio.Task[Any]:
    """Start `coro` as a task held in `tasks` until it ends; a failure is logged as
    `what` failed."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logger.warning("%s failed: %r", what, t.exception())

    task.add_done_callback(done)
    return task


def report(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """One line for a failure that is handled by carrying on (not re-raised)."""
    logger.warning("%s failed: %r", what, exc)
