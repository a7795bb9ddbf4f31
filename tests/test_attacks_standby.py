"""Attacks on the standby stream of a live migration, by someone who did not write it.

A live migration tells the VM's streams where it is `moving`; the SDK opens a
standby stream there, which the destination holds unread until the VM lands
(edge_agent/arrivals.py), and at the commit it switches onto it. Each case here
attacks that with real `cloudlet agent` processes, real sockets and, where a
crash matters, SIGKILL: who may hold a stream and what it reads before the VM
lands; one client holding the node's every held stream; a second offer of an
arriving VM's id; an old attempt that ends late; forged and stormy `moving`
notices; and either side killed while calls wait on a held stream. Whatever
happens, every call the application made is applied exactly once (the VM's
sequence number is the session's last, its state a twin's that applied each
call once).

Some cases play a source cloudlet with a peer identity of the cluster (as
tests/test_attacks_review.py does): it offers VMs and then says nothing, which
stands for a client's VMs on their way in (a client's own VMs moving at once) or
for a misbehaving peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import pytest

from cloudlet.migration.messages import Accept, Offer, decode, encode
from cloudlet.trust.cluster import cluster_tokens
from edge_agent.app import NOT_ARRIVING_CLOSE_CODE
from edge_agent.arrivals import MAX_HELD, MAX_HELD_PER_CLIENT, MAX_HELD_PER_VM
from edge_agent.live_migration import new_migration_id
from mobile_client import CloudletClient
from tests.daemons import Daemon, daemon_pair
from tests.tcp_proxy import LoopbackProxy, reset, until_either_ends
from tests.test_migration_standby import (
    KVSTORE,
    SETTINGS,
    Caller,
    HoldAfterAccept,
    Outsider,
    check_exactly_once,
    homes,
    migrate,
    stream_refusal,
)
from tests.waiting import async_wait_until

# Starts daemons and other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

SILENCE_S = 0.5  # how long a held stream is watched for a frame that must not come


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    yield from daemon_pair(tmp_path, **SETTINGS)


# --- the attacker's tools -------------------------------------------------------------------


async def offer(http: aiohttp.ClientSession, dest: Daemon, vm_id: str, owner: str,
                source_node: str = "south") -> aiohttp.ClientWebSocketResponse:
    """Play a source cloudlet (a peer identity of the cluster): offer `vm_id` of
    `owner` to `dest`, take its `Accept`, then say nothing. The destination now
    expects the VM and holds its owner's streams for it."""
    ws = await http.ws_connect(f"{dest.endpoint}/v1/peer/migrate",
                               params={"endpoint": "http://127.0.0.1:9"},
                               headers={"Authorization": f"Bearer {dest.peer_token(source_node)}"})
    await ws.send_bytes(encode(Offer(new_migration_id(), vm_id=vm_id, owner=owner,
                                     image_digest="0" * 64, memory_bytes=1 << 20,
                                     overlay_bytes=0, digests=b"")))
    msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    assert isinstance(decode(msg.data), Accept)
    return ws


async def hold(http: aiohttp.ClientSession, dest: Daemon, vm_id: str,
               token: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"{dest.endpoint}/v1/vms/{vm_id}/stream",
                                 headers={"Authorization": f"Bearer {token}"})


async def silent(ws: aiohttp.ClientWebSocketResponse, for_s: float = SILENCE_S) -> bool:
    """True if `ws` says nothing (no frame, no close) for `for_s`."""
    try:
        async with asyncio.timeout(for_s):
            await ws.receive()
    except TimeoutError:
        return True
    return False


async def closed_unanswered(ws: aiohttp.ClientWebSocketResponse) -> None:
    """`ws` ends with 4002 (the VM is not coming here) and no answer before it."""
    async with asyncio.timeout(10):
        msg = await ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    assert ws.close_code == NOT_ARRIVING_CLOSE_CODE
    await ws.close()


