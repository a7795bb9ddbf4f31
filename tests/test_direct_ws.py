"""Stream messages answered as they are parsed (edge_agent/direct_ws.py): over real
sockets, in-process servers for the mechanism, and real daemon processes for what a
client (or an attacker) can do with it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import WSMsgType, web

from edge_agent import direct_ws
from edge_agent.direct_ws import (
    SHORT_HEADERS,
    DirectWebSocket,
    binary_frame_header,
    write_binary,
)
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, make_daemon

KV = (WORKLOADS / "kvstore.wasm").read_bytes()


class EchoServer:
    """An app whose one stream answers binary messages directly (`b"direct:" + payload`)
    unless told to decline them; the coroutine answers `b"coroutine:" + payload` and
    can be held inside a message with `hold`."""

    def __init__(self) -> None:
        self.decline: Callable[[bytes], bool] = lambda payload: False
        self.hold = asyncio.Event()
        self.hold.set()
        self.direct_seen: list[bytes] = []
        self.coroutine_seen: list[bytes] = []
        self.sockets: list[DirectWebSocket] = []
        self.transports: list[Any] = []

    async def stream(self, request: web.Request) -> DirectWebSocket:
        ws = DirectWebSocket(max_msg_size=1 << 20)
        await ws.prepare(request)
        self.sockets.append(ws)
        transport = request.transport
        self.transports.append(transport)

        def serve(payload: bytes) -> bool:
            if self.decline(payload) or transport is None or not ws.can_write_now(transport):
                return False
            self.direct_seen.append(payload)
            write_binary(transport, b"direct:" + payload)
            return True

        ws.serve_directly(serve)
        while True:
            msg = await ws.receive_when_idle()
            if msg.type is not WSMsgType.BINARY:
                break
            self.coroutine_seen.append(msg.data)
            await self.hold.wait()
            await ws.send_bytes(b"coroutine:" + msg.data)
        return ws


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[EchoServer, str]]:
    server = EchoServer()
    app = web.Application()
    app.router.add_get("/s", server.stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}/s"
    finally:
        await runner.cleanup()


async def hold_in_coroutine(server: EchoServer, ws: aiohttp.ClientWebSocketResponse,
                            first: bytes) -> None:
    """Send `first`, declined by the direct path, and return once the server's
    coroutine holds it (until `server.hold` is set)."""
    server.decline = lambda payload: payload == first
    server.hold.clear()
    await ws.send_bytes(first)
    while not server.coroutine_seen:
        await asyncio.sleep(0.01)


def test_the_installed_aiohttp_takes_the_direct_path() -> None:
    """If an aiohttp upgrade changes the reader this relies on, streams fall back to
    aiohttp's own path; this says so instead of letting the daemon slow down quietly."""
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            await ws.send_bytes(b"one")
            assert await ws.receive_bytes() == b"direct:one"
            assert server.sockets[0].direct
            assert server.direct_seen == [b"one"] and server.coroutine_seen == []
    asyncio.run(run())


def test_frames_of_every_length_class_reach_a_real_client_whole() -> None:
    """The header's three length forms (7-bit, 16-bit, 64-bit), at their edges, read
    back by aiohttp's client parser."""
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 200_000]
    assert [len(binary_frame_header(n)) for n in sizes] == [2, 2, 2, 4, 4, 4, 10, 10]
    assert binary_frame_header(65536) == struct.pack("!BBQ", 0x82, 127, 65536)
    assert tuple(binary_frame_header(n) for n in range(126)) == SHORT_HEADERS
    # The server answers b"direct:" + payload through `write_binary`, 7 bytes more:
    # these payloads put its answers at each edge too (125 and 126 bytes, ...).
    sent = sorted({max(n - 7, 0) for n in sizes} | set(sizes))

    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url, max_msg_size=1 << 20) as ws:
            assert server.sockets == [] or server.sockets[0].direct
            for n in sent:
                payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
                await ws.send_bytes(payload)
                assert await ws.receive_bytes() == b"direct:" + payload, n
            assert len(server.direct_seen) == len(sent)
    asyncio.run(run())


def test_order_is_kept_when_the_coroutine_is_busy() -> None:
    """Messages that arrive while the coroutine is inside a message queue behind it,
    and are answered after it, in order, even though the direct path would take them."""
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            await hold_in_coroutine(server, ws, b"slow")
            for k in range(20):
                await ws.send_bytes(b"m%d" % k)
            await ws.ping()  # a control frame among them changes nothing
            await asyncio.sleep(0.2)
            server.hold.set()
            answers = [await ws.receive_bytes() for _ in range(21)]
            assert answers == [b"coroutine:slow"] + [b"coroutine:m%d" % k for k in range(20)]
            assert server.direct_seen == []
            # Back between messages: the next one is answered directly again.
            await ws.send_bytes(b"after")
            assert await ws.receive_bytes() == b"direct:after"
    asyncio.run(run())


