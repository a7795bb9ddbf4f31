"""Call deadlines of one session share one timer: each call still ends at its own.

The session arms a single timer for the earliest deadline among its waiting calls
(not one per call). These tests hold answers back at a real proxy in front of a
real daemon and check that a short deadline behind a long one still fires on
time, that the long one is neither cut short nor lost, and that the timer is
armed again once the session had nothing waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlet.errors import CallTimeout
from mobile_client import CloudletClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, make_daemon
from tests.test_sdk_faults import FaultProxy

KVSTORE = WORKLOADS / "kvstore.wasm"


@contextlib.asynccontextmanager
async def _session_behind_a_proxy(daemon: Daemon, user: str
                                  ) -> AsyncIterator[tuple[FaultProxy, Any]]:
    """A kvstore session of `user`'s whose stream passes a proxy that can hold or
    cut the daemon's answers."""
    async with FaultProxy(daemon.port) as link, \
            CloudletClient(daemon.token(user), endpoints=[link.endpoint]) as client, \
            client.session(KVSTORE) as s:
        yield link, s


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path, "deadlines").start()
    yield d
    d.stop()


def test_a_short_deadline_behind_a_long_one_fires_on_time(daemon: Daemon) -> None:
    async def run() -> None:
        async with _session_behind_a_proxy(daemon, "dora") as (link, s):
            assert await s.call("kv_put", 1, 1) == 1
            link.hold = True
            long_call = asyncio.ensure_future(s.call("kv_put", 1, 2, deadline_ms=5000))
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            with pytest.raises(CallTimeout):
                await s.call("kv_put", 2, 2, deadline_ms=300)
            waited_s = time.perf_counter() - started
            assert 0.29 <= waited_s < 2.0, waited_s
            assert not long_call.done()  # its own deadline is far: it still waits
            link.cut()  # the held answers are dropped: the reconnect resends both calls
            link.hold = False
            await long_call  # answered, not timed out
            assert await s.call("kv_get", 1) == 2
            # Nothing waited for a while: the timer is armed afresh for the next call.
            link.hold = True
            started = time.perf_counter()
            with pytest.raises(CallTimeout):
                await s.call("kv_get", 1, deadline_ms=200)
            assert 0.19 <= time.perf_counter() - started < 2.0
            link.cut()
            link.hold = False
            assert await s.call("kv_get", 2) == 2

    asyncio.run(run())


def test_a_long_deadline_is_not_cut_short_by_a_shorter_one(daemon: Daemon) -> None:
    async def run() -> None:
        async with _session_behind_a_proxy(daemon, "ed") as (link, s):
            assert await s.call("kv_put", 1, 1) == 1
            link.hold = True
            started = time.perf_counter()
            short = asyncio.ensure_future(s.call("kv_put", 1, 2, deadline_ms=200))
            long = asyncio.ensure_future(s.call("kv_put", 1, 3, deadline_ms=900))
            with pytest.raises(CallTimeout):
                await short
            assert not long.done()
            with pytest.raises(CallTimeout):
                await long
            assert 0.89 <= time.perf_counter() - started < 3.0
            link.cut()
            link.hold = False
            assert await s.call("kv_get", 1) == 3  # both applied, once each, in order

    asyncio.run(run())


def test_a_caller_reading_its_own_answer_still_ends_at_its_deadline(daemon: Daemon) -> None:
    """Back to back, a call reads the stream itself (no hand-over from the session's
    task): its deadline still ends it on time, cancels nothing around it, and the
    session reads on for the next call."""
    async def run() -> None:
        async with _session_behind_a_proxy(daemon, "fay") as (link, s):
            async with asyncio.timeout(20):
                assert await s.call("kv_put", 1, 1) == 1
                link.hold = True
                started = time.perf_counter()
                with pytest.raises(CallTimeout):
                    await s.call("kv_put", 1, 2, deadline_ms=300)
                assert 0.29 <= time.perf_counter() - started < 2.0
                task = asyncio.current_task()
                assert task is not None and task.cancelling() == 0
                link.cut()
                link.hold = False
                assert await s.call("kv_get", 1) == 2  # it applied, once
                assert await s.call("kv_get", 1) == 2

    asyncio.run(run())


def test_a_cancelled_caller_that_was_reading_leaves_the_session_working(
        daemon: Daemon) -> None:
    async def run() -> None:
        async with _session_behind_a_proxy(daemon, "gus") as (link, s):
            assert await s.call("kv_put", 1, 1) == 1

            async def two_calls() -> Any:
                await s.call("kv_get", 1)
                link.hold = True
                return await s.call("kv_put", 1, 5)  # reads its own answer: held

            pending = asyncio.ensure_future(two_calls())
            await asyncio.sleep(0.3)
            assert not pending.done()
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            link.cut()
            link.hold = False
            assert await s.call("kv_get", 1) == 5  # the cancelled call applied, once
            assert s.pending == ()

    asyncio.run(run())
