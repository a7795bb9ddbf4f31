"""Owned tasks: held until they end, and a failure is logged, not lost."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cloudlet.tasks import own


def test_an_owned_task_is_held_until_it_ends_and_its_failure_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the disk caught fire")

    async def fine() -> int:
        return 7

    async def run() -> set[asyncio.Task[Any]]:
        tasks: set[asyncio.Task[Any]] = set()
        a = own(tasks, fail(), "the failing step")
        b = own(tasks, fine(), "the fine step")
        assert tasks == {a, b}
        await asyncio.gather(a, b, return_exceptions=True)
        await asyncio.sleep(0)
        return tasks

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(run()) == set()
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["the failing step failed: RuntimeError('the disk caught fire')"]