def test_order_is_kept_when_aiohttp_resumes_parsing_inside_receive() -> None:
    """Found by a second reader: aiohttp stops parsing once its queue holds 512 KiB and
    resumes inside `receive()` as it hands over the next message. The small messages
    parsed then must queue behind that large one, not be answered before it."""
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            await hold_in_coroutine(server, ws, b"M0")
            big = b"M1" + bytes(600 << 10)  # over the queue's limit on its own
            for payload in (big, b"M2", b"M3"):
                await ws.send_bytes(payload)
            await asyncio.sleep(0.2)  # all of it read, M2 and M3 left unparsed
            server.hold.set()
            answers = [(await ws.receive_bytes())[:12] for _ in range(4)]
            assert answers == [b"coroutine:M0", b"coroutine:M1", b"coroutine:M2",
                               b"coroutine:M3"]
    asyncio.run(run())


def test_a_failure_inside_serve_ends_the_stream_and_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(payload: bytes) -> bool:
        raise RuntimeError("a defect in serve")

    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            server.decline = broken
            await ws.send_bytes(b"x")
            msg = await ws.receive()
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    asyncio.run(run())
    assert "answering a stream message failed" in caplog.text
    assert "a defect in serve" in caplog.text


def test_text_and_declined_messages_reach_the_coroutine() -> None:
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            server.decline = lambda payload: payload.startswith(b"no")
            answers = []
            for payload in (b"a", b"no1", b"b", b"no2"):
                await ws.send_bytes(payload)
                answers.append(await ws.receive_bytes())
            assert answers == [b"direct:a", b"coroutine:no1", b"direct:b", b"coroutine:no2"]
            await ws.send_str("text")  # ends the server's loop (not binary)
            closed = await ws.receive()
            assert closed.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    asyncio.run(run())


def test_a_client_that_does_not_read_gets_no_direct_answers_beyond_the_limit() -> None:
    """A client that writes and never reads: once the socket's write buffer passes the
    limit, answers go through `send_bytes`, which waits for the client, and the
    server stops reading the socket; nothing piles up in the server."""
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url, max_msg_size=1 << 20) as ws:
            big = bytes(32 << 10)
            sent = 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    while True:
                        await ws.send_bytes(big)
                        sent += 1
            buffered = server.transports[0].get_write_buffer_size()
            handled = len(server.direct_seen) + len(server.coroutine_seen)
            # Once the kernel's buffers were full, the direct path stopped at its
            # limit; the coroutine took over and is parked in send_bytes's wait, not
            # reading further: the server holds little of what it was sent.
            assert server.coroutine_seen, "the coroutine never took over"
            assert buffered < 1 << 20 < sent * len(big) // 8, (buffered, sent)
            print(f"sent {sent}, direct {len(server.direct_seen)}, "
                  f"coroutine {len(server.coroutine_seen)}, buffered {buffered}")
            assert handled < sent
            # The client reads again: every message sent is answered, in order.
            answers = [await ws.receive_bytes() for _ in range(sent)]
            assert all(a.endswith(big) for a in answers)
            assert len(answers) == sent
    asyncio.run(run())


def test_a_notice_written_now_arrives_whole_and_only_while_the_socket_keeps_up() -> None:
    """`write_now` (the `moved` notice at a migration's decision) writes a frame at
    once, without a loop turn, between whole answers; once a client that does not
    read has filled the socket past the limit it writes nothing and says so (the
    caller then sends it through aiohttp's flow control)."""
    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url, max_msg_size=1 << 20) as ws:
            await ws.send_bytes(b"one")
            assert await ws.receive_bytes() == b"direct:one"
            notice = msgpack.packb({"id": None, "moved": {"vm": "v", "node": "n"}})
            before = server.transports[0].get_write_buffer_size()
            assert server.sockets[0].write_now(notice)  # no await: written as called
            assert server.transports[0].get_write_buffer_size() <= before
            await ws.send_bytes(b"two")
            assert [await ws.receive_bytes() for _ in range(2)] == [notice, b"direct:two"]
            big = bytes(32 << 10)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    while True:
                        await ws.send_bytes(big)
            transport = server.transports[0]
            assert transport.get_write_buffer_size() > direct_ws.DIRECT_WRITE_LIMIT
            buffered = transport.get_write_buffer_size()
            assert not server.sockets[0].write_now(notice)
            assert transport.get_write_buffer_size() == buffered
    asyncio.run(run())


