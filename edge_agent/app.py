"""The data plane: an aiohttp application for clients (images, VMs, calls) and peers.

Handlers are thin: parse (into the typed requests of edge_agent/requests.py),
call `VMHost`, answer. Everything that can go wrong is a `CloudletError` with a
stable code, answered as `{"code", "message"}` with an HTTP status by meaning
(see `STATUS`), so the SDK can raise the daemon's own exception class. Bodies
are msgpack; management answers are JSON when the client asks for
`application/json`. Every request has a size cap (its route's
`BodyLimit`, enforced before the body is buffered, edge_agent/bodies.py) and a
deadline, and nothing but `/health` answers without credentials.
The API is described in docs/openapi.yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from cloudlet import errors
from cloudlet.errors import CloudletError
from cloudlet.migration.messages import MAX_MESSAGE_BYTES
from cloudlet.protocol import Location
from cloudlet.tasks import own
from cloudlet.trust import proof
from cloudlet.trust.sealed import Identity
from edge_agent.auth import Authority, Principal
from edge_agent.bodies import BodyLimit, read_body, spooled_body
from edge_agent.config import NodeConfig
from edge_agent.direct_ws import DirectWebSocket
from edge_agent.handoff import Mover
from edge_agent.identity import NodeTrust
from edge_agent.live_migration import peer_of
from edge_agent.metrics import Metrics
from edge_agent.peer_client import PeerClient
from edge_agent.peers import PeerDirectory
from edge_agent.requests import (
    Call,
    parse_call,
    parse_challenge,
    parse_create,
    parse_move,
    source_endpoint,
    unpack_map,
)
from edge_agent.storage import public_reason
from edge_agent.stream_calls import Pending, StreamCalls
from edge_agent.vm_host import HostedVM, VMHost

log = logging.getLogger(__name__)

HOST = web.AppKey("host", VMHost)
AUTHORITY = web.AppKey("authority", Authority)
IDENTITY = web.AppKey("identity", Identity)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", NodeConfig)


class OpenStreams:
    """WebSockets being served, by VM: shutdown closes them (they would outlive it),
    and a VM that moves tells its streams where it went."""

    def __init__(self) -> None:
        self.by_vm: dict[str, set[web.WebSocketResponse]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def add(self, vm_id: str, ws: web.WebSocketResponse) -> None:
        self.by_vm.setdefault(vm_id, set()).add(ws)

    def discard(self, vm_id: str, ws: web.WebSocketResponse) -> None:
        streams = self.by_vm.get(vm_id)
        if streams is not None:
            streams.discard(ws)
            if not streams:
                del self.by_vm[vm_id]

    def all(self) -> list[web.WebSocketResponse]:
        return [ws for streams in self.by_vm.values() for ws in streams]

    def vm_moving(self, vm_id: str, where: Location | None) -> None:
        """Tell each stream of the VM where it is moving (its live migration is under
        way: the destination holds streams for it now), or, with None, that the
        move is off. The streams stay open: the VM serves here until the commit."""
        body = None if where is None else {"vm": vm_id, **where.to_wire()}
        notice = msgpack.packb({"id": None, "moving": body})
        for ws in list(self.by_vm.get(vm_id, ())):
            own(self._closing, _notify(ws, notice), f"telling a stream VM {vm_id} is moving",
                log)

    def vm_moved(self, vm_id: str, where: Location) -> None:
        """Send each stream of the VM a `moved` notice, then close it; the SDK
        reconnects to `where` (or switches to the stream it opened there when told
        the VM was `moving`) and resends what was not answered. Each stream is told
        once: a live migration tells them when the move is decided, and the
        handover that follows finds them gone."""
        notice = msgpack.packb({"id": None, "moved": {"vm": vm_id, **where.to_wire()}})
        for ws in list(self.by_vm.pop(vm_id, ())):
            # Written now where it can be: the clients' switch is on the downtime's path,
            # and a task would run only after the caller's next steps (the `Commit`,
            # the handover: ~0.3 ms here). Then closed, owned here until done
            # (shutdown waits for it).
            told = isinstance(ws, DirectWebSocket) and ws.write_now(notice)
            own(self._closing, _notify_and_close(ws, None if told else notice),
                f"telling a stream VM {vm_id} moved", log)

    async def drain(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _notify(ws: web.WebSocketResponse, notice: bytes) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_bytes(notice)


async def _notify_and_close(ws: web.WebSocketResponse, notice: bytes | None) -> None:
    """Send `notice` (None: it was written already), then close `ws` a little later
    (`MOVED_CLOSE_DELAY_S`)."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        if notice is not None:
            await ws.send_bytes(notice)
        await asyncio.sleep(MOVED_CLOSE_DELAY_S)
        await ws.close(code=MOVED_CLOSE_CODE, message=b"vm moved")