def call_frame(fn: str, *args: int) -> bytes:
    """A call without a sequence number (it uses up no number of the session's)."""
    return msgpack.packb({"id": 1, "fn": fn, "args": list(args)})


# --- who may hold, and what a held stream reads --------------------------------------------------


def test_who_may_hold_a_stream_and_what_it_reads_before_the_vm_lands(
        pair: tuple[Daemon, Daemon]) -> None:
    """With a session standing by at the destination (pre-copy stalled):
    - another tenant is refused `forbidden`, exactly as at the source that hosts the
      VM: the arrival tells an outsider no more than the VM's presence already does
      (an id that is nowhere is `vm_not_found`), and only to one who knows the id;
    - an expired client token, a peer token made for another node, and no token are
      refused `unauthorized` before anything is held;
    - a peer's token for this node is held (peers reach every VM, as for hosted ones);
    - the owner's held stream reads nothing: a call written on it gets no answer
      while the VM is away, and none when the move fails (4002); it was never
      applied (the VM's `seq` and state are the session's alone)."""
    east, west = pair
    token = east.token("alice")
    mallory = west.token("mallory")
    expired = cluster_tokens(west.cluster_dir).issue("alice", 60, now=time.time() - 3600)

    async def run() -> None:
        async with HoldAfterAccept(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s, aiohttp.ClientSession() as http:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: s.standby is not None, 20, what="a standby")
                for d in (west, east):  # arriving, or hosted: the same answer
                    status, body = await stream_refusal(d, s.vm_id, mallory)
                    assert (status, body["code"]) == (403, "forbidden"), body
                status, body = await stream_refusal(west, "nowhere", mallory)
                assert (status, body["code"]) == (404, "vm_not_found"), body
                for bad in (expired, east.peer_token("south"), ""):
                    status, body = await stream_refusal(west, s.vm_id, bad)
                    assert (status, body["code"]) == (401, "unauthorized"), body
                peer = await hold(http, west, s.vm_id, west.peer_token("south"))
                mine = await hold(http, west, s.vm_id, token)
                await mine.send_bytes(call_frame("kv_put", 7, 700))
                await mine.send_bytes(call_frame("kv_checksum"))
                assert await silent(mine) and await silent(peer)
                await caller.more()  # served at the source all the while
                proxy.reset_migrations()
                status, body = await move
                assert status >= 400 and body["code"] == "migration_aborted", body
                await closed_unanswered(mine)
                await closed_unanswered(peer)
                await async_wait_until(lambda: s.standby is None, 10, what="the standby dropped")
                await caller.more()
            assert homes([east, west], token, s.vm_id) == ["east"]
            await check_exactly_once(s, caller.calls, east, token)  # kv_put 7 never applied

    asyncio.run(run())


# --- exhaustion ----------------------------------------------------------------------------------


def test_one_client_cannot_take_every_held_stream(pair: tuple[Daemon, Daemon]) -> None:
    """Mallory's VMs are on their way to west, many at once (a peer plays their
    source), and she holds every stream she may for them: at most
    `MAX_HELD_PER_CLIENT` (`quota_exceeded`), never the node's `MAX_HELD`. Alice's
    VM then moves east -> west: her session still gets its standby there and
    switches onto it, every call applied once. (Before the per-client bound, mallory
    held all 256 and alice's standby was refused `capacity_exceeded`.)"""
    east, west = pair
    token, mallory = east.token("alice"), west.token("mallory")
    vms = MAX_HELD // MAX_HELD_PER_VM  # enough to fill the node, 4 streams each

    async def run() -> None:
        async with aiohttp.ClientSession() as http, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            offers = [await offer(http, west, f"mal{k}", "mallory") for k in range(vms)]
            held: list[aiohttp.ClientWebSocketResponse] = []
            refused: list[str] = []
            for k in range(vms):
                for _ in range(MAX_HELD_PER_VM):
                    status, body = await stream_refusal(west, f"mal{k}", mallory) \
                        if len(held) >= MAX_HELD_PER_CLIENT else (101, None)
                    if status == 101:
                        held.append(await hold(http, west, f"mal{k}", mallory))
                    else:
                        refused.append(body["code"])
            assert len(held) == MAX_HELD_PER_CLIENT
            assert set(refused) == {"quota_exceeded"}, refused
            async with Caller(s) as caller:
                await caller.more()
                status, body = await migrate(east, s.vm_id, west.endpoint)
                assert status == 200, body
                await caller.more()
                assert (s.moves_followed, s.standby_switches) == (1, 1)
            await check_exactly_once(s, caller.calls, west, token)
            for ws in offers:
                await ws.close()
            for ws in held:  # their arrivals are off: let go of, unanswered
                await closed_unanswered(ws)

    asyncio.run(run())


