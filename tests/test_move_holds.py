"""A live move stopped at an awkward moment leaves the garbage collector as it
found it, and the VM in one place.

Both ends hold the collector off on the downtime's path
(`cloudlet.migration.collections_off`): the source from the pause until its
quiet period after the commit ends, the destination over the final round and
the landing. A hold that is never released would leave a daemon without
automatic collections for good. Here two real `VMHost`s and `LiveMigrations`
in one process move a real kvstore VM over a real WebSocket (the peer proof is
skipped, as in tests/test_kept_round.py; between two real daemons:
tests/test_migration_faults.py), and each move is disturbed at one point:
the source cancelled in its quiet period (a daemon stopping then), and the
destination's landing hook failing at the commit."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cloudlet.migration import MigrationStats, collections_off
from cloudlet.protocol import Location
from edge_agent import live_migration
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.live_migration import LiveMigrations
from edge_agent.requests import Call, parse_call
from edge_agent.vm_host import HostedVM, VMHost
from tests.conftest import WORKLOADS
from tests.test_kept_round import UnprovenPeers

ALICE = Principal("alice", is_peer=False)
SOURCE = Location("west", "http://127.0.0.1:9")  # never asked: no move here is in doubt
SETTLED_S = 20.0  # what a test waits, at most, for what must happen
WHOLE_TEST_S = 60.0


@dataclass
class Pair:
    source: LiveMigrations
    destination: LiveMigrations
    url: str  # the destination's migration route
    http: aiohttp.ClientSession
    received: list[dict[str, Any]]


@asynccontextmanager
async def two_cloudlets(tmp_path: Path) -> AsyncIterator[Pair]:
    """A source and a destination host in this process; the destination takes
    migrations on a real local HTTP server."""
    async with (VMHost(NodeConfig(state_dir=str(tmp_path / "west"))) as west,
                VMHost(NodeConfig(state_dir=str(tmp_path / "east"))) as east,
                aiohttp.ClientSession() as http):
        source, destination = LiveMigrations(west), LiveMigrations(east)
        received: list[dict[str, Any]] = []

        async def migrate(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            peers: Any = UnprovenPeers(http)
            received.append(await destination.receive(ws, SOURCE, peers))
            await ws.close()
            return ws

        app = web.Application()
        app.router.add_get("/migrate", migrate)
        async with TestServer(app, host="127.0.0.1") as server:
            try:
                yield Pair(source, destination, str(server.make_url("/migrate")), http,
                           received)
            finally:
                await source.close()
                await destination.close()


async def kvstore_with_data(host: VMHost) -> HostedVM:
    image = await host.add_image(ALICE, (WORKLOADS / "kvstore.wasm").read_bytes(), None)
    hosted = await host.create(ALICE, image.digest, None)
    assert await host.call(hosted, call_of("kv_put", 7, 70)) is not None
    return hosted


def call_of(fn: str, *args: int) -> Call:
    return parse_call({"fn": fn, "args": list(args)})


async def move(pair: Pair, hosted: HostedVM, migration_id: str) -> MigrationStats:
    where = Location("east", pair.url.rsplit("/", 1)[0])
    async with pair.http.ws_connect(pair.url, max_msg_size=0) as ws:
        return await pair.source.send(hosted, where, ws, migration_id)


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(SETTLED_S):
            while not condition():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"not within {SETTLED_S} s: {what}") from None


async def the_vm_serves_at(host: VMHost, vm_id: str) -> None:
    await until(lambda: vm_id in host.vms, f"VM {vm_id} lands")
    # Bound while its source decided: `kv_put` was only ever called at the source.
    assert "kv_put" in host.vms[vm_id].vm.called
    reply = await host.call(host.vms[vm_id], call_of("kv_get", 7))
    assert reply["result"] == 70  # its state came with it


def run(body: Callable[[], Awaitable[None]]) -> None:
    assert gc.isenabled()
    try:
        # Bounded: a VM left paused (its lock held) would hang the hosts' closing.
        asyncio.run(asyncio.wait_for(body(), WHOLE_TEST_S))
    finally:
        holds = collections_off._holds  # noqa: SLF001
        while collections_off._holds:  # noqa: SLF001  (never leak into later tests)
            collections_off.release()
    assert holds == 0, f"{holds} collector holds left"
    assert gc.isenabled()


def test_a_source_stopped_in_its_quiet_period_hands_the_vm_over_and_lets_the_collector_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled after the commit, while it keeps off the CPU: the VM is the
    destination's (it serves there, with its state), the source lets it go and
    keeps its tombstone, and no hold on the collector is left behind."""
    monkeypatch.setattr(live_migration, "QUIET_AFTER_COMMIT_S", 3600.0)

    async def body() -> None:
        async with two_cloudlets(tmp_path) as pair:
            west, east = pair.source.host, pair.destination.host
            hosted = await kvstore_with_data(west)
            moving = asyncio.create_task(move(pair, hosted, "m-quiet"))
            await the_vm_serves_at(east, hosted.id)
            outgoing = pair.source._outgoing["m-quiet"]  # noqa: SLF001
            assert outgoing.state == "committed" and outgoing.holds_collections
            assert not gc.isenabled()  # the quiet period holds it
            moving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await moving
            assert hosted.id not in west.vms
            assert west.tombstones.where[hosted.id].node == "east"
            assert "m-quiet" not in pair.source._outgoing  # noqa: SLF001
            await the_vm_serves_at(east, hosted.id)
            await until(lambda: len(pair.received) == 1, "the destination's end")
            assert pair.received[0]["outcome"] == "committed"

    run(body)


def test_a_landing_hook_that_fails_at_the_commit_still_lands_the_vm_and_releases_its_hold(
        tmp_path: Path) -> None:
    """The destination's `activate` hook (hosting the VM from inside its driver, at
    the commit) fails once: the driver logs it, the VM lands the usual way once
    the driver has returned, and the hold the hook took is given back."""

    async def body() -> None:
        async with two_cloudlets(tmp_path) as pair:
            west, east = pair.source.host, pair.destination.host
            hosted = await kvstore_with_data(west)
            land_now = pair.destination._land_now  # noqa: SLF001
            failed: list[str] = []

            def failing_once(*args: Any) -> Any:
                if not failed:
                    failed.append("activate")
                    raise RuntimeError("the landing hook failed")
                return land_now(*args)

            pair.destination._land_now = failing_once  # type: ignore[method-assign]  # noqa: SLF001
            stats = await move(pair, hosted, "m-hook")
            assert stats.outcome == "committed" and failed == ["activate"]
            await the_vm_serves_at(east, hosted.id)
            await until(lambda: len(pair.received) == 1, "the destination's end")
            assert pair.received[0]["outcome"] == "committed"
            assert hosted.id not in west.vms  # (`run` checks the holds once it ends)

    run(body)
