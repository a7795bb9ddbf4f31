"""The simulator: every chosen policy, side by side, on the same world.

Each tick the world moves once (mobility, attachment to access points, which
interactions each session makes and their jitter), and then every policy takes
its own step on that same world: its migrations progress, its sessions'
interactions are measured, and its placer decides. The policies share one
random stream for the world (common random numbers), so the differences between
their results come from the policies, not from luck; the same seed gives the
same result, bit for bit.

A policy's step works on tables of arrays that keep their own columns in step
(cloudlet.sim.columns): the world's `Users` (one row per user slot), a policy's
`Hosting` (where each slot's session is) and `CloudletLoad` (one row per
cloudlet), and its `Migrations` in flight (one row each, progressed by the
pre-copy model round by round, sharing backhaul links). Nothing loops over
users; the only Python loops run over events (a session starting, a migration
starting), which are rare by comparison.

A destination reserves room for a VM from the migration's start (`vms`, what
capacity is checked against), but the VM loads its queue only once it serves
there (`serving`, what queueing delay is computed from): until it resumes at the
destination, it serves, and queues, at its source.
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
from cloudlet.placement import ClusterState, InFlight, Links, Policy, Sessions
from cloudlet.sim.hosting import CloudletLoad, Hosting
from cloudlet.sim.migrations import Migrations, Pauses
from cloudlet.sim.mobility import GaussMarkov, ManhattanGrid, Mobility, RandomWaypoint
from cloudlet.sim.scenario import Scenario
from cloudlet.sim.topology import Topology, build_topology
from cloudlet.sim.traces import TraceInfo, TraceMobility, scan_trace
from cloudlet.sim.users import Users, Workloads

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

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


def backhaul_links(topology: Topology) -> Links:
    """The placer's view of the backhaul: each directed link's bandwidth, and the
    routes its pairs' paths take (looked up per pair, nothing n x n)."""
    return Links(bandwidth_mbit_s=topology.directed_bandwidth_mbit_s,
                 routes=topology.backhaul)


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
        self.workloads = Workloads.of(sc.workloads)
        self.users = Users.empty(mobility.slots)
        self.links = backhaul_links(topology)
        # Each slot's access point last tick (-1: none yet): the hint that answers
        # most of this tick's attachments from one distance (AccessIndex.nearest).
        self.last_attach = np.full(mobility.slots, -1, dtype=np.int64)

    @property
    def slots(self) -> int:
        return len(self.users)

    @property
    def active(self) -> BoolArray:
        """Which slots are on the map this tick."""
        return self.users.active

    @property
    def xy(self) -> FloatArray:
        """Every slot's position this tick (0 while inactive)."""
        return self.users.xy_m

    @property
    def workload(self) -> IntArray:
        """Every slot's workload (index into `workloads`)."""
        return self.users.workload

    def tick(self, t_s: float, dt_s: float) -> None:
        mob = self.mobility
        mob.advance(t_s)
        users = self.users
        users.grow(mob.slots)
        n = len(users)
        active = np.zeros(n, dtype=bool)
        active[:mob.slots] = mob.active
        xy = np.zeros((n, 2))
        xy[:mob.slots] = mob.xy
        # `users` holds the last tick's activity and positions until replaced below.
        self.entered = np.flatnonzero(active & ~users.active)
        self.left = np.flatnonzero(users.active & ~active)
        if len(self.entered):
            users.workload[self.entered] = self.rng_workload.choice(
                len(self.workloads), size=len(self.entered), p=self.workloads.share)
        both = active & users.active
        self.velocity = np.where(both[:, None], (xy - users.xy_m) / dt_s, 0.0)
        users.active = active
        users.xy_m = xy
        self._interactions(dt_s)

    def _interactions(self, dt_s: float) -> None:
        """The active slots' attachment, and the interactions each makes this tick."""
        idx = self.idx = np.flatnonzero(self.users.active)
        if len(self.last_attach) < len(self.users):
            grown = np.full(len(self.users), -1, dtype=np.int64)
            grown[:len(self.last_attach)] = self.last_attach
            self.last_attach = grown
        self.attach, dist = self.net.index.nearest(self.users.xy_m[idx],
                                                   self.last_attach[idx])
        self.last_attach[idx] = self.attach
        self.access_ms = self.net.latency.access_rtt_ms(dist)
        wl = self.wl = self.users.workload[idx]
        w = self.workloads
        self.counts = self.rng_interactions.poisson(
            w.interaction_rate_hz[wl] * dt_s).astype(np.float64)
        self.jitter_ms = self.rng_interactions.exponential(1.0, len(idx)) * w.jitter_ms[wl]


