"""Request bodies, capped before they are buffered.

Every route has a cap (`BodyLimit`, chosen per route by the app): a declared
Content-Length over it is refused before one byte of the body is read, and a
chunked body is read only up to it, then refused. Small bodies (calls, VM
requests, images of a few MiB) are read into memory. VM snapshots, which may
be gigabytes, are streamed to a file under the state directory as they arrive
and parsed from there, so an upload costs disk while it arrives, never memory,
and nothing is kept of one that is refused.

After a refusal, aiohttp reads and discards what the client still sends for a
moment (edge_agent/connections.py, `LINGER_S`), so that the client reads the
answer rather than a reset; discarded bytes are never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from cloudlet.errors import CloudletError, RequestTooLarge

READ_PIECE_BYTES = 64 << 10  # as aiohttp's own reads: one socket buffer's worth
SPOOL_WRITE_BYTES = 4 << 20  # spooled bodies go to disk in pieces this size


@dataclass(frozen=True)
class BodyLimit:
    """A route's cap on request bodies, and the error for a body over it (given
    the declared size, or None for a chunked body that ran past the cap)."""

    cap_bytes: int
    refuse: Callable[[int | None], CloudletError]

    @classmethod
    def plain(cls, cap_bytes: int, what: str = "body") -> BodyLimit:
        def refuse(size_bytes: int | None) -> CloudletError:
            told = f"a {what} of {size_bytes} bytes" if size_bytes is not None else \
                f"a {what} over {cap_bytes} bytes"
            return RequestTooLarge(f"{told}; this endpoint takes at most {cap_bytes}",
                                   limit=cap_bytes)
        return cls(cap_bytes, refuse)

    def check_declared(self, request: web.BaseRequest) -> None:
        """Refuse at once a body whose Content-Length says it is over the cap."""
        declared = request.content_length
        if declared is not None and declared > self.cap_bytes:
            raise self.refuse(declared)


async def read_body(request: web.Request, limit: BodyLimit) -> bytes:
    """The whole body, read up to `limit` and no further."""
    limit.check_declared(request)
    body = bytearray()
    async for piece in request.content.iter_chunked(READ_PIECE_BYTES):
        body += piece
        if len(body) > limit.cap_bytes:
            raise limit.refuse(None)
    return bytes(body)


@contextlib.asynccontextmanager
async def spooled_body(request: web.Request, limit: BodyLimit,
                       directory: Path) -> AsyncIterator[Path]:
    """The body in a file under `directory`, streamed there as it arrives, up to
    `limit` and no further; the file is gone when the block ends."""
    limit.check_declared(request)
    fd, name = await asyncio.to_thread(tempfile.mkstemp, prefix="body-", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            received = 0
            pending = bytearray()
            async for piece in request.content.iter_chunked(READ_PIECE_BYTES):
                received += len(piece)
                if received > limit.cap_bytes:
                    raise limit.refuse(None)
                pending += piece
                if len(pending) >= SPOOL_WRITE_BYTES:
                    data, pending = bytes(pending), bytearray()
                    await asyncio.to_thread(f.write, data)
            if pending:
                await asyncio.to_thread(f.write, bytes(pending))
        yield path
    finally:
        await asyncio.to_thread(path.unlink, True)