# --- two attempts at one id --------------------------------------------------------------


def test_a_second_offer_of_an_arriving_vm_serves_its_streams_nothing(
        pair: tuple[Daemon, Daemon]) -> None:
    """Alice's VM is on its way east -> west (pre-copy stalled). A peer offers west
    a VM by the same id, owned by mallory, and mallory holds a stream for it. When
    alice's VM lands, mallory's held stream must not be served alice's VM: it is
    closed (4002) unanswered, because the owner check is made again on the VM that
    landed. (Before, the land settled whichever arrival was registered last, and
    mallory's `kv_checksum` was answered from alice's VM.) Alice's session follows
    the move, every call applied once."""
    east, west = pair
    token, mallory = east.token("alice"), west.token("mallory")

    async def run() -> None:
        async with HoldAfterAccept(west.port) as proxy, aiohttp.ClientSession() as http, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: s.standby is not None, 20, what="a standby")
                rogue = await offer(http, west, s.vm_id, "mallory")
                theirs = await hold(http, west, s.vm_id, mallory)
                await theirs.send_bytes(call_frame("kv_checksum"))
                proxy.release()
                status, body = await move
                assert status == 200, body
                await closed_unanswered(theirs)
                await caller.more()
                assert s.location.endpoint == proxy.endpoint and s.moves_followed == 1
                await rogue.close()
            assert homes([east, west], token, s.vm_id) == ["west"]
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())


def test_an_old_attempt_that_ends_late_leaves_the_new_attempts_streams(
        pair: tuple[Daemon, Daemon]) -> None:
    """Two attempts to move one VM of alice's into west overlap (a source retried
    while west still ran the first: a real race, played here by two peers). Alice
    holds a stream for the newer. When the older attempt ends, the newer one's
    held stream stays held, and a new one is still held, not `vm_not_found`.
    (Before, the older attempt's end settled the VM's arrival whatever attempt it
    was: alice's stream was closed and her next refused, with the newer attempt
    still going.) The newer attempt's end lets them go."""
    _, west = pair
    alice = west.token("alice")

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            older = await offer(http, west, "kv1", "alice", source_node="south")
            newer = await offer(http, west, "kv1", "alice", source_node="north")
            first = await hold(http, west, "kv1", alice)
            await older.close()
            assert await silent(first, 1.0)
            second = await hold(http, west, "kv1", alice)
            assert await silent(second)
            await newer.close()
            await closed_unanswered(first)
            await closed_unanswered(second)
            status, body = await stream_refusal(west, "kv1", alice)
            assert (status, body["code"]) == (404, "vm_not_found"), body

    asyncio.run(run())


# --- crashes around the commit -------------------------------------------------------------


class ResettableStandby(HoldAfterAccept):
    """`HoldAfterAccept` that can also reset the clients' streams through it (the
    standby, or the stream it became) while the migration link lives on."""

    def reset_streams(self) -> int:
        streams = self._writers - self._migrations
        for w in streams:
            reset(w)
        self._writers -= streams
        return len(streams)


