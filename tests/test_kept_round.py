"""A destination that lost its copy of the final round fetches the one its source
kept with the decision: over a real HTTP connection, whole whatever its size, and
only if it is this VM's round after the last one on disk.

The source here is a bare aiohttp server answering the route, and the peer's
proof of identity (a challenge the real `PeerClient` makes) is skipped: what is
tested is the fetch's reading and checking. The whole path, proof included,
between two real daemons: tests/test_migration_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cloudlet.protocol import Location
from cloudlet.vm import VM, Image, Snapshot, VMLimits
from edge_agent.live_migration import Incoming, kept_round_onto


class UnprovenPeers:
    """`PeerClient`'s surface for a source whose identity is taken as proven."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def prove(self, where: Location, node: str | None) -> Location:
        return where

    def headers(self, node: str) -> dict[str, str]:
        return {}


class Owner:
    def __init__(self, incoming_dir: Path) -> None:
        self.incoming_dir = incoming_dir


def last_and_final(image: Image, dirty_pages: int) -> tuple[Snapshot, Snapshot]:
    vm = VM.create(image, VMLimits(memory_bytes=64 << 20), vm_id="vm1")
    vm.call("hog_grow", 16)
    last = vm.snapshot()  # the last round the destination has on disk
    vm.call("hog_dirty", dirty_pages, 7)
    final = replace(vm.snapshot(delta=True), annex={"replies": {}})  # as the source keeps it
    vm.close()
    return last, final


@asynccontextmanager
async def source_answering(handler: Callable[[web.Request], Any],
                           tmp_path: Path) -> AsyncIterator[Incoming]:
    app = web.Application()
    app.router.add_get("/v1/peer/migrations/m1/final", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        yield Incoming(Owner(tmp_path / "incoming"),  # type: ignore[arg-type]
                       Location("east", f"http://127.0.0.1:{server.port}"),
                       UnprovenPeers(http), migration_id="m1")  # type: ignore[arg-type]


@pytest.mark.parametrize("dirty_pages", [16, 128, 1024])  # 64 KiB, 512 KiB, 4 MiB
def test_a_kept_round_is_fetched_whole_whatever_its_size(
        workload: dict[str, Image], tmp_path: Path, dirty_pages: int) -> None:
    last, final = last_and_final(workload["memhog"], dirty_pages)
    body = final.to_bytes("none")

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    async def run() -> Snapshot | None:
        async with source_answering(handler, tmp_path) as incoming:
            return await incoming.fetch_final(last)

    got = asyncio.run(run())
    assert got is not None and got.base_id == last.snapshot_id
    assert got.to_bytes("none") == replace(final, base_id=last.snapshot_id).to_bytes("none")
    vm = VM.restore(workload["memhog"], last, got)
    assert vm.seq == final.seq


@pytest.mark.parametrize("answer", ["not found", "forbidden", "too large", "another owner"])
def test_a_kept_round_that_is_missing_refused_or_wrong_is_not_taken(
        workload: dict[str, Image], tmp_path: Path, answer: str) -> None:
    """Each ends the fetch with nothing (the rounds stay for a human): no endless
    retry of a permanent answer, nothing of another VM taken for this one."""
    last, final = last_and_final(workload["memhog"], 16)

    async def handler(_: web.Request) -> web.Response:
        if answer == "not found":
            return web.json_response({"code": "kept_round_not_found"}, status=404)
        if answer == "forbidden":
            return web.json_response({"code": "forbidden"}, status=403)
        if answer == "too large":  # past the VM's memory and the annex's allowance
            return web.Response(body=bytes(last.memory_bytes + (65 << 20)))
        return web.Response(body=replace(final, owner="mallory").to_bytes("none"))

    async def run() -> Snapshot | None:
        async with source_answering(handler, tmp_path) as incoming:
            return await asyncio.wait_for(incoming.fetch_final(last), 30)

    assert asyncio.run(run()) is None


def test_only_a_round_that_follows_the_last_one_here_is_taken(
        workload: dict[str, Image]) -> None:
    last, final = last_and_final(workload["memhog"], 4)
    assert kept_round_onto(last, final).base_id == last.snapshot_id
    for wrong in (replace(final, owner="mallory"), replace(final, vm_id="vm2"),
                  replace(final, limits=VMLimits(memory_bytes=1 << 20)),
                  replace(final, seq=last.seq - 1), replace(final, annex={}),
                  replace(last, annex={"a": 1})):
        with pytest.raises(Exception, match="round"):
            kept_round_onto(last, wrong)
