"""A WebSocket whose binary messages can be answered as they are parsed, with no task switch.

Why it exists: speed. With a stock aiohttp `WebSocketResponse`, every message
goes parser -> queue -> a future's callback -> the handler's coroutine resumes in
`receive()` -> the answer goes out through two more coroutines (`send_bytes`,
`send_frame`). For a call that takes a few microseconds that hand-off is the
largest share of the daemon's CPU per message (an echo built as below spent 13.3
us per message where aiohttp's own spent 16.4-19 on this project's host). Here
the queue aiohttp's (compiled) frame parser feeds is a subclass whose
`feed_data` offers each binary message to a synchronous `serve` function first;
when it answers, the answer frame is written to the transport at once and the
coroutine never wakes.

Everything else is aiohttp's, unchanged: the handshake, frame parsing (masks,
fragments, size caps, UTF-8 checks), control frames, the close handshake, and
every message `serve` declines, which reaches `receive()` as usual.

When `serve` may run, so the order of messages and answers is kept:
- only while the handler's coroutine waits in `receive_when_idle()`, entered
  with nothing queued: the coroutine is between messages, not in the middle of
  one. (Entered with messages queued, it is not: aiohttp may have stopped
  parsing at its queue's limit, and resumes inside `receive()` as it hands over
  the next message; what it parses then queues behind that message.)
- never once a message has gone to the queue, until the coroutine has taken it
  and come back to `receive_when_idle()`;
- only while the socket's write buffer holds at most `DIRECT_WRITE_LIMIT`
  bytes (so it holds at most that plus one answer). Beyond it the coroutine
  answers through `send_bytes`, whose flow control is aiohttp's (it waits for
  the client once it has written its own limit, 256 KiB in 3.14, while the
  socket is paused), and further messages wait in aiohttp's queue, which stops
  reading the socket at its limit.

Compression is off on these streams: an answer written here is a plain frame,
and a compressed frame aiohttp were still writing (it compresses large ones in a
thread) could otherwise be overtaken.

Why here only: it reaches into aiohttp's private WebSocket reader
(`aiohttp._websocket.reader`) and repeats `WebSocketResponse._post_start`, so
pyproject bounds aiohttp to the versions this was checked against, and
`tests/test_direct_ws.py` fails if the direct path is not in use. On an aiohttp
whose reader takes other arguments, the stream falls back to aiohttp's own path
(`direct` is False) and works as before, only slower. (The reader's module is
there from aiohttp 3.11 on: pyproject's lower bound.)
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http_websocket import WSMessage

if TYPE_CHECKING:  # named by recent aiohttp only; the fallback serves older ones
    from aiohttp.http_websocket import WSMessageTextBytes

log = logging.getLogger(__name__)

# Above this many bytes waiting in the socket's write buffer, answers go the slow
# way, through `send_bytes` and its wait for the client to read.
DIRECT_WRITE_LIMIT = 64 << 10

_BINARY = WSMsgType.BINARY
_FIN_BINARY = 0x82  # FIN + opcode 2; a server's frames are not masked
_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
_ONE_WRITE_MAX = 16 << 10  # larger payloads are written after their header, not copied

Serve = Callable[[bytes], bool]


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, unfragmented binary frame of `length` bytes (RFC 6455
    section 5.2)."""
    if length < 126:
        return _HEADER_SHORT(_FIN_BINARY, length)
    if length < 1 << 16:
        return _HEADER_16(_FIN_BINARY, 126, length)
    return _HEADER_64(_FIN_BINARY, 127, length)