# A stream told its VM moved is closed this long after the notice: its client is
# switching to the destination meanwhile, and reading a close frame (and this
# cloudlet writing it) took a share of the cores that switch waited for.
MOVED_CLOSE_DELAY_S = 0.005

STREAMS = web.AppKey("streams", OpenStreams)
MOVER = web.AppKey("mover", Mover)

MSGPACK = "application/msgpack"
OVERSIZE_SLACK_BYTES = 64 << 10
# A snapshot's bytes beyond the memory it restores: its header, globals and host
# state (a few KiB), and 4 bytes of chunk id per 4 KiB chunk (1/1024 of the data).
SNAPSHOT_OVERHEAD_BYTES = 64 << 10
SNAPSHOT_IDS_SHARE = 1024
# What ends a stream's loop (as `async for` over a WebSocket ends on them).
STREAM_ENDS = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})
MOVED_CLOSE_CODE = 4001  # private-use WebSocket close code: "the VM moved; see the notice"
NOT_ARRIVING_CLOSE_CODE = 4002  # a held stream's VM did not arrive here (its move failed)
PUBLIC_PATHS = frozenset({"/health"})

# HTTP status by error meaning; the most specific class wins.
STATUS: list[tuple[type[CloudletError], int]] = [
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.VMNotFound, 404),
    (errors.KeptRoundNotFound, 404),
    (errors.VMMoved, 410),
    (errors.SequenceError, 409),
    (errors.ImageNotFound, 404),
    (errors.ImageInUse, 409),
    (errors.RequestTooLarge, 413),
    (errors.ImageTooLarge, 413),
    (errors.RequestTimeout, 408),
    (errors.CapacityExceeded, 503),
    (errors.QuotaExceeded, 429),
    (errors.StorageFull, 507),
    (errors.PeerUnverified, 502),
    (errors.TrustError, 403),
    (errors.ShuttingDown, 503),
    (errors.BadCall, 400),
    (errors.VMError, 422),  # the call reached the guest and failed there
    (errors.CloudletError, 400),
]


def status_of(exc: CloudletError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def answer(request: web.Request, body: Any, status: int = 200) -> web.Response:
    if wants_json(request):
        return web.json_response(body, status=status)
    return web.Response(body=msgpack.packb(body), status=status, content_type=MSGPACK)


# --- middlewares -----------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    try:
        return await handler(request)
    except CloudletError as exc:
        metrics.errors.labels(exc.code).inc()
        if isinstance(exc, errors.StorageFull):  # an upload's or a new VM's write
            reason = public_reason(exc, f"state for {route_of(request)}")
            request.app[HOST].storage.write_failed("request", reason)
        return answer(request, exc.to_wire(), status_of(exc))
    except web.HTTPException as exc:
        if exc.status == 413:
            metrics.errors.labels("request_too_large").inc()
            return answer(request, errors.RequestTooLarge(
                f"the body is over this endpoint's limit ({exc.text})").to_wire(), 413)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        metrics.errors.labels("internal_error").inc()
        return answer(request, {"code": "internal_error",
                                "message": "internal error (logged by the cloudlet)"}, 500)


def route_of(request: web.Request) -> str:
    """`POST /v1/vms/{vm}/migrate`: the route, without the ids in the path."""
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource else request.path}"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        request["principal"] = request.app[AUTHORITY].check(request.headers.get("Authorization"))
    return await handler(request)


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body declared over its route's cap is refused before a byte of it is read."""
    if request.content_length is not None:
        body_limit(request).check_declared(request)
    return await handler(request)


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await handler(request)  # a stream lives long; each call has the VM's deadline
    config = request.app[CONFIG]
    moving = request.method == "POST" and (request.path.endswith("/migrate")
                                           or request.path in ("/v1/peer/vms",
                                                               "/v1/vms/synthesize"))
    deadline_s = config.move_deadline_s if moving else config.request_deadline_s
    try:
        async with asyncio.timeout(deadline_s):
            return await handler(request)
    except TimeoutError:
        raise errors.RequestTimeout(
            f"the request took longer than {deadline_s} s (a slow client, or a slow call)"
        ) from None


