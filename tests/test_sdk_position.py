"""Position reports from the SDK, on a real `cloudlet up` (embedded broker) and on a
Mosquitto configured by `cloudlet broker-config`: what reaches the placer, under
whose name, and what a client without a broker is told."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from cloudlet.errors import InvalidArgument, NoBroker
from cloudlet.protocol import ALL_POSITIONS, decode_report, position_topic, report_message
from mobile_client import CloudletClient
from tests.metro import Metro, generated_mosquitto, mqtt, running_metro
from tests.waiting import async_wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metro]:
    with running_metro(tmp_path_factory.mktemp("metro")) as running:
        yield running


async def _watch_positions(url: str, login: tuple[str, str], ready: asyncio.Event,
                           until: asyncio.Event, arrived: asyncio.Event | None = None
                           ) -> list[tuple[str, dict[str, Any] | None]]:
    """What a placer reading every client's position sees, until `until` is set
    (`arrived` is set at the first report)."""
    host, port = url.removeprefix("mqtt://").split(":")
    seen: list[tuple[str, dict[str, Any] | None]] = []
    async with aiomqtt.Client(host, int(port), identifier=f"placer-{time.time_ns()}",
                              username=login[0], password=login[1]) as c:
        await c.subscribe(ALL_POSITIONS, qos=1)
        ready.set()

        async def read() -> None:
            async for m in c.messages:
                raw = m.payload if isinstance(m.payload, bytes | bytearray) else b""
                seen.append((str(m.topic), decode_report(raw)))
                if arrived is not None:
                    arrived.set()

        reader = asyncio.get_running_loop().create_task(read())
        await until.wait()
        await asyncio.sleep(0.3)  # QoS 0 reports in flight still arrive
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    return seen


def test_reports_reach_the_placer_under_the_clients_own_topic(metro: Metro) -> None:
    """An explicit report (with velocity) and a polled source arrive as the wire
    contract says; a source that fails, answers None or nonsense is logged and
    polled again; closing the client ends the polling task."""
    answers: list[Any] = [(1.0, 2.0), None, RuntimeError("no fix"), (float("nan"), 0.0),
                          "garbage", (3.0, 4.0)]
    calls = 0

    def source() -> tuple[float, float] | None:
        nonlocal calls
        answer = answers[min(calls, len(answers) - 1)]
        calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def run() -> list[tuple[str, dict[str, Any] | None]]:
        ready, done = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(_watch_positions(
                metro.broker_url, metro.broker_login("operator"), ready, done))
            await ready.wait()
            async with CloudletClient(metro.token("alice"), broker=metro.broker_url,
                                      position_source=source,
                                      position_interval_s=0.05) as client:
                async with asyncio.timeout(10):
                    await client.discovery.connected.wait()
                assert await client.report_position(-7.5, 12, vx_m_s=1.5, vy_m_s=-0.25)
                await async_wait_until(lambda: calls >= len(answers) + 2, 10)
            assert [t for t in asyncio.all_tasks()
                    if t.get_name().startswith("cloudlet-")] == []
            polls = calls
            await asyncio.sleep(0.2)  # four polling intervals: any poll would come in them
            assert calls == polls  # nothing polls a closed client
            done.set()
        return watch.result()

    sent_at = time.time()
    seen = asyncio.run(run())
    assert {topic for topic, _ in seen} == {position_topic("alice")}
    reports = [r for _, r in seen]
    assert all(r is not None and r["client"] == "alice" and r["v"] == 2
               and sent_at - 1 <= r["ts"] <= time.time() + 1 for r in reports)
    points = [(r["x_m"], r["y_m"]) for r in reports if r is not None]
    assert (-7.5, 12.0) in points and (1.0, 2.0) in points and (3.0, 4.0) in points
    assert set(points) == {(-7.5, 12.0), (1.0, 2.0), (3.0, 4.0)}  # no NaN, no garbage
    explicit = next(r for r in reports if r is not None and r["x_m"] == -7.5)
    assert (explicit["vx_m_s"], explicit["vy_m_s"]) == (1.5, -0.25)
    polled = next(r for r in reports if r is not None and r["x_m"] == 1.0)
    assert "vx_m_s" not in polled  # velocity is the placer's to derive


def _forgery_reaches_no_one(url: str, operator: tuple[str, str], forger: tuple[str, str],
                            own: str, victim: str) -> list[str]:
    """`forger` publishes a position under its own name and under `victim`'s; the
    topics a subscriber to every position saw."""
    async def run() -> list[str]:
        async with asyncio.TaskGroup() as tg:
            subscribed = asyncio.Event()
            watch = tg.create_task(mqtt(url, login=operator, subscribe=[ALL_POSITIONS],
                                        listen_s=2.0, subscribed=subscribed))
            await subscribed.wait()
            await mqtt(url, login=forger, publish=[
                (position_topic(victim), report_message(victim, x_m=0.0, y_m=0.0,
                                                        ts=time.time()), False),
                (position_topic(own), report_message(own, x_m=1.0, y_m=1.0,
                                                     ts=time.time()), False)])
        return [topic for topic, _ in watch.result()[1]]

    return asyncio.run(run())


def test_a_client_cannot_report_another_clients_position(metro: Metro) -> None:
    seen = _forgery_reaches_no_one(metro.broker_url, metro.broker_login("operator"),
                                   ("mallory", metro.token("mallory")), "mallory", "alice")
    assert seen == [position_topic("mallory")]


def test_positions_through_a_generated_mosquitto(metro: Metro, tmp_path: Path) -> None:
    with generated_mosquitto(metro, tmp_path, clients=("dana", "erin")) as broker:
        dana_password = broker.client_passwords["dana"]
        host_port = broker.url.removeprefix("mqtt://")

        async def report() -> list[tuple[str, dict[str, Any] | None]]:
            ready, done = asyncio.Event(), asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(_watch_positions(
                    broker.url, metro.broker_login("operator"), ready, done))
                await ready.wait()
                async with CloudletClient(metro.token("dana"),
                                          broker=f"mqtt://dana:{dana_password}@{host_port}"
                                          ) as client:
                    async with asyncio.timeout(10):
                        await client.discovery.connected.wait()
                    assert await client.report_position(5, 6)
                done.set()
            return watch.result()

        seen = asyncio.run(report())
        assert [(t, r and (r["client"], r["x_m"], r["y_m"])) for t, r in seen] == [
            (position_topic("dana"), ("dana", 5.0, 6.0))]
        forged = _forgery_reaches_no_one(broker.url, metro.broker_login("operator"),
                                         ("dana", dana_password), "dana", "erin")
        assert forged == [position_topic("dana")]


def test_without_a_broker_or_with_bad_numbers_a_typed_error(metro: Metro) -> None:
    token = metro.token("alice")
    with pytest.raises(NoBroker):
        CloudletClient(token, endpoints=[metro.endpoints["downtown"]],
                       position_source=lambda: (0.0, 0.0))
    for interval in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            CloudletClient(token, broker=metro.broker_url, position_interval_s=interval)

    async def run() -> None:
        async with CloudletClient(token, endpoints=[metro.endpoints["downtown"]]) as client:
            with pytest.raises(NoBroker) as refused:
                await client.report_position(1.0, 2.0)
            assert refused.value.code == "no_broker"
        async with CloudletClient(token, broker=metro.broker_url) as client:
            bad: list[dict[str, Any]] = [
                {"x_m": float("nan"), "y_m": 0.0}, {"x_m": 0.0, "y_m": float("inf")},
                {"x_m": 0.0, "y_m": 0.0, "vx_m_s": float("-inf")},
                {"x_m": True, "y_m": 0.0}, {"x_m": "1", "y_m": 0.0}]
            for fields in bad:
                with pytest.raises(InvalidArgument):
                    await client.report_position(**fields)

    asyncio.run(run())


def test_a_position_reported_right_after_entering_is_sent(metro: Metro) -> None:
    """As the README's placer example does: report straight after `async with`, before
    the broker connection is up; the first report waits for it instead of being
    dropped (without the wait it answers False and sends nothing)."""
    async def run() -> tuple[bool, list[tuple[str, dict[str, Any] | None]]]:
        ready, done, arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(_watch_positions(
                metro.broker_url, metro.broker_login("operator"), ready, done, arrived))
            await ready.wait()
            async with CloudletClient(metro.token("early"), broker=metro.broker_url) as client:
                assert not client.discovery.connected.is_set()  # the case under test
                sent = await client.report_position(2400.0, 750.0)
                # QoS 0: what the client still had to write is lost if it closes now.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await arrived.wait()
            done.set()
        return sent, watch.result()

    sent, seen = asyncio.run(run())
    assert sent
    assert [(t, r and (r["x_m"], r["y_m"])) for t, r in seen] == [
        (position_topic("early"), (2400.0, 750.0))]


KVSTORE_WASM = Path(__file__).resolve().parent.parent / "workloads" / "kvstore.wasm"


def test_a_client_with_a_broker_opens_a_session_at_once(metro: Metro) -> None:
    """As the README's example does: enter the client and ask for a session straight
    away; the client waits for the cloudlets' presence instead of saying none is
    there (without the wait, this fails: no cloudlet is known yet)."""
    async def run() -> int:
        async with CloudletClient(metro.token("eager"), broker=metro.broker_url) as client, \
                client.session(KVSTORE_WASM) as s:
            await s.call("kv_put", 1, 5)
            result: int = await s.call("kv_get", 1)
            return result

    assert asyncio.run(run()) == 5


def test_no_cloudlet_on_the_broker_is_said_in_those_words(metro: Metro) -> None:
    """A broker with no cloudlet on it (here: one that is not there at all): the
    answer names the broker after the wait, not 'no cloudlet answered a probe'."""
    from cloudlet.errors import NoCloudletAvailable
    from tests.mqtt_brokers import free_port

    async def run() -> None:
        async with CloudletClient(metro.token("eager"),
                                  broker=f"mqtt://127.0.0.1:{free_port()}",
                                  discovery_wait_s=0.5) as client, client.session(KVSTORE_WASM):
            pass

    with pytest.raises(NoCloudletAvailable, match="no cloudlet announced itself on the broker"):
        asyncio.run(run())


def test_closing_ends_the_polling_even_if_its_cancel_is_lost(metro: Metro) -> None:
    """On Python 3.11 `asyncio.wait_for` (inside the broker client's publish) can drop
    a cancel that lands as its wait completes; the polling loop then went on, and
    `close()`, awaiting it, never returned (a suite run hung here for 300 s). A
    report that swallows its cancellation stands in for that publish."""
    reports = 0

    async def run() -> None:
        nonlocal reports
        async with CloudletClient(metro.token("alice"), broker=metro.broker_url,
                                  position_source=lambda: (1.0, 2.0),
                                  position_interval_s=0.01) as client:
            async def swallowing_report(x_m: float, y_m: float) -> bool:
                nonlocal reports
                reports += 1
                with contextlib.suppress(asyncio.CancelledError):  # the lost cancel
                    await asyncio.sleep(0.05)
                return True
            client.report_position = swallowing_report  # type: ignore[method-assign,assignment]
            await async_wait_until(lambda: reports >= 3, 10)
            async with asyncio.timeout(10):  # the old loop never ended here
                await client.close()
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("cloudlet-")] == []

    asyncio.run(run())