class _DirectQueue(WebSocketDataQueue):
    """aiohttp's message queue, with a first refusal for `serve` (see the module)."""

    def __init__(self, protocol: Any, limit: int, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(protocol, limit, loop=loop)
        self.serve: Serve | None = None
        self.idle = False  # the coroutine is parked in receive_when_idle(), between messages

    def park(self) -> None:
        """The coroutine is about to wait for its next message. It is between messages
        only if none is queued: when one is, aiohttp may have stopped parsing at its
        queue's limit and resumes inside `receive()`, as it hands that one over, and
        what it parses then must queue behind it."""
        self.idle = not self._buffer

    def feed_data(self, data: WSMessage | WSMessageTextBytes, size: int) -> None:
        if self.idle and data.type is _BINARY and not self._buffer:
            serve = self.serve
            if serve is not None:
                try:
                    served = serve(data.data)
                except Exception:
                    # aiohttp's reader would keep this as the stream's error and end
                    # the stream without a word: say what it was.
                    log.exception("answering a stream message failed; the stream ends")
                    raise
                if served:
                    return
        self.idle = False  # queued: nothing overtakes it until the coroutine has it
        WebSocketDataQueue.feed_data(self, data, size)


class DirectWebSocket(web.WebSocketResponse):
    """A server WebSocket whose binary messages `serve` may answer as they arrive.

    Use as a `WebSocketResponse` (compression is always off, and pings are answered
    by `receive_when_idle`, not by `receive`), then, once prepared,
    `serve_directly(serve)` and read with `receive_when_idle()`. `serve(payload)`
    answers one binary message and returns True, or returns False having done
    nothing, and the message is then returned by `receive_when_idle()`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "compress": False, "autoping": False})
        self._direct: _DirectQueue | None = None
        self._transport: asyncio.Transport | None = None

    @property
    def direct(self) -> bool:
        """True when messages can be answered as they are parsed (aiohttp as expected)."""
        return self._direct is not None

    def _post_start(self, request: web.BaseRequest, protocol: str | None,
                    writer: Any) -> None:
        """aiohttp's own steps, with `_DirectQueue` in place of its queue. The queue and
        parser are made first: if this aiohttp's take other arguments, nothing has
        changed yet and aiohttp's own method runs instead."""
        loop = self._loop
        assert loop is not None  # as aiohttp's: set by prepare() before this runs
        try:
            queue = _DirectQueue(request._protocol, DEFAULT_CHUNK_SIZE,  # noqa: SLF001
                                 loop=loop)
            parser = WebSocketReader(queue, self._max_msg_size, compress=False,
                                     decode_text=self._decode_text)
        except (TypeError, AttributeError) as exc:
            log.warning("WebSocket streams take aiohttp's own path (%s): this aiohttp's "
                        "reader is not the one edge_agent/direct_ws.py knows", exc)
            super()._post_start(request, protocol, writer)
            return
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        self._reader = queue
        self._parser = parser
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(parser, data_received_cb=callback)
        request.protocol.keep_alive(False)  # as aiohttp: no HTTP keep-alive on a WebSocket
        self._direct = queue
        self._transport = request.transport

    def serve_directly(self, serve: Serve) -> None:
        """From now on, offer each binary message to `serve` first (no-op when not
        `direct`)."""
        if self._direct is not None:
            self._direct.serve = serve

    async def receive_when_idle(self) -> WSMessage:
        """`receive()`, marking the coroutine as between messages while it waits.

        Pings are answered here, not inside `receive()` (this socket has no
        autoping): between a ping and the next message the coroutine is between
        messages again, and `receive()` would wait for that one without saying so."""
        queue = self._direct
        while True:
            if queue is None:
                msg = await self.receive()
            else:
                queue.park()
                try:
                    msg = await self.receive()
                finally:
                    queue.idle = False
            if msg.type is WSMsgType.PING:
                await self.pong(msg.data)
            elif msg.type is not WSMsgType.PONG:
                return msg

    def can_write_now(self, transport: asyncio.Transport) -> bool:
        """True when an answer may be written straight to `transport`: open, and its
        write buffer under `DIRECT_WRITE_LIMIT`."""
        return (not self.closed and not transport.is_closing()
                and transport.get_write_buffer_size() <= DIRECT_WRITE_LIMIT)


    def write_now(self, payload: bytes) -> bool:
        """Write `payload` as one binary frame at once, without waiting for the loop's
        next turn, if it can be written now (`can_write_now`); False, with nothing
        written, if not. For a notice the client is waiting on (`moved`): a task
        would send it only after whatever the caller does next. A whole frame in
        one go, so it cannot land inside another frame: every frame here is
        written whole (compression, which aiohttp may do in a thread, is off)."""
        transport = self._transport
        if self._direct is None or transport is None or not self.can_write_now(transport):
            return False
        write_binary(transport, payload)
        return True


# The headers of the small frames, made once: a call's answer is a few dozen bytes.
SHORT_HEADERS = tuple(_HEADER_SHORT(_FIN_BINARY, n) for n in range(126))


def write_binary(transport: asyncio.Transport, payload: bytes) -> None:
    """One binary frame carrying `payload`, written to `transport` now."""
    length = len(payload)
    if length < 126:
        transport.write(SHORT_HEADERS[length] + payload)
    elif length > _ONE_WRITE_MAX:
        transport.write(binary_frame_header(length))
        transport.write(payload)
    else:
        transport.write(binary_frame_header(length) + payload)
