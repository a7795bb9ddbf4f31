"""A TCP proxy on loopback that kills its connections on demand, mid-call.

Real sockets, real connection loss: `kill_after(chunks, side)` lets the next
`chunks` pieces from the client reach the server (so a call can be applied),
then resets the connection on one side first: "server" (the daemon sees its
peer vanish) or "client" (the SDK's socket is reset). The answer in flight is
lost either way, which is what exactly-once has to survive.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.tcp_proxy import LoopbackProxy, reset, until_either_ends


class ChaosProxy(LoopbackProxy):
    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.kills = 0
        self._live: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._armed: tuple[int, str] | None = None

    def kill_after(self, chunks: int, side: str) -> None:
        """Kill every live connection once `chunks` more client pieces went through."""
        self._armed = (chunks, side)

    def kill_now(self, side: str) -> None:
        for key, (client, server) in list(self._live.items()):
            first, second = (server, client) if side == "server" else (client, server)
            reset(first)
            reset(second)
            self._live.pop(key, None)
            self.kills += 1

    def reset_all(self) -> None:
        for client, server in self._live.values():
            reset(client)
            reset(server)
        self._live.clear()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        key = id(writer)
        self._live[key] = (writer, up_writer)
        try:
            await until_either_ends(self._pipe(reader, up_writer, count=True),
                                    self._pipe(up_reader, writer, count=False))
        finally:
            self._live.pop(key, None)

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
