"""Moving a VM to another cloudlet (VM handoff), as the source carries it out.

Two ways. Live (the default): pre-copy rounds while the VM keeps serving, then a
short stop-and-copy and an atomic commit (`edge_agent.live_migration` over
`cloudlet.migration`). Stop-and-copy: pause the VM between calls, send one
whole snapshot (with its reply log, so exactly-once survives the move) to the
destination's peer route, and when the destination answers that it restored
and checkpointed the VM, forget it here and leave a tombstone; that is also
the cold path and the benchmark's baseline. Either way, if anything fails
before the destination commits, the VM simply resumes here: it was never gone.
Clients on the VM's streams get a `moved` notice and follow it, and every
outcome goes to the events topic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack

from cloudlet.errors import (
    BadCall,
    CloudletError,
    MigrationAborted,
    error_from_wire,
)
from cloudlet.migration.messages import MAX_MESSAGE_BYTES
from edge_agent.auth import Authority
from edge_agent.config import NodeConfig
from edge_agent.live_migration import LiveMigrations, new_migration_id
from edge_agent.vm_host import HostedVM, Location, VMHost

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
PEER_TOKEN_TTL_S = 300  # minted per move; a leaked one is useless five minutes later
MODES = ("live", "stop_and_copy")
MESSAGE_SLACK_BYTES = 64 << 10  # WebSocket framing around the largest migration message


class Mover:
    """Carries out moves of this cloudlet's VMs. `async with` owns its HTTP client."""

    def __init__(self, config: NodeConfig, host: VMHost, authority: Authority) -> None:
        self.config = config
        self.host = host
        self.authority = authority
        self.peers: dict[str, str] = {}  # node -> endpoint, kept by the control plane
        self.live = LiveMigrations(host)
        # Every outcome (ok or not) goes to the events topic; the control plane sets it.
        self.on_event: Callable[[dict[str, Any]], None] = lambda event: None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Mover:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=self.config.move_deadline_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.live.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def resolve(self, node: str | None, endpoint: str | None) -> Location:
        """The destination named by node (from presence) or given by endpoint."""
        if endpoint:
            if not endpoint.startswith(("http://", "https://")):
                raise BadCall(f"endpoint {endpoint!r} must be an http(s) URL")
            name = node or next((n for n, e in self.peers.items() if e == endpoint), endpoint)
            return Location(name, endpoint.rstrip("/"))
        if not node:
            raise BadCall("say where to move the VM: 'to' (a node) or 'endpoint' (a URL)")
        if node == self.config.name:
            raise BadCall(f"the VM is already on {node}")
        found = self.peers.get(node)
        if found is None:
            raise BadCall(f"no cloudlet {node!r} is online on the control plane "
                          f"(known: {', '.join(sorted(self.peers)) or 'none'})")
        return Location(node, found)

    def peer_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.authority.issue_peer(
            self.config.name, PEER_TOKEN_TTL_S)}

    async def move(self, hosted: HostedVM, where: Location,
                   mode: str = "live") -> dict[str, Any]:
        """Move `hosted` to `where`; returns what was measured. `mode` "live" is
        pre-copy (the VM serves while most of its memory travels); "stop_and_copy"
        pauses it and sends one whole snapshot (the cold path, and the baseline the
        benchmark compares against). On any failure before the destination
        commits, the VM is still here, serving."""
        if mode not in MODES:
            raise BadCall(f"mode must be one of {', '.join(MODES)}")
        if where.endpoint == self.config.endpoint:
            raise BadCall("the destination is this cloudlet")
        started = time.perf_counter()
        headers = self.peer_headers()
        try:
            if where.node == where.endpoint:  # given by URL: learn its name for the record
                health = await self._get(f"{where.endpoint}/health", headers)
                where = Location(str(health.get("node", where.node)), where.endpoint)
            if mode == "live":
                stats = await self._move_live(hosted, where, headers)
            else:
                stats = await self._move_stopped(hosted, where, headers)
        except CloudletError as exc:
            log.warning("move of VM %s to %s aborted: %s", hosted.id, where.node, exc)
            self._emit({"op": "migrated", "vm": hosted.id, "to": where.node, "mode": mode,
                        "ok": False, "error": exc.to_wire()})
            if isinstance(exc, MigrationAborted):
                raise
            raise MigrationAborted(f"move of VM {hosted.id} to {where.node} aborted, the VM "
                                   f"stays here: {exc.message}", cause=exc.code) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("move of VM %s to %s aborted: %r", hosted.id, where.node, exc)
            self._emit({"op": "migrated", "vm": hosted.id, "to": where.node, "mode": mode,
                        "ok": False, "error": {"code": "migration_aborted",
                                               "message": repr(exc)}})
            raise MigrationAborted(f"move of VM {hosted.id} to {where.node} aborted, the VM "
                                   f"stays here: {exc!r}") from exc
        stats.update({"vm": hosted.id, "to": where.node, "endpoint": where.endpoint,
                      "mode": mode, "total_s": time.perf_counter() - started,
                      # As the source sees it: paused until the destination committed.
                      # Users see this plus their reconnect (`arrival_downtime_ms` in
                      # the destination's `GET /v1/vms/{vm}`).
                      "downtime_ms": stats["paused_ms"]})
        log.info("moved VM %s to %s (%s): %d bytes in %d rounds, %.1f ms paused", hosted.id,
                 where.node, mode, stats["bytes_sent"], stats["rounds"],
                 stats["paused_ms"])
        self._emit({"op": "migrated", "ok": True, **stats})
        return stats

    async def _move_live(self, hosted: HostedVM, where: Location,
                         headers: dict[str, str]) -> dict[str, Any]:
        migration_id = new_migration_id()
        async with self._client().ws_connect(
                f"{where.endpoint}/v1/peer/migrate", headers=headers,
                params={"endpoint": self.config.endpoint},
                max_msg_size=MAX_MESSAGE_BYTES + MESSAGE_SLACK_BYTES) as ws:
            stats = await self.live.send(hosted, where, ws, migration_id)
        if stats.outcome != "committed":
            raise MigrationAborted(f"live migration {migration_id} of VM {hosted.id} aborted "
                                   f"({stats.abort_code}); the VM stays here",
                                   cause=stats.abort_code or "migration_aborted")
        record = stats.to_dict()
        record["migration_id"] = migration_id
        record["round_stats"] = record.get("rounds", [])  # per round, its codec included
        record["rounds"] = len(stats.rounds)
        record["paused_ms"] = (stats.downtime_s or 0.0) * 1000
        return record

    async def _move_stopped(self, hosted: HostedVM, where: Location,
                            headers: dict[str, str]) -> dict[str, Any]:
        image_bytes = await self._ensure_image(hosted, where, headers)
        async with self.host.paused(hosted):
            paused_at = time.perf_counter()
            snap = self.host.snapshot_with_annex(hosted)
            data = await asyncio.to_thread(snap.to_bytes)
            await self._post(f"{where.endpoint}/v1/peer/vms", data, headers, expect=201)
            await self.host.hand_over(hosted, where)
            paused_s = time.perf_counter() - paused_at
        return {"rounds": 1, "bytes_sent": len(data) + image_bytes,
                "memory_bytes": snap.memory_bytes, "seq": snap.seq,
                "paused_ms": paused_s * 1000}

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("publishing a migration event failed")

    async def _ensure_image(self, hosted: HostedVM, where: Location,
                            headers: dict[str, str]) -> int:
        """Upload the VM's image unless the destination holds it; bytes sent."""
        digest = hosted.vm.image.digest
        listing = await self._get(f"{where.endpoint}/v1/images", headers)
        if digest in listing.get("images", ()):
            return 0
        wasm = await asyncio.to_thread(self.host.images.wasm_bytes, digest)
        await self._post(f"{where.endpoint}/v1/images", wasm,
                         {**headers, "X-Image-Digest": digest}, expect=201)
        return len(wasm)

    def http(self) -> aiohttp.ClientSession:
        """The cloudlet's client to its peers (kept alive across moves)."""
        return self._client()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise MigrationAborted("the cloudlet is shutting down")
        return self._http

    async def _get(self, url: str, headers: dict[str, str]) -> dict[str, Any]:
        async with self._client().get(url, headers=headers) as resp:
            return await _decoded(resp, 200)

    async def _post(self, url: str, data: bytes, headers: dict[str, str],
                    expect: int) -> dict[str, Any]:
        async with self._client().post(url, data=data, headers=headers) as resp:
            return await _decoded(resp, expect)


async def _decoded(resp: aiohttp.ClientResponse, expect: int) -> dict[str, Any]:
    raw = await resp.read()
    try:
        if "json" in resp.headers.get("Content-Type", ""):
            body = json.loads(raw)
        else:
            body = msgpack.unpackb(raw) if raw else {}
    except (ValueError, msgpack.UnpackException):
        body = {"code": "malformed_answer", "message": raw[:200].decode(errors="replace")}
    if resp.status != expect:
        raise error_from_wire(body)
    if not isinstance(body, dict):
        raise MigrationAborted(f"the destination answered {body!r:.100}")
    return body
