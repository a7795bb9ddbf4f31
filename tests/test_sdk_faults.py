"""Fault tests of the client SDK against real daemons on loopback.

Each test breaks something for real (a socket reset, a daemon SIGKILLed or
SIGTERMed, a full destination, a malformed message) and checks one of the SDK's
promises: every call is applied exactly once, the application sees latency and
never an error when its VM moves, bad input gets a typed error, the daemon stays
healthy, and nothing is left behind after close.

Written by a reviewer who did not write the code under test; each of the
twelve bugs it found was fixed and its test now guards the fix. No mocks:
`cloudlet agent` processes, real sockets, and `FaultProxy`, a TCP proxy that
can hold a connection's answers, reset every connection, refuse new ones, or
run a hook (e.g. SIGKILL a daemon) when it sees a given request go by.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from cloudlet.errors import (
    BadCall,
    CallTimeout,
    CloudletError,
    ConfigError,
    InvalidArgument,
    MalformedRequest,
    NoCloudletAvailable,
    RequestTooLarge,
    SessionLost,
    Unauthorized,
    VMNotFound,
)
from cloudlet.trust.client_tokens import ClientTokens
from cloudlet.trust.cluster import cluster_tokens
from cloudlet.trust.keys import SigningKey
from cloudlet.vm import VM, ImageStore, Snapshot, VMLimits
from edge_agent.replies import REPLY_BYTES_CAP, REPLY_WINDOW
from mobile_client import CloudletClient
from mobile_client.session import MAX_IN_FLIGHT
from mobile_client.sync import BlockingClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, make_daemon
from tests.tcp_proxy import LoopbackProxy, reset, until_either_ends
from tests.waiting import async_wait_until as wait_until
from tests.waiting import live_threads

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KVSTORE = WORKLOADS / "kvstore.wasm"
CLI = [sys.executable, "-m", "cloudlet.cli"]


# --- daemons --------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """`cluster(name, **settings)` starts a daemon; all are stopped at the end."""
    started: list[Daemon] = []

    def start(name: str, **settings: Any) -> Daemon:
        d = make_daemon(tmp_path, name, **settings).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            try:
                d.stop(timeout_s=15)
            except subprocess.TimeoutExpired:
                d.kill()
        else:
            d.kill()


def restart(d: Daemon) -> None:
    """SIGTERM (a clean shutdown: streams closed, every VM checkpointed), then start."""
    assert d.stop(signal.SIGTERM) == 0, d.log()
    d.start()


def assert_healthy(d: Daemon) -> None:
    status, body = d.request("GET", "/health")
    assert status == 200 and body["status"] == "ok", body
    log = d.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def vm_seq(d: Daemon, token: str, vm_id: str) -> int:
    status, info = d.request("GET", f"/v1/vms/{vm_id}", token=token)
    assert status == 200, info
    seq: int = info["seq"]
    return seq


def vms_of(d: Daemon, token: str) -> list[str]:
    status, body = d.request("GET", "/v1/vms", token=token)
    assert status == 200, body
    return [v["vm"] for v in body["vms"]]


def no_tasks_left() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


# --- what the VM should have answered ----------------------------------------------------

Op = tuple[str, tuple[Any, ...]]


class Twin:
    """A local kvstore VM that applies each call exactly once: the reference."""

    def __init__(self) -> None:
        self.vm = VM.create(ImageStore(None).add_file(KVSTORE), VMLimits(memory_bytes=64 << 20))

    def apply(self, op: Op) -> Any:
        fn, args = op
        try:
            if len(args) == 1 and isinstance(args[0], bytes):
                return self.vm.call_bytes(fn, args[0])
            return self.vm.call(fn, *args)
        except CloudletError as exc:
            return type(exc).__name__

    def state(self) -> tuple[Any, ...]:
        return tuple(self.vm.call(fn) for fn in ("kv_checksum", "kv_count", "kv_bytes_checksum",
                                                  "kv_bytes_count"))


async def remote_state(s: Any) -> tuple[Any, ...]:
    return tuple([await s.call(fn) for fn in ("kv_checksum", "kv_count", "kv_bytes_checksum",
                                               "kv_bytes_count")])


def numeric_op(i: int, rng: random.Random) -> Op:
    key = rng.randrange(13)
    r = rng.random()
    if r < 0.15:
        return ("kv_del", (key,))
    if r < 0.25:
        return ("kv_get", (key,))
    if r < 0.28:
        return ("no_such_function", (key,))  # an error answer: it uses up its number too
    return ("kv_put", (key, i * 7919 + key))


def bytes_op(i: int, rng: random.Random) -> Op:
    key = b"k%d" % rng.randrange(9)
    if rng.random() < 0.4:
        return ("kv_lookup", (key,))
    value = rng.randbytes(rng.randrange(1, 300))
    return ("kv_set", (key + b"=" + value.replace(b"=", b"-"),))


@dataclass
class Recorder:
    """Ops in the order of their sequence numbers, and what each call returned."""

    ops: list[Op] = field(default_factory=list)
    results: dict[int, Any] = field(default_factory=dict)

    async def call(self, s: Any, op: Op) -> None:
        index = len(self.ops)
        self.ops.append(op)  # no await before `s.call` takes its number: same order
        try:
            self.results[index] = await s.call(op[0], *op[1])
        except BadCall as exc:
            self.results[index] = type(exc).__name__

    def check(self, twin: Twin) -> None:
        expected = [twin.apply(op) for op in self.ops]
        got = [self.results.get(i, "<no answer>") for i in range(len(self.ops))]
        wrong = [(i, self.ops[i], got[i], expected[i]) for i in range(len(self.ops))
                 if got[i] != expected[i]]
        assert not wrong, f"{len(wrong)} calls answered wrongly, e.g. {wrong[:3]}"


# --- a proxy that breaks things on purpose ---------------------------------------------------


@dataclass
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    held: list[bytes] = field(default_factory=list)


class FaultProxy(LoopbackProxy):
    """TCP proxy on loopback. `hold`: answers (server to client) are kept back;
    `cut()`: every live connection is reset (RST) and what was held is dropped;
    `refusing`: new connections are reset at once; `on_request`: when the client
    side sends bytes containing the marker, the hook runs and the connection is
    reset before those bytes reach the server."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.hold = False
        self.refusing = False
        self.on_request: tuple[bytes, Callable[[], None]] | None = None
        self.fired = 0
        self._live: list[_Conn] = []

    def cut(self) -> None:
        for conn in list(self._live):
            conn.held.clear()
            reset(conn.server)
            reset(conn.client)
        self._live.clear()

    reset_all = cut

    def refuse(self) -> bool:
        return self.refusing

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, up_writer)
        self._live.append(conn)
        try:
            await until_either_ends(self._up(reader, conn), self._down(up_reader, conn))
        finally:
            with contextlib.suppress(ValueError):
                self._live.remove(conn)

    async def _up(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        tail = b""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.on_request is not None and self.on_request[0] in tail + data:
                    hook = self.on_request[1]
                    self.on_request = None
                    self.fired += 1
                    hook()
                    reset(conn.server)
                    reset(conn.client)
                    return
                tail = data[-64:]
                conn.server.write(data)
                await conn.server.drain()

    async def _down(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.hold:
                    conn.held.append(data)
                    continue
                if conn.held:
                    conn.client.write(b"".join(conn.held))
                    conn.held.clear()
                conn.client.write(data)
                await conn.client.drain()


# --- moves -----------------------------------------------------------------------------------


def test_move_with_bytes_and_numeric_calls_pipelined_from_several_tasks(
        cluster: Callable[..., Daemon]) -> None:
    """Four tasks pipeline numeric and bytes calls (some of them errors) while the VM
    moves east -> west -> east -> west. No task sees an error it did not cause, every
    call gets the answer a VM applying each call once would give, in order."""
    east, west = cluster("east"), cluster("west")
    token = east.token("dave")
    rng = random.Random(41)
    rec = Recorder()

    async def run() -> None:
        async with CloudletClient(token, endpoints=[east.endpoint]) as client:
            async with client.session(KVSTORE, budget_ms=30) as s:
                done = asyncio.Event()

                async def caller(make: Callable[[int, random.Random], Op]) -> None:
                    while not done.is_set():
                        await rec.call(s, make(len(rec.ops), rng))

                async def mover() -> list[dict[str, Any]]:
                    moves = []
                    for src, dst in ((east, west), (west, east), (east, west)):
                        await asyncio.sleep(0.12)
                        status, body = await asyncio.to_thread(
                            src.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                            {"endpoint": dst.endpoint}, token=src.operator_token())
                        assert status == 200, body
                        moves.append(body)
                    await asyncio.sleep(0.12)
                    done.set()
                    return moves

                async with asyncio.timeout(30):
                    *_, moves = await asyncio.gather(
                        caller(numeric_op), caller(numeric_op), caller(bytes_op),
                        caller(bytes_op), mover())
                assert [m["to"] for m in moves] == ["west", "east", "west"]
                assert s.stats().moves_followed >= 3
                assert s.location.endpoint == west.endpoint
                assert s.seq == len(rec.ops)
                twin = Twin()
                rec.check(twin)
                assert await remote_state(s) == twin.state()
                assert vm_seq(west, token, s.vm_id) == len(rec.ops) + 4
            assert vms_of(west, token) == [] and vms_of(east, token) == []
        assert no_tasks_left() == []

    asyncio.run(run())
    assert len(rec.ops) > 200
    assert_healthy(east)
    assert_healthy(west)


def test_move_to_a_destination_sigkilled_mid_handover(cluster: Callable[..., Daemon]) -> None:
    """(The stop-and-copy path.) The destination is SIGKILLed while the source is
    paused in stop-and-copy, as
    the snapshot is on its way (before the destination got any of it). The move is
    reported aborted, the VM goes on serving at the source, the session sees only
    latency; a later move to the restarted destination works and is followed."""
    east, west = cluster("east"), cluster("west")
    token = east.token("olga")
    rng = random.Random(5)
    rec = Recorder()

    async def run() -> None:
        async with FaultProxy(west.port) as to_west, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE) as s:
            west_pid = west.proc.pid if west.proc else 0
            to_west.on_request = (b"POST /v1/peer/vms", lambda: os.kill(west_pid,
                                                                          signal.SIGKILL))
            done = asyncio.Event()

            async def caller(make: Callable[[int, random.Random], Op]) -> None:
                while not done.is_set():
                    await rec.call(s, make(len(rec.ops), rng))
                    await asyncio.sleep(0.001)

            async def mover() -> None:
                await asyncio.sleep(0.1)
                status, body = await asyncio.to_thread(
                    east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                    {"endpoint": to_west.endpoint, "mode": "stop_and_copy"},
                    token=east.operator_token())
                assert to_west.fired == 1, "the hook should have killed the destination"
                assert status >= 400 and body["code"] == "migration_aborted", body
                await asyncio.sleep(0.1)
                done.set()

            async with asyncio.timeout(30):
                await asyncio.gather(caller(numeric_op), caller(bytes_op), mover())
            assert west.proc is not None and west.proc.wait(5) == -signal.SIGKILL
            assert s.location.endpoint == east.endpoint and s.stats().moves_followed == 0
            assert vm_seq(east, token, s.vm_id) == len(rec.ops)
            await rec.call(s, ("kv_put", (1, 1)))  # still serving at the source
            west.kill()
            west.start()
            assert s.vm_id not in vms_of(west, token), "the killed destination kept the VM"
            status, body = await asyncio.to_thread(
                east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                {"endpoint": west.endpoint}, token=east.operator_token())
            assert status == 200, body
            await rec.call(s, ("kv_put", (2, 2)))
            assert s.location.endpoint == west.endpoint
            twin = Twin()
            rec.check(twin)
            assert await remote_state(s) == twin.state()

    asyncio.run(run())
    assert_healthy(east)
    assert_healthy(west)


def test_move_refused_for_lack_of_capacity_goes_unnoticed(
        cluster: Callable[..., Daemon]) -> None:
    """The destination is full (max_vms=1, one VM there already): the move fails with a
    typed error naming the cause, the session never notices, and nothing of the VM
    is left behind at the destination. A move to the VM's own cloudlet (by an alias
    of its URL) is refused the same way, without a deadlock."""
    east = cluster("east")
    west = cluster("west", max_vms=1)
    token = east.token("pat")
    rng = random.Random(11)
    rec = Recorder()

    async def run() -> None:
        async with CloudletClient(token, endpoints=[west.endpoint]) as filler_client, \
                filler_client.session(KVSTORE) as filler:
            assert filler.location.endpoint == west.endpoint
            async with CloudletClient(token, endpoints=[east.endpoint]) as client, \
                    client.session(KVSTORE) as s:
                done = asyncio.Event()

                async def caller() -> None:
                    while not done.is_set():
                        await rec.call(s, numeric_op(len(rec.ops), rng))
                        await asyncio.sleep(0.001)

                async def mover() -> None:
                    for _ in range(3):
                        await asyncio.sleep(0.05)
                        status, body = await asyncio.to_thread(
                            east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                            {"endpoint": west.endpoint}, token=east.operator_token())
                        assert status >= 400 and body["code"] == "migration_aborted", body
                        assert body["details"]["cause"] == "capacity_exceeded", body
                    # To itself, by its own URL and by another name for it: refused too.
                    for itself in (east.endpoint + "/", f"http://localhost:{east.port}"):
                        status, body = await asyncio.to_thread(
                            east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                            {"endpoint": itself}, token=east.operator_token())
                        assert status >= 400 and body["code"] in (
                            "bad_call", "migration_aborted"), body
                    await asyncio.sleep(0.05)
                    done.set()

                async with asyncio.timeout(30):
                    await asyncio.gather(caller(), caller(), mover())
                assert s.location.endpoint == east.endpoint
                assert s.stats().reconnects == 0 and s.stats().moves_followed == 0
                assert vms_of(west, token) == [filler.vm_id]
                assert vm_seq(east, token, s.vm_id) == len(rec.ops)
                twin = Twin()
                rec.check(twin)
                assert await remote_state(s) == twin.state()

    asyncio.run(run())
    assert_healthy(east)
    assert_healthy(west)


def test_tombstone_survives_a_restart_of_the_old_cloudlet(
        cluster: Callable[..., Daemon]) -> None:
    """The session's link to east is down when its VM moves to west, and east is
    restarted before the link comes back. A call made meanwhile (and one applied
    at east whose answer was lost) must reach west through east's tombstone,
    which has to survive the restart: latency, no error, applied once."""
    east, west = cluster("east"), cluster("west")
    token = east.token("quinn")

    async def run() -> None:
        async with FaultProxy(east.port) as link, \
                CloudletClient(token, endpoints=[link.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            assert await s.call("kv_put", 1, 10) == 1
            link.hold = True  # the next answer is lost on the way back
            lost = asyncio.create_task(s.call("kv_put", 2, 20))
            await wait_until(lambda: vm_seq(east, token, s.vm_id) == 2)
            link.refusing = True
            link.cut()
            link.hold = False
            later = asyncio.create_task(s.call("kv_put", 3, 30))  # made while unreachable
            status, body = await asyncio.to_thread(
                east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                {"endpoint": west.endpoint}, token=east.operator_token())
            assert status == 200, body
            await asyncio.to_thread(restart, east)
            status, body = east.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 410 and body["details"]["endpoint"] == west.endpoint, body
            link.refusing = False
            async with asyncio.timeout(10):
                assert await lost == 1 and await later == 1
            assert s.location.endpoint == west.endpoint
            assert vm_seq(west, token, s.vm_id) == 3  # each applied once
            assert await s.call("kv_count") == 3
            vm_id = s.vm_id
        # A new client that only knows east is sent on, too.
        async with CloudletClient(token, endpoints=[east.endpoint]) as other, \
                other.attach(vm_id, east.endpoint) as again:
            assert await again.call("kv_get", 3) == 30
            assert again.location.endpoint == west.endpoint
            assert vm_seq(west, token, vm_id) == 5

    asyncio.run(run())
    assert_healthy(east)
    assert_healthy(west)


# --- restarts --------------------------------------------------------------------------------


def test_session_rides_out_sigterm_restarts(cluster: Callable[..., Daemon]) -> None:
    """A clean restart keeps the VM (checkpointed at shutdown, with its reply log):
    calls pipelined through two restarts each apply once, and nobody sees an error."""
    d = cluster("solo")
    token = d.token("rita")
    rng = random.Random(23)
    rec = Recorder()
    threads_before = live_threads()

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client:
            async with client.session(KVSTORE) as s:
                done = asyncio.Event()

                async def caller(make: Callable[[int, random.Random], Op]) -> None:
                    while not done.is_set():
                        await rec.call(s, make(len(rec.ops), rng))

                async def restarter() -> None:
                    for k in range(1, 3):
                        await asyncio.sleep(0.1)
                        await asyncio.to_thread(restart, d)
                        await wait_until(functools.partial(
                            lambda k: s.stats().reconnects == k, k))
                    await asyncio.sleep(0.1)
                    done.set()

                async with asyncio.timeout(30):
                    await asyncio.gather(caller(numeric_op), caller(numeric_op),
                                         caller(bytes_op), restarter())
                assert s.stats().reconnects == 2
                assert vm_seq(d, token, s.vm_id) == len(rec.ops)
                twin = Twin()
                rec.check(twin)
                assert await remote_state(s) == twin.state()
            assert vms_of(d, token) == []
        assert no_tasks_left() == []

    asyncio.run(run())
    assert live_threads() == threads_before
    assert_healthy(d)


# --- malformed input, straight to the daemon ------------------------------------------------


async def _created_vm(d: Daemon, token: str, limits: dict[str, Any] | None = None) -> str:
    async with CloudletClient(token, endpoints=[d.endpoint]) as client, \
            client.session(KVSTORE, keep=True, limits=limits) as s:
        return s.vm_id


BAD_SEQS: list[Any] = [0, -1, -(2**63), 1.5, 1.0, True, False, "1", [1], {"n": 1}, b"\x01"]


def test_malformed_sequence_numbers_get_typed_errors(cluster: Callable[..., Daemon]) -> None:
    """Over the stream and over HTTP: a sequence number that is not a positive integer
    is refused (`malformed_request`) and uses up nothing; one far ahead is a gap
    (`sequence_gap`, with the number expected); the stream and the VM stay usable."""
    d = cluster("strict")
    token = d.token("sam")
    auth = {"Authorization": f"Bearer {token}"}

    async def run() -> None:
        vm_id = await _created_vm(d, token)
        async with aiohttp.ClientSession(headers=auth) as http, \
                http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws:

            async def ask(body: Any, raw: bytes | None = None) -> dict[str, Any]:
                await ws.send_bytes(raw if raw is not None else msgpack.packb(body))
                reply: dict[str, Any] = msgpack.unpackb((await ws.receive(timeout=5)).data)
                return reply

            for i, bad in enumerate(BAD_SEQS):
                reply = await ask({"id": i, "fn": "kv_put", "args": [1, 1], "seq": bad})
                assert reply["id"] == i and reply["error"]["code"] == "malformed_request", (
                    bad, reply)
            for huge in (2, 2**32, 2**63, 2**64 - 1):
                reply = await ask({"id": "gap", "fn": "kv_put", "args": [1, 1], "seq": huge})
                assert reply["error"]["code"] == "sequence_gap", (huge, reply)
                assert reply["error"]["details"]["expected"] == 1
            for junk in (b"\xc1", b"\x92\x01\x02", msgpack.packb([1]) + b"\x00"):
                reply = await ask(None, raw=junk)
                assert reply["error"]["code"] == "malformed_request", (junk, reply)
            await ws.send_str("text")
            reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
            assert reply["error"]["code"] == "malformed_request"
            assert vm_seq(d, token, vm_id) == 0  # none of that used a number
            assert (await ask({"id": 1, "fn": "kv_put", "args": [1, 7], "seq": 1}))["result"] == 1
            # A malformed call with a good number uses the number up; a resend of it
            # gets the same answer from the reply log, and the next number goes on.
            first = await ask({"id": 2, "fn": 5, "args": [1], "seq": 2})
            assert first["error"]["code"] == "malformed_request"
            assert await ask({"id": 2, "fn": 5, "args": [1], "seq": 2}) == first
            assert vm_seq(d, token, vm_id) == 2
            assert (await ask({"id": 3, "fn": "kv_get", "args": [1], "seq": 3}))["result"] == 7

        for bad in BAD_SEQS:
            status, body = d.request("POST", f"/v1/vms/{vm_id}/call",
                                     {"fn": "kv_put", "args": [2, 2], "seq": bad}, token=token)
            assert status == 400 and body["code"] == "malformed_request", (bad, body)
        status, body = d.request("POST", f"/v1/vms/{vm_id}/call",
                                 {"fn": "kv_put", "args": [2, 2], "seq": 2**64 - 1}, token=token)
        assert status == 409 and body["code"] == "sequence_gap"
        assert body["details"]["expected"] == 4
        status, body = d.request("POST", f"/v1/vms/{vm_id}/call",
                                 {"fn": "kv_put", "args": [2, 2], "seq": 4}, token=token)
        assert status == 200 and body["seq"] == 4
        assert vm_seq(d, token, vm_id) == 4

    asyncio.run(run())
    assert_healthy(d)


@pytest.mark.parametrize("deadline_ms", [50, 500], ids=["inline", "thread-pool"])
def test_the_same_call_raced_over_three_connections_applies_once(
        cluster: Callable[..., Daemon], deadline_ms: int) -> None:
    """The same numbered call sent at once over two streams and HTTP (a resend racing
    the original): applied once, and all three get the same answer. `kv_put` answers
    1 for a new key and 0 for an update, so a second application would show."""
    d = cluster(f"race{deadline_ms}")
    token = d.token("lee")
    rounds = 60

    async def run() -> None:
        vm_id = await _created_vm(d, token, {"deadline_ms": deadline_ms})
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
                http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws1, \
                http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws2:

            async def over_ws(ws: aiohttp.ClientWebSocketResponse, body: bytes) -> Any:
                await ws.send_bytes(body)
                return msgpack.unpackb((await ws.receive(timeout=5)).data)

            async def over_http(body: bytes) -> Any:
                async with http.post(f"{d.endpoint}/v1/vms/{vm_id}/call", data=body) as resp:
                    return msgpack.unpackb(await resp.read())

            for seq in range(1, rounds + 1):
                body = msgpack.packb({"id": seq, "fn": "kv_put", "args": [seq, seq],
                                      "seq": seq})
                answers = await asyncio.gather(over_ws(ws1, body), over_http(body),
                                               over_ws(ws2, body))
                results = [(a.get("result"), a.get("seq")) for a in answers]
                assert results == [(1, seq)] * 3, (seq, answers)
        assert vm_seq(d, token, vm_id) == rounds
        status, body = d.request("POST", f"/v1/vms/{vm_id}/call", {"fn": "kv_count"},
                                 token=token)
        assert status == 200 and body["result"] == rounds

    asyncio.run(run())
    assert_healthy(d)


def test_resend_older_than_the_reply_window(cluster: Callable[..., Daemon]) -> None:
    """The VM keeps its last REPLY_WINDOW unacknowledged answers: a resend inside the
    window gets the very answer it missed (and applies nothing), one older gets
    `reply_expired`, a different call under a used number `sequence_conflict`, and an
    acknowledged answer is forgotten. All of it survives a restart (the checkpoint)."""
    d = cluster("window")
    token = d.token("tess")
    auth = {"Authorization": f"Bearer {token}"}
    n = REPLY_WINDOW + 44

    def put(seq: int, **extra: Any) -> bytes:
        return msgpack.packb({"id": seq, "fn": "kv_put", "args": [seq, seq], "seq": seq,
                              **extra})

    async def run() -> None:
        vm_id = await _created_vm(d, token)
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws:
                for seq in range(1, n + 1):  # pipelined, never acknowledged
                    await ws.send_bytes(put(seq))
                answers = {}
                for _ in range(n):
                    reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
                    answers[reply["id"]] = reply
                assert [answers[i]["result"] for i in range(1, n + 1)] == [1] * n
            await asyncio.to_thread(restart, d)
            async with http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws:
                oldest_kept = n - REPLY_WINDOW + 1
                for seq, code in ((1, "reply_expired"), (oldest_kept - 1, "reply_expired"),
                                  (oldest_kept, None), (n, None)):
                    await ws.send_bytes(put(seq))
                    reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
                    if code is None:
                        assert reply["result"] == answers[seq]["result"], reply
                    else:
                        assert reply["error"]["code"] == code, reply
                await ws.send_bytes(msgpack.packb({"id": 0, "fn": "kv_del", "args": [n],
                                                   "seq": n}))
                reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
                assert reply["error"]["code"] == "sequence_conflict", reply
                await ws.send_bytes(put(n, ack=n))  # "I have every answer up to n"
                reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
                assert reply["error"]["code"] == "reply_expired", reply
        status, body = d.request("POST", f"/v1/vms/{vm_id}/call",
                                 {"fn": "kv_put", "args": [1, 1], "seq": 2}, token=token)
        assert status == 409 and body["code"] == "reply_expired"
        assert vm_seq(d, token, vm_id) == n  # no resend applied anything
        status, body = d.request("POST", f"/v1/vms/{vm_id}/call",
                                 {"fn": "kv_count", "args": []}, token=token)
        assert status == 200 and body["result"] == n

    asyncio.run(run())
    assert_healthy(d)


def test_bad_call_arguments_are_typed_and_use_up_one_number_each(
        cluster: Callable[..., Daemon]) -> None:
    """Wrong arguments through the SDK: each call gets a typed error, uses up exactly
    its own number on both sides, and the session and the VM go on."""
    d = cluster("picky")
    token = d.token("gus")
    # The SDK refuses what is not a call before numbering it (no number used) ...
    refused_by_sdk: list[tuple[str, tuple[Any, ...]]] = [
        ("kv_put", (True, 1)),  # bool is not a number on the wire
        ("kv_put", ("1", "2")),
        ("kv_put", (1, b"x")),  # bytes mixed with numbers
        ("kv_set", (b"a=1", b"b=2")),  # two bytes arguments
        ("kv_put", (2**64, 1)),  # fits no wasm integer
    ]
    # ... and the cloudlet refuses the rest, each using up its own number.
    bad: list[tuple[str, tuple[Any, ...], type[CloudletError]]] = [
        ("kv_put", (1.5, 2), BadCall),  # a float for an i32
        ("kv_put", (float("nan"), 1), BadCall),
        ("kv_put", (2**40, 1), BadCall),  # does not fit an i32
        ("kv_put", (-(2**63), 1), BadCall),
        ("kv_put", (), BadCall),  # wrong count
        ("kv_put", (1, 2, 3), BadCall),
        ("kv_set", (1,), BadCall),  # a bytes function called with a number
        ("kv_put", (b"1=2",), BadCall),  # a numeric function called with bytes
        ("", (), BadCall),
        ("memory", (), BadCall),  # an export that is not a function
    ]

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client, \
                client.session(KVSTORE) as s:
            assert await s.call("kv_put", 1, 11) == 1
            for fn, args in refused_by_sdk:
                with pytest.raises(InvalidArgument):
                    await s.call(fn, *args)
            for fn, args, expected in bad:
                with pytest.raises(expected):
                    await s.call(fn, *args)
            assert await s.call("kv_set", bytearray(b"k=v")) == b""  # type: ignore[arg-type]
            assert await s.call("kv_get", 1) == 11
            assert s.seq == len(bad) + 3
            assert vm_seq(d, token, s.vm_id) == s.seq  # numbering never forked
            assert s.stats().reconnects == 0
            with pytest.raises(VMNotFound):
                async with client.attach("0123456789abcdef", d.endpoint):
                    pass

    asyncio.run(run())
    assert_healthy(d)


def test_a_call_that_timed_out_still_applies_exactly_once(
        cluster: Callable[..., Daemon]) -> None:
    """`CallTimeout` leaves the call queued: after the link comes back it is resent,
    answered from the reply log (it had been applied), and not applied again."""
    d = cluster("late")
    token = d.token("hal")

    async def run() -> None:
        async with FaultProxy(d.port) as link, \
                CloudletClient(token, endpoints=[link.endpoint]) as client, \
                client.session(KVSTORE) as s:
            assert await s.call("kv_put", 1, 1) == 1
            link.hold = True
            with pytest.raises(CallTimeout):
                await s.call("kv_put", 1, 2, deadline_ms=300)
            assert vm_seq(d, token, s.vm_id) == 2  # applied, the answer held back
            link.cut()
            link.hold = False
            assert await s.call("kv_get", 1) == 2
            assert vm_seq(d, token, s.vm_id) == 3
            assert s.stats().resent >= 1 and s.pending == ()

    asyncio.run(run())
    assert_healthy(d)


def test_a_session_starts_where_there_is_room(cluster: Callable[..., Daemon]) -> None:
    """A full cloudlet (max_vms=1, taken) is skipped whatever its RTT; with only full
    cloudlets, the error is typed."""
    full = cluster("full", max_vms=1)
    free = cluster("free")
    token = full.token("ida")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[full.endpoint]) as only_full:
            async with only_full.session(KVSTORE) as filler:
                assert filler.location.endpoint == full.endpoint
                with pytest.raises(NoCloudletAvailable):
                    async with only_full.session(KVSTORE):
                        pass
                async with CloudletClient(token, endpoints=[full.endpoint, free.endpoint]) as c:
                    for _ in range(3):
                        async with c.session(KVSTORE) as s:
                            assert s.location.endpoint == free.endpoint
                            assert await s.call("kv_put", 1, 1) == 1
            assert vms_of(full, token) == [] and vms_of(free, token) == []

    asyncio.run(run())
    assert_healthy(full)
    assert_healthy(free)


# --- bugs: exactly-once and "latency, never an error" ---------------------------------------


async def _calls_lost_in_flight(d: Daemon, token: str,
                                make_calls: Callable[[Any], list[Any]],
                                prepare: Callable[[Any], Any] | None = None) -> list[Any]:
    """Run `make_calls(session)` while every answer is held back by the proxy; once
    the daemon applied all the session lets be in flight (MAX_IN_FLIGHT), reset the
    connection. Returns what each call gave the application (a value, or the
    exception)."""
    async with FaultProxy(d.port) as link, \
            CloudletClient(token, endpoints=[link.endpoint]) as client, \
            client.session(KVSTORE) as s:
        await s.call("kv_count")  # connected: the handshake's answer is not held
        if prepare is not None:
            await prepare(s)
        base = s.seq
        link.hold = True
        calls = make_calls(s)
        tasks = [asyncio.ensure_future(c) for c in calls]
        in_flight = min(len(tasks), MAX_IN_FLIGHT)
        await wait_until(lambda: vm_seq(d, token, s.vm_id) == base + in_flight)
        link.cut()  # every answer is lost; the session must resend and get them all
        link.hold = False
        async with asyncio.timeout(20):
            return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_more_calls_in_flight_than_the_reply_window_survive_a_drop(
        cluster: Callable[..., Daemon]) -> None:
    d = cluster("busy")
    token = d.token("uma")
    n = 300

    async def run() -> None:
        results = await _calls_lost_in_flight(
            d, token, lambda s: [s.call("kv_put", i, i) for i in range(n)])
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of {n} calls failed, e.g. {errors[0]!r}"
        assert results == [1] * n

    asyncio.run(run())
    assert_healthy(d)


def test_large_answers_in_flight_survive_a_drop(cluster: Callable[..., Daemon]) -> None:
    d = cluster("frames")
    token = d.token("vic")
    value = random.Random(1).randbytes(900 << 10).replace(b"=", b"-")

    async def prepare(s: Any) -> None:
        assert await s.call("kv_set", b"frame=" + value) == b""

    async def run() -> None:
        results = await _calls_lost_in_flight(
            d, token, lambda s: [s.call("kv_lookup", b"frame") for _ in range(6)], prepare)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of 6 calls failed, e.g. {errors[0]!r}"
        assert results == [value] * 6

    asyncio.run(run())
    assert_healthy(d)


def test_two_sessions_attached_to_one_vm(cluster: Callable[..., Daemon]) -> None:
    """What happens: both sessions start from the VM's seq; A's call takes N+1; B's
    different call also carries N+1 and gets A's kept answer. B is told its write
    succeeded; it never happened. What should: B's call applied (numbering per
    session), or B refused with a typed error (one session per VM)."""
    d = cluster("shared")
    token = d.token("wes")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client:
            vm_id = await _created_vm(d, token)
            async with client.attach(vm_id, d.endpoint) as a, \
                    client.attach(vm_id, d.endpoint) as b:
                assert await a.call("kv_put", 1, 10) == 1
                try:
                    await b.call("kv_put", 2, 20)
                except CloudletError:
                    pass  # a typed refusal is an acceptable answer
                else:
                    assert await a.call("kv_get", 2) == 20, "B was told its put applied"

    asyncio.run(run())
    assert_healthy(d)


def test_unpackable_argument_is_typed_and_the_session_survives(
        cluster: Callable[..., Daemon]) -> None:
    d = cluster("args")
    token = d.token("xan")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client, \
                client.session(KVSTORE, call_deadline_ms=3000) as s:
            assert await s.call("kv_put", 1, 1) == 1
            for bad in (2**64, object()):
                with pytest.raises((InvalidArgument, BadCall, MalformedRequest)):
                    await s.call("kv_put", bad, 1)  # type: ignore[arg-type]
            assert await s.call("kv_put", 2, 2) == 1  # the session goes on (1: a new key)

    asyncio.run(run())
    assert_healthy(d)


def test_oversized_call_is_typed_and_the_session_survives(
        cluster: Callable[..., Daemon]) -> None:
    d = cluster("small", max_request_kib=16)
    token = d.token("zoe")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client, \
                client.session(KVSTORE, call_deadline_ms=2000) as s:
            assert await s.call("kv_set", b"a=" + b"x" * 1000) == b""
            with pytest.raises(RequestTooLarge):
                await s.call("kv_set", b"b=" + b"x" * (32 << 10))
            assert await s.call("kv_put", 1, 1) == 1
            assert s.stats().reconnects < 5

    asyncio.run(run())
    assert_healthy(d)


def test_token_expiring_under_a_session_surfaces_as_unauthorized(
        cluster: Callable[..., Daemon]) -> None:
    d = cluster("strict-auth")
    token = cluster_tokens(d.cluster_dir).issue("jo", 2)
    expiry = int(base64.urlsafe_b64decode(token.split(".")[0] + "==").decode().split("|")[1])

    async def run() -> None:
        async with FaultProxy(d.port) as link, \
                CloudletClient(token, endpoints=[link.endpoint]) as client, \
                client.session(KVSTORE, call_deadline_ms=2500) as s:
            assert await s.call("kv_put", 1, 1) == 1
            await asyncio.sleep(max(0.0, expiry + 0.2 - time.time()))
            assert await s.call("kv_put", 2, 2) == 1  # an open stream outlives its token
            link.cut()
            with pytest.raises((Unauthorized, SessionLost)):
                await s.call("kv_put", 3, 3)

    asyncio.run(run())
    assert_healthy(d)


def test_reply_log_stays_under_its_byte_cap_with_large_error_answers(
        cluster: Callable[..., Daemon]) -> None:
    d = cluster("bloat")
    token = d.token("kai")
    rng = random.Random(17)

    async def run() -> None:
        vm_id = await _created_vm(d, token)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
                http.ws_connect(f"{d.endpoint}/v1/vms/{vm_id}/stream") as ws:
            for seq in range(1, 13):  # 12 x 400 KiB names, each under max_request_kib
                name = rng.randbytes(200 << 10).hex()
                await ws.send_bytes(msgpack.packb({"id": seq, "fn": name, "args": [],
                                                   "seq": seq}))
                reply = msgpack.unpackb((await ws.receive(timeout=5)).data)
                assert reply["error"]["code"] == "bad_call"
        status, data = d.request("GET", f"/v1/vms/{vm_id}/snapshot", token=token)
        assert status == 200
        annex = Snapshot.from_bytes(data, 1 << 30).annex
        assert len(msgpack.packb(annex)) <= REPLY_BYTES_CAP + (64 << 10), "reply log over cap"

    asyncio.run(run())
    assert_healthy(d)


# --- leaks after moves ------------------------------------------------------------------------


def test_offload_after_its_warm_vm_moved(cluster: Callable[..., Daemon]) -> None:
    east, west = cluster("east"), cluster("west")
    token = east.token("abe")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[east.endpoint]) as client:
            assert (await client.offload(KVSTORE, "kv_put", [1, 1])).value == 1
            (vm_id,) = vms_of(east, token)
            status, body = east.request("POST", f"/v1/vms/{vm_id}/migrate",
                                        {"endpoint": west.endpoint}, token=east.operator_token())
            assert status == 200, body
            out = await client.offload(KVSTORE, "kv_count")
            assert out.value in (0, 1)
        assert vms_of(east, token) == [] and vms_of(west, token) == []

    asyncio.run(run())


def test_session_closed_right_after_a_move_leaves_no_vm(cluster: Callable[..., Daemon]) -> None:
    east, west = cluster("east"), cluster("west")
    token = east.token("bea")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE) as s:
                assert await s.call("kv_put", 1, 1) == 1
                # Blocking on purpose: the move completes before the session's task can
                # read the notice, i.e. the application closes as the VM moves.
                status, body = east.request("POST", f"/v1/vms/{s.vm_id}/migrate",
                                            {"endpoint": west.endpoint},
                                            token=east.operator_token())
                assert status == 200, body
        assert vms_of(west, token) == [] and vms_of(east, token) == []

    asyncio.run(run())


