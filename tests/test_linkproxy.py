"""The link proxy shapes bandwidth within ~10% of the set rate and adds its delay."""

from __future__ import annotations

import asyncio
import time

import pytest

from cloudlet.errors import InvalidArgument
from cloudlet.linkproxy import LinkProxy, LinkShape, shaped_link


async def _sink_server() -> tuple[asyncio.Server, int, list[int]]:
    received: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        total = 0
        while data := await r.read(1 << 16):
            total += len(data)
        received.append(total)
        w.write(b"k")  # the whole transfer arrived
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


async def _transfer(port: int, size_bytes: int) -> float:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    chunk = bytes(64 * 1024)
    for _ in range(size_bytes // len(chunk)):
        w.write(chunk)
        await w.drain()
    w.write_eof()
    assert await r.read(1) == b"k"
    elapsed = time.monotonic() - start
    w.close()
    return elapsed


@pytest.mark.parametrize(("rate_mbit_s", "delay_ms"), [(100.0, 0.0), (25.0, 0.0), (25.0, 10.0)])
def test_throughput_within_ten_percent(rate_mbit_s: float, delay_ms: float) -> None:
    size_bytes = int(rate_mbit_s * 1e6 / 8 * 0.8)  # ~0.8 s of transfer

    async def main() -> float:
        server, port, received = await _sink_server()
        async with server, shaped_link("127.0.0.1", port, rate_mbit_s, delay_ms) as proxy:
            elapsed = await _transfer(proxy.port, size_bytes)
        assert received == [size_bytes // (64 * 1024) * 64 * 1024]
        return received[0] * 8 / 1e6 / elapsed

    measured = asyncio.run(main())
    assert measured == pytest.approx(rate_mbit_s, rel=0.10)


def test_delay_is_added_each_way() -> None:
    async def main() -> float:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(100):
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, LinkProxy("127.0.0.1", port, up=LinkShape(None, 20),
                                     down=LinkShape(None, 20)) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            start = time.monotonic()
            w.write(b"ping")
            await w.drain()
            assert await r.readexactly(4) == b"ping"
            rtt_s = time.monotonic() - start
            w.close()
        return rtt_s

    rtt_s = asyncio.run(main())
    assert 0.040 <= rtt_s < 0.080


def test_shape_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgument):
        LinkShape(rate_mbit_s=0)
    with pytest.raises(InvalidArgument):
        LinkShape(delay_ms=-1)
