"""RTT probing of candidate cloudlets: light, rate-limited, shared with the placer.

A probe is a few `GET /health` round trips on the client's kept-alive
connection (the smallest request a cloudlet answers); the median is kept, so
one scheduling hiccup does not move a session. Each cloudlet is probed at most
once per `interval_s` however often the SDK asks, so probing costs a phone a
few hundred bytes every few seconds. Results go to the placer on
`clients/{client}/rtt` when a broker is in use.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass

from cloudlet.errors import CloudletError, PeerUnverified
from cloudlet.trust import proof
from mobile_client.discovery import CloudletInfo, Discovery
from mobile_client.transport import Http

PROBE_INTERVAL_S = 5.0
SAMPLES = 3
PROBE_TIMEOUT_S = 1.0  # a cloudlet slower than this to answer /health is no candidate


@dataclass(frozen=True)
class Probe:
    rtt_ms: float  # inf when unreachable
    at: float  # time.monotonic()


class Prober:
    """Measures and remembers RTTs to the cloudlets discovery knows."""

    def __init__(self, http: Http, discovery: Discovery, *,
                 interval_s: float = PROBE_INTERVAL_S, samples: int = SAMPLES) -> None:
        self.http = http
        self.discovery = discovery
        self.interval_s = interval_s
        self.samples = samples
        self.last: dict[str, Probe] = {}  # by endpoint
        # Endpoints whose last probe could not prove they are of this cluster, and why.
        self.unverified: dict[str, PeerUnverified] = {}
        self._lock = asyncio.Lock()

    async def rtts(self, *, force: bool = False) -> dict[str, float]:
        """RTT in ms to each online cloudlet, by node; unreachable ones are left out.
        Cloudlets probed within `interval_s` are not probed again unless `force`."""
        async with self._lock:  # concurrent askers share one round of probes
            now = time.monotonic()
            stale = [c for c in self.discovery.candidates()
                     if force or c.endpoint not in self.last
                     or now - self.last[c.endpoint].at >= self.interval_s]
            if stale:
                await asyncio.gather(*(self._probe(c) for c in stale))
                await self.discovery.publish_rtt(self._by_node())
            return self._by_node()

    def _by_node(self) -> dict[str, float]:
        out = {}
        for c in self.discovery.candidates():
            probe = self.last.get(c.endpoint)
            if probe is not None and math.isfinite(probe.rtt_ms):
                out[c.node] = round(probe.rtt_ms, 3)
        return out

    async def ranked(self, *, force: bool = False) -> list[tuple[CloudletInfo, float]]:
        """Reachable cloudlets, nearest (lowest RTT) first."""
        rtts = await self.rtts(force=force)
        found = [(c, rtts[c.node]) for c in self.discovery.candidates() if c.node in rtts]
        return sorted(found, key=lambda pair: (pair[1], pair[0].node))

    async def _probe(self, cloudlet: CloudletInfo) -> None:
        """A few `GET /health` round trips (no token: /health is public). The first
        carries a challenge when the cloudlet's proof of identity is due, so the
        session that follows never waits for one; a cloudlet that cannot prove it
        is of this cluster is no candidate."""
        times_ms = []
        known = self.http.proven(cloudlet.location)
        node = known.node if known is not None else None
        challenge = None if known is not None else proof.new_challenge()
        for _ in range(self.samples):
            started = time.perf_counter()
            try:
                health = await self.http.request(
                    "GET", cloudlet.location, "/health", timeout_s=PROBE_TIMEOUT_S,
                    authenticated=False,
                    params={"challenge": challenge.hex()} if challenge else None)
                if challenge is not None:
                    answer = health.get("identity") if isinstance(health, dict) else None
                    node = self.http.check_proof(cloudlet.location, challenge, answer).node
                    challenge = None
                    self.unverified.pop(cloudlet.endpoint, None)
            except PeerUnverified as exc:
                self.unverified[cloudlet.endpoint] = exc
                break
            except CloudletError:
                break
            times_ms.append((time.perf_counter() - started) * 1000)
        rtt = statistics.median(times_ms) if times_ms else math.inf
        self.last[cloudlet.endpoint] = Probe(rtt, time.monotonic())
        self.discovery.mark_reachable(cloudlet.endpoint, node, bool(times_ms))
