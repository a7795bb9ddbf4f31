"""`connect_via`: the SDK dials a cloudlet through another address (a shaped link,
a port forward) while everything logical stays on the cloudlet's real endpoint.
Real daemons behind real `LinkProxy`s; the delay a proxy adds shows the path the
calls took."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.errors import InvalidArgument, NoCloudletAvailable
from cloudlet.linkproxy import LinkProxy, LinkShape
from mobile_client import CloudletClient, Session
from tests.daemons import Daemon, make_daemon
from tests.test_sdk import KVSTORE, kv_op, twin_checksum
from tests.waiting import async_wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture
def two_daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a = make_daemon(tmp_path, "east").start()
    b = make_daemon(tmp_path, "west").start()
    yield a, b
    a.stop()
    b.stop()


def delayed(d: Daemon, one_way_ms: float) -> LinkProxy:
    return LinkProxy("127.0.0.1", d.port, up=LinkShape(None, one_way_ms),
                     down=LinkShape(None, one_way_ms))


async def fastest_call_ms(s: Session, count: int = 5) -> float:
    """The quickest of a few calls' round trips (the least disturbed one); they put
    key i = i for i < count."""
    loop = asyncio.get_running_loop()
    best = float("inf")
    for i in range(count):
        started = loop.time()
        await s.call("kv_put", i, i)
        best = min(best, (loop.time() - started) * 1000)
    return best


def test_calls_take_the_mapped_link(two_daemons: tuple[Daemon, Daemon]) -> None:
    """Behind a link of 10 ms each way a call takes >= 20 ms, and well under that
    without; the session's location, the probes' results and the proof all stay
    on the real endpoint."""
    east, _ = two_daemons
    token = east.token("via")

    async def run() -> tuple[float, float, float]:
        async with delayed(east, 10) as proxy:
            asked: list[str] = []

            def via(endpoint: str) -> str:
                asked.append(endpoint)
                return f"http://127.0.0.1:{proxy.port}/" if endpoint == east.endpoint \
                    else endpoint

            async with CloudletClient(token, endpoints=[east.endpoint],
                                      connect_via=via) as client:
                async with client.session(KVSTORE) as s:
                    assert s.location.endpoint == east.endpoint
                    through = await fastest_call_ms(s)
                rtts = await client.prober.rtts(force=True)
                probed = rtts["east"]
                assert client.http.proven(s.location) is not None  # kept by real endpoint
            assert set(asked) == {east.endpoint}
        async with CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE) as s:
            direct = await fastest_call_ms(s)
        return through, probed, direct

    through, probed, direct = asyncio.run(run())
    assert through >= 20 and probed >= 20, (through, probed)
    assert direct < 10, direct


def test_a_session_follows_its_vm_between_mapped_cloudlets(
        two_daemons: tuple[Daemon, Daemon]) -> None:
    """Both cloudlets are reached through their own proxies (east 3 ms, west 10 ms
    each way). The VM moves east -> west under a stream of calls: the session
    follows the `moved` notice's real endpoint, dials west's proxy, and the final
    state is that of a run with no move."""
    east, west = two_daemons
    token = east.token("mover")
    rng = random.Random(11)
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def run() -> None:
        async with delayed(east, 3) as east_proxy, delayed(west, 10) as west_proxy:
            routes = {east.endpoint: f"http://127.0.0.1:{east_proxy.port}",
                      west.endpoint: f"http://127.0.0.1:{west_proxy.port}"}
            asked: list[str] = []

            def via(endpoint: str) -> str:
                asked.append(endpoint)
                return routes[endpoint]  # a KeyError here would fail the test loudly

            async with CloudletClient(token, endpoints=[east.endpoint],
                                      connect_via=via) as client, \
                    client.session(KVSTORE) as s:
                assert await fastest_call_ms(s, 3) >= 6
                done = asyncio.Event()

                async def caller() -> None:
                    while not done.is_set():
                        op = kv_op(len(calls), rng)
                        calls.append(op)
                        await s.call(op[0], *op[1])

                async def mover() -> None:
                    await async_wait_until(lambda: len(calls) >= 10)  # calls under way
                    status, body = await asyncio.to_thread(
                        east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                        {"endpoint": west.endpoint}, token=east.operator_token())
                    assert status == 200 and body["to"] == "west", body
                    moved_at = len(calls)
                    await async_wait_until(lambda: len(calls) >= moved_at + 10)  # and after
                    done.set()

                await asyncio.gather(caller(), caller(), mover())
                assert s.stats().moves_followed >= 1
                assert s.location.endpoint == west.endpoint  # the real one, not the proxy's
                assert await fastest_call_ms(s, 3) >= 20  # through west's link
                probes: list[tuple[str, tuple[int, ...]]] = [("kv_put", (i, i))
                                                             for i in range(3)]
                assert (await s.call("kv_checksum"), await s.call("kv_count")) == \
                    twin_checksum(probes + calls + probes)
            assert {east.endpoint, west.endpoint} <= set(asked)

    asyncio.run(run())


def test_a_broken_mapping_is_a_typed_error(two_daemons: tuple[Daemon, Daemon]) -> None:
    east, _ = two_daemons

    def broken(endpoint: str) -> str:
        raise LookupError(endpoint)

    async def run() -> None:
        for via in (broken, lambda endpoint: "ftp://elsewhere"):
            async with CloudletClient(east.token("via"), endpoints=[east.endpoint],
                                      connect_via=via) as client:
                with pytest.raises(InvalidArgument):
                    await client.http.request("GET", client.discovery.candidates()[0].location,
                                              "/health", authenticated=False)
                with pytest.raises(NoCloudletAvailable):  # the cloudlet is unreachable
                    async with client.session(KVSTORE):
                        pass

    asyncio.run(run())