def principal(request: web.Request) -> Principal:
    who: Principal = request["principal"]
    return who


def peer_only(request: web.Request) -> Principal:
    who = principal(request)
    if not who.is_peer:
        raise errors.Forbidden("this route is for peer cloudlets only")
    return who


def body_limit(request: web.Request) -> BodyLimit:
    """The cap on this request's body, by route: images up to `max_image_mib`
    (`image_too_large` past it), snapshots up to `max_snapshot_mib` and, for a
    client's own, no more than its memory quota has room for; everything else up
    to `max_request_kib`."""
    config = request.app[CONFIG]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if route == "/v1/images":
        cap_bytes = config.max_image_mib << 20

        def image_too_large(size_bytes: int | None) -> CloudletError:
            size = f"{size_bytes} bytes" if size_bytes is not None else f"over {cap_bytes} bytes"
            return errors.ImageTooLarge(f"the image is {size}; this cloudlet takes images of "
                                        f"at most {cap_bytes} bytes (max_image_mib)",
                                        limit=cap_bytes)
        return BodyLimit(cap_bytes, image_too_large)
    if route == "/v1/peer/vms":
        return BodyLimit.plain(config.max_snapshot_mib << 20, "snapshot")
    if route == "/v1/vms/synthesize":
        return synthesis_limit(request)
    return BodyLimit.plain(config.max_request_kib << 10)


def synthesis_limit(request: web.Request) -> BodyLimit:
    """A client's overlay may be no larger than the memory it could be given: past
    that, the VM could not be admitted anyway, so its bytes are not taken."""
    host, config = request.app[HOST], request.app[CONFIG]
    snapshot_cap = config.max_snapshot_mib << 20
    who = principal(request)
    room = host.memory_room_bytes(who)
    room_cap = room + SNAPSHOT_OVERHEAD_BYTES + room // SNAPSHOT_IDS_SHARE
    if room_cap >= snapshot_cap:
        return BodyLimit.plain(snapshot_cap, "snapshot")
    held = host.usage(who.name)

    def over_quota(size_bytes: int | None) -> CloudletError:
        if room < host.quotas.memory_room_bytes(held):
            return errors.CapacityExceeded(
                f"the overlay is over the {room} bytes of memory this cloudlet has left")
        size = f"{size_bytes} bytes" if size_bytes is not None else f"over {room_cap} bytes"
        return errors.QuotaExceeded(
            f"an overlay of {size} holds more memory than the {room} bytes left of client "
            f"{who.name!r}'s memory quota", quota="memory_bytes",
            limit=host.quotas.max_memory_bytes, use=held.memory_bytes)
    return BodyLimit(room_cap, over_quota)


