"""Benchmark of the placer and the simulator.

Prints a table and writes benchmarks/results/sim.json. Measured on this machine,
in this run:

- the city scenario (configs/sim/city.toml: 100 cloudlets, 1,000 users, one hour
  at 1 s = 3.6 million user-steps) once per policy, each policy alone, as a user
  running `cloudlet sim --policies P` would; and all four side by side;
- one placer decision round for 10,000 sessions and 1,000 cloudlets, per policy
  (median of repeated rounds), on a state where many sessions are away from
  their best cloudlet; and the same with a measured (sessions x cloudlets) RTT
  matrix, as a live orchestrator could pass;
- a baseline in the same run: the same model (Manhattan mobility, attachment,
  RTT, the threshold policy, interactions) stepped the naive way, one Python
  object per user and a loop over users and cloudlets, on a subset of users.
  EdgeSimPy, the usual reference, is not installable here; an earlier measurement recorded
  about 6,800 user-steps/s for it at 1,000 users.

Targets: the city hour in under 10 s for the slowest policy, i.e. at
least 350,000 user-steps/s, and the placer round in under 100 ms.

Usage: python benchmarks/sim.py [--quick]   (--quick: a 10-minute city, < 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloudlet.fsutil import atomic_write  # noqa: E402
from cloudlet.placement import (  # noqa: E402
    POLICIES,
    ClusterState,
    LatencyModel,
    Network,
    Sessions,
    make_policy,
)
from cloudlet.sim import load_scenario, simulate  # noqa: E402

CITY = ROOT / "configs" / "sim" / "city.toml"
RESULTS = ROOT / "benchmarks" / "results" / "sim.json"
TARGETS = {"city_wall_s": 10.0, "user_steps_per_s": 350_000.0, "placer_round_ms": 100.0}
MiB = float(1 << 20)
GiB = float(1 << 30)


def bench_city(quick: bool) -> dict[str, Any]:
    sc = load_scenario(CITY)
    full_s = sc.duration_s or 3600.0
    if quick:
        sc = dataclasses.replace(sc, duration_s=600.0)
    scale = full_s / (sc.duration_s or full_s)
    per: dict[str, Any] = {}
    for name in sc.policies:
        one = sc.with_policies((name,))
        t0 = time.perf_counter()
        res = simulate(one)
        wall = time.perf_counter() - t0
        s = res.policies[name].summary
        per[name] = {
            "wall_s": wall, "user_steps": res.user_steps,
            "user_steps_per_s": res.user_steps / wall,
            "within_budget": s["within_budget"], "p95_ms": s["p95_ms"],
            "migrations": s["migrations"], "ping_pongs": s["ping_pongs"],
            "bytes_moved": s["bytes_moved"], "downtime_s": s["downtime_s"],
        }
    t0 = time.perf_counter()
    together = simulate(sc)
    together_s = time.perf_counter() - t0
    slowest = max(per, key=lambda n: per[n]["wall_s"])
    return {
        "scenario": str(CITY.relative_to(ROOT)),
        "simulated_s": sc.duration_s,
        "extrapolated_from_s": sc.duration_s if quick else None,
        "per_policy": per,
        "slowest_policy": slowest,
        "city_wall_s": per[slowest]["wall_s"] * scale,
        "user_steps_per_s": per[slowest]["user_steps_per_s"],
        "all_policies_side_by_side_wall_s": together_s * scale,
        "all_policies_user_steps": together.user_steps,
    }


def placer_state(sessions: int, cloudlets: int, measured: bool,
                 seed: int = 1) -> ClusterState:
    """A 32 x 32 km metro with `cloudlets` on a grid and sessions spread over it,
    a third of them away from their best cloudlet and all on the move."""
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(cloudlets))
    spacing = 1000.0
    xs = (np.arange(side) + 0.5) * spacing
    pos = np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)[:cloudlets]
    hops = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1) / spacing
    rtt = hops * 5.0
    bw = np.full((cloudlets, cloudlets), 1000.0)
    extent = (0.0, 0.0, side * spacing, side * spacing)
    net = Network.build(pos, np.full(cloudlets, 20), np.full(cloudlets, 32 * GiB), rtt, bw,
                        latency=LatencyModel(access_range_m=800), extent_m=extent)
    users = rng.uniform(0, side * spacing, (sessions, 2))
    host, _ = net.index.nearest(users)
    away = rng.random(sessions) < 1 / 3
    host[away] = rng.integers(0, cloudlets, int(away.sum()))
    vms = np.bincount(host, minlength=cloudlets)
    rtt_ms = None
    if measured:
        attach, dist = net.index.nearest(users)
        rtt_ms = (net.latency.access_rtt_ms(dist)[:, None] + net.backhaul_rtt_ms[attach]
                  + rng.normal(0, 1, (sessions, cloudlets)))
        rtt_ms[rng.random((sessions, cloudlets)) < 0.9] = np.nan  # most never probed
    return ClusterState(
        time_s=1000.0, network=net, vms=vms, memory_used_bytes=vms * 512 * MiB,
        sessions=Sessions(
            host=host, position_m=users, velocity_m_s=rng.normal(0, 8, (sessions, 2)),
            memory_bytes=np.full(sessions, 512 * MiB),
            overlay_bytes=np.full(sessions, 128 * MiB),
            dirty_rate_bytes_s=np.full(sessions, 6 * MiB),
            budget_ms=np.full(sessions, 25.0), service_ms=np.full(sessions, 5.0),
            interaction_rate_hz=np.full(sessions, 5.0),
            last_move_s=np.full(sessions, -np.inf), previous_host=np.full(sessions, -1),
            movable=np.ones(sessions, dtype=bool), rtt_ms=rtt_ms))


def bench_placer(quick: bool) -> dict[str, Any]:
    sessions, cloudlets = 10_000, 1_000
    reps = 5 if quick else 15
    t0 = time.perf_counter()
    state = placer_state(sessions, cloudlets, measured=False)
    build_s = time.perf_counter() - t0
    measured = placer_state(sessions, cloudlets, measured=True)
    out: dict[str, Any] = {"sessions": sessions, "cloudlets": cloudlets,
                           "network_build_s": build_s, "per_policy": {}}
    for name in POLICIES:
        policy = make_policy(name)
        row: dict[str, Any] = {}
        for label, st in (("model", state), ("measured", measured)):
            policy.decide(st)
            times = []
            for _ in range(reps):
                t1 = time.perf_counter()
                moves = policy.decide(st)
                times.append(time.perf_counter() - t1)
            row[f"{label}_ms"] = statistics.median(times) * 1e3
            row[f"{label}_moves"] = len(moves)
        out["per_policy"][name] = row
    out["placer_round_ms"] = max(r["model_ms"] for r in out["per_policy"].values())
    out["placer_round_measured_ms"] = max(r["measured_ms"]
                                          for r in out["per_policy"].values())
    return out


class _NaiveUser:
    """One user as an object, the way agent-based simulators model it."""

    def __init__(self, rnd: random.Random, block: float, max_x: float, max_y: float,
                 vmin: float, vmax: float) -> None:
        if rnd.random() < 0.5:
            self.x, self.y = rnd.uniform(0, max_x), rnd.randint(0, int(max_y // block)) * block
            self.d = rnd.choice((0, 2))
        else:
            self.x, self.y = rnd.randint(0, int(max_x // block)) * block, rnd.uniform(0, max_y)
            self.d = rnd.choice((1, 3))
        self.speed = rnd.uniform(vmin, vmax)
        self.host = -1
        self.last_move = -math.inf


def naive_baseline(users: int, ticks: int) -> dict[str, Any]:
    """The city's model, stepped per user in Python (mobility, attach, RTT, the
    threshold policy, interactions), on `users` users: what the arrays replace."""
    sc = load_scenario(CITY)
    mob = sc.mobility
    w, h = sc.area_m or (10_000.0, 10_000.0)
    block = mob.block_m
    max_x, max_y = (w // block) * block, (h // block) * block
    n_side = int(math.sqrt(sc.topology.count))
    cl = [((c + 0.5) * w / n_side, (r + 0.5) * h / n_side)
          for r in range(n_side) for c in range(n_side)]
    hop_ms = sc.backhaul.link_rtt_ms + sc.backhaul.hop_rtt_ms
    radio = sc.topology.radio_rtt_ms
    rng_m = sc.topology.access_range_m
    wl = sc.workloads[0]
    rnd = random.Random(1)
    people = [_NaiveUser(rnd, block, max_x, max_y, mob.speed_min_m_s, mob.speed_max_m_s)
              for _ in range(users)]
    dirs = ((1, 0), (0, 1), (-1, 0), (0, -1))

    def nearest(x: float, y: float) -> tuple[int, float]:
        best, bd = 0, math.inf
        for i, (cx, cy) in enumerate(cl):
            d = math.hypot(x - cx, y - cy)
            if d < bd:
                best, bd = i, d
        return best, bd

    def backhaul(a: int, b: int) -> float:
        ax, ay = divmod(a, n_side)
        bx, by = divmod(b, n_side)
        return (abs(ax - bx) + abs(ay - by)) * hop_ms

    within = total = 0
    t0 = time.perf_counter()
    for tick in range(ticks):
        for u in people:
            # Manhattan step: straight to the next intersection, maybe turn.
            left = u.speed
            while left > 0:
                dx, dy = dirs[u.d]
                c = u.x if dx else u.y
                sign = dx or dy
                nxt = (math.floor(c / block + 1e-9) + 1) * block if sign > 0 else \
                    (math.ceil(c / block - 1e-9) - 1) * block
                dist = abs(nxt - c)
                if left < dist:
                    u.x += dx * left
                    u.y += dy * left
                    break
                u.x += dx * dist
                u.y += dy * dist
                left -= dist
                r = rnd.random()
                nd = (u.d + 1) % 4 if r < 0.25 else (u.d + 3) % 4 if r < 0.5 else u.d
                ndx, ndy = dirs[nd]
                if 0 <= u.x + ndx * block <= max_x and 0 <= u.y + ndy * block <= max_y:
                    u.d = nd
                elif not (0 <= u.x + dx * block <= max_x and 0 <= u.y + dy * block <= max_y):
                    u.d = (u.d + 2) % 4
            a, d = nearest(u.x, u.y)
            access = radio + 1e-5 * d + (sc.topology.out_of_range_rtt_ms if d > rng_m else 0)
            if u.host < 0:
                u.host = a
            rtt = access + backhaul(a, u.host)
            # Threshold policy, per user: scan every cloudlet for the best.
            if rtt + wl.service_ms > wl.budget_ms and tick - u.last_move >= 30:
                best, best_rtt = u.host, rtt
                for j in range(len(cl)):
                    r2 = access + backhaul(a, j)
                    if r2 < best_rtt - 3:
                        best, best_rtt = j, r2
                if best != u.host:
                    u.host, u.last_move = best, tick
            k = int(rnd.random() * 2 * wl.interaction_rate_hz)
            lat = rtt + wl.service_ms + rnd.expovariate(1 / wl.jitter_ms)
            total += k
            within += k if lat <= wl.budget_ms else 0
    wall = time.perf_counter() - t0
    return {"users": users, "ticks": ticks, "wall_s": wall,
            "user_steps_per_s": users * ticks / wall, "within_budget": within / max(total, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 10-minute city: under a minute")
    args = ap.parse_args()
    t_start = time.perf_counter()
    placer = bench_placer(args.quick)
    city = bench_city(args.quick)
    baseline = naive_baseline(users=100 if args.quick else 200, ticks=60 if args.quick else 150)
    # Like for like: the baseline steps the threshold policy.
    speedup = (city["per_policy"]["threshold"]["user_steps_per_s"]
               / baseline["user_steps_per_s"])
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "platform": platform.platform()},
        "quick": args.quick,
        "city_wall_s": city["city_wall_s"],
        "user_steps_per_s": city["user_steps_per_s"],
        "placer_round_ms": placer["placer_round_ms"],
        "placer_round_measured_ms": placer["placer_round_measured_ms"],
        "targets": TARGETS,
        "meets_targets": {
            "city_wall_s": city["city_wall_s"] < TARGETS["city_wall_s"],
            "user_steps_per_s": city["user_steps_per_s"] >= TARGETS["user_steps_per_s"],
            "placer_round_ms": placer["placer_round_ms"] < TARGETS["placer_round_ms"],
        },
        "baseline_naive_python": baseline,
        "speedup_vs_naive_same_policy": speedup,
        "edgesimpy_reference_user_steps_per_s": 6_800,
        "city": city,
        "placer": placer,
        "bench_wall_s": time.perf_counter() - t_start,
    }
    atomic_write(RESULTS, (json.dumps(result, indent=2) + "\n").encode())

    what = "10-min city, x6" if args.quick else "city hour"
    print(f"\nSimulator: {what} (100 cloudlets, 1,000 users, 1 s steps), each policy alone")
    print(f"{'policy':<12}{'wall s':>9}{'user-steps/s':>15}{'within':>9}{'migrations':>12}"
          f"{'ping-pongs':>12}")
    scale = 3600.0 / city["simulated_s"]
    for name, r in city["per_policy"].items():
        print(f"{name:<12}{r['wall_s'] * scale:>9.2f}{r['user_steps_per_s']:>15,.0f}"
              f"{100 * r['within_budget']:>8.1f}%{r['migrations']:>12,}{r['ping_pongs']:>12,}")
    print(f"{'all four':<12}{city['all_policies_side_by_side_wall_s']:>9.2f}  (side by side, "
          "one world)")
    print(f"naive Python loop, same model, {baseline['users']} users: "
          f"{baseline['user_steps_per_s']:,.0f} user-steps/s; threshold with arrays is "
          f"{speedup:,.1f}x faster (EdgeSimPy, measured earlier: ~6,800 at 1,000 users)")
    print("\nPlacer: one decision round, 10,000 sessions x 1,000 cloudlets (median)")
    print(f"{'policy':<12}{'model ms':>10}{'moves':>8}{'measured ms':>13}{'moves':>8}")
    for name, r in placer["per_policy"].items():
        print(f"{name:<12}{r['model_ms']:>10.1f}{r['model_moves']:>8,}"
              f"{r['measured_ms']:>13.1f}{r['measured_moves']:>8,}")
    print("\nTargets")
    rows = [("city hour, slowest policy", f"{result['city_wall_s']:.2f} s", "< 10 s",
             result["meets_targets"]["city_wall_s"]),
            ("user-steps/s, slowest policy", f"{result['user_steps_per_s']:,.0f}",
             ">= 350,000", result["meets_targets"]["user_steps_per_s"]),
            ("placer round", f"{result['placer_round_ms']:.1f} ms", "< 100 ms",
             result["meets_targets"]["placer_round_ms"])]
    for label, got, want, ok in rows:
        print(f"  {label:<30}{got:>14}  target {want:<11}{'ok' if ok else 'MISSED'}")
    print(f"\nwrote {RESULTS.relative_to(ROOT)} in {result['bench_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
