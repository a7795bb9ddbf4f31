"""Loops that reconnect to the broker end when their owner stops them: the
orchestrator (`Orchestrator.stop()`) and the SDK's discovery (leaving `async with`).

Why these exist: on Python 3.11 a cancellation can reach such a loop as an
MqttError (a TaskGroup whose child fails while being cancelled raises that
error; aiomqtt's disconnect, cut short, raises one in its place). The loop took
it for a lost broker and reconnected for ever; a daemon stuck in its shutdown
was found that way (tests/test_control_plane.py has the daemon's own case, with
real processes). The race cannot be provoked on demand, so the MQTT session is
the one stand-in here: it ends in an MqttError when cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

import edge_agent.orchestrator.runner as runner
from cloudlet.trust.certs import CertificateVerifier
from edge_agent.config import NodeConfig
from edge_agent.orchestrator.metrics import OrchestratorMetrics
from edge_agent.orchestrator.runner import Orchestrator
from mobile_client.discovery import Discovery

ENDED_WITHIN_S = 5.0


def outcome_of(main: Coroutine[Any, Any, str]) -> str:
    """Run `main` on a loop of its own, closed without waiting for what is left: a
    task that ignores its cancellation would make asyncio.run's clean-up hang."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


async def ended(task: asyncio.Task[Any]) -> str:
    done, _ = await asyncio.wait({task}, timeout=ENDED_WITHIN_S)
    if not done:
        return "still running after the cancel"
    return "ended" if task.cancelled() or task.exception() is None \
        else f"ended with {task.exception()!r}"


# --- the orchestrator ----------------------------------------------------------------------


class SessionEndsInAnError(Orchestrator):
    """Its MQTT session ends in an MqttError when cancelled, or when `lost` is set
    (the broker went away)."""

    sessions = 0
    lost: asyncio.Event

    async def _session(self, host: str, port: int, tls: bool) -> None:
        type(self).sessions += 1
        self.connected.set()
        try:
            await self.lost.wait()
        except asyncio.CancelledError:
            raise aiomqtt.MqttError("Operation timed out") from None
        self.lost.clear()
        raise aiomqtt.MqttError("Disconnected during message iteration")


def stand_in_orchestrator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> SessionEndsInAnError:
    # The placer's warm-up compiles numba code (seconds with an empty cache): not
    # what is tested here.
    monkeypatch.setattr(runner, "warm_up", lambda policy: None)
    monkeypatch.setattr(runner, "cache_in", lambda *args: None)
    monkeypatch.setattr(runner, "BACKOFF_START_S", 0.01)
    SessionEndsInAnError.sessions = 0
    # Only what `run` itself reads: the rest of an orchestrator is not involved.
    orchestrator = SessionEndsInAnError.__new__(SessionEndsInAnError)
    orchestrator.config = NodeConfig(broker_url="mqtt://127.0.0.1:1", state_dir=str(tmp_path))
    orchestrator.policy = None  # type: ignore[assignment]
    orchestrator.metrics = OrchestratorMetrics()
    orchestrator.connected = asyncio.Event()
    orchestrator.lost = asyncio.Event()
    orchestrator._client = None  # noqa: SLF001
    orchestrator._stopping = False  # noqa: SLF001
    return orchestrator


async def connected_again(orchestrator: SessionEndsInAnError, sessions: int) -> bool:
    async with asyncio.timeout(ENDED_WITHIN_S):
        while SessionEndsInAnError.sessions <= sessions or not orchestrator.connected.is_set():
            await asyncio.sleep(0.01)
    return True


def test_a_stopped_orchestrator_ends_even_if_its_session_ends_in_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orchestrator = stand_in_orchestrator(tmp_path, monkeypatch)

    async def main() -> str:
        task = asyncio.create_task(orchestrator.run())
        await asyncio.wait_for(orchestrator.connected.wait(), ENDED_WITHIN_S)
        orchestrator.lost.set()  # a lost broker first: it reconnects
        await connected_again(orchestrator, 1)
        orchestrator.stop()  # as the daemon and `cloudlet orchestrator` do
        task.cancel()
        return await ended(task)

    assert outcome_of(main()) == "ended"
    assert SessionEndsInAnError.sessions == 2