# --- handlers ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    """Liveness for probes. Always 200 while the daemon answers: "degraded" (its
    state cannot be written, `reasons` say why) still serves its VMs from memory, and
    the SDK's probes count any error status as "unreachable", which would drop
    sessions' RTTs to a cloudlet that is serving them well. With `?challenge=HEX`,
    also a proof of which cloudlet this is (its certificate and its signature over
    the challenge), so a client or peer can check it before sending it a credential."""
    host = request.app[HOST]
    storage = host.storage
    status = "shutting_down" if host.closing else "ok" if storage.ok else "degraded"
    body: dict[str, Any] = {"status": status, "node": request.app[CONFIG].name,
                            "vms": len(host.vms), "reasons": list(storage.reasons)}
    challenge = parse_challenge(request.query.get("challenge"))
    if challenge is not None:
        body["identity"] = proof.prove(request.app[IDENTITY], challenge)
    return web.json_response(body)


async def metrics_text(request: web.Request) -> web.Response:
    host, metrics = request.app[HOST], request.app[METRICS]
    metrics.vms.set(len(host.vms))
    metrics.memory.set(sum(h.vm.memory_bytes for h in host.vms.values()))
    metrics.images.set(len(host.images.list()))
    return web.Response(body=metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def upload_image(request: web.Request) -> web.Response:
    wasm = await read_body(request, body_limit(request))
    image = await request.app[HOST].add_image(principal(request), wasm,
                                              request.headers.get("X-Image-Digest"))
    return answer(request, {"digest": image.digest, "size_bytes": image.size_bytes,
                            "exports": sorted(n for n in image.functions
                                              if not n.startswith("_"))}, 201)


async def list_images(request: web.Request) -> web.Response:
    """The images this client uploaded here (a peer: all of them)."""
    return answer(request, {"images": request.app[HOST].images_of(principal(request))})


async def delete_image(request: web.Request) -> web.Response:
    await request.app[HOST].delete_image(principal(request), request.match_info["digest"])
    return web.Response(status=204)


async def create_vm(request: web.Request) -> web.Response:
    asked = parse_create(await read_body(request, body_limit(request)))
    hosted = await request.app[HOST].create(principal(request), asked.image, asked.limits,
                                            asked.clock)
    return answer(request, hosted.describe(), 201)


async def list_vms(request: web.Request) -> web.Response:
    vms = request.app[HOST].owned_by(principal(request))
    return answer(request, {"vms": [h.describe() for h in vms]})


def hosted_vm(request: web.Request) -> HostedVM:
    return request.app[HOST].get(request.match_info["vm"], principal(request))


async def vm_info(request: web.Request) -> web.Response:
    hosted = hosted_vm(request)
    info = {**hosted.describe(),
            # The largest call this cloudlet takes: a client checks before it numbers one.
            "max_request_bytes": request.app[CONFIG].max_request_kib << 10}
    if hosted.arrival_downtime_ms is not None:
        # Arrived by live migration: its last call at the source to its first here.
        info["arrival_downtime_ms"] = hosted.arrival_downtime_ms
    return answer(request, info)


def parse_counted(metrics: Metrics, body: Mapping[str, Any], transport: str) -> Call:
    """The call in a request map. One refused outright (no number to use up) counts
    as a rejected call, as one the VM refused does."""
    try:
        return parse_call(body)
    except CloudletError:
        metrics.calls.record(transport, False, 0.0)
        raise


def apply_call_now(host: VMHost, metrics: Metrics, hosted: HostedVM, call: Call,
                   transport: str) -> dict[str, Any] | None:
    """A call to an interactive VM, done synchronously: most of the daemon's work,
    so it costs no coroutine. None if the call must take `apply_call`."""
    if not host.can_call_now(hosted):
        return None
    started = time.perf_counter()
    ok = False
    try:
        reply = host.call_now(hosted, call)
        ok = True
        return reply
    finally:
        metrics.calls.record(transport, ok, time.perf_counter() - started)


async def apply_call(app: web.Application, hosted: HostedVM, call: Call,
                     transport: str) -> dict[str, Any]:
    """One parsed call; shared by HTTP and the WebSocket stream."""
    host, metrics = app[HOST], app[METRICS]
    reply = apply_call_now(host, metrics, hosted, call, transport)
    if reply is not None:
        return reply
    started = time.perf_counter()
    ok = False
    try:
        reply = await host.call(hosted, call)
        ok = True
        return reply
    finally:
        metrics.calls.record(transport, ok, time.perf_counter() - started)


async def call_vm(request: web.Request) -> web.Response:
    hosted = hosted_vm(request)
    body = unpack_map(await read_body(request, body_limit(request)))
    call = parse_counted(request.app[METRICS], body, "http")
    reply = await apply_call(request.app, hosted, call, "http")
    return web.Response(body=msgpack.packb(reply), content_type=MSGPACK)


async def stream_vm(request: web.Request) -> web.WebSocketResponse:
    """The low-latency path: one WebSocket, binary msgpack messages, one call each.

    Request `{"id", "fn", "args" | "data", "seq"?}`, answer `{"id", "result" |
    "data", "seq"}` or `{"id", "error": {"code", "message", "details"?}}`. Errors
    end the call, not the stream. Messages are handled one at a time, in order, so
    a client's calls apply in the order it sent them. If the VM moves, the stream
    gets `{"id": null, "moved": {"vm", "node", "endpoint"}}` and is closed; while it
    migrates live, `{"id": null, "moving": {"vm", "node", "endpoint"}}` says where
    to (`"moving": null`: the move is off), and the stream goes on. At the
    destination, a stream for a VM on its way is held until the VM lands.
    """
    config = request.app[CONFIG]
    # No WebSocket heartbeat: aiohttp schedules an extra loop callback for every
    # received message to keep it, a few percent of a call. The kernel finds dead
    # peers for free instead: TCP keepalive after 30 s idle, 3 probes 10 s apart.
    cap_bytes = config.max_request_kib << 10
    # Messages up to twice the cap are read and refused with a typed answer (one
    # that carries a sequence number uses it up); only larger ones end the stream.
    ws = DirectWebSocket(max_msg_size=2 * cap_bytes + OVERSIZE_SLACK_BYTES)
    hosted = await hosted_or_arrived(request, ws)
    if hosted is None:
        return ws  # held for a VM that did not arrive: closed
    if not ws.prepared:  # (a held stream was opened, and set up, before its hold)
        await open_websocket(request, ws)
        _keepalive(request)
    streams = request.app[STREAMS]
    streams.add(hosted.id, ws)
    calls = StreamCalls(request.app[HOST], request.app[METRICS], hosted, cap_bytes)
    ws.serve_directly(calls.direct_server(ws, request.transport))
    # `receive_when_idle()` rather than `async for`: one coroutine frame less a
    # message, and while it waits, calls are answered as they are parsed.
    receive, send_bytes = ws.receive_when_idle, ws.send_bytes
    binary = WSMsgType.BINARY  # an enum member's lookup costs more than the check
    try:
        while True:
            msg = await receive()
            if msg.type is not binary:
                if msg.type in STREAM_ENDS:
                    break
                if msg.type is WSMsgType.TEXT:
                    await send_bytes(calls.refuse_text())
                continue
            answer = calls.answer_now(msg.data)
            if isinstance(answer, Pending):
                answer = await calls.answer_later(answer)
            if ws.closed:
                break  # moved or shutting down: the client resends on its next stream
            try:
                await send_bytes(answer)
            except ConnectionError:
                # The peer reset the stream while answers were being written. Nothing
                # is lost: an applied call's answer stays in the reply log until
                # acknowledged, and the client resends on its next stream.
                break
    finally:
        streams.discard(hosted.id, ws)
    return ws


async def hosted_or_arrived(request: web.Request,
                            ws: web.WebSocketResponse) -> HostedVM | None:
    """The stream's VM. One that is on its way here by live migration (its client
    was told it is `moving`): open `ws` now and hold it, unread, until the VM
    lands (edge_agent/arrivals.py), so the client's switch at the commit is a
    write; None, with `ws` closed, if it does not land within the move deadline."""
    vm_id = request.match_info["vm"]
    arrivals = request.app[MOVER].live.arrivals
    arrival = arrivals.get(vm_id) if vm_id not in request.app[HOST].vms else None
    if arrival is None:
        return hosted_vm(request)
    who = principal(request)
    with arrivals.hold(arrival, who):
        await open_websocket(request, ws)
        _keepalive(request)  # now, not on the landing's path
        # Unread means unread: what the client writes while it is held waits in the
        # kernel's socket buffers, not in ours (aiohttp would read up to a whole
        # message, twice the request cap, before its own flow control stops it).
        transport = request.transport
        if transport is not None:
            transport.pause_reading()
        try:
            hosted = await arrival.wait(request.app[CONFIG].move_deadline_s)
        finally:
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
    if (hosted is None or request.app[HOST].vms.get(vm_id) is not hosted
            or not (who.is_peer or hosted.owner == who.name)):
        # Not coming (or gone again at once): the client resends where the VM is. Or
        # what landed is not what was announced (a second offer of the same id named
        # another owner): the owner check is made again on the VM that is here.
        await ws.close(code=NOT_ARRIVING_CLOSE_CODE, message=b"the VM is not coming here")
        return None
    return hosted


async def open_websocket(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Upgrade to `ws`, or refuse with a typed error a request that is not a WebSocket
    handshake (aiohttp's own refusal would be a bare text/plain 400)."""
    if not ws.can_prepare(request).ok:
        raise errors.MalformedRequest("this route is a WebSocket: ask with 'Connection: "
                                      "Upgrade', 'Upgrade: websocket' and the handshake's keys")
    await ws.prepare(request)