class PolicyRun:
    """One policy's sessions, cloudlet usage, migrations in flight and metrics."""

    def __init__(self, policy: Policy, world: World, ticks: int, seed: int) -> None:
        self.policy = policy
        self.world = world
        self.sc = world.sc
        topo = world.topology
        self.topo = topo
        self.net = topo.network
        self.rng = np.random.default_rng(seed)
        self.hosting = Hosting.empty(world.slots)
        # Each slot's last (access point, host) pair and its backhaul RTT.
        self._pair_attach = np.full(world.slots, -1, dtype=np.int64)
        self._pair_host = np.full(world.slots, -1, dtype=np.int64)
        self._pair_rtt_ms = np.full(world.slots, np.nan)
        self.load = CloudletLoad.empty(self.net.size)
        self.link_rate = topo.directed_bandwidth_mbit_s * (1e6 / 8.0)
        self.cost = self.net.cost
        self.migrations = Migrations.empty()
        self.hist = np.zeros(HIST_BINS + 1)
        self.max_latency_ms = 0.0
        self.timeline = np.zeros((ticks, len(TIMELINE_COLUMNS)))
        self.totals = dict(interactions=0.0, within=0.0, unserved=0.0, started=0,
                           completed=0, cancelled=0, ping_pongs=0, bytes_moved=0.0,
                           downtime_s=0.0, sessions=0, latency_sum_ms=0.0)
        self.own_s = 0.0

    # --- one tick ------------------------------------------------------------------

    def step(self, tick: int, t_s: float, dt_s: float, decide: bool) -> None:
        t0 = time.perf_counter()
        w = self.world
        self.hosting.grow(w.slots)
        row = self.timeline[tick]
        row[0] = t_s
        if len(w.left):
            self._end(w.left)
        unplaced = w.idx[self.hosting.host[w.idx] < 0]
        if len(unplaced):
            self._start_sessions(unplaced)
        downtime = self._advance(t_s, dt_s, row)
        self.refresh_queue()
        self._measure(downtime, row)
        if decide:
            self._decide(t_s, row)
        row[8] = len(self.migrations)
        self.own_s += time.perf_counter() - t0

    def _memory_bytes(self, slots: IntArray) -> FloatArray:
        w = self.world
        mem: FloatArray = w.workloads.memory_bytes[w.users.workload[slots]]
        return mem

    def _end(self, slots: IntArray) -> None:
        hosting = self.hosting
        mem = self._memory_bytes(slots)
        placed = hosting.host[slots] >= 0
        self.load.release(hosting.host[slots[placed]], mem[placed])
        if hosting.migrating[slots].any():
            mig = self.migrations
            gone = np.isin(mig.slot, slots)
            self.load.unreserve(mig.target[gone], self._memory_bytes(mig.slot[gone]))
            self.totals["cancelled"] += int(gone.sum())
            mig.keep(~gone)
        hosting.clear(slots)

    def _start_sessions(self, slots: IntArray) -> None:
        """Place new sessions at their nearest cloudlet with room (then the next ones)."""
        attach, _ = self.net.index.nearest(self.world.xy[slots])
        mem = self._memory_bytes(slots)
        net, load = self.net, self.load
        for s, a, m in zip(slots.tolist(), attach.tolist(), mem.tolist(), strict=True):
            for c in net.near[a].tolist():
                if load.has_room(c, m, net.capacity_vms, net.capacity_memory_bytes):
                    self.hosting.host[s] = c
                    load.place(c, m)
                    self.totals["sessions"] += 1
                    break

    def _advance(self, t_s: float, dt_s: float, row: FloatArray) -> Pauses | None:
        """Progress every migration in flight by one tick; the sessions whose VM was
        paused during it, if any."""
        mig = self.migrations
        if len(mig) == 0:
            return None
        w = self.world
        wl = w.users.workload[mig.slot]
        mem = w.workloads.memory_bytes[wl]
        progress = mig.progress(self.link_rate, self.net.size, dt_s, self.cost, mem,
                                w.workloads.dirty_rate_bytes_s[wl])
        self.totals["bytes_moved"] += float(progress.sent_bytes.sum())
        row[10] = progress.sent_bytes.sum()
        pause = mig.pauses(progress, self.cost.resume_s)
        if progress.done.any():
            self._complete(progress.done, mem, t_s, row)
        return pause

    def _complete(self, done: BoolArray, mem: FloatArray, t_s: float, row: FloatArray) -> None:
        """The migrations of `done` resumed at their destination within this tick."""
        mig = self.migrations
        d_slot = mig.slot[done]
        d_src = mig.source[done]
        d_dst = mig.target[done]
        d_down = mig.stop_s[done] + self.cost.resume_s
        self.load.arrive(d_src, d_dst, mem[done])
        self.hosting.moved(d_slot, d_src, d_dst, t_s)
        self.totals["completed"] += len(d_slot)
        self.totals["downtime_s"] += float(d_down.sum())
        row[7] = len(d_slot)
        row[11] = d_down.sum()
        mig.keep(~done)

    def _measure(self, pause: Pauses | None, row: FloatArray) -> None:
        w = self.world
        idx = w.idx
        host = self.hosting.host[idx]
        placed = host >= 0
        counts = w.counts
        total = counts.sum()
        served_counts = np.where(placed, counts, 0.0)
        h = np.maximum(host, 0)
        rtt = w.access_ms + self._backhaul_rtt_ms(w.attach, h) + self._queue_ms[h]
        wl = w.wl
        lat = rtt + w.workloads.service_ms[wl] + w.jitter_ms
        budget = w.workloads.budget_ms[wl]
        lats = lat
        weights = served_counts
        if pause is not None:
            lats, weights, budget = self._paused(pause, lat, served_counts, budget)
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

    def _backhaul_rtt_ms(self, attach: IntArray, host: IntArray) -> FloatArray:
        """The backhaul RTT from each active user's access point to its host. A user
        keeps both for many ticks, so each slot keeps its last pair and RTT and only
        changed pairs are looked up: a lookup is a cache miss in the backhaul's tables,
        which at 10,000 cloudlets no longer fit the cache (the same RTTs either way)."""
        idx = self.world.idx
        if len(self._pair_rtt_ms) < self.world.slots:
            size = self.world.slots
            self._pair_attach = _grown(self._pair_attach, size, -1)
            self._pair_host = _grown(self._pair_host, size, -1)
            self._pair_rtt_ms = _grown(self._pair_rtt_ms, size, np.nan)
        stale = np.flatnonzero((self._pair_attach[idx] != attach)
                               | (self._pair_host[idx] != host))
        if len(stale):
            at = idx[stale]
            self._pair_rtt_ms[at] = self.net.backhaul.rtt_ms(attach[stale], host[stale])
            self._pair_attach[at] = attach[stale]
            self._pair_host[at] = host[stale]
        out: FloatArray = self._pair_rtt_ms[idx]
        return out

    def _paused(self, pause: Pauses, lat: FloatArray, served_counts: FloatArray,
                budget: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Interactions that arrive while the VM is paused wait for it to resume; how
        many arrive then is binomial in the paused share. They become extra rows of
        (latency, interactions, budget)."""
        idx = self.world.idx
        p_slot = pause.slot
        pos = np.searchsorted(idx, p_slot)
        rows = pos[(pos < len(idx)) & (idx[np.minimum(pos, len(idx) - 1)] == p_slot)]
        keep = np.isin(p_slot, idx[rows])
        p_s, wait_s = pause.paused_s[keep], pause.wait_s[keep]
        k = self.rng.binomial(served_counts[rows].astype(np.int64),
                              np.minimum(p_s / max(self.world_dt, 1e-9), 1.0))
        weights = served_counts.copy()
        weights[rows] -= k
        return (np.concatenate([lat, lat[rows] + wait_s * 1000.0]),
                np.concatenate([weights, k.astype(np.float64)]),
                np.concatenate([budget, budget[rows]]))

    def _decide(self, t_s: float, row: FloatArray) -> None:
        if self.policy.never_moves:
            return
        w = self.world
        hosting = self.hosting
        idx = w.idx
        rows = idx[hosting.host[idx] >= 0]
        if len(rows) == 0:
            return
        wl = w.users.workload[rows]
        wk = w.workloads
        load = self.load
        state = ClusterState(
            time_s=t_s, network=self.net, vms=load.vms, serving_vms=load.serving,
            memory_used_bytes=load.memory_bytes,
            sessions=Sessions(
                host=hosting.host[rows], position_m=w.xy[rows], velocity_m_s=w.velocity[rows],
                memory_bytes=wk.memory_bytes[wl], overlay_bytes=wk.overlay_bytes[wl],
                dirty_rate_bytes_s=wk.dirty_rate_bytes_s[wl], budget_ms=wk.budget_ms[wl],
                service_ms=wk.service_ms[wl], interaction_rate_hz=wk.interaction_rate_hz[wl],
                last_move_s=hosting.last_move_s[rows], previous_host=hosting.previous_host[rows],
                movable=~hosting.migrating[rows]),
            # The placer prices and admits new moves on the links these use.
            in_flight=InFlight(self.migrations.source.copy(), self.migrations.target.copy()),
            links=w.links)
        moves = self.policy.decide(state)
        if len(moves) == 0:
            return
        self._start_migrations(rows[moves.session], moves.source, moves.target, t_s, row)

    def _start_migrations(self, slots: IntArray, src: IntArray, dst: IntArray, t_s: float,
                          row: FloatArray) -> None:
        w = self.world
        hosting = self.hosting
        mem = self._memory_bytes(slots)
        self.load.reserve(dst, mem)
        hosting.migrating[slots] = True
        pp = ((dst == hosting.previous_host[slots])
              & (t_s - hosting.last_move_s[slots] <= self.sc.ping_pong_window_s))
        paths = self.topo.backhaul.path(src, dst)
        overlay = w.workloads.overlay_bytes[w.users.workload[slots]]
        self.migrations.start(slots, src, dst, overlay, self.cost.setup_time_s(mem), paths,
                              self.cost)
        k = len(slots)
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
        load = self.load.serving / np.maximum(self.net.capacity_vms, 1)
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
    runs = [PolicyRun(sc.policy(name), world, ticks, int(seed))
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


def _grown(values: NDArray[Any], size: int, fill: float) -> NDArray[Any]:
    """`values` extended to `size` with `fill`."""
    out = np.full(size, fill, dtype=values.dtype)
    out[:len(values)] = values
    return out