def test_an_aiohttp_with_another_reader_falls_back_to_its_own_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: a reader that takes other arguments (as aiohttp 3.11-3.13's, which
    have no `decode_text`) leaves the stream on aiohttp's own path, working."""
    def other_reader(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("__init__() takes exactly 4 positional arguments (5 given)")

    monkeypatch.setattr(direct_ws, "WebSocketReader", other_reader)

    async def run() -> None:
        async with echo_server() as (server, url), aiohttp.ClientSession() as s, \
                s.ws_connect(url) as ws:
            await ws.send_bytes(b"x")
            assert await ws.receive_bytes() == b"coroutine:x"
            assert not server.sockets[0].direct
    asyncio.run(run())


# --- real daemons ------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path, request_deadline_s=5.0, max_request_kib=256).start()
    yield d
    d.kill()


def _vm(d: Daemon, token: str) -> str:
    status, body = d.request("POST", "/v1/images", raw=KV, token=token)
    assert status == 201, body
    status, body = d.request("POST", "/v1/vms", {"image": body["digest"]}, token=token)
    assert status == 201, body
    vm: str = body["vm"]
    return vm


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_pipelined_numbered_calls_apply_once_each_in_order(daemon: Daemon) -> None:
    """A client writes 500 numbered calls without waiting, pings among them, then
    reads: every call applied once, in its order, each answer under its own id."""
    alice = daemon.token("alice")
    vm = _vm(daemon, alice)

    async def run() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {alice}"}) as s, \
                s.ws_connect(f"{daemon.endpoint}/v1/vms/{vm}/stream") as ws:
            for k in range(1, 501):
                await ws.send_bytes(msgpack.packb(
                    {"id": k, "fn": "kv_put", "args": [7, k], "seq": k}))
                if k % 50 == 0:
                    await ws.ping()
            return [msgpack.unpackb(await ws.receive_bytes()) for _ in range(500)]

    answers = asyncio.run(run())
    assert [a["id"] for a in answers] == list(range(1, 501))
    assert [a["seq"] for a in answers] == list(range(1, 501))
    assert answers[0]["result"] == 1  # new key
    assert all(a["result"] == 0 for a in answers[1:])  # replaced
    status, body = daemon.request("POST", f"/v1/vms/{vm}/call",
                                  {"fn": "kv_get", "args": [7]}, token=alice)
    assert (status, body) == (200, {"result": 500, "seq": 501})


@pytest.mark.slow
def test_a_client_that_never_reads_is_held_back_and_others_are_served(
        daemon: Daemon) -> None:
    """An attacker streams calls of 48 KiB whose answers are 48 KiB and never reads them.
    The daemon stops answering it once the socket's buffers are full (its memory
    does not grow with what was asked), and another client's calls still answer."""
    mallory, alice = daemon.token("mallory"), daemon.token("alice")
    vm_m, vm_a = _vm(daemon, mallory), _vm(daemon, alice)
    value = bytes(48 << 10)
    status, _ = daemon.request("POST", f"/v1/vms/{vm_m}/call",
                               {"fn": "kv_set", "data": b"k=" + value}, token=mallory)
    assert status == 200
    assert daemon.proc is not None
    rss_before = _rss_kib(daemon.proc.pid)

    async def run() -> tuple[int, list[int]]:
        # kv_set answers with the value it replaces: the same 48 KiB, each time.
        swap = msgpack.packb({"id": 1, "fn": "kv_set", "data": b"k=" + value})
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(f"{daemon.endpoint}/v1/vms/{vm_m}/stream",
                             headers={"Authorization": f"Bearer {mallory}"}) as bad, \
                s.ws_connect(f"{daemon.endpoint}/v1/vms/{vm_a}/stream",
                             headers={"Authorization": f"Bearer {alice}"}) as good:
            sent = 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    while sent < 20_000:  # 940 MiB of answers, were they all made
                        await bad.send_bytes(swap)
                        sent += 1
            results = []
            for k in range(20):
                await good.send_bytes(msgpack.packb({"id": k, "fn": "add", "args": [k, 1]}))
                async with asyncio.timeout(5):
                    results.append(msgpack.unpackb(await good.receive_bytes())["result"])
            return sent, results

    sent, results = asyncio.run(run())
    assert results == [k + 1 for k in range(20)]
    assert sent < 20_000, "the daemon read everything: nothing held the attacker back"
    grown_mib = (_rss_kib(daemon.proc.pid) - rss_before) / 1024
    assert grown_mib < 64, f"daemon grew {grown_mib:.0f} MiB for {sent} unread answers"
    status, body = daemon.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
