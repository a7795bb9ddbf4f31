"""What the tests' fault-injecting TCP proxies share: a loopback server that
connects each client to the real daemon, relays both ways, and resets (RST, as a
dropped radio link or a killed process does) rather than closing politely.

Each proxy (tests/chaos_proxy.py, tests/migration_proxy.py, FaultProxy in
tests/test_sdk_faults.py) only says how it relays: `relay()` gets both ends.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable
from typing import Any, Self


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: the peer sees the connection die, not end."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class LoopbackProxy(abc.ABC):
    """Listens on 127.0.0.1 (any port) and relays to `upstream_port`. Use as
    `async with`; subclasses implement `relay`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.reset_all()
        await self._server.wait_closed()

    @abc.abstractmethod
    def reset_all(self) -> None:
        """Reset every live connection (subclasses track theirs)."""

    def refuse(self) -> bool:
        """True to reset a new connection at once."""
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse():
            reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.upstream_port)
        except OSError:
            reset(writer)
            return
        try:
            await self.relay(reader, writer, up_reader, up_writer)
        except asyncio.CancelledError:
            pass  # the proxy is closing; asyncio's server would log the cancellation
        finally:
            reset(writer)
            reset(up_writer)

    @abc.abstractmethod
    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        """Move bytes both ways until the connection ends (then both ends are reset)."""


async def until_either_ends(*pipes: Awaitable[Any]) -> None:
    """Run the relay's two directions; when one ends (its side died), stop both, as
    the network would: else the survivor waits forever on a dead peer."""
    tasks = [asyncio.ensure_future(p) for p in pipes]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