# --- blocking client --------------------------------------------------------------------------


def test_blocking_client_used_after_close(cluster: Callable[..., Daemon]) -> None:
    d = cluster("blocking")
    token = d.token("cal")
    threads_before = live_threads()
    client = BlockingClient(token, endpoints=[d.endpoint])
    with client.session(KVSTORE) as s:
        assert s.call("kv_put", 1, 2) == 1
        kept = s
    with pytest.raises(SessionLost):
        kept.call("kv_get", 1)  # the session's block is over
    client.close()
    client.close()  # twice is fine
    with pytest.raises(CloudletError):
        client.offload(KVSTORE, "kv_count")
    with pytest.raises(CloudletError), client.session(KVSTORE):
        pass
    with pytest.raises(CloudletError):
        kept.call("kv_get", 1)
    assert live_threads() == threads_before
    assert vms_of(d, token) == []
    assert_healthy(d)


def test_blocking_client_with_bad_options_leaks_no_thread() -> None:
    threads_before = live_threads()
    failures = []
    token = ClientTokens(b"s" * 32, SigningKey.generate().public_bytes).issue("t", 60)
    for options in ({}, {"endpoints": ["ftp://nowhere"]},
                    {"endpoints": ["http://127.0.0.1:9"], "policy": "fastest"}):
        with pytest.raises((ConfigError, InvalidArgument)) as failed:
            BlockingClient(token, **options)
        failures.append(failed)
    assert len(failures) == 3
    leaked = live_threads() - threads_before
    assert leaked == 0, f"{leaked} loop threads left running"


