"""Connections that say nothing are closed: a request head must arrive in time.

Every open connection costs a file descriptor and a little memory, so a client
that opens connections and sends nothing, or half a request head, a byte now
and then, could hold them until the daemon runs out (with a low file limit,
`/health` itself then fails). Two timers bound that:

- `header_timeout_s`: a connection must send a whole request head within this,
  from its opening, or from the first byte of its next request on a kept-alive
  connection. Past it, the connection is closed.
- `idle_timeout_s`: a kept-alive connection with no request at all is closed
  after this (aiohttp's own `keepalive_timeout`).

Bodies are not timed here: once its head arrived, a request is bounded by its
deadline (`request_deadline_s`). WebSocket streams are never timed out by
either: after the upgrade, a stream is a request in progress until it closes.

aiohttp's `RequestHandler` has the idle timer, but nothing for a head that never
completes. This adds the head timer with the least reach into aiohttp: a
subclass that overrides three of its methods (`connection_made`,
`data_received`, `finish_response`) and reads one attribute, its count of
parsed requests (`_request_count`); on an upgraded connection, `data_received`
feeds aiohttp's payload parser itself, as aiohttp's own does (reading
`_payload_parser`, `_data_received_cb`, `_close`, `_force_close`); the runner
turns the low-level server aiohttp built (`AppRunner._make_server`) into a
subclass that makes these handlers, so the server keeps every setting it was
built with. A connection is between requests when every request parsed on it
was answered; bytes that arrive then begin a new head. (A head that a client
pipelines while its previous request is still being served is timed by
`idle_timeout_s` instead.) It costs ~0.13 us per chunk received on a
connection that is not a stream. The daemon's tests of silent
and half-sent connections (tests/test_isolation.py), and every stream test, fail
if a new aiohttp changes what this relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

# After refusing a request whose body is still arriving (over its cap), read and
# discard what the client sends for at most this long before closing, so it can
# read the refusal instead of a reset (aiohttp's default is 10 s of reading).
LINGER_S = 1.0


class HeadTimeoutHandler(RequestHandler):
    """aiohttp's request handler, plus a deadline for each request head."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float,
                 on_timeout: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_timeout = on_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = 0  # requests answered on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        parser = self._payload_parser
        if parser is not None and data and not (self._force_close or self._close):
            # An upgraded connection (a WebSocket stream: the only user of a payload
            # parser here). aiohttp's own branch for it, inline, one frame less for
            # every message a stream receives; a stream has no head to time.
            callback = self._data_received_cb
            if callback is not None:
                callback()
            if parser.feed_data(data)[0]:
                self.close()
            return
        heads = self._request_count
        RequestHandler.data_received(self, data)  # `super()` costs a lookup per chunk
        if self._request_count != heads:  # a whole head arrived
            self._disarm()
        # `_between_requests`, inline: on a stream this runs for every message.
        elif self._head_timer is None and self._answered >= self._request_count:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    async def finish_response(self, request: BaseRequest, resp: StreamResponse,
                              start_time: float | None) -> tuple[StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        """Every request parsed on this connection was answered (a WebSocket stream,
        a body still arriving, a request queued: not between requests)."""
        return self._answered >= self._request_count

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = asyncio.get_running_loop().call_later(self._header_timeout_s,
                                                                 self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._between_requests():
            self._on_timeout()
            self.force_close()


class HeadTimeoutServer(web.Server):
    """aiohttp's low-level server, making `HeadTimeoutHandler`s."""

    header_timeout_s: float
    on_timeout: Callable[[], None]

    @classmethod
    def guarding(cls, server: web.Server, *, header_timeout_s: float,
                 on_timeout: Callable[[], None]) -> HeadTimeoutServer:
        """`server` itself, from now on making HeadTimeoutHandlers. aiohttp builds the
        server from settings only it holds (the runner's and the app's, for each
        handler); turning that very object into this subclass keeps every one of
        them, where a new server would have to copy them out of its private fields."""
        server.__class__ = cls
        assert isinstance(server, cls)
        server.header_timeout_s = header_timeout_s
        server.on_timeout = on_timeout
        return server

    def __call__(self) -> RequestHandler:
        return HeadTimeoutHandler(self, loop=self._loop, header_timeout_s=self.header_timeout_s,
                                  on_timeout=self.on_timeout, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections must send each request head within
    `header_timeout_s` and are closed after `idle_timeout_s` between requests."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, idle_timeout_s: float,
                 on_timeout: Callable[[], None] = lambda: None, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=idle_timeout_s, lingering_time=LINGER_S,
                         **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_timeout = on_timeout

    async def _make_server(self) -> web.Server:
        return HeadTimeoutServer.guarding(await super()._make_server(),
                                          header_timeout_s=self._header_timeout_s,
                                          on_timeout=self._on_timeout)
