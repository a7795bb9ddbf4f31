"""Moving a VM to another cloudlet (VM handoff), as the source carries it out.

Two ways. Live (the default): pre-copy rounds while the VM keeps serving, then a
short stop-and-copy and an atomic commit (`edge_agent.live_migration` over
`cloudlet.migration`). Stop-and-copy: pause the VM between calls, write the
tombstone (the decision, durable before anything leaves: a full disk aborts
here), send one whole snapshot (with its reply log, so exactly-once survives
the move) to the destination's peer route, and when the destination answers
that it restored and checkpointed the VM, forget it here; a lost answer is
settled by asking the destination, a refusal removes the tombstone. That is
also the cold path and the benchmark's baseline. Either way, if anything fails
before the destination commits, the VM simply resumes here: it was never gone.
Clients on the VM's streams get a `moved` notice and follow it, and every
outcome goes to the events topic.

Where a VM may go: a cloudlet known from signed presence, named by its node
(`PeerDirectory.target`). Only peers and operators may name a raw endpoint
(tests and benchmarks put proxies in the path); clients never can. Either way,
the endpoint first proves it is that cloudlet (`PeerClient.prove`), and only
then gets a peer token minted for it alone, the image and the VM's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from cloudlet.errors import (
    BadCall,
    CloudletError,
    Forbidden,
    MigrationAborted,
    TrustError,
)
from cloudlet.migration.messages import MAX_MESSAGE_BYTES
from cloudlet.protocol import Location
from cloudlet.trust.sealed import Identity
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.live_migration import LiveMigrations, new_migration_id
from edge_agent.peer_client import PeerClient
from edge_agent.peers import PeerDirectory
from edge_agent.vm_host import HostedVM, VMHost

log = logging.getLogger(__name__)

MODES = ("live", "stop_and_copy")
MESSAGE_SLACK_BYTES = 64 << 10  # WebSocket framing around the largest migration message


class Mover:
    """Carries out moves of this cloudlet's VMs. `async with` owns its HTTP client."""

    def __init__(self, config: NodeConfig, host: VMHost, peer_client: PeerClient,
                 peers: PeerDirectory | None = None) -> None:
        self.config = config
        self.host = host
        self.peer_client = peer_client
        # Cloudlets known from signed presence; the control plane keeps it.
        self.peers = peers if peers is not None else PeerDirectory(config.name)
        self.live = LiveMigrations(host)
        # Every outcome (ok or not) goes to the events topic; the control plane sets it.
        self.on_event: Callable[[dict[str, Any]], None] = lambda event: None

    @property
    def identity(self) -> Identity:
        return self.peer_client.identity

    async def __aenter__(self) -> Mover:
        await self.peer_client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.live.close()
        await self.peer_client.__aexit__(*exc)

    def resolve(self, who: Principal, node: str | None, endpoint: str | None) -> Location:
        """The destination: a node known from signed presence, or (peers and operators
        only) an endpoint, which must still prove which cloudlet it is before the move."""
        if endpoint:
            if not who.is_peer:
                raise Forbidden("name the destination cloudlet ('to': NODE); a client "
                                "cannot send a VM to an address of its choosing")
            if not endpoint.startswith(("http://", "https://")):
                raise BadCall(f"endpoint {endpoint!r} must be an http(s) URL")
            return Location(node or "", endpoint.rstrip("/"))
        if not node:
            raise BadCall("say where to move the VM: 'to' (a node)")
        return self.peers.target(node)

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
        try:
            # Nothing goes to an endpoint before it proves which cloudlet it is.
            where = await self.peer_client.prove(where, where.node or None)
            if where.node == self.config.name:
                raise BadCall("the destination is this cloudlet")
            headers = self.peer_client.headers(where.node)
            if mode == "live":
                stats = await self._move_live(hosted, where, headers)
            else:
                stats = await self._move_stopped(hosted, where)
        except CloudletError as exc:
            log.warning("move of VM %s to %s aborted: %s", hosted.id, where.node, exc)
            self._emit({"op": "migrated", "vm": hosted.id, "to": where.node, "mode": mode,
                        "ok": False, "error": exc.to_wire()})
            if isinstance(exc, MigrationAborted | BadCall | Forbidden | TrustError):
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
        async with self.peer_client.http.ws_connect(
                f"{where.endpoint}/v1/peer/migrate", headers=headers,
                params={"endpoint": self.config.endpoint},
                max_msg_size=MAX_MESSAGE_BYTES + MESSAGE_SLACK_BYTES) as ws:
            # Wall clock (comparable across cloudlets and with an order's signed `ts`):
            # the destination has accepted the migration stream; its first message
            # follows at once.
            started_unix = time.time()
            stats = await self.live.send(hosted, where, ws, migration_id)
        if stats.outcome != "committed":
            raise MigrationAborted(f"live migration {migration_id} of VM {hosted.id} aborted "
                                   f"({stats.abort_code}); the VM stays here",
                                   cause=stats.abort_code or "migration_aborted")
        record = stats.to_dict()
        record["migration_id"] = migration_id
        record["started_unix"] = started_unix
        record["round_stats"] = record.get("rounds", [])  # per round, its codec included
        record["rounds"] = len(stats.rounds)
        record["paused_ms"] = (stats.downtime_s or 0.0) * 1000
        return record

    async def _move_stopped(self, hosted: HostedVM, where: Location) -> dict[str, Any]:
        started_unix = time.time()  # the first request about this VM goes out now
        image_bytes = await self._ensure_image(hosted, where)
        await self.live.supersede_arrival(hosted)
        async with self.host.paused(hosted):
            paused_at = time.perf_counter()
            # Captured in a thread (the VM is paused: nothing else touches it), so the
            # cloudlet's other VMs keep answering while a large one is copied.
            snap = await asyncio.to_thread(
                functools.partial(self.host.snapshot_with_annex, hosted, moving=True))
            data = await asyncio.to_thread(snap.to_bytes)
            # The decision first, durably, as live migration does: if it cannot be
            # written (a full disk), nothing has left and the VM simply stays. Once
            # the destination has the VM, a failure to write here would leave it
            # serving in two places.
            await asyncio.to_thread(self.host.record_move, hosted.id, where, None)
            arrived = False
            try:
                await self.peer_client.post(where, "/v1/peer/vms", data, 201)
                arrived = True
            except (CloudletError, aiohttp.ClientError, TimeoutError):
                arrived = await self._holds(where, hosted.id)  # the answer may be lost
                if not arrived:
                    raise
            finally:
                if not arrived:
                    self.host.forget_move(hosted.id)
            await self.host.hand_over(hosted, where)
            paused_s = time.perf_counter() - paused_at
        return {"rounds": 1, "bytes_sent": len(data) + image_bytes,
                "memory_bytes": snap.memory_bytes, "seq": snap.seq,
                "paused_ms": paused_s * 1000, "started_unix": started_unix}

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("publishing a migration event failed")

    async def _holds(self, where: Location, vm_id: str) -> bool:
        """Does the destination hold `vm_id` (its answer to the handover was lost)?
        Unreachable counts as no: the VM resumes here, as before this check."""
        try:
            await self.peer_client.get(where, f"/v1/vms/{vm_id}")
        except (CloudletError, aiohttp.ClientError, TimeoutError):
            return False
        log.warning("handover of VM %s: the answer was lost, but %s holds it", vm_id,
                    where.node)
        return True

    async def _ensure_image(self, hosted: HostedVM, where: Location) -> int:
        """Upload the VM's image unless the destination holds it; bytes sent."""
        digest = hosted.vm.image.digest
        listing = await self.peer_client.get(where, "/v1/images")
        if digest in listing.get("images", ()):
            return 0
        wasm = await asyncio.to_thread(self.host.images.wasm_bytes, digest)
        await self.peer_client.post(where, "/v1/images", wasm, 201,
                                    headers={"X-Image-Digest": digest})
        return len(wasm)