# --- command line -----------------------------------------------------------------------------


def _cli(args: list[str], token: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUDLET_TOKEN": token}
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=60)


def _one_line_error(out: subprocess.CompletedProcess[str], code: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cloudlet: error [{code}]: "), out.stderr
    assert len(lines[0]) > len(f"cloudlet: error [{code}]: ") + 5, "an empty message"


def test_cli_bad_input_is_one_line_exit_1(cluster: Callable[..., Daemon], tmp_path: Path) -> None:
    d = cluster("cli")
    token = d.token("dan")
    ep = ["--endpoint", d.endpoint]
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"this is not webassembly")
    cases = [
        (["offload", *ep, str(tmp_path / "missing.wasm"), "kv_count"], "image_not_found"),
        (["session", *ep, str(tmp_path / "missing.wasm")], "image_not_found"),
        (["session", *ep, str(tmp_path)], "image_not_found"),  # a directory
        (["offload", *ep, str(junk), "kv_count"], "image_rejected"),
        (["offload", *ep, str(KVSTORE), "kv_put", "one", "2"], "bad_call"),
        (["offload", *ep, str(KVSTORE), "kv_put", "@" + str(tmp_path / "nofile")], "bad_call"),
        (["offload", *ep, str(KVSTORE), "kv_put", "x:zz"], "bad_call"),
        (["offload", "--endpoint", "ftp://x", str(KVSTORE), "kv_count"], "config_error"),
        (["offload", "--endpoint", "http://127.0.0.1:9", str(KVSTORE), "kv_count"],
         "no_cloudlet_available"),
    ]
    for args, code in cases:
        _one_line_error(_cli(args, token), code)
    # With no metro, the answer names the broker it could not reach.
    out = _cli(["offload", "--broker", "mqtt://127.0.0.1:9", str(KVSTORE), "kv_count"], token)
    _one_line_error(out, "no_cloudlet_available")
    assert "on the broker mqtt://127.0.0.1:9" in out.stderr, out.stderr
    assert vms_of(d, token) == []
    assert_healthy(d)


