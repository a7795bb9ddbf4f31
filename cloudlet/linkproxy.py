"""A loopback TCP proxy that shapes a link: bandwidth per direction and added delay.

Why: migration's figures on a 100 or 25 Mbit/s link (and the emulation's
per-client delays) must come from real sockets on one machine, without root
(`tc netem` needs CAP_NET_ADMIN). Each direction of each connection is a token
bucket (rate in Mbit/s, a small burst), and every piece of data is held back
`delay_ms` after it arrived, like propagation delay: delay does not cut the
throughput of a long transfer, as on a real link.

A proxy is one link, or one pipe per connection: with `shared=True` every
connection through it draws on one token bucket per direction, so two transfers
at once each get about half the rate, as flows crossing one real link do (the
emulation's backhaul, where concurrent migrations must slow each other down);
by default each connection has its own rate (one migration over a throttled
path, as the migration benchmark runs).

Backpressure is real: the proxy reads only as fast as the bucket lets it
forward, and has at most `BUFFER_BYTES` in flight per direction, so a sender's
`drain()` blocks as it would behind a slow link.

A link's delay and rate can change while connections are open (`set_delay`,
`set_rate`: a client walking away from a cloudlet), for data that arrives after
the change. Order is kept as on a real link: a piece of data is due at
max(arrival + delay, the previous piece's due time), so a shorter delay never
lets a byte overtake an earlier one. Every connection takes a later delay, even
one opened with none; data that meets no delay and nothing queued is written at
once, so a link without delay costs no more than a plain relay.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace

from cloudlet.errors import InvalidArgument

READ_BYTES = 16 * 1024  # one read; small enough that the bucket's grain stays fine
# Bytes a direction may hold (read, not yet forwarded): about a real router's
# queue at these rates, and what the sender sees as the link's buffer.
BUFFER_BYTES = 256 * 1024
# Burst the bucket allows after idling: 2 reads, so an idle link does not
# later send a second's worth at once and overshoot the rate.
BURST_BYTES = 2 * READ_BYTES


@dataclass(frozen=True)
class LinkShape:
    rate_mbit_s: float | None = None  # None: unlimited
    delay_ms: float = 0.0  # one way, added to every byte

    def __post_init__(self) -> None:
        if self.rate_mbit_s is not None and not self.rate_mbit_s > 0:
            raise InvalidArgument("rate_mbit_s must be positive (or None for unlimited)")
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise InvalidArgument(f"delay_ms must be a finite number >= 0, not {self.delay_ms!r}")

    @property
    def rate_bytes_s(self) -> float | None:
        return None if self.rate_mbit_s is None else self.rate_mbit_s * 1e6 / 8


class LiveShape:
    """The shape of one direction of a link, which may change while connections use
    it: each connection's pipe reads `shape` for every piece of data it forwards.
    `bucket`, when set, is the direction's one token bucket that every connection
    shares (a shared link)."""

    __slots__ = ("bucket", "shape")

    def __init__(self, shape: LinkShape, shared: bool = False) -> None:
        self.shape = shape
        self.bucket: TokenBucket | None = None
        if shared:
            self.bucket = TokenBucket(shape.rate_bytes_s or 1.0)


class TokenBucket:
    """`take(n)` waits until n bytes may pass at `rate_bytes_s`. Takers may share
    one: each adds its bytes to the debt and waits it off, so together they pass
    `rate_bytes_s`, served about in turn."""

    def __init__(self, rate_bytes_s: float, burst_bytes: int = BURST_BYTES) -> None:
        self.rate_bytes_s = rate_bytes_s
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._at = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.rate_bytes_s)
        self._at = now
        self._tokens -= n  # may go negative: wait off the debt
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate_bytes_s)


class LinkProxy:
    """Listen on 127.0.0.1:`port` (0: any), forward to `target`, shaped by `up`
    (client to target) and `down` (target to client). Use `async with`."""

    def __init__(self, target_host: str, target_port: int, *, up: LinkShape | None = None,
                 down: LinkShape | None = None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, shared: bool = False) -> None:
        self.target = (target_host, target_port)
        self._up = LiveShape(up or LinkShape(), shared)
        self._down = LiveShape(down or LinkShape(), shared)
        self._listen = (listen_host, listen_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @classmethod
    def symmetric(cls, target_host: str, target_port: int, rate_mbit_s: float | None,
                  delay_ms: float = 0.0) -> LinkProxy:
        shape = LinkShape(rate_mbit_s, delay_ms)
        return cls(target_host, target_port, up=shape, down=shape)

    @property
    def up(self) -> LinkShape:
        """The shape of client-to-target data now."""
        return self._up.shape

    @property
    def down(self) -> LinkShape:
        """The shape of target-to-client data now."""
        return self._down.shape

    def set_delay(self, up_ms: float, down_ms: float | None = None) -> None:
        """Change the one-way delay (`down_ms` None: the same as `up_ms`), for data that
        arrives from now on, on open connections too; order is kept (see above)."""
        up = replace(self._up.shape, delay_ms=up_ms)  # checked before either changes
        down = replace(self._down.shape, delay_ms=up_ms if down_ms is None else down_ms)
        self._up.shape, self._down.shape = up, down

    def set_rate(self, mbit_s: float | None) -> None:
        """Change both directions' rate (None: unlimited), on open connections too."""
        up = replace(self._up.shape, rate_mbit_s=mbit_s)
        down = replace(self._down.shape, rate_mbit_s=mbit_s)
        self._up.shape, self._down.shape = up, down

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self._listen)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)  # owned: close() cancels and awaits every connection
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_r: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pipe(client_r, target_w, self._up))
                tg.create_task(_pipe(target_r, client_w, self._down))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (client_w, target_w):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                live: LiveShape) -> None:
    """Forward one direction: rate-limit on the way in, delay on the way out.

    Pieces wait in `queue` (oldest first) until due; `deliver` writes them. A piece
    that is due at once while nothing waits is written here instead: the queue is
    empty only when every earlier piece has been handed to the transport (`deliver`
    takes a piece off just as it writes it), so this keeps order too."""
    queue: deque[tuple[float, bytes]] = deque()
    ready = asyncio.Event()
    room = asyncio.Semaphore(BUFFER_BYTES // READ_BYTES)
    bucket: TokenBucket | None = None
    last_due_s = 0.0

    async def deliver() -> None:
        while True:
            while not queue:
                ready.clear()
                await ready.wait()
            due_s, data = queue[0]
            wait_s = due_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            queue.popleft()
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            room.release()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(deliver())
        while True:
            await room.acquire()
            data = await reader.read(READ_BYTES)
            shape = live.shape
            rate = shape.rate_bytes_s
            if data and rate is not None:
                if live.bucket is not None:
                    bucket = live.bucket
                elif bucket is None:
                    bucket = TokenBucket(rate)
                bucket.rate_bytes_s = rate
                await bucket.take(len(data))
            if data and not queue and shape.delay_ms == 0:
                writer.write(data)  # nothing to wait for, nothing ahead of it
                await writer.drain()
                room.release()
                continue
            last_due_s = max(time.monotonic() + shape.delay_ms / 1000, last_due_s)
            queue.append((last_due_s, data))
            ready.set()
            if not data:
                break


@asynccontextmanager
async def shaped_link(target_host: str, target_port: int, rate_mbit_s: float | None,
                      delay_ms: float = 0.0) -> AsyncIterator[LinkProxy]:
    """`async with shaped_link(host, port, 25) as proxy:` connect to proxy.port."""
    async with LinkProxy.symmetric(target_host, target_port, rate_mbit_s, delay_ms) as proxy:
        yield proxy
