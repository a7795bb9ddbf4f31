"""Per-client quotas: what one client may hold on a cloudlet, so it cannot crowd out others.

A client is the name in its token. On each cloudlet it may hold at most
`client_max_vms` VMs, `client_max_memory_mib` of memory and `client_max_images`
images (node settings, docs/daemon.md). Past one, the request is refused with
`429 quota_exceeded`, whose details name the quota, its limit and the use, and
other clients go on as before. The node's own capacity (`max_vms`,
`max_memory_mib`) is checked as well, as `503 capacity_exceeded`.

Memory is what the cloudlet commits to the client, counted the way the node
counts its own capacity: each VM's memory cap, plus the bytes of its reply log
(answers kept for exactly-once resends until the client acknowledges them, up
to 16 MiB a VM: memory a client holds through its calls rather than its guests).
A client's reply logs share what its caps leave of its memory quota: each VM's
log is capped at an equal share of that room (never below `REPLY_FLOOR_BYTES`,
never above the log's own 16 MiB), and past its cap a log drops its oldest
answers, as it always has past 16 MiB. Clients that acknowledge (the SDK does)
keep their logs near empty and never notice.

Images are shared by content, so an image counts against every client that
uploaded it, until it is deleted; the record survives restarts
(`STATE/image_holders.json`). Images a peer brings with a migrating VM count
against nobody: they come with a VM, which counts against its owner.

VMs that arrive from peers count against their owner like created ones: a
migration that would take its owner over a quota is refused, and the VM stays
where it was. VMs restored at start are never refused (they were admitted
once); if the quotas were lowered meanwhile, the client only cannot add more.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cloudlet.errors import QuotaExceeded
from cloudlet.fsutil import atomic_write
from edge_agent.config import NodeConfig

log = logging.getLogger(__name__)

MiB = 1 << 20
# A reply log is never capped below this, whatever room its owner has left: enough
# for the SDK's 64 calls in flight with 4 KiB answers each. So a client whose caps
# fill its quota exactly may exceed it by this much per VM, and no more.
REPLY_FLOOR_BYTES = 256 << 10
REPLY_LOG_MAX_BYTES = 16 << 20  # edge_agent.replies.REPLY_BYTES_CAP, the log's own cap


@dataclass(frozen=True)
class Usage:
    """What one client holds on this cloudlet."""

    vms: int = 0
    caps_bytes: int = 0  # the VMs' memory caps
    reply_bytes: int = 0  # their reply logs

    @property
    def memory_bytes(self) -> int:
        return self.caps_bytes + self.reply_bytes

    def plus(self, other: Usage) -> Usage:
        return Usage(self.vms + other.vms, self.caps_bytes + other.caps_bytes,
                     self.reply_bytes + other.reply_bytes)


class Quotas:
    """The quota policy of one cloudlet, and the record of who uploaded which image."""

    def __init__(self, config: NodeConfig) -> None:
        self.max_vms = config.client_max_vms
        self.max_memory_bytes = config.client_max_memory_mib * MiB
        self.max_images = config.client_max_images
        self._holders_path = config.state_path / "image_holders.json"
        self._holders: dict[str, set[str]] = {}  # image digest -> clients that uploaded it

    # --- VMs and memory -------------------------------------------------------------

    def check_vm(self, client: str, held: Usage, memory_bytes: int,
                 reply_bytes: int = 0) -> None:
        """May `client`, holding `held`, take one more VM of this cap (and reply log)?"""
        if held.vms + 1 > self.max_vms:
            raise QuotaExceeded(
                f"client {client!r} holds {held.vms} VMs here, its quota "
                f"(client_max_vms = {self.max_vms})", quota="vms", limit=self.max_vms,
                use=held.vms)
        asked = memory_bytes + reply_bytes
        if held.memory_bytes + asked > self.max_memory_bytes:
            raise QuotaExceeded(
                f"client {client!r} holds {held.memory_bytes} bytes of memory here "
                f"({held.caps_bytes} in VM caps, {held.reply_bytes} in reply logs); "
                f"{asked} more would pass its quota of {self.max_memory_bytes}",
                quota="memory_bytes", limit=self.max_memory_bytes, use=held.memory_bytes,
                asked=asked)

    def memory_room_bytes(self, held: Usage) -> int:
        return max(0, self.max_memory_bytes - held.memory_bytes)

    def reply_cap_bytes(self, held: Usage) -> int:
        """The cap of each of a client's reply logs: an equal share of what its VM caps
        leave of its memory quota, within [REPLY_FLOOR_BYTES, REPLY_LOG_MAX_BYTES]."""
        if held.vms == 0:
            return REPLY_LOG_MAX_BYTES
        share = (self.max_memory_bytes - held.caps_bytes) // held.vms
        return max(REPLY_FLOOR_BYTES, min(REPLY_LOG_MAX_BYTES, share))

    # --- images ---------------------------------------------------------------------

    def load(self, known_images: Iterable[str]) -> None:
        """Read who holds which image (at start); images gone from the store are dropped."""
        known = set(known_images)
        try:
            wire = json.loads(self._holders_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s (image quotas start empty): %r",
                      self._holders_path.name, exc)
            return
        if isinstance(wire, dict):
            for digest, clients in wire.items():
                if digest in known and isinstance(clients, list):
                    self._holders[digest] = {c for c in clients if isinstance(c, str)}

    def images_of(self, client: str) -> int:
        return sum(client in holders for holders in self._holders.values())

    def held_by(self, client: str) -> list[str]:
        """The digests `client` uploaded (and has not deleted)."""
        return sorted(d for d, holders in self._holders.items() if client in holders)

    def holders(self, digest: str) -> frozenset[str]:
        return frozenset(self._holders.get(digest, ()))

    def hold_image(self, client: str, digest: str) -> bool:
        """Count `digest` against `client` (raises if that passes its quota). False if
        it already did (an upload of an image one holds is free)."""
        holders = self._holders.get(digest, set())
        if client in holders:
            return False
        held = self.images_of(client)
        if held + 1 > self.max_images:
            raise QuotaExceeded(
                f"client {client!r} holds {held} images here, its quota "
                f"(client_max_images = {self.max_images}); delete one it no longer uses",
                quota="images", limit=self.max_images, use=held)
        self._holders.setdefault(digest, set()).add(client)
        return True

    def release_image(self, client: str, digest: str) -> None:
        """Undo `hold_image` (the upload failed)."""
        holders = self._holders.get(digest)
        if holders is not None:
            holders.discard(client)
            if not holders:
                del self._holders[digest]

    def forget_image(self, digest: str) -> None:
        """The image was deleted: it counts against nobody."""
        self._holders.pop(digest, None)

    def record(self) -> tuple[Path, bytes]:
        """Where and what to write so the record survives a restart (encoded here, on
        the loop, where it changes; written by the caller off the loop)."""
        wire = {d: sorted(c) for d, c in self._holders.items()}
        return self._holders_path, json.dumps(wire, sort_keys=True).encode()

    @staticmethod
    def write_record(record: tuple[Path, bytes]) -> None:
        atomic_write(*record)