async def quietly_migrate(src: Daemon, vm_id: str, endpoint: str) -> None:
    """A migration whose source is killed under it: its answer does not matter."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        await migrate(src, vm_id, endpoint)


def sigkill(d: Daemon) -> None:
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGKILL)
    assert d.proc.wait(10) == -signal.SIGKILL
    d.kill()  # closes what the dead process left


def test_the_source_killed_after_moving_before_the_decision(
        pair: tuple[Daemon, Daemon]) -> None:
    """The session stands by at west; east, still serving the VM (its checkpoints
    wait for the migration), is SIGKILLed before it decides. West holds a round
    on disk and cannot know whether east decided as it sent the final round: it
    keeps the held stream and asks east until east is back and says no, then lets
    it go. East comes back from the checkpoint it made as the migration began: the
    calls it answered since are replayed from the session's journal, so every
    call is applied once, at east, and the VM is nowhere else."""
    east, west = pair
    token = east.token("bo")

    async def run() -> None:
        async with HoldAfterAccept(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(quietly_migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: s.standby is not None, 20, what="a standby")
                await caller.more()
                sigkill(east)
                await move
                east.start()
                await async_wait_until(lambda: s.standby is None, 10, what="the standby dropped")
                await caller.more()
                assert s.moves_followed == 0 and s.location.endpoint == east.endpoint
            assert homes([east, west], token, s.vm_id) == ["east"]
            await check_exactly_once(s, caller.calls, east, token)

    asyncio.run(run())


@pytest.mark.parametrize("killed", ["the destination", "the source"])
def test_a_side_killed_while_calls_wait_on_the_held_stream(
        pair: tuple[Daemon, Daemon], killed: str) -> None:
    """The move is decided and the session has switched onto its standby and
    written its calls there, but the `Commit` never reaches west (the link dies).
    Then one side is SIGKILLed and restarted:
    - west, holding the unread calls: it recovers the VM from its rounds on disk
      (east says the migration committed), and the session resends on a new
      stream; the calls it had written were never read, so none applies twice;
    - east, the only one that knows the decision: west, in doubt, keeps the held
      stream (and the calls on it) until east is back and answers, then serves
      them there, on the stream the session already had.
    Either way every call is applied once, at west."""
    east, west = pair
    token = east.token("cy")

    async def run() -> None:
        async with HoldAfterAccept(west.port, hold_commit=True) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(quietly_migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: proxy.commit_held.is_set(), 20,
                                       what="the commit on its way")
                await async_wait_until(lambda: s.standby_switches == 1, 10,
                                       what="the switch onto the standby")
                await async_wait_until(lambda: bool(s.pending), 10, what="calls written")
                victim = west if killed == "the destination" else east
                sigkill(victim)
                proxy.reset_migrations()
                await move
                victim.start()
                await caller.more()
                assert s.location.endpoint == proxy.endpoint and s.moves_followed == 1
                if killed == "the source":  # served on the stream it was held on
                    assert (s.standby_switches, s.reconnects) == (1, 1)
            assert homes([east, west], token, s.vm_id) == ["west"]
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())


def test_the_standby_reset_as_the_move_commits(pair: tuple[Daemon, Daemon]) -> None:
    """The session has switched onto its standby and written its calls there; the
    connection is then reset (the client's network drops it) just before the
    `Commit` reaches west. West may still read the calls that reached it before the
    reset when the VM lands; the session resends them on a new stream: the reply
    log answers those already applied, so each applies once."""
    east, west = pair
    token = east.token("di")

    async def run() -> None:
        async with ResettableStandby(west.port, hold_commit=True) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: proxy.commit_held.is_set(), 20,
                                       what="the commit on its way")
                await async_wait_until(lambda: s.standby_switches == 1, 10,
                                       what="the switch onto the standby")
                await async_wait_until(lambda: bool(s.pending), 10, what="calls written")
                assert proxy.reset_streams() >= 1
                proxy.release()
                status, body = await move
                assert status == 200, body
                await caller.more()
                assert s.location.endpoint == proxy.endpoint and s.reconnects >= 2
            assert homes([east, west], token, s.vm_id) == ["west"]
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())


# --- forged and stormy notices -------------------------------------------------------------


class FrameInjector(LoopbackProxy):
    """An attacker on the client's path to its cloudlet (plain HTTP) that slips forged
    frames into the cloudlet's streams on demand, between two of its frames."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._writers: set[asyncio.StreamWriter] = set()
        self._queues: list[list[bytes]] = []

    def reset_all(self) -> None:
        for w in list(self._writers):
            reset(w)
        self._writers.clear()

    def inject(self, *payloads: bytes) -> None:
        for queue in self._queues:
            queue.extend(payloads)

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        self._writers |= {writer, up_writer}
        queue: list[bytes] = []

        async def forth() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def back() -> None:
            head, left, upgraded = bytearray(), 0, False
            pending = bytearray()
            while data := await up_reader.read(65536):
                writer.write(data)
                if not upgraded:
                    pending += data
                    at = pending.find(b"HTTP/1.1 101")
                    end = pending.find(b"\r\n\r\n", at) if at >= 0 else -1
                    if end < 0:
                        continue
                    upgraded, data = True, bytes(pending[end + 4 :])
                    self._queues.append(queue)
                for byte in data:  # where the cloudlet's frames end
                    if left:
                        left -= 1
                        continue
                    head.append(byte)
                    if len(head) >= 2:
                        n = head[1] & 0x7F
                        need = 2 + (2 if n == 126 else 8 if n == 127 else 0)
                        if len(head) == need:
                            left = n if n < 126 else int.from_bytes(head[2:need], "big")
                            head.clear()
                if not left and not head:
                    while queue:
                        forged = queue.pop(0)
                        size = len(forged)
                        header = bytes([0x82, size]) if size < 126 else \
                            bytes([0x82, 126]) + size.to_bytes(2, "big")
                        writer.write(header + forged)
                await writer.drain()

        with contextlib.suppress(ConnectionError, OSError):
            await until_either_ends(forth(), back())


def moving(node: str, endpoint: str, vm: str | None = None) -> bytes:
    body = {"node": node, "endpoint": endpoint} | ({"vm": vm} if vm is not None else {})
    return msgpack.packb({"id": None, "moving": body})


def standby_tasks() -> int:
    return sum(t.get_name().startswith("cloudlet-standby") for t in asyncio.all_tasks())


def test_forged_and_stormy_moving_notices(pair: tuple[Daemon, Daemon]) -> None:
    """On the session's stream, an on-path attacker slips `moving` notices:
    - one for another VM, and one naming the place the session is already at:
      ignored, no standby is tried;
    - a storm of 200 naming two outsiders in turn: the session never has more than
      one standby under way, tries no more places than it was told of, gives
      neither outsider a token, and serves on where it is.
    A real move afterwards is followed onto a standby at the real destination, and
    every call is applied once."""
    east, west = pair
    token = east.token("ed")

    async def run() -> None:
        async with Outsider() as a, Outsider() as b, FrameInjector(east.port) as injector, \
                CloudletClient(token, endpoints=[east.endpoint], connect_via=lambda url: (
                    injector.endpoint if url == east.endpoint else url)) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                injector.inject(moving("west", a.endpoint, vm="someone-else"),
                                moving(s.location.node, s.location.endpoint))
                await caller.more(40)
                assert s.standby is None and not a.seen
                storm = [moving("west", (a, b)[k % 2].endpoint) for k in range(200)]
                injector.inject(*storm)
                most = 0
                for _ in range(100):
                    most = max(most, standby_tasks())
                    await asyncio.sleep(0.01)
                await caller.more(40)
                assert most <= 1, most
                tried = len(a.seen) + len(b.seen)
                assert 1 <= tried <= len(storm), tried  # heard, and bounded by what was said
                assert all(auth is None for _, auth in a.seen + b.seen)
                assert s.location.endpoint == east.endpoint and s.moves_followed == 0
                status, body = await migrate(east, s.vm_id, west.endpoint)
                assert status == 200, body
                await caller.more()
                assert (s.moves_followed, s.standby_switches) == (1, 1)
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())