def _keepalive(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def download_snapshot(request: web.Request) -> web.Response:
    data = await request.app[HOST].snapshot_bytes(hosted_vm(request))
    return web.Response(body=data, content_type="application/octet-stream")


async def destroy_vm(request: web.Request) -> web.Response:
    hosted = hosted_vm(request)
    # A VM that arrived moments ago: its arrival's rounds go aside first, or a
    # restart would bring the deleted VM back from them.
    await request.app[MOVER].live.forget_arrival(hosted.id)
    await request.app[HOST].destroy(hosted)
    return web.Response(status=204)


async def move_vm(request: web.Request) -> web.Response:
    """Move a VM to another cloudlet: `{"to": NODE}` (found on the control plane)
    or `{"endpoint": URL}`. Its owner or a peer (the orchestrator) may ask."""
    hosted = hosted_vm(request)
    asked = parse_move(await read_body(request, body_limit(request)))
    mover = request.app[MOVER]
    where = mover.resolve(principal(request), asked.to, asked.endpoint)
    return answer(request, await mover.move(hosted, where, asked.mode))


async def accept_migration(request: web.Request) -> web.StreamResponse:
    """A peer migrates a VM here live: the protocol runs over this WebSocket.

    Only a cloudlet (not an operator) sends VMs. Its endpoint is needed only to ask
    it, in doubt, whether the migration committed: taken from its signed presence
    when known, else from `?endpoint=`, and proven before any credential goes there."""
    who = peer_only(request)
    if who.is_operator:
        raise errors.Forbidden("only a cloudlet migrates VMs here")
    mover = request.app[MOVER]
    source_node = peer_of(who.name)
    source = Location(source_node, source_endpoint(mover.peers.endpoint_of(source_node),
                                                   request.query.get("endpoint")))
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES + (64 << 10))
    await open_websocket(request, ws)
    try:
        outcome = await mover.live.receive(ws, source, mover.peer_client)
        log.info("migration from %s: %s", source.node, outcome.get("outcome"))
    finally:
        await ws.close()
    return ws


