"""One WebSocket stream's calls: a message's bytes in, its answer's bytes out.

Why a module of its own: this is the daemon's hottest path (a stream call is tens
of microseconds, most of it the WebSocket itself), so it is written to do each
step once: decode the message (`decode_stream_message`), parse it into a `Call`,
run it on the event loop when the VM allows (`VMHost.call_now`: no task, no
future, no thread hop), and encode the answer with the stream's own msgpack
`Packer`. Most messages are answered from inside aiohttp's frame parser, as they
are read (`direct_server`, edge_agent/direct_ws.py): the answer frame is written
at once. The rest reach the stream handler in `edge_agent/app.py`, which hands
each binary message to `answer_now` and writes what comes back; a call that
must wait (a VM with a long deadline, one that is paused or moving) returns a
`Pending` for `answer_later`, which awaits `VMHost.call` as the HTTP route does.

What a message means (`edge_agent/stream.py`, `edge_agent/requests.py`), what the
call does (`VMHost`), and its exactly-once bookkeeping (`edge_agent/exactly_once.py`)
are all unchanged: this only decides the order and does no step twice. Every
answer is `{"id", ...}` with the client's `id`; an answer kept in the reply log is
copied before the `id` goes in, since a resend may be answered from it later.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

import msgpack

from cloudlet import errors
from cloudlet.errors import CloudletError
from edge_agent.direct_ws import DirectWebSocket, Serve, write_binary
from edge_agent.metrics import Metrics
from edge_agent.requests import Call, parse_call
from edge_agent.stream import decode_stream_message
from edge_agent.vm_host import HostedVM, VMHost

TRANSPORT = "ws"


class Pending:
    """A parsed call that cannot run on the event loop now: `answer_later` runs it."""

    __slots__ = ("call", "req_id")

    def __init__(self, req_id: Any, call: Call) -> None:
        self.req_id = req_id
        self.call = call


class StreamCalls:
    """The calls of one stream to one VM (one per WebSocket, on the event loop)."""

    __slots__ = ("_packer", "_record", "cap_bytes", "host", "hosted", "metrics")

    def __init__(self, host: VMHost, metrics: Metrics, hosted: HostedVM, cap_bytes: int) -> None:
        self.host = host
        self.metrics = metrics
        self.hosted = hosted
        self.cap_bytes = cap_bytes
        # One packer per stream, reused for every answer (msgpack.packb makes one a call).
        self._packer = msgpack.Packer()
        self._record = metrics.calls.tally(TRANSPORT).record

    def answer_now(self, raw: bytes) -> bytes | Pending:
        """The answer to one binary message, or `Pending` if its call must wait."""
        req_id = None
        try:
            req_id, body = decode_stream_message(raw, self.cap_bytes)
            try:
                call = parse_call(body)
            except CloudletError:
                self._record(False, 0.0)
                raise
            host, hosted = self.host, self.hosted
            if not host.can_call_now(hosted):
                return Pending(req_id, call)
            started = perf_counter()
            try:
                reply = host.call_now(hosted, call)
            except BaseException:
                self._record(False, perf_counter() - started)
                raise
            self._record(True, perf_counter() - started)
        except CloudletError as exc:
            return self._refused(req_id, exc)
        except (ValueError, msgpack.UnpackException) as exc:
            # `decode_stream_message` raises MalformedRequest itself; a stray
            # ValueError still answers the message instead of ending the stream.
            return self.refuse(errors.MalformedRequest(
                f"message is not msgpack ({type(exc).__name__})"))
        # `_answer`, inline: this is every streamed call's path.
        if call.seq is None:
            reply["id"] = req_id  # an unnumbered call's answer is kept nowhere
        else:
            reply = {**reply, "id": req_id}  # the kept answer is shared: copy it
        answer: bytes = self._packer.pack(reply)
        return answer

    def direct_server(self, ws: DirectWebSocket, transport: asyncio.Transport | None) -> Serve:
        """`answer_now` for messages answered as they are parsed (edge_agent/direct_ws.py):
        the answer is written to `transport` at once. An answer that cannot be written
        now is declined before anything runs; a call that must wait (`Pending`: nothing
        ran either) too. The stream's coroutine then takes the message as usual (and
        parses it again: the slow path)."""
        answer_now, can_write_now = self.answer_now, ws.can_write_now
        if transport is None:
            return lambda raw: False

        def serve(raw: bytes) -> bool:
            if not can_write_now(transport):
                return False
            answer = answer_now(raw)
            if isinstance(answer, Pending):
                return False
            write_binary(transport, answer)
            return True

        return serve

    async def answer_later(self, pending: Pending) -> bytes:
        """The answer to a call that had to wait for its turn or for a thread."""
        started = perf_counter()
        ok = False
        try:
            reply = await self.host.call(self.hosted, pending.call)
            ok = True
        except CloudletError as exc:
            return self._refused(pending.req_id, exc)
        finally:
            self._record(ok, perf_counter() - started)
        return self._answer(pending.req_id, pending.call, reply)

    def _answer(self, req_id: Any, call: Call, reply: dict[str, Any]) -> bytes:
        if call.seq is None:
            reply["id"] = req_id  # an unnumbered call's answer is kept nowhere
        else:
            reply = {**reply, "id": req_id}  # the kept answer is shared: copy it
        return self._pack(reply)

    def _pack(self, answer: dict[str, Any]) -> bytes:
        packed: bytes = self._packer.pack(answer)
        return packed

    def _refused(self, req_id: Any, exc: CloudletError) -> bytes:
        self.metrics.errors.labels(exc.code).inc()
        return self._pack({"id": req_id, "error": exc.to_wire()})

    def refuse(self, exc: CloudletError) -> bytes:
        """An error answer to a message that is not a call (it has no id)."""
        return self._pack({"id": None, "error": exc.to_wire()})

    def refuse_text(self) -> bytes:
        """The answer to a text message: a stream's messages are binary msgpack."""
        return self.refuse(errors.MalformedRequest("send binary msgpack messages"))
