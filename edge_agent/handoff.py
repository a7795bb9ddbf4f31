"""Moving a VM to another cloudlet (VM handoff), as the source carries it out.

The path here is stop-and-copy of one whole snapshot: pause the VM between
calls, send its snapshot (with its reply log, so exactly-once survives the
move) to the destination's peer route, and when the destination answers that
it restored and checkpointed the VM, forget it here and leave a tombstone. If
anything fails before that answer, the VM simply resumes here: it was never
gone. Clients on the VM's streams get a `moved` notice and follow it.

Before the pause, the destination is given the image if it lacks it, so the
VM keeps serving while the largest piece travels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import msgpack

from cloudlet.errors import (
    BadCall,
    CloudletError,
    MigrationAborted,
    error_from_wire,
)
from edge_agent.auth import Authority
from edge_agent.config import NodeConfig
from edge_agent.vm_host import HostedVM, Location, VMHost

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
PEER_TOKEN_TTL_S = 300  # minted per move; a leaked one is useless five minutes later


class Mover:
    """Carries out moves of this cloudlet's VMs. `async with` owns its HTTP client."""

    def __init__(self, config: NodeConfig, host: VMHost, authority: Authority) -> None:
        self.config = config
        self.host = host
        self.authority = authority
        self.peers: dict[str, str] = {}  # node -> endpoint, kept by the control plane
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Mover:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=self.config.move_deadline_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
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

    async def move(self, hosted: HostedVM, where: Location) -> dict[str, Any]:
        """Move `hosted` to `where`; returns what was measured. On any failure before
        the destination commits, the VM is still here, serving."""
        if where.endpoint == self.config.endpoint:
            raise BadCall("the destination is this cloudlet")
        started = time.perf_counter()
        headers = {"Authorization": "Bearer " + self.authority.issue_peer(
            self.config.name, PEER_TOKEN_TTL_S)}
        try:
            if where.node == where.endpoint:  # given by URL: learn its name for the record
                health = await self._get(f"{where.endpoint}/health", headers)
                where = Location(str(health.get("node", where.node)), where.endpoint)
            image_bytes = await self._ensure_image(hosted, where, headers)
            async with self.host.paused(hosted):
                paused_at = time.perf_counter()
                snap = self.host.snapshot_with_annex(hosted)
                data = await asyncio.to_thread(snap.to_bytes)
                await self._post(f"{where.endpoint}/v1/peer/vms", data, headers, expect=201)
                await self.host.hand_over(hosted, where)
                downtime_s = time.perf_counter() - paused_at
        except CloudletError as exc:
            log.warning("move of VM %s to %s aborted: %s", hosted.id, where.node, exc)
            raise MigrationAborted(f"move of VM {hosted.id} to {where.node} aborted, the VM "
                                   f"stays here: {exc.message}", cause=exc.code) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("move of VM %s to %s aborted: %r", hosted.id, where.node, exc)
            raise MigrationAborted(f"move of VM {hosted.id} to {where.node} aborted, the VM "
                                   f"stays here: {exc!r}") from exc
        stats = {"vm": hosted.id, "to": where.node, "endpoint": where.endpoint,
                 "mode": "stop_and_copy", "rounds": 1, "bytes_sent": len(data) + image_bytes,
                 "memory_bytes": snap.memory_bytes, "seq": snap.seq,
                 "downtime_ms": downtime_s * 1000,
                 "total_s": time.perf_counter() - started}
        log.info("moved VM %s to %s: %d bytes, downtime %.1f ms", hosted.id, where.node,
                 stats["bytes_sent"], stats["downtime_ms"])
        return stats

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