def test_an_orchestrator_run_again_after_a_stop_reconnects_after_a_lost_broker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop is for the run it ended: a later `run` reconnects as before."""
    orchestrator = stand_in_orchestrator(tmp_path, monkeypatch)

    async def main() -> str:
        first = asyncio.create_task(orchestrator.run())
        await asyncio.wait_for(orchestrator.connected.wait(), ENDED_WITHIN_S)
        orchestrator.stop()
        first.cancel()
        if (result := await ended(first)) != "ended":
            return f"the first run {result}"
        second = asyncio.create_task(orchestrator.run())
        await connected_again(orchestrator, 1)
        orchestrator.lost.set()
        try:
            await connected_again(orchestrator, 2)
        except TimeoutError:
            return "the second run did not reconnect after a lost broker" + (
                " (it ended: the first run's stop stuck)" if second.done() else "")
        orchestrator.stop()
        second.cancel()
        return f"the second run {await ended(second)}"

    assert outcome_of(main()) == "the second run ended"


# --- the SDK's discovery -----------------------------------------------------------------


class StandInClient:
    """aiomqtt.Client as discovery uses it: connects (or fails to, `refusals` times),
    subscribes, and waits for messages; cancelled, it ends in an MqttError."""

    opened = 0
    refusals = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def __aenter__(self) -> StandInClient:
        if type(self).refusals:
            type(self).refusals -= 1
            raise aiomqtt.MqttError("Connection refused")
        type(self).opened += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None

    @property
    def messages(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise aiomqtt.MqttError("Operation timed out") from None
        yield None  # pragma: no cover - never reached


def stand_in_discovery(monkeypatch: pytest.MonkeyPatch) -> Discovery:
    monkeypatch.setattr(aiomqtt, "Client", StandInClient)
    StandInClient.opened = StandInClient.refusals = 0
    return Discovery(broker="mqtt://127.0.0.1:1", verifier=CertificateVerifier(bytes(32)),
                     password="pw")


async def leave(discovery: Discovery) -> str:
    """Leave `async with discovery`, bounded: a loop that reconnects instead of ending
    would hold the exit for ever."""
    leaving = asyncio.create_task(discovery.__aexit__(None, None, None))
    done, _ = await asyncio.wait({leaving}, timeout=ENDED_WITHIN_S)
    return "left" if done else "leaving did not end: the loop reconnected"


def test_discovery_left_ends_even_if_its_session_ends_in_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    discovery = stand_in_discovery(monkeypatch)

    async def main() -> str:
        await discovery.__aenter__()
        await asyncio.wait_for(discovery.connected.wait(), ENDED_WITHIN_S)
        task = discovery._task  # noqa: SLF001
        assert task is not None
        if (left := await leave(discovery)) != "left":
            return left
        return await ended(task)

    assert outcome_of(main()) == "ended"
    assert StandInClient.opened == 1


def test_discovery_entered_again_retries_a_broker_it_cannot_reach(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving stops the loop of that entry only: entered again, discovery retries a
    refused connection as it always did."""
    discovery = stand_in_discovery(monkeypatch)

    async def main() -> str:
        await discovery.__aenter__()
        await asyncio.wait_for(discovery.connected.wait(), ENDED_WITHIN_S)
        if (left := await leave(discovery)) != "left":
            return left
        StandInClient.refusals = 1
        await discovery.__aenter__()
        try:
            await asyncio.wait_for(discovery.connected.wait(), ENDED_WITHIN_S)
        except TimeoutError:
            return "did not reconnect after one refusal"
        return "reconnected" if await leave(discovery) == "left" else "did not leave"

    assert outcome_of(main()) == "reconnected"
    assert StandInClient.opened == 2