def test_cli_huge_integer_argument(cluster: Callable[..., Daemon]) -> None:
    d = cluster("cli2")
    token = d.token("eve")
    out = _cli(["offload", "--endpoint", d.endpoint, str(KVSTORE), "kv_put", str(2**64), "1"],
               token)
    _one_line_error(out, "bad_call")
    out = _cli(["session", "--endpoint", d.endpoint, str(KVSTORE)], token,
               stdin=f"kv_put {2**64} 1\nkv_put 1 1\n")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout.splitlines()[-1] == "1", out.stdout  # the session survives
    # A session whose only call failed says so, rather than printing NaN latencies.
    out = _cli(["session", "--endpoint", d.endpoint, str(KVSTORE)], token,
               stdin=f"kv_put {2**64} 1\n")
    assert out.returncode == 1
    assert "nan" not in out.stderr.lower(), out.stderr
    assert out.stderr.strip().splitlines()[-1] == "no call answered, 1 failed; 0 moves followed"


def test_offload_deadline_is_a_typed_error(cluster: Callable[..., Daemon]) -> None:
    d = cluster("slowpoke")
    token = d.token("fay")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client:
            with pytest.raises(CloudletError):
                await client.offload(KVSTORE, "kv_count", deadline_ms=0.001)

    asyncio.run(run())
    _one_line_error(_cli(["offload", "--endpoint", d.endpoint, "--deadline-ms", "0.001",
                          str(KVSTORE), "kv_count"], token), "call_timeout")



