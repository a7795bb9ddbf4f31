"""FairPool: clients take turns on worker threads, and none holds more than its share."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from edge_agent.workers import FairPool
from tests.waiting import async_wait_until

WAIT_S = 10.0  # a job that does not start or end in this long is a hang


class Jobs:
    """Jobs that run until released, noting the order they started in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def job(self, name: str) -> Callable[[], str]:
        gate = self.gates[name] = threading.Event()

        def run() -> str:
            with self.lock:
                self.started.append(name)
            assert gate.wait(WAIT_S), f"{name} was never released"
            return name
        return run

    async def until_started(self, *names: str) -> None:
        await async_wait_until(lambda: set(names) <= set(self.started), WAIT_S)

    def release(self, name: str) -> None:
        self.gates[name].set()


def test_a_client_holds_at_most_its_share_and_waiting_clients_take_turns() -> None:
    async def main() -> list[str]:
        pool, jobs = FairPool(1, 1, "t"), Jobs()
        try:
            tasks = {}
            for i, name in enumerate(("a1", "a2", "a3", "b1", "c1")):  # a1 runs; the rest
                tasks[name] = asyncio.create_task(pool.run(name[0], jobs.job(name)))  # wait,
                # in order: each is queued before the next comes.
                await async_wait_until(lambda i=i: bool(jobs.started) and pool.waiting() == i,
                                       WAIT_S)
            for name in ("a1", "a2", "b1", "c1", "a3"):
                await jobs.until_started(name)
                jobs.release(name)
                assert await tasks[name] == name
            return jobs.started
        finally:
            pool.shutdown()

    # a's second job had the first turn; its third waited for b's and c's turns.
    assert asyncio.run(main()) == ["a1", "a2", "b1", "c1", "a3"]


def test_another_client_gets_a_free_thread_at_once() -> None:
    async def main() -> None:
        pool, jobs = FairPool(2, 1, "t"), Jobs()
        try:
            a = [asyncio.create_task(pool.run("a", jobs.job(f"a{i}"))) for i in range(2)]
            await jobs.until_started("a0")
            b = asyncio.create_task(pool.run("b", jobs.job("b0")))
            await jobs.until_started("b0")  # while a0 runs and a1 waits for a's turn
            assert jobs.started == ["a0", "b0"] and pool.waiting() == 1
            for name in ("b0", "a0", "a1"):
                jobs.release(name)
            await asyncio.gather(b, *a)
        finally:
            pool.shutdown()

    asyncio.run(main())


def test_cancelled_jobs_give_their_place_back() -> None:
    async def main() -> tuple[list[str], list[str]]:
        pool, jobs = FairPool(1, 1, "t"), Jobs()
        orphans: list[str] = []
        try:
            running = asyncio.create_task(pool.run("a", jobs.job("a0"),
                                                   on_orphan=orphans.append))
            await jobs.until_started("a0")
            waiting = asyncio.create_task(pool.run("b", jobs.job("b0")))
            await async_wait_until(lambda: pool.waiting() == 1, WAIT_S)
            waiting.cancel()  # never started: its place goes
            running.cancel()  # started: the cancellation waits for the job to end
            await asyncio.sleep(0.05)  # the time a wrong cancellation would take to end it
            assert not running.done()
            jobs.release("a0")
            for task in (waiting, running):
                with pytest.raises(asyncio.CancelledError):
                    await task
            after = asyncio.create_task(pool.run("c", jobs.job("c0")))
            await jobs.until_started("c0")
            jobs.release("c0")
            await after
            return jobs.started, orphans
        finally:
            pool.shutdown()

    started, orphans = asyncio.run(main())
    assert started == ["a0", "c0"]
    assert orphans == ["a0"]  # the result nobody received was handed on (a VM closed)


def test_a_failing_job_frees_its_thread() -> None:
    def boom() -> None:
        raise ValueError("boom")

    async def main() -> str:
        pool = FairPool(1, 1, "t")
        try:
            with pytest.raises(ValueError):
                await pool.run("a", boom)
            return await pool.run("a", lambda: "next")
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == "next"
