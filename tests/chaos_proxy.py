"""A TCP proxy on loopback that kills its connections on demand, mid-call.

Real sockets, real connection loss: `kill_after(chunks, side)` lets the next
`chunks` pieces from the client reach the server (so a call can be applied),
then closes the connection on one side first: "server" (the daemon sees its
peer vanish) or "client" (the SDK's socket is reset). The answer in flight is
lost either way, which is what exactly-once has to survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter


@dataclass
class ChaosProxy:
    upstream_port: int
    port: int = 0
    kills: int = 0
    _live: dict[int, _Pair] = field(default_factory=dict)
    _armed: tuple[int, str] | None = None
    _server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pair in list(self._live.values()):
            _abort(pair.client)
            _abort(pair.server)
        await self._server.wait_closed()

    def kill_after(self, chunks: int, side: str) -> None:
        """Kill every live connection once `chunks` more client pieces went through."""
        self._armed = (chunks, side)

    def kill_now(self, side: str) -> None:
        for key, pair in list(self._live.items()):
            first, second = ((pair.server, pair.client) if side == "server"
                             else (pair.client, pair.server))
            _abort(first)
            _abort(second)
            self._live.pop(key, None)
            self.kills += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _abort(writer)
            return
        key = id(writer)
        self._live[key] = _Pair(writer, up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, count=True),
                                 self._pipe(up_reader, writer, count=False))
        except asyncio.CancelledError:
            pass  # the proxy is closing; asyncio's server would log the cancellation
        finally:
            self._live.pop(key, None)
            _abort(writer)
            _abort(up_writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    count: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if count and self._armed is not None:
                    left, side = self._armed
                    if left <= 1:
                        self._armed = None
                        await asyncio.sleep(0)  # let the server read it: a call in flight
                        self.kill_now(side)
                        return
                    self._armed = (left - 1, side)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # RST, not FIN: the peer sees the connection reset, as when a radio link drops.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
