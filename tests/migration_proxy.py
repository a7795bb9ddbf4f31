"""A TCP proxy between two cloudlets that sees migration messages and breaks things.

The source reaches the destination's peer WebSocket through it. It parses the
WebSocket frames going by (unmasking the client's), reads each migration
message's type (`offer`, `chunks`, `round_end`, `final`, `ready`, `commit`,
...), and when the armed type goes by it acts, for real: SIGKILLs a daemon,
resets the connections, or stalls the migration's connection (forwards nothing
more on it, both ways) so the migration's deadline has to expire; a client's
stream through it (a standby stream follows the address the source was sent to)
goes on, as it would over a path of its own. "before" acts with the message still unsent; "after"
once it was forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tests.tcp_proxy import LoopbackProxy, reset, until_either_ends

_TYPE = re.compile(rb"\xa1t([\xa0-\xbf])")  # msgpack: the key "t", then a short str


@dataclass
class Trigger:
    message: str  # the migration message type to act on
    when: str  # "before" forwarding it (which it then never is), "after", or "on-the-way"
    # (acted on, then forwarded: the action happens before the peer can react)
    action: Callable[[], None]  # what to do (kill a process, ...); "drop"/"stall" built in
    kind: str = "call"  # "call", "drop" or "stall"


class MigrationProxy(LoopbackProxy):
    def __init__(self, upstream_port: int, trigger: Trigger | None = None) -> None:
        super().__init__(upstream_port)
        self.trigger = trigger
        self.seen: list[str] = []  # message types, in order
        self.fired = False
        self._writers: set[asyncio.StreamWriter] = set()

    def reset_all(self) -> None:
        for w in list(self._writers):
            reset(w)
        self._writers.clear()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        self._writers |= {writer, up_writer}
        stalled = asyncio.Event()  # this connection's, both ways
        await until_either_ends(self._pipe(reader, up_writer, True, stalled),
                                self._pipe(up_reader, writer, False, stalled))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    masked: bool, stalled: asyncio.Event) -> None:
        frames = FrameReader(masked)
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if stalled.is_set():
                    continue  # swallowed: the link is dead but not closed
                types = frames.feed(data)
                self.seen.extend(types)
                trigger = self.trigger
                hit = (trigger is not None and not self.fired and trigger.message in types)
                if hit and trigger is not None and trigger.when == "before":
                    self._act(trigger, stalled)
                    if trigger.kind == "stall":
                        continue  # swallowed, and everything after it
                    return  # the message (and what came with it) never arrives
                if hit and trigger is not None and trigger.when == "on-the-way":
                    self._act(trigger, stalled)
                writer.write(data)
                await writer.drain()
                if hit and trigger is not None and trigger.when == "after":
                    try:
                        await asyncio.sleep(0.01)  # let it reach the peer
                    finally:
                        # Even if the connection ends meanwhile (the message was its
                        # last: a source closes the channel right after `commit`).
                        self._act(trigger, stalled)
                    if trigger.kind == "drop":
                        return

    def _act(self, trigger: Trigger, stalled: asyncio.Event) -> None:
        self.fired = True
        if trigger.kind == "drop":
            self.reset_all()
        elif trigger.kind == "stall":
            stalled.set()
        else:
            trigger.action()


class FrameReader:
    """Incremental WebSocket frame parser: yields the migration message types of
    complete binary frames (the first bytes of each payload are enough)."""

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        self.buffer = bytearray()
        # Plain HTTP first (a kept-alive connection may carry requests before the
        # upgrade): frames start after the upgrade request's, or the 101's, headers.
        self.marker = b"upgrade: websocket" if masked else b"http/1.1 101"
        self.in_http = True

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        if self.in_http:
            at = bytes(self.buffer).lower().find(self.marker)
            if at < 0:
                del self.buffer[: max(0, len(self.buffer) - len(self.marker))]
                return []
            end = self.buffer.find(b"\r\n\r\n", at)
            if end < 0:
                return []
            del self.buffer[: end + 4]
            self.in_http = False
        types = []
        while True:
            parsed = self._frame()
            if parsed is None:
                return types
            if parsed:
                types.append(parsed)

    def _frame(self) -> str | None:
        b = self.buffer
        if len(b) < 2:
            return None
        length = b[1] & 0x7F
        pos = 2
        if length == 126:
            if len(b) < 4:
                return None
            length = struct.unpack_from(">H", b, 2)[0]
            pos = 4
        elif length == 127:
            if len(b) < 10:
                return None
            length = struct.unpack_from(">Q", b, 2)[0]
            pos = 10
        mask = b""
        if b[1] & 0x80:
            if len(b) < pos + 4:
                return None
            mask = bytes(b[pos : pos + 4])
            pos += 4
        if len(b) < pos + length:
            return None
        head = bytes(b[pos : pos + min(length, 32)])
        if mask:
            head = bytes(c ^ mask[i % 4] for i, c in enumerate(head))
        del b[: pos + length]
        m = _TYPE.search(head)
        if m is None:
            return ""
        n = m.group(1)[0] & 0x1F
        return head[m.end() : m.end() + n].decode(errors="replace")