def test_cli_manages_vms_on_cloudlets(cluster: Callable[..., Daemon]) -> None:
    """`cloudlet vm create|ls|call|destroy` against a real cloudlet, and a kept session."""
    d = cluster("vmcli")
    token = d.token("gil")
    ep = ["--endpoint", d.endpoint]
    out = _cli(["vm", "create", *ep, str(KVSTORE)], token)
    assert out.returncode == 0, out.stderr
    vm_id, node, endpoint = out.stdout.split()
    assert node == "vmcli" and endpoint == d.endpoint
    out = _cli(["vm", "ls", *ep], token)
    assert out.returncode == 0 and vm_id in out.stdout and "vmcli" in out.stdout, out.stdout
    assert _cli(["vm", "call", *ep, vm_id, "kv_put", "3", "30"], token).returncode == 0
    out = _cli(["vm", "call", *ep, vm_id, "kv_get", "3"], token)
    assert out.returncode == 0 and out.stdout.strip() == "30", out.stderr
    out = _cli(["vm", "ls", *ep], d.token("hal"))  # another client sees none of it
    assert vm_id not in out.stdout
    _one_line_error(_cli(["vm", "call", *ep, vm_id, "kv_get", "3"], d.token("hal")),
                    "vm_not_found")
    out = _cli(["vm", "destroy", *ep, vm_id], token)
    assert out.returncode == 0, out.stderr
    assert vm_id not in _cli(["vm", "ls", *ep], token).stdout
    _one_line_error(_cli(["vm", "destroy", *ep, vm_id], token), "vm_not_found")
    # A session kept beyond its end is there to call afterwards.
    out = _cli(["session", "--keep", *ep, str(KVSTORE)], token, stdin="kv_put 1 11\n")
    assert out.returncode == 0, out.stderr
    kept = out.stderr.split("session: VM ")[1].split()[0]
    out = _cli(["vm", "call", *ep, kept, "kv_get", "1"], token)
    assert out.stdout.strip() == "11", out.stderr
    assert _cli(["vm", "destroy", *ep, kept], token).returncode == 0
    assert vms_of(d, token) == []
    assert_healthy(d)
