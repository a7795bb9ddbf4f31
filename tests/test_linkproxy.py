"""The link proxy shapes bandwidth within ~10% of the set rate and adds its delay,
which may change under open connections without reordering a byte."""

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

    # 20 ms each way: the round trip takes at least 40 ms. (How little more it takes
    # depends on the machine, not on the proxy: no upper bound.)
    assert asyncio.run(main()) >= 0.040


def test_shape_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgument):
        LinkShape(rate_mbit_s=0)
    with pytest.raises(InvalidArgument):
        LinkShape(delay_ms=-1)


# --- a link whose delay changes while connections are open ---------------------------------


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _rtt_ms(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> float:
    """The lowest of a few round trips (one scheduling hiccup does not count)."""
    best = float("inf")
    for _ in range(3):
        start = time.monotonic()
        w.write(b"ping")
        await w.drain()
        assert await r.readexactly(4) == b"ping"
        best = min(best, (time.monotonic() - start) * 1000)
    return best


def test_set_delay_changes_an_open_connection_up_and_down() -> None:
    """A connection opened with no delay takes one later, and loses it again."""
    async def main() -> list[float]:
        server, port = await _echo_server()
        async with server, LinkProxy("127.0.0.1", port) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            rtts = [await _rtt_ms(r, w)]
            proxy.set_delay(20)
            assert proxy.up.delay_ms == proxy.down.delay_ms == 20
            rtts.append(await _rtt_ms(r, w))
            proxy.set_delay(5, 30)
            assert (proxy.up.delay_ms, proxy.down.delay_ms) == (5, 30)
            rtts.append(await _rtt_ms(r, w))
            proxy.set_delay(0)
            rtts.append(await _rtt_ms(r, w))
            w.close()
        return rtts

    none, both_20, up5_down30, none_again = asyncio.run(main())
    assert none < 15 and none_again < 15, (none, none_again)
    assert both_20 >= 40 and up5_down30 >= 35, (both_20, up5_down30)


def test_order_is_kept_while_the_delay_changes() -> None:
    """A numbered stream through a link whose delay keeps changing (longer, shorter,
    none) arrives complete and in order: a shorter delay lets nothing overtake."""
    count = 400

    async def main() -> bytes:
        received = bytearray()
        done = asyncio.Event()

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1 << 16):
                received.extend(data)
            done.set()
            w.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, LinkProxy("127.0.0.1", port) as proxy:
            _, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            for i in range(count):
                if i % 50 == 0:
                    proxy.set_delay((0, 60, 1, 30, 0, 45, 2, 0)[i // 50])
                w.write(i.to_bytes(4, "big"))
                await w.drain()
                await asyncio.sleep(0.001)
            w.write_eof()
            async with asyncio.timeout(10):
                await done.wait()
            w.close()
        return bytes(received)

    received = asyncio.run(main())
    numbers = [int.from_bytes(received[i:i + 4], "big") for i in range(0, len(received), 4)]
    assert numbers == list(range(count))


def test_set_delay_and_set_rate_check_their_arguments() -> None:
    async def main() -> None:
        async with LinkProxy("127.0.0.1", 9, up=LinkShape(None, 7)) as proxy:
            for bad in (-1.0, float("nan"), float("inf")):
                with pytest.raises(InvalidArgument):
                    proxy.set_delay(bad)
                with pytest.raises(InvalidArgument):
                    proxy.set_delay(1, bad)
            with pytest.raises(InvalidArgument):
                proxy.set_rate(0)
            assert (proxy.up.delay_ms, proxy.down.delay_ms) == (7, 0)  # nothing changed
            proxy.set_rate(10)
            assert proxy.up.rate_mbit_s == proxy.down.rate_mbit_s == 10

    asyncio.run(main())


def test_set_rate_limits_a_link_made_without_a_rate() -> None:
    rate_mbit_s = 25.0

    async def main() -> float:
        server, port, received = await _sink_server()
        async with server, LinkProxy("127.0.0.1", port) as proxy:
            proxy.set_rate(rate_mbit_s)
            elapsed = await _transfer(proxy.port, int(rate_mbit_s * 1e6 / 8 * 0.8))
        return received[0] * 8 / 1e6 / elapsed

    assert asyncio.run(main()) == pytest.approx(rate_mbit_s, rel=0.10)


@pytest.mark.parametrize("shared", [True, False])
def test_a_shared_link_splits_its_rate_between_connections(shared: bool) -> None:
    """Two transfers at once: on a shared link (one bucket per direction) they pass
    the link's rate together; with a pipe per connection, each passes it."""
    rate_mbit_s = 25.0
    size_bytes = int(rate_mbit_s * 1e6 / 8 * 0.4)  # ~0.4 s alone, each

    async def main() -> float:
        server, port, received = await _sink_server()
        shape = LinkShape(rate_mbit_s)
        async with server, LinkProxy("127.0.0.1", port, up=shape, down=shape,
                                     shared=shared) as proxy:
            start = time.monotonic()
            await asyncio.gather(_transfer(proxy.port, size_bytes),
                                 _transfer(proxy.port, size_bytes))
            elapsed = time.monotonic() - start
        assert len(received) == 2
        return sum(received) * 8 / 1e6 / elapsed

    together_mbit_s = asyncio.run(main())
    expected = rate_mbit_s if shared else 2 * rate_mbit_s
    assert together_mbit_s == pytest.approx(expected, rel=0.15)
