"""The emulation's measurements in the simulator's result shape.

Users record every interaction (arrival, latency or not served) and the calls
of each session; the events topic gives the migrations. Here they become a
`PolicyResult` per policy with the simulator's summary keys, timeline columns
and latency histogram, so `cloudlet.sim.report` writes the same files and plots
for both, and two more keys:

- `lost_calls`: calls the client had answered that the VM's final sequence
  number does not cover (an answered call the VM no longer reflects);
- `duplicate_calls`: calls the VM applied beyond those the client sent (a call
  applied twice).

Both come from comparing, per session, the client's count of sent and answered
calls with the VM's `seq` read from the cloudlet that holds it at the end.
Exactly-once means both are 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from cloudlet.sim.engine import HIST_BIN_MS, HIST_BINS, TIMELINE_COLUMNS, PolicyResult
from cloudlet.sim.scenario import Scenario
from edge_agent.emulation.user import UserRecord
from edge_agent.emulation.world import WorldFrames


def percentile(hist: np.ndarray, q: float, max_ms: float) -> float:
    """As the simulator reads its histogram (0.1 ms bins, overflow last)."""
    total = hist.sum()
    if total <= 0:
        return math.nan
    i = int(np.searchsorted(np.cumsum(hist), q * total))
    if i >= HIST_BINS:
        return max_ms
    return (i + 0.5) * HIST_BIN_MS


def exactly_once(users: list[UserRecord]) -> dict[str, int]:
    lost = dup = failed = unchecked = 0
    for u in users:
        for s in u.sessions:
            failed += s.failed
            if s.final_seq is None:
                unchecked += 1
                continue
            applied = s.final_seq - s.start_seq
            lost += max(s.acked - applied, 0)
            dup += max(applied - s.sent, 0)
    return {"lost_calls": lost, "duplicate_calls": dup, "failed_calls": failed,
            "unchecked_sessions": unchecked}


def ping_pongs(records: list[dict[str, Any]], window_s: float) -> list[bool]:
    """Per record (in order): a move back to the cloudlet the VM left < window ago."""
    last: dict[str, tuple[str, float]] = {}
    out = []
    for r in records:
        started = r["t_s"] - (r.get("duration_s") or 0.0)
        prev = last.get(str(r["vm"]))
        out.append(prev is not None and prev[0] == r["target"] and started - prev[1] <= window_s)
        last[str(r["vm"])] = (str(r["source"]), r["t_s"])
    return out


def policy_result(name: str, sc: Scenario, frames: WorldFrames, ticks: int,
                  users: list[UserRecord], records: list[dict[str, Any]],
                  failed_moves: int, wall_s: float) -> PolicyResult:
    dt = frames.step_s
    tl = np.zeros((ticks, len(TIMELINE_COLUMNS)))
    tl[:, 0] = np.arange(ticks) * dt
    tl[:, 1] = frames.active[:ticks].sum(axis=1)
    hist = np.zeros(HIST_BINS + 1)
    lat_sum = [0.0] * ticks
    served_n = [0] * ticks
    total = within = unserved = 0
    max_ms = 0.0
    sessions = 0
    for u in users:
        sessions += len(u.sessions)
        budget = sc.workloads[u.workload].budget_ms
        for t, lat in zip(u.arrivals_s, u.latency_ms, strict=True):
            k = min(int(t / dt), ticks - 1)
            total += 1
            tl[k, 2] += 1
            if lat != lat:
                unserved += 1
                tl[k, 4] += 1
                continue
            hist[min(int(lat / HIST_BIN_MS), HIST_BINS)] += 1
            max_ms = max(max_ms, lat)
            lat_sum[k] += lat
            served_n[k] += 1
            if lat <= budget:
                within += 1
                tl[k, 3] += 1
    for k in range(ticks):
        tl[k, 5] = lat_sum[k] / served_n[k] if served_n[k] else math.nan
    pp = ping_pongs(records, sc.ping_pong_window_s)
    downtime = moved = 0.0
    for r, is_pp in zip(records, pp, strict=True):
        end = min(int(r["t_s"] / dt), ticks - 1)
        start = min(max(int((r["t_s"] - (r.get("duration_s") or 0.0)) / dt), 0), ticks - 1)
        tl[start, 6] += 1
        tl[end, 7] += 1
        tl[start:end, 8] += 1
        tl[start, 9] += int(is_pp)
        tl[end, 10] += r["wire_bytes"]
        tl[end, 11] += r.get("downtime_s") or 0.0
        downtime += r.get("downtime_s") or 0.0
        moved += r["wire_bytes"]
    served = total - unserved
    user_steps = int(frames.active[:ticks].sum())
    summary: dict[str, Any] = {
        "within_budget": within / total if total else math.nan,
        "p50_ms": percentile(hist, 0.50, max_ms),
        "p95_ms": percentile(hist, 0.95, max_ms),
        "p99_ms": percentile(hist, 0.99, max_ms),
        "mean_ms": sum(lat_sum) / served if served else math.nan,
        "migrations": len(records),
        "migrations_started": len(records) + failed_moves,
        "migrations_cancelled": failed_moves,
        "ping_pongs": int(sum(pp)),
        "bytes_moved": round(moved),
        "downtime_s": downtime,
        "interactions": total,
        "unserved_interactions": unserved,
        "sessions": sessions,
        "wall_s": wall_s,
        "user_steps_per_s": user_steps / wall_s if wall_s > 0 else math.nan,
        **exactly_once(users),
        "errors": sum(len(u.errors) for u in users),
    }
    by_error: dict[str, int] = defaultdict(int)
    for u in users:
        for e in u.errors:
            by_error[e.split(":", 1)[0]] += 1
    summary["error_kinds"] = dict(by_error)
    mems = [s.memory_bytes for u in users for s in u.sessions if s.memory_bytes]
    summary["guest_memory_mib"] = (round(sum(mems) / len(mems) / (1 << 20), 1)
                                   if mems else None)
    return PolicyResult(name=name, summary=summary, timeline=tl, latency_hist=hist,
                        wall_s=wall_s)
