"""Where to run a task: on the device or on a cloudlet, chosen from what was measured.

As MAUI did: the cost of running remotely is the network round trip plus the
cloudlet's execution time plus moving the payload; the cost of running locally
is the device's execution time. Both are learnt per (image, function) as
exponentially weighted averages of real runs. An option never measured is
tried once first (you cannot compare against a guess), and the losing option
is re-measured every `EXPLORE_EVERY` decisions, so a cloudlet that got closer
or a device that got busy is noticed. Every decision says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EWMA_WEIGHT = 0.3  # recent runs count most; ~3 runs to follow a change
EXPLORE_EVERY = 20
# Payload upload cost when nothing better is known: a conservative 20 Mbit/s uplink.
DEFAULT_UPLINK_MBIT_S = 20.0


@dataclass(frozen=True)
class Decision:
    where: str  # "local" or "remote"
    reason: str
    local_ms: float | None  # the estimates compared (None: not measured yet)
    remote_ms: float | None


@dataclass
class _Estimate:
    local_ms: float | None = None
    remote_exec_ms: float | None = None  # the cloudlet's share: round trip minus RTT
    decisions: int = 0


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass
class Decider:
    """Learns run times and decides, per (image digest, function)."""

    uplink_mbit_s: float = DEFAULT_UPLINK_MBIT_S
    _estimates: dict[tuple[str, str], _Estimate] = field(default_factory=dict)

    def decide(self, image: str, fn: str, *, payload_bytes: int, rtt_ms: float | None,
               local_available: bool) -> Decision:
        est = self._estimates.setdefault((image, fn), _Estimate())
        est.decisions += 1
        reachable = rtt_ms is not None and math.isfinite(rtt_ms)
        if not reachable and not local_available:
            return Decision("remote", "no cloudlet reachable and no local runtime: "
                            "trying remote anyway", None, None)
        if not reachable:
            return Decision("local", "no cloudlet reachable", est.local_ms, None)
        assert rtt_ms is not None
        upload_ms = payload_bytes * 8 / (self.uplink_mbit_s * 1e3)
        remote_ms = (None if est.remote_exec_ms is None
                     else rtt_ms + est.remote_exec_ms + upload_ms)
        if not local_available:
            return Decision("remote", "local execution is not available (install the "
                            "'local' extra)", None, remote_ms)
        if remote_ms is None:
            return Decision("remote", "remote time not measured yet: measuring it",
                            est.local_ms, None)
        if est.local_ms is None:
            return Decision("local", "local time not measured yet: measuring it",
                            None, remote_ms)
        best = "remote" if remote_ms <= est.local_ms else "local"
        other = "local" if best == "remote" else "remote"
        if est.decisions % EXPLORE_EVERY == 0:
            return Decision(other, f"re-measuring {other} (every {EXPLORE_EVERY} decisions)",
                            est.local_ms, remote_ms)
        why = (f"remote {remote_ms:.2f} ms (RTT {rtt_ms:.2f} + cloudlet "
               f"{est.remote_exec_ms:.2f} + upload {upload_ms:.2f}) vs local "
               f"{est.local_ms:.2f} ms")
        return Decision(best, why, est.local_ms, remote_ms)

    def observe_local(self, image: str, fn: str, elapsed_ms: float) -> None:
        est = self._estimates.setdefault((image, fn), _Estimate())
        est.local_ms = _ewma(est.local_ms, elapsed_ms)

    def observe_remote(self, image: str, fn: str, elapsed_ms: float, rtt_ms: float,
                       payload_bytes: int) -> None:
        est = self._estimates.setdefault((image, fn), _Estimate())
        upload_ms = payload_bytes * 8 / (self.uplink_mbit_s * 1e3)
        est.remote_exec_ms = _ewma(est.remote_exec_ms, max(0.0, elapsed_ms - rtt_ms - upload_ms))
