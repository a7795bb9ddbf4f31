"""The simulator: every chosen policy, side by side, on the same world.

Each tick the world moves once (mobility, attachment to access points, which
interactions each session makes and their jitter), and then every policy takes
its own step on that same world: its migrations progress, its sessions'
interactions are measured, and its placer decides. The policies share one
random stream for the world (common random numbers), so the differences between
their results come from the policies, not from luck; the same seed gives the
same result, bit for bit.

A policy's step works on arrays: one row per user slot, one per cloudlet, one per
migration in flight. Nothing loops over users; the only Python loops run over
events (a session starting, a migration starting), which are rare by comparison.

Migrations follow the pre-copy model of cloudlet.placement.cost round by round:
a setup (identity proof, connection, checkpoint, first capture) while the VM
serves, round 0 sends the overlay, later rounds what was dirtied meanwhile, then
the VM pauses for stop-and-copy and resumes at the destination. Migrations in
flight share each directed backhaul link equally, so a burst of handoffs slows
each other down. A destination reserves room for the VM from the start
(`vms`, what capacity is checked against), but the VM loads its queue only once
it serves there (`serving`, what queueing delay is computed from): until it
resumes at the destination, it serves, and queues, at its source.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import ScenarioError
from cloudlet.placement import ClusterState, Policy, Sessions
from cloudlet.sim.mobility import GaussMarkov, ManhattanGrid, Mobility, RandomWaypoint
from cloudlet.sim.scenario import Scenario
from cloudlet.sim.topology import Topology, build_topology
from cloudlet.sim.traces import TraceInfo, TraceMobility, scan_trace

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

MiB = float(1 << 20)
# Phases of a migration in flight (`m_phase`).
SETUP, PRECOPY, STOP_COPY, RESUME = 0, 1, 2, 3
# Latency histogram: 0.1 ms bins up to 2 s, then one overflow bin. Percentiles are
# read from it (to 0.1 ms), so an hour of a city needs no list of every sample.
HIST_BIN_MS = 0.1
HIST_BINS = 20_000

TIMELINE_COLUMNS = ("t_s", "sessions", "interactions", "within_budget", "unserved",
                    "mean_latency_ms", "migrations_started", "migrations_completed",
                    "migrations_active", "ping_pongs", "bytes_moved", "downtime_s")


@dataclass(frozen=True, eq=False)
class PolicyResult:
    name: str
    summary: dict[str, Any]
    timeline: FloatArray  # (ticks, len(TIMELINE_COLUMNS))
    latency_hist: FloatArray  # interactions per HIST_BIN_MS bin, overflow last
    wall_s: float  # this policy's own step time plus the shared world's


@dataclass(frozen=True, eq=False)
class SimResult:
    scenario: Scenario
    topology: Topology
    extent_m: tuple[float, float, float, float]
    policies: dict[str, PolicyResult]
    ticks: int
    user_steps: int
    world_wall_s: float
    trajectories: NDArray[np.float32]  # (ticks, k, 2), NaN while a slot is empty
    trace: TraceInfo | None
    users: int = 0  # user slots the run had (a trace's vehicles, or the mobility's users)


def _grow(a: Any, size: int, fill: Any) -> Any:
    if len(a) >= size:
        return a
    extra = np.full((size - len(a), *a.shape[1:]), fill, dtype=a.dtype)
    return np.concatenate([a, extra])


class World:
    """What every policy shares in one tick: positions, attachment, interactions.

    Public because `cloudlet emulate` replays the very same world (its users move
    and call as the simulator's do) on real daemons."""

    def __init__(self, sc: Scenario, seed_seq: np.random.SeedSequence,
                 mobility: Mobility, topology: Topology) -> None:
        self.sc = sc
        self.mobility = mobility
        self.topology = topology
        self.net = topology.network
        streams = seed_seq.spawn(2)
        self.rng_workload = np.random.default_rng(streams[0])
        self.rng_interactions = np.random.default_rng(streams[1])
        w = sc.workloads
        shares = np.array([x.share for x in w])
        self.shares = shares / shares.sum()
        self.w_memory = np.array([x.memory_mib * MiB for x in w])
        self.w_overlay = np.array([x.overlay_mib * MiB for x in w])
        self.w_dirty = np.array([x.dirty_rate_mib_s * MiB for x in w])
        self.w_budget = np.array([x.budget_ms for x in w])
        self.w_service = np.array([x.service_ms for x in w])
        self.w_rate = np.array([x.interaction_rate_hz for x in w])
        self.w_jitter = np.array([x.jitter_ms for x in w])
        self.slots = 0
        self.workload = np.zeros(0, dtype=np.int64)
        self.prev_active = np.zeros(0, dtype=bool)
        self.prev_xy = np.zeros((0, 2))
        self._fit(mobility.slots)

    def _fit(self, slots: int) -> None:
        if slots <= self.slots:
            return
        self.workload = _grow(self.workload, slots, 0)
        self.prev_active = _grow(self.prev_active, slots, False)
        self.prev_xy = _grow(self.prev_xy, slots, 0.0)
        self.slots = slots

    def tick(self, t_s: float, dt_s: float) -> None:
        mob = self.mobility
        mob.advance(t_s)
        self._fit(mob.slots)
        n = self.slots
        active = np.zeros(n, dtype=bool)
        active[:mob.slots] = mob.active
        xy = np.zeros((n, 2))
        xy[:mob.slots] = mob.xy
        self.entered = np.flatnonzero(active & ~self.prev_active)
        self.left = np.flatnonzero(self.prev_active & ~active)
        if len(self.entered):
            self.workload[self.entered] = self.rng_workload.choice(
                len(self.shares), size=len(self.entered), p=self.shares)
        both = active & self.prev_active
        vel = np.where(both[:, None], (xy - self.prev_xy) / dt_s, 0.0)
        self.active = active
        self.xy = xy
        self.velocity = vel
        self.idx = np.flatnonzero(active)
        idx = self.idx
        self.attach, dist = self.net.index.nearest(xy[idx])
        self.access_ms = self.net.latency.access_rtt_ms(dist)
        wl = self.workload[idx]
        self.wl = wl
        self.counts = self.rng_interactions.poisson(self.w_rate[wl] * dt_s).astype(np.float64)
        self.jitter_ms = self.rng_interactions.exponential(1.0, len(idx)) * self.w_jitter[wl]
        self.prev_active = active
        self.prev_xy = xy


class _PolicyRun:
    """One policy's sessions, cloudlet usage, migrations in flight and metrics."""

    def __init__(self, policy: Policy, world: World, ticks: int, seed: int) -> None:
        self.policy = policy
        self.world = world
        self.sc = world.sc
        topo = world.topology
        self.topo = topo
        self.net = topo.network
        n = self.net.size
        self.rng = np.random.default_rng(seed)
        self.slots = 0
        self.host = np.zeros(0, dtype=np.int64)
        self.prev_host = np.zeros(0, dtype=np.int64)
        self.last_move = np.zeros(0)
        self.migrating = np.zeros(0, dtype=bool)
        self.vms = np.zeros(n, dtype=np.int64)  # hosted plus reserved by arrivals
        self.serving = np.zeros(n, dtype=np.int64)  # hosted, serving calls here
        self.mem = np.zeros(n)
        self.link_rate = topo.directed_bandwidth_mbit_s * (1e6 / 8.0)
        self.cost = self.net.cost
        # Migrations in flight, one row each.
        self.m_slot = np.zeros(0, dtype=np.int64)
        self.m_src = np.zeros(0, dtype=np.int64)
        self.m_dst = np.zeros(0, dtype=np.int64)
        self.m_phase = np.zeros(0, dtype=np.int64)  # SETUP, PRECOPY, STOP_COPY, RESUME
        self.m_remaining = np.zeros(0)  # wire bytes left in this round
        self.m_round = np.zeros(0)  # state bytes this round carries
        self.m_elapsed = np.zeros(0)  # seconds into this round
        self.m_rounds = np.zeros(0, dtype=np.int64)
        self.m_timer = np.zeros(0)  # seconds left of SETUP or RESUME
        self.m_stop_s = np.zeros(0)
        self.m_links = np.full((0, 1), -1, dtype=np.int64)
        self.hist = np.zeros(HIST_BINS + 1)
        self.max_latency_ms = 0.0
        self.timeline = np.zeros((ticks, len(TIMELINE_COLUMNS)))
        self.totals = dict(interactions=0.0, within=0.0, unserved=0.0, started=0,
                           completed=0, cancelled=0, ping_pongs=0, bytes_moved=0.0,
                           downtime_s=0.0, sessions=0, latency_sum_ms=0.0)
        self.own_s = 0.0
        self._fit(world.slots)

    def _fit(self, slots: int) -> None:
        if slots <= self.slots:
            return
        self.host = _grow(self.host, slots, -1)
        self.prev_host = _grow(self.prev_host, slots, -1)
        self.last_move = _grow(self.last_move, slots, -np.inf)
        self.migrating = _grow(self.migrating, slots, False)
        self.slots = slots

    # --- one tick ------------------------------------------------------------------

    def step(self, tick: int, t_s: float, dt_s: float, decide: bool) -> None:
        t0 = time.perf_counter()
        w = self.world
        self._fit(w.slots)
        row = self.timeline[tick]
        row[0] = t_s
        if len(w.left):
            self._end(w.left)
        unplaced = w.idx[self.host[w.idx] < 0]
        if len(unplaced):
            self._start_sessions(unplaced)
        downtime = self._advance(t_s, dt_s, row)
        self.refresh_queue()
        self._measure(downtime, row)
        if decide:
            self._decide(t_s, row)
        row[8] = len(self.m_slot)
        self.own_s += time.perf_counter() - t0

    def _end(self, slots: IntArray) -> None:
        w = self.world
        mem = w.w_memory[w.workload[slots]]
        placed = self.host[slots] >= 0
        np.subtract.at(self.vms, self.host[slots[placed]], 1)
        np.subtract.at(self.serving, self.host[slots[placed]], 1)
        np.subtract.at(self.mem, self.host[slots[placed]], mem[placed])
        if self.migrating[slots].any():
            gone = np.isin(self.m_slot, slots)
            np.subtract.at(self.vms, self.m_dst[gone], 1)
            np.subtract.at(self.mem, self.m_dst[gone], w.w_memory[w.workload[self.m_slot[gone]]])
            self.totals["cancelled"] += int(gone.sum())
            self._keep(~gone)
        self.host[slots] = -1
        self.prev_host[slots] = -1
        self.last_move[slots] = -np.inf
        self.migrating[slots] = False

    def _start_sessions(self, slots: IntArray) -> None:
        """Place new sessions at their nearest cloudlet with room (then the next ones)."""
        w = self.world
        pos = w.xy[slots]
        attach, _ = self.net.index.nearest(pos)
        mem = w.w_memory[w.workload[slots]]
        cap_vms = self.net.capacity_vms
        cap_mem = self.net.capacity_memory_bytes
        near = self.net.near
        for s, a, m in zip(slots.tolist(), attach.tolist(), mem.tolist(), strict=True):
            for c in near[a].tolist():
                if self.vms[c] < cap_vms[c] and self.mem[c] + m <= cap_mem[c]:
                    self.host[s] = c
                    self.vms[c] += 1
                    self.serving[c] += 1
                    self.mem[c] += m
                    self.totals["sessions"] += 1
                    break

    def _keep(self, keep: BoolArray) -> None:
        for name in ("m_slot", "m_src", "m_dst", "m_phase", "m_remaining", "m_round",
                     "m_elapsed", "m_rounds", "m_timer", "m_stop_s", "m_links"):
            setattr(self, name, getattr(self, name)[keep])

    def _advance(self, t_s: float, dt_s: float, row: FloatArray
                 ) -> tuple[IntArray, FloatArray, FloatArray] | None:
        """Progress every migration in flight by one tick.

        Returns, for the sessions whose VM was paused during this tick, their slots,
        how long it was paused within the tick, and the mean wait of an interaction
        that arrived during the pause (half the paused time, plus the pause still
        to come when it does not end in this tick).
        """
        m = len(self.m_slot)
        if m == 0:
            return None
        w = self.world
        wl = w.workload[self.m_slot]
        mem = w.w_memory[wl]
        dirty = w.w_dirty[wl]
        cost = self.cost
        ratio = cost.wire_ratio
        links = self.m_links
        phase = self.m_phase
        # Sending, or about to within this tick (a setup ending now): those share links.
        sending = ((phase == PRECOPY) | (phase == STOP_COPY)
                   | ((phase == SETUP) & (self.m_timer < dt_s)))[:, None] & (links >= 0)
        counts = np.bincount(links[sending], minlength=len(self.link_rate))
        share = np.where(links >= 0,
                         self.link_rate[np.maximum(links, 0)]
                         / np.maximum(counts[np.maximum(links, 0)], 1), np.inf)
        rate = share.min(axis=1)
        if cost.send_s_per_gib > 0:
            # The source's own work per wire byte, in series with the link and shared
            # by the migrations it sends at once (cost.py).
            from_source = np.bincount(self.m_src[sending.any(axis=1)],
                                      minlength=self.net.size)
            share_src = np.maximum(from_source[self.m_src], 1)
            rate = 1.0 / (1.0 / rate + share_src * cost.send_s_per_byte)
        left = np.full(m, dt_s)
        done = np.zeros(m, dtype=bool)
        bytes_sent = np.zeros(m)
        paused = np.zeros(m)
        for _ in range(cost.max_rounds + 5):
            act = (left > 1e-12) & ~done
            if not act.any():
                break
            timed = act & ((phase == SETUP) | (phase == RESUME))
            fin_t = timed & (self.m_timer <= left)
            part_t = timed & ~fin_t
            res = phase == RESUME
            paused[fin_t & res] += self.m_timer[fin_t & res]
            paused[part_t & res] += left[part_t & res]
            left[fin_t] -= self.m_timer[fin_t]
            self.m_timer[part_t] -= left[part_t]
            left[part_t] = 0.0
            self.m_timer[fin_t] = 0.0
            done |= fin_t & res
            phase[fin_t & (phase == SETUP)] = PRECOPY
            tr = act & ((phase == PRECOPY) | (phase == STOP_COPY)) & (left > 1e-12)
            need = self.m_remaining / rate
            fin = tr & (need <= left)
            part = tr & ~fin
            stop_copy = phase == STOP_COPY
            paused[part & stop_copy] += left[part & stop_copy]
            paused[fin & stop_copy] += need[fin & stop_copy]
            moved = rate * left
            bytes_sent[part] += moved[part]
            self.m_remaining[part] -= moved[part]
            self.m_elapsed[part] += left[part]
            left[part] = 0.0
            bytes_sent[fin] += self.m_remaining[fin]
            self.m_elapsed[fin] += need[fin]
            left[fin] -= need[fin]
            self.m_remaining[fin] = 0.0
            stopped = fin & stop_copy
            phase[stopped] = RESUME
            self.m_stop_s[stopped] = self.m_elapsed[stopped]
            self.m_timer[stopped] = cost.resume_s
            pre = fin & (phase == PRECOPY)
            if pre.any():
                self.m_rounds[pre] += 1
                nxt, stop = cost.next_round(self.m_round[pre], self.m_elapsed[pre],
                                            mem[pre], dirty[pre], self.m_rounds[pre])
                self.m_round[pre] = nxt
                self.m_remaining[pre] = nxt * ratio
                self.m_elapsed[pre] = 0.0
                phase[pre] = np.where(stop, STOP_COPY, PRECOPY)
        self.totals["bytes_moved"] += float(bytes_sent.sum())
        row[10] = bytes_sent.sum()
        hit = paused > 0
        pause: tuple[IntArray, FloatArray, FloatArray] | None = None
        if hit.any():
            still = np.where(done, 0.0, np.where(phase == STOP_COPY,
                                                 self.m_remaining / rate + cost.resume_s,
                                                 self.m_timer))
            pause = (self.m_slot[hit], paused[hit], paused[hit] / 2 + still[hit])
        if not done.any():
            return pause
        d_slot = self.m_slot[done]
        d_src = self.m_src[done]
        d_dst = self.m_dst[done]
        d_down = self.m_stop_s[done] + cost.resume_s
        d_mem = mem[done]
        np.subtract.at(self.vms, d_src, 1)
        np.subtract.at(self.serving, d_src, 1)
        np.add.at(self.serving, d_dst, 1)
        np.subtract.at(self.mem, d_src, d_mem)
        self.host[d_slot] = d_dst
        self.prev_host[d_slot] = d_src
        self.last_move[d_slot] = t_s
        self.migrating[d_slot] = False
        self.totals["completed"] += len(d_slot)
        self.totals["downtime_s"] += float(d_down.sum())
        row[7] = len(d_slot)
        row[11] = d_down.sum()
        self._keep(~done)
        return pause

    def _measure(self, pause: tuple[IntArray, FloatArray, FloatArray] | None,
                 row: FloatArray) -> None:
        w = self.world
        idx = w.idx
        host = self.host[idx]
        placed = host >= 0
        counts = w.counts
        total = counts.sum()
        served_counts = np.where(placed, counts, 0.0)
        h = np.maximum(host, 0)
        rtt = (w.access_ms + self.net.backhaul_rtt_ms[w.attach, h]
               + self._queue_ms[h])
        wl = w.wl
        lat = rtt + w.w_service[wl] + w.jitter_ms
        budget = w.w_budget[wl]
        lats = lat
        weights = served_counts
        if pause is not None:
            # Interactions that arrive while the VM is paused wait for it to
            # resume; how many arrive then is binomial in the paused share.
            p_slot, p_s, wait_s = pause
            pos = np.searchsorted(idx, p_slot)
            rows = pos[(pos < len(idx)) & (idx[np.minimum(pos, len(idx) - 1)] == p_slot)]
            keep = np.isin(p_slot, idx[rows])
            p_s, wait_s = p_s[keep], wait_s[keep]
            k = self.rng.binomial(served_counts[rows].astype(np.int64),
                                  np.minimum(p_s / max(self.world_dt, 1e-9), 1.0))
            weights = served_counts.copy()
            weights[rows] -= k
            lats = np.concatenate([lat, lat[rows] + wait_s * 1000.0])
            weights = np.concatenate([weights, k.astype(np.float64)])
            budget = np.concatenate([budget, budget[rows]])
        within = float(weights[lats <= budget].sum())
        served = float(weights.sum())
        bins = np.minimum((lats * (1.0 / HIST_BIN_MS)).astype(np.int64), HIST_BINS)
        self.hist += np.bincount(bins, weights=weights, minlength=HIST_BINS + 1)
        if served:
            self.max_latency_ms = max(self.max_latency_ms, float(lats[weights > 0].max()))
        lat_sum = float(lats @ weights)
        t = self.totals
        t["interactions"] += float(total)
        t["within"] += within
        t["unserved"] += float(total) - served
        t["latency_sum_ms"] += lat_sum
        row[1] = placed.sum()
        row[2] = total
        row[3] = within
        row[4] = total - served
        row[5] = lat_sum / served if served else math.nan

    def _decide(self, t_s: float, row: FloatArray) -> None:
        w = self.world
        idx = w.idx
        rows = idx[self.host[idx] >= 0]
        if len(rows) == 0:
            return
        wl = w.workload[rows]
        state = ClusterState(
            time_s=t_s, network=self.net, vms=self.vms, serving_vms=self.serving,
            memory_used_bytes=self.mem,
            sessions=Sessions(
                host=self.host[rows], position_m=w.xy[rows], velocity_m_s=w.velocity[rows],
                memory_bytes=w.w_memory[wl], overlay_bytes=w.w_overlay[wl],
                dirty_rate_bytes_s=w.w_dirty[wl], budget_ms=w.w_budget[wl],
                service_ms=w.w_service[wl], interaction_rate_hz=w.w_rate[wl],
                last_move_s=self.last_move[rows], previous_host=self.prev_host[rows],
                movable=~self.migrating[rows]))
        moves = self.policy.decide(state)
        if len(moves) == 0:
            return
        slots = rows[moves.session]
        src, dst = moves.source, moves.target
        mem = w.w_memory[w.workload[slots]]
        np.add.at(self.vms, dst, 1)
        np.add.at(self.mem, dst, mem)
        self.migrating[slots] = True
        pp = ((dst == self.prev_host[slots])
              & (t_s - self.last_move[slots] <= self.sc.ping_pong_window_s))
        paths = [self.topo.path_links(a, b) for a, b in zip(src.tolist(), dst.tolist(),
                                                                strict=True)]
        width = max(self.m_links.shape[1], max(len(p) for p in paths))
        links = np.full((len(paths), width), -1, dtype=np.int64)
        for i, p in enumerate(paths):
            links[i, :len(p)] = p
        old = np.full((len(self.m_slot), width), -1, dtype=np.int64)
        old[:, :self.m_links.shape[1]] = self.m_links
        overlay = w.w_overlay[w.workload[slots]]
        k = len(slots)
        self.m_slot = np.concatenate([self.m_slot, slots])
        self.m_src = np.concatenate([self.m_src, src])
        self.m_dst = np.concatenate([self.m_dst, dst])
        self.m_phase = np.concatenate([self.m_phase, np.full(k, SETUP, dtype=np.int64)])
        self.m_remaining = np.concatenate([self.m_remaining, overlay * self.cost.wire_ratio])
        self.m_round = np.concatenate([self.m_round, overlay])
        self.m_elapsed = np.concatenate([self.m_elapsed, np.zeros(k)])
        self.m_rounds = np.concatenate([self.m_rounds, np.zeros(k, dtype=np.int64)])
        # Setup runs first (the VM serves at its source meanwhile); a zero setup ends
        # at once and round 0 starts in the same tick, as it did without one.
        self.m_timer = np.concatenate([self.m_timer, self.cost.setup_time_s(mem)])
        self.m_stop_s = np.concatenate([self.m_stop_s, np.zeros(k)])
        self.m_links = np.concatenate([old, links])
        self.totals["started"] += k
        self.totals["ping_pongs"] += int(pp.sum())
        row[6] = k
        row[9] = pp.sum()

    # --- bookkeeping ------------------------------------------------------------------

    world_dt = 1.0
    _queue_ms: FloatArray

    def refresh_queue(self) -> None:
        # The VMs serving here, not those reserved by arrivals: a VM being migrated
        # in loads this queue only once it resumes here.
        load = self.serving / np.maximum(self.net.capacity_vms, 1)
        self._queue_ms = self.net.latency.queue_ms(load)

    def result(self, world_s: float, user_steps: int) -> PolicyResult:
        t = self.totals
        inter = t["interactions"]
        served = inter - t["unserved"]
        wall = world_s + self.own_s
        summary: dict[str, Any] = {
            "within_budget": t["within"] / inter if inter else math.nan,
            "p50_ms": self.percentile(0.50),
            "p95_ms": self.percentile(0.95),
            "p99_ms": self.percentile(0.99),
            "mean_ms": t["latency_sum_ms"] / served if served else math.nan,
            "migrations": int(t["completed"]),
            "migrations_started": int(t["started"]),
            "migrations_cancelled": int(t["cancelled"]),
            "ping_pongs": int(t["ping_pongs"]),
            "bytes_moved": round(t["bytes_moved"]),
            "downtime_s": t["downtime_s"],
            "interactions": round(inter),
            "unserved_interactions": round(t["unserved"]),
            "sessions": int(t["sessions"]),
            "wall_s": wall,
            "user_steps_per_s": user_steps / wall if wall > 0 else math.nan,
        }
        return PolicyResult(name=self.policy.name, summary=summary, timeline=self.timeline,
                            latency_hist=self.hist, wall_s=wall)

    def percentile(self, q: float) -> float:
        total = self.hist.sum()
        if total <= 0:
            return math.nan
        cdf = np.cumsum(self.hist)
        i = int(np.searchsorted(cdf, q * total))
        if i >= HIST_BINS:
            return self.max_latency_ms
        return (i + 0.5) * HIST_BIN_MS


def make_mobility(sc: Scenario, rng: np.random.Generator
                  ) -> tuple[Mobility, TraceInfo | None]:
    mob = sc.mobility
    if mob.model == "trace":
        assert mob.file is not None
        info = scan_trace(mob.file, mob.format, mob.coords, mob.elements)
        return TraceMobility(mob.file, info, mob.elements), info
    assert sc.area_m is not None
    w, h = sc.area_m
    if mob.model == "random_waypoint":
        return RandomWaypoint(mob.users, w, h, rng, mob.speed_min_m_s, mob.speed_max_m_s,
                              mob.pause_min_s, mob.pause_max_s), None
    if mob.model == "gauss_markov":
        return GaussMarkov(mob.users, w, h, rng, mob.mean_speed_m_s, mob.speed_std_m_s,
                           mob.direction_std_rad, mob.alpha, mob.edge_margin_m), None
    if mob.block_m > min(w, h):
        raise ScenarioError(f"{sc.path}: key 'mobility.block_m': must be <= the area's "
                            f"smaller side ({min(w, h):g} m)")
    return ManhattanGrid(mob.users, w, h, rng, mob.block_m, mob.speed_min_m_s,
                         mob.speed_max_m_s, mob.turn_probability,
                         mob.speed_change_probability), None


@dataclass(frozen=True, eq=False)
class Setting:
    """What a run is played in, before any policy: the mobility (open: close it),
    the cloudlets and backhaul, the ticks, and the seed streams still unused.
    `simulate`, `scenario_topology` and `cloudlet emulate` build it the same way,
    so they all see one world for one seed."""

    mobility: Mobility
    trace: TraceInfo | None
    topology: Topology
    extent_m: tuple[float, float, float, float]
    ticks: int
    world_seed: np.random.SeedSequence
    policy_seed: np.random.SeedSequence


@contextmanager
def setting(sc: Scenario) -> Iterator[Setting]:
    """The scenario's setting, its mobility closed when the block ends."""
    root = np.random.SeedSequence(sc.seed)
    s_mob, s_topo, s_world, s_pol = root.spawn(4)
    mobility, info = make_mobility(sc, np.random.default_rng(s_mob))
    try:
        extent = mobility.extent_m
        if info is not None and sc.area_m is not None:
            extent = (0.0, 0.0, sc.area_m[0], sc.area_m[1])
        topology = build_topology(sc, extent, np.random.default_rng(s_topo))
        if sc.duration_s is not None:
            duration = sc.duration_s
        else:
            assert info is not None
            duration = info.t_end_s - info.t_start_s + sc.step_s
        ticks = max(math.floor(duration / sc.step_s + 1e-9), 1)
        yield Setting(mobility, info, topology, extent, ticks, s_world, s_pol)
    finally:
        mobility.close()


def scenario_topology(sc: Scenario) -> Topology:
    """The cloudlets and backhaul `simulate` builds for `sc` (the same seed streams),
    for a live orchestrator or an emulation that must see the simulator's network."""
    with setting(sc) as st:
        return st.topology


def simulate(sc: Scenario, progress: bool = False) -> SimResult:
    """Run every policy of the scenario side by side; deterministic for a seed."""
    with setting(sc) as st:
        return _run(sc, st, progress)


def _run(sc: Scenario, st: Setting, progress: bool) -> SimResult:
    mobility, info, topology, extent, ticks = (st.mobility, st.trace, st.topology,
                                               st.extent_m, st.ticks)
    s_world, s_pol = st.world_seed, st.policy_seed
    dt = sc.step_s
    decide_every = max(round(sc.decision_interval_s / dt), 1)
    world = World(sc, s_world, mobility, topology)
    seeds = s_pol.generate_state(len(sc.policies))
    runs = [_PolicyRun(sc.policy(name), world, ticks, int(seed))
            for name, seed in zip(sc.policies, seeds, strict=True)]
    for r in runs:
        r.world_dt = dt
    k = sc.trajectories
    traj = np.full((ticks, k, 2), np.nan, dtype=np.float32)
    world_s = 0.0
    user_steps = 0
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, nothing in a log file or a pipe.
        bar = tqdm(total=ticks, unit="tick", desc=sc.name, leave=False, mininterval=0.2,
                   disable=None)
    try:
        for tick in range(ticks):
            t_s = tick * dt
            t0 = time.perf_counter()
            world.tick(t_s, dt)
            world_s += time.perf_counter() - t0
            user_steps += len(world.idx)
            decide = tick % decide_every == 0
            for r in runs:
                r.step(tick, t_s, dt, decide)
            if k:
                kk = min(k, world.slots)
                on = world.active[:kk]
                traj[tick, :kk][on] = world.xy[:kk][on]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    results = {r.policy.name: r.result(world_s, user_steps) for r in runs}
    return SimResult(scenario=sc, topology=topology, extent_m=extent, policies=results,
                     ticks=ticks, user_steps=user_steps, world_wall_s=world_s,
                     trajectories=traj, trace=info, users=world.slots)
