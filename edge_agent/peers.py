"""The cloudlets this one knows, from their signed presence: where VMs may go.

A VM's state goes only to a cloudlet known from presence that passed the
control gate (signed by that cloudlet's own certificate). Presence is
refreshed every `refresh_s` by its cloudlet; one not refreshed for
`STALE_AFTER_REFRESHES` periods is from a cloudlet that may be gone (its Will
lost with a broker restart, say), and is not a target; an offline one
(its Will, or a clean goodbye) is never one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudlet.errors import BadCall
from cloudlet.protocol import Location

STALE_AFTER_REFRESHES = 3.0
DEFAULT_REFRESH_S = 30.0


@dataclass(frozen=True)
class Peer:
    node: str
    endpoint: str
    online: bool
    signed_at: float  # the presence's own (signed) time
    refresh_s: float
    position_m: tuple[float, float] | None = None

    def fresh(self, now: float) -> bool:
        return self.online and now - self.signed_at <= STALE_AFTER_REFRESHES * self.refresh_s


class PeerDirectory:
    def __init__(self, me: str, clock: Callable[[], float] = time.time) -> None:
        self.me = me
        self.clock = clock
        self._peers: dict[str, Peer] = {}

    def note_presence(self, node: str, body: dict[str, Any], signed_at: float) -> None:
        """A presence the gate believed."""
        endpoint = body.get("endpoint")
        online = body.get("status") == "online" and isinstance(endpoint, str) and (
            endpoint.startswith(("http://", "https://")))
        old = self._peers.get(node)
        refresh = body.get("refresh_s")
        position = body.get("position")
        self._peers[node] = Peer(
            node, endpoint if isinstance(endpoint, str) and online else (
                old.endpoint if old else ""),
            online, signed_at,
            float(refresh) if isinstance(refresh, int | float) and refresh > 0
            else DEFAULT_REFRESH_S,
            (float(position[0]), float(position[1]))
            if isinstance(position, list) and len(position) == 2
            and all(isinstance(v, int | float) for v in position) else None)

    def get(self, node: str) -> Peer | None:
        return self._peers.get(node)

    def known(self) -> list[str]:
        now = self.clock()
        return sorted(n for n, p in self._peers.items() if p.fresh(now))

    def target(self, node: str) -> Location:
        """Where to send a VM bound for `node`; `BadCall` saying why it cannot go."""
        if node == self.me:
            raise BadCall(f"the VM is already on {node}")
        peer = self._peers.get(node)
        if peer is None:
            raise BadCall(f"no cloudlet {node!r} is known from signed presence "
                          f"(known: {', '.join(self.known()) or 'none'})")
        if not peer.online:
            raise BadCall(f"cloudlet {node!r} is offline")
        if not peer.fresh(self.clock()):
            raise BadCall(f"cloudlet {node!r} has not refreshed its presence for "
                          f"{self.clock() - peer.signed_at:.0f} s: it may be gone")
        return Location(node, peer.endpoint)

    def endpoint_of(self, node: str) -> str | None:
        peer = self._peers.get(node)
        return peer.endpoint if peer is not None and peer.endpoint else None
