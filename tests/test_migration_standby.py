"""The standby stream of a live migration, broken between the pre-connect and the commit.

When a live migration starts, the source tells the VM's streams where it is
`moving`; the SDK opens a standby stream there, which the destination holds
until the VM lands, and at the commit the session switches onto it. Each case
here runs real `cloudlet agent` processes and a real SDK session calling the VM
throughout, and breaks something after the session stood by: the destination
SIGKILLed, the migration aborted with the destination alive, a forged `moving`
injected on the path naming an outsider or an unreachable place, an attacker
opening streams for VMs that are not arriving (or too many for one that is).
Then: the VM lives on exactly one cloudlet, the session never saw an error, and
every call the application made was applied exactly once (the VM's sequence
number is the session's last, its state is a twin's that applied each call once).

`HoldAfterAccept` stands between the source and the destination: once the
destination's `accept` went back, it holds the destination's further messages
(its acks), so pre-copy stalls with the VM serving at the source and its
session standing by, for as long as a case needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from cloudlet.vm import VM, ImageStore, VMLimits
from edge_agent.app import NOT_ARRIVING_CLOSE_CODE
from edge_agent.arrivals import MAX_HELD_PER_VM
from mobile_client import CloudletClient, Session
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, daemon_pair, free_port
from tests.migration_proxy import FrameReader
from tests.tcp_proxy import LoopbackProxy, reset, until_either_ends
from tests.waiting import async_wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KVSTORE = WORKLOADS / "kvstore.wasm"
# A stalled pre-copy must outlast each case's steps; checkpoints come often so a
# restart loses little.
SETTINGS: dict[str, Any] = {"migration_deadline_s": 30.0, "checkpoint_interval_s": 0.3}
WS_HANDSHAKE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Accept": "application/json"}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    yield from daemon_pair(tmp_path, **SETTINGS)


# --- on the path --------------------------------------------------------------------------


class HoldAfterAccept(LoopbackProxy):
    """Relays to the destination. On a migration connection, once the destination's
    `accept` has gone back, holds what it says next until `release()`; other
    connections (the clients' standby streams) pass freely. With `hold_commit`, it
    holds the source's `commit` instead (the move is decided, the destination does
    not know yet)."""

    def __init__(self, upstream_port: int, *, hold_commit: bool = False) -> None:
        super().__init__(upstream_port)
        self.hold_commit = hold_commit
        self.commit_held = asyncio.Event()
        self.accepted = asyncio.Event()
        self._released = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._migrations: set[asyncio.StreamWriter] = set()

    def release(self) -> None:
        self._released.set()

    def reset_all(self) -> None:
        for w in list(self._writers):
            reset(w)
        self._writers.clear()

    def reset_migrations(self) -> None:
        """Both ends of every migration connection see it die (the destination lives)."""
        for w in list(self._migrations):
            reset(w)

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        self._writers |= {writer, up_writer}
        link = {"migration": False}

        async def forth() -> None:
            frames = FrameReader(masked=True)
            while data := await reader.read(65536):
                if b"GET /v1/peer/migrate" in data:
                    link["migration"] = True
                    self._migrations |= {writer, up_writer}
                if link["migration"] and self.hold_commit and "commit" in frames.feed(data):
                    self.commit_held.set()
                    await self._released.wait()
                up_writer.write(data)
                await up_writer.drain()

        async def back() -> None:
            # Held messages wait in `out` while the destination is still read: if it
            # dies meanwhile, the source sees its connection end (as it would with no
            # proxy between) instead of waiting out its migration deadline.
            frames = FrameReader(masked=False)
            out: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue()
            holding = {"count": 0}  # held messages not yet delivered

            async def deliver() -> None:
                while (item := await out.get()) is not None:
                    data, held = item
                    if held:
                        await self._released.wait()
                        holding["count"] -= 1
                    writer.write(data)
                    await writer.drain()

            delivering = asyncio.ensure_future(deliver())
            try:
                while data := await up_reader.read(65536):
                    types = frames.feed(data)
                    held = link["migration"] and self.accepted.is_set() and not self.hold_commit
                    holding["count"] += held
                    out.put_nowait((data, held))
                    if link["migration"] and "accept" in types:
                        self.accepted.set()
                if holding["count"] == 0 or self._released.is_set():
                    out.put_nowait(None)  # the destination closed: pass on what it said
                    await delivering
            finally:
                delivering.cancel()

        with contextlib.suppress(ConnectionError, OSError):
            await until_either_ends(forth(), back())


class Injector(LoopbackProxy):
    """An attacker on the client's path to its cloudlet (plain HTTP): right after the
    cloudlet accepts a stream, it slips a forged frame to the client."""

    def __init__(self, upstream_port: int, forged: bytes) -> None:
        super().__init__(upstream_port)
        self.forged = forged
        self.injected = 0
        self._writers: set[asyncio.StreamWriter] = set()

    def reset_all(self) -> None:
        for w in list(self._writers):
            reset(w)
        self._writers.clear()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        self._writers |= {writer, up_writer}

        async def forth() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def back() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                if data.startswith(b"HTTP/1.1 101") and data.endswith(b"\r\n\r\n"):
                    # An unmasked binary frame, as a server sends it.
                    writer.write(bytes([0x82, len(self.forged)]) + self.forged)
                    self.injected += 1
                await writer.drain()

        with contextlib.suppress(ConnectionError, OSError):
            await until_either_ends(forth(), back())


class Outsider:
    """A server that is no cloudlet of the cluster: it records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Outsider:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append((request.path, request.headers.get("Authorization")))
            return web.json_response({"status": "ok", "node": "west"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# --- the client ---------------------------------------------------------------------------


class Caller:
    """Calls the VM in a loop (kv_put and kv_del), recording every call made."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Caller:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            if exc[0] is not None:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            key = k % 13
            op = ("kv_del", (key,)) if k % 5 == 4 else ("kv_put", (key, k * 31 + key))
            self.calls.append(op)
            await self.session.call(op[0], *op[1])  # any error fails the case
            k += 1
            await asyncio.sleep(0.002)

    async def more(self, n: int = 20) -> None:
        """Wait until `n` more calls were answered (the VM serves wherever it is)."""
        if self._task is not None and self._task.done():
            await self._task
        target = len(self.calls) + n
        await async_wait_until(lambda: len(self.calls) >= target, 20,
                               what=f"{n} more calls answered")


def twin_state(calls: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    vm = VM.create(ImageStore(None).add_file(KVSTORE), VMLimits(memory_bytes=64 << 20))
    for fn, args in calls:
        vm.call(fn, *args)
    return vm.call("kv_checksum"), vm.call("kv_count")


def homes(daemons: list[Daemon], token: str, vm_id: str) -> list[str]:
    found = []
    for d in daemons:
        with contextlib.suppress(OSError):
            status, _ = d.request("GET", f"/v1/vms/{vm_id}", token=token, timeout_s=2)
            if status == 200:
                found.append(d.name)
    return found


async def check_exactly_once(s: Session, calls: list[tuple[str, tuple[int, ...]]],
                             home: Daemon, token: str) -> None:
    checksum, count = await s.call("kv_checksum"), await s.call("kv_count")
    assert (checksum, count) == twin_state(calls)
    status, info = await asyncio.to_thread(home.request, "GET", f"/v1/vms/{s.vm_id}",
                                           token=token)
    assert status == 200 and info["seq"] == s.seq, info


async def migrate(src: Daemon, vm_id: str, endpoint: str) -> tuple[int, Any]:
    status, body = await asyncio.to_thread(
        src.request, "POST", f"/v1/vms/{vm_id}/migrate", {"endpoint": endpoint},
        token=src.operator_token(), timeout_s=60)
    return status, body


async def stream_refusal(d: Daemon, vm_id: str, token: str) -> tuple[int, Any]:
    """What a stream handshake for `vm_id` is answered before any upgrade."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{d.endpoint}/v1/vms/{vm_id}/stream",
            headers={**WS_HANDSHAKE, "Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json(content_type=None)


# --- cases --------------------------------------------------------------------------------


def test_a_destination_killed_after_the_session_stood_by(pair: tuple[Daemon, Daemon]) -> None:
    """The session stands by at the destination, which is SIGKILLed before the commit:
    the move aborts, the standby is dropped, the VM serves on at the source and the
    session never notices. A later move to the restarted destination switches onto
    a standby there."""
    east, west = pair
    token = east.token("olga")

    async def run() -> None:
        async with HoldAfterAccept(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await standby_then_kill(proxy, s, caller)
            await check_exactly_once(s, caller.calls, west, token)

    async def standby_then_kill(proxy: HoldAfterAccept, s: Session, caller: Caller) -> None:
        await caller.more()
        move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
        await async_wait_until(lambda: s.standby is not None, 20, what="a standby")
        assert s.standby is not None and s.standby.node == "west"
        assert s.standby.endpoint == proxy.endpoint and s.location.endpoint == east.endpoint
        await caller.more()  # standing by, still served at the source
        assert west.proc is not None
        os.kill(west.proc.pid, signal.SIGKILL)
        status, body = await move
        assert status >= 400 and body["code"] == "migration_aborted", body
        await async_wait_until(lambda: s.standby is None, 10, what="the standby dropped")
        await caller.more()
        assert s.location.endpoint == east.endpoint and s.moves_followed == 0
        assert west.proc.wait(10) == -signal.SIGKILL
        west.kill()
        west.start()
        assert homes([east, west], token, s.vm_id) == ["east"]
        status, body = await migrate(east, s.vm_id, west.endpoint)
        assert status == 200, body
        await caller.more()
        assert s.location.endpoint == west.endpoint
        assert (s.moves_followed, s.standby_switches) == (1, 1)
        assert homes([east, west], token, s.vm_id) == ["west"]

    asyncio.run(run())


def test_a_migration_aborted_after_moving_drops_the_standby_and_bounds_holders(
        pair: tuple[Daemon, Daemon]) -> None:
    """Pre-copy stalls with the session standing by. Meanwhile an attacker asks the
    destination for streams: for VMs that are not arriving (refused at once,
    `vm_not_found`), for the arriving VM with another client's token (`forbidden`),
    and with the owner's, past the bound (`quota_exceeded`). Then the migration
    channel dies with both daemons alive: the move aborts, the destination closes
    every held stream (4002), the session's standby is dropped and the VM serves
    on at the source, every call applied once."""
    east, west = pair
    token = east.token("pat")

    async def run() -> None:
        async with HoldAfterAccept(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s, aiohttp.ClientSession() as http:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: s.standby is not None, 20, what="a standby")
                assert proxy.accepted.is_set()
                # Not arriving: refused at once, typed; nothing is held for them.
                for k in range(50):
                    status, body = await stream_refusal(west, f"nothere{k}", token)
                    assert (status, body["code"]) == (404, "vm_not_found"), body
                status, body = await stream_refusal(west, s.vm_id, west.token("mallory"))
                assert (status, body["code"]) == (403, "forbidden"), body
                # The owner's own streams: the session holds one; the bound takes the rest.
                held = [await http.ws_connect(f"{west.endpoint}/v1/vms/{s.vm_id}/stream",
                                              headers={"Authorization": f"Bearer {token}"})
                        for _ in range(MAX_HELD_PER_VM - 1)]
                status, body = await stream_refusal(west, s.vm_id, token)
                assert (status, body["code"]) == (429, "quota_exceeded"), body
                assert body["details"]["limit"] == MAX_HELD_PER_VM
                await caller.more()  # all the while, served at the source
                proxy.reset_migrations()
                status, body = await move
                assert status >= 400 and body["code"] == "migration_aborted", body
                for ws in held:  # the destination lets go of them, unanswered
                    async with asyncio.timeout(10):
                        msg = await ws.receive()
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                    assert ws.close_code == NOT_ARRIVING_CLOSE_CODE
                    await ws.close()
                await async_wait_until(lambda: s.standby is None, 10, what="the standby dropped")
                await caller.more()
                assert s.location.endpoint == east.endpoint and s.moves_followed == 0
                assert s.standby_switches == 0
                assert homes([east, west], token, s.vm_id) == ["east"]
                status, health = west.request("GET", "/health")
                assert status == 200 and health["status"] == "ok"
            await check_exactly_once(s, caller.calls, east, token)

    asyncio.run(run())


@pytest.mark.parametrize("place", ["an outsider", "an unreachable address"])
def test_a_forged_moving_notice_gets_no_token_and_moves_nothing(
        pair: tuple[Daemon, Daemon], place: str) -> None:
    """An attacker on the client's path (plain HTTP) slips a `moving` notice naming a
    place of its choosing into the session's stream. The session tries a standby
    there, which must prove it is a cloudlet of the cluster first: the outsider
    gets a challenge and nothing else (no token, no stream); an unreachable place
    gets nothing. The session stays where its VM is, and a real move afterwards is
    followed, onto a standby at the real destination."""
    east, west = pair
    token = east.token("quinn")

    async def run() -> None:
        async with Outsider() as outsider:
            endpoint = (outsider.endpoint if place == "an outsider"
                        else f"http://127.0.0.1:{free_port()}")
            forged = msgpack.packb({"id": None, "moving": {"node": "west",
                                                           "endpoint": endpoint}})
            async with Injector(east.port, forged) as injector, \
                    CloudletClient(token, endpoints=[east.endpoint], connect_via=lambda url: (
                        injector.endpoint if url == east.endpoint else url)) as client, \
                    client.session(KVSTORE, keep=True) as s:
                async with Caller(s) as caller:
                    await async_wait_until(lambda: injector.injected > 0, 10, what="the forgery")
                    await caller.more(40)
                    assert s.standby is None and s.location.endpoint == east.endpoint
                    assert s.moves_followed == 0
                    assert all(auth is None for _, auth in outsider.seen), outsider.seen
                    assert {path for path, _ in outsider.seen} <= {"/health"}, outsider.seen
                    if place == "an outsider":
                        assert outsider.seen, "the standby was never tried: no forgery seen"
                    status, body = await migrate(east, s.vm_id, west.endpoint)
                    assert status == 200, body
                    await caller.more()
                    assert s.location.endpoint == west.endpoint
                    assert (s.moves_followed, s.standby_switches) == (1, 1)
                    assert all(auth is None for _, auth in outsider.seen), outsider.seen
                await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())


def test_calls_written_before_the_vm_lands_wait_and_apply_once(
        pair: tuple[Daemon, Daemon]) -> None:
    """The move is decided and the session told (`moved`), but the `Commit` is held on
    its way to the destination: the session has switched onto its standby and
    written its calls there, and they wait, unanswered, on the held stream. Once the
    `Commit` goes through, the VM lands and they are served, each applied once."""
    east, west = pair
    token = east.token("rita")

    async def run() -> None:
        async with HoldAfterAccept(west.port, hold_commit=True) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: proxy.commit_held.is_set(), 20,
                                       what="the commit on its way")
                await async_wait_until(lambda: s.standby_switches == 1, 10,
                                       what="the switch onto the standby")
                assert s.location.endpoint == proxy.endpoint
                waiting = len(caller.calls)
                await asyncio.sleep(0.5)
                assert len(caller.calls) == waiting and s.pending  # written, not served
                proxy.release()
                status, body = await move
                assert status == 200, body
                await caller.more()
                assert (s.moves_followed, s.standby_switches, s.reconnects) == (1, 1, 1)
                assert homes([east, west], token, s.vm_id) == ["west"]
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())