async def migration_outcome(request: web.Request) -> web.Response:
    """Did migration ID commit? Asked by a destination that is in doubt."""
    peer_only(request)
    committed = await request.app[MOVER].live.committed(request.match_info["migration"])
    return web.json_response({"committed": committed})


async def kept_final_round(request: web.Request) -> web.Response:
    """The final round this cloudlet kept with its decision to move a VM away, for
    the destination it moved to (which lost its own copy: a restart before it was
    flushed there). Nobody else's, not even an operator's: it is the VM's memory."""
    node = _destination_node(peer_only(request))
    migration_id = request.match_info["migration"]
    try:
        data = await asyncio.to_thread(request.app[HOST].tombstones.kept_final,
                                       migration_id, node)
    except PermissionError:
        raise errors.Forbidden("a kept final round is only for the cloudlet the VM moved "
                               "to") from None
    if data is None:
        raise errors.KeptRoundNotFound(f"no final round of migration {migration_id!r} is "
                                       "kept here")
    return web.Response(body=data, content_type="application/octet-stream")


async def release_final_round(request: web.Request) -> web.Response:
    """The destination has the final round on its own disk now: the copy kept here
    goes. Only that destination may say so."""
    node = _destination_node(peer_only(request))
    migration_id = request.match_info["migration"]
    released = await asyncio.to_thread(request.app[HOST].tombstones.release_kept,
                                       migration_id, node)
    if not released:
        raise errors.KeptRoundNotFound(f"no final round of migration {migration_id!r} is "
                                       "kept here for you")
    return web.Response(status=204)


def _destination_node(who: Principal) -> str:
    """The node name of the peer cloudlet asking (never an operator: an operator's
    token names a person, who may happen to share a node's name)."""
    if who.is_operator:
        raise errors.Forbidden("a kept final round is for the cloudlet the VM moved to, "
                               "not for an operator")
    return peer_of(who.name)


async def synthesize_vm(request: web.Request) -> web.Response:
    """VM synthesis: a new VM of this client from an image this cloudlet holds plus
    an overlay snapshot the client sends (`cloudlet vm run --snapshot-out`)."""
    host, who = request.app[HOST], principal(request)
    async with spooled_body(request, body_limit(request), host.upload_dir) as path:
        hosted = await host.adopt_snapshot(who, path, request.app[CONFIG].max_snapshot_mib << 20,
                                           owner=who.name)
    return answer(request, hosted.describe(), 201)


async def adopt_vm(request: web.Request) -> web.Response:
    """A peer hands a VM over as a whole snapshot (the stop-and-copy path)."""
    who = peer_only(request)
    host = request.app[HOST]
    async with spooled_body(request, body_limit(request), host.upload_dir) as path:
        hosted = await host.adopt_snapshot(who, path, request.app[CONFIG].max_snapshot_mib << 20)
    return answer(request, hosted.describe(), 201)


async def peer_vms(request: web.Request) -> web.Response:
    peer_only(request)
    return answer(request, {"node": request.app[CONFIG].name,
                            "vms": [h.describe() for h in request.app[HOST].vms.values()]})


def build_app(config: NodeConfig, host: VMHost, trust: NodeTrust, metrics: Metrics,
              peers: PeerDirectory | None = None) -> web.Application:
    # The largest body any route takes is an image; routes check their own caps.
    app = web.Application(middlewares=[error_middleware, auth_middleware,
                                       body_limit_middleware, deadline_middleware],
                          client_max_size=(config.max_image_mib << 20) + 4096)
    app[HOST], app[AUTHORITY], app[METRICS], app[CONFIG] = (host, trust.authority, metrics,
                                                           config)
    app[IDENTITY] = trust.identity
    streams = app[STREAMS] = OpenStreams()
    host.on_moved = streams.vm_moved
    app[MOVER] = Mover(config, host,
                       PeerClient(trust.identity, trust.verifier, config.move_deadline_s,
                                  tls_ca_file=config.tls_ca_file), peers)
    app[MOVER].live.on_moving = streams.vm_moving
    app.cleanup_ctx.append(_mover_session)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_post("/v1/images", upload_image)
    app.router.add_get("/v1/images", list_images)
    app.router.add_delete("/v1/images/{digest}", delete_image)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_get("/v1/vms/{vm}", vm_info)
    app.router.add_post("/v1/vms/{vm}/call", call_vm)
    app.router.add_get("/v1/vms/{vm}/stream", stream_vm)
    app.router.add_get("/v1/vms/{vm}/snapshot", download_snapshot)
    app.router.add_delete("/v1/vms/{vm}", destroy_vm)
    app.router.add_post("/v1/vms/{vm}/migrate", move_vm)
    app.router.add_post("/v1/peer/vms", adopt_vm)
    app.router.add_get("/v1/peer/migrate", accept_migration)
    app.router.add_get("/v1/peer/migrations/{migration}", migration_outcome)
    app.router.add_get("/v1/peer/migrations/{migration}/final", kept_final_round)
    app.router.add_delete("/v1/peer/migrations/{migration}/final", release_final_round)
    app.router.add_post("/v1/vms/synthesize", synthesize_vm)
    app.router.add_get("/v1/peer/vms", peer_vms)
    app.on_shutdown.append(_close_sockets)
    return app


async def _close_sockets(app: web.Application) -> None:
    app[MOVER].live.arrivals.close()  # streams held for arriving VMs end too
    await app[STREAMS].drain()
    for ws in app[STREAMS].all():
        await ws.close(code=1001, message=b"cloudlet shutting down")


async def _mover_session(app: web.Application) -> AsyncIterator[None]:
    async with app[MOVER]:
        yield
