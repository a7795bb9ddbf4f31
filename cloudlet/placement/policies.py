"""The placement policies, behind one interface: `decide(state) -> Moves`.

Four policies, from doing nothing to planning ahead, so the simulator can show
what each step of sophistication buys:

- `never`: a session stays where it started. The baseline.
- `nearest` (follow-me): the VM follows its user to the cloudlet with the lowest
  RTT now, whenever that changes. Reacts at once, and ping-pongs on borders.
- `threshold`: move only when the session is over its budget, to a cloudlet at
  least `hysteresis_ms` better, and not within `cooldown_s` of its last move.
- `predictive`: extrapolate each user's motion over `horizon_s`, and start a
  migration when the budget is predicted to break within the migration's own
  duration (plus `lead_s`), so the handoff completes before it breaks; move only
  when the interactions it keeps within budget outweigh what the migration costs.

Every policy is pure (state in, moves out, no I/O, no clock, no randomness),
deterministic (ties break by cloudlet and session index) and vectorised: per
session it considers its host and a few candidates (the cloudlets closest to its
access point), then one capacity-aware greedy assignment serves every policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import kernels, slices
from cloudlet.placement.congestion import (
    MAX_LINK_MIGRATIONS,
    LinkBudget,
    admit,
    ahead_of,
    highest_first,
    price,
)
from cloudlet.placement.state import ClusterState, Move, Moves

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

GiB = float(1 << 30)
# Sessions from which predictive attaches their extrapolated positions by halving
# their paths rather than looking every instant up. Halving once paid only from
# here; compiled, it pays for any number, but below this the lookups stay as they
# were so that small scenarios keep their exact answers at exact ties.
HALVING_MIN_ROWS = 4096
# From this many sessions ready to move, the screen for steady ones and the whole
# horizon of the others are one pass (the same answers as two).
ONE_PASS_MIN_ROWS = HALVING_MIN_ROWS


class Policy(ABC):
    """A placer: cluster state in, moves out."""

    name: ClassVar[str]
    # True for a policy that never moves anything: a caller may skip building the
    # state for it (the simulator does, every tick of every `never` run).
    never_moves: ClassVar[bool] = False

    @abstractmethod
    def decide(self, state: ClusterState) -> Moves:
        """The moves to start now, as arrays (the simulator's fast path)."""

    def plan(self, state: ClusterState) -> list[Move]:
        """The moves to start now, as objects (what a live orchestrator carries out)."""
        return self.decide(state).list()


@dataclass(frozen=True)
class _Candidates:
    cand: IntArray  # (m, C) cloudlet rows; column 0 is the host
    rtt_ms: FloatArray  # (m, C) RTT now


def _rtt_now(state: ClusterState, cand: IntArray, attach: IntArray,
             access_ms: FloatArray, queue_ms: FloatArray) -> FloatArray:
    net = state.network
    # Column 0 is the host (a lookup by pair); the rest are the access point's
    # closest cloudlets, whose RTTs the network keeps beside them.
    backhaul = np.concatenate([net.backhaul.rtt_ms(attach, cand[:, 0])[:, None],
                               net.near_rtt_ms[attach]], axis=1)
    rtt: FloatArray = access_ms[:, None] + backhaul + queue_ms[cand]
    measured = state.sessions.measured(np.arange(len(cand)), cand)
    if measured is not None:
        got = measured[0]
        rtt = np.where(np.isnan(got), rtt, got)
    return rtt


def _candidates(state: ClusterState, queue_ms: FloatArray) -> tuple[_Candidates, IntArray]:
    s = state.sessions
    net = state.network
    attach, dist = net.index.nearest(s.position_m, s.host)  # most are near their host
    access_ms = net.latency.access_rtt_ms(dist)
    cand = np.concatenate([s.host[:, None], net.near[attach]], axis=1)
    return _Candidates(cand, _rtt_now(state, cand, attach, access_ms, queue_ms)), attach


def _assign(state: ClusterState, cand: IntArray, score: FloatArray, ok: BoolArray,
            priority: FloatArray, rows: IntArray | None = None) -> tuple[IntArray, IntArray]:
    """Greedy, capacity-aware: each session takes its best acceptable candidate with room.

    Rounds go down the preference lists; within a round, proposals to one cloudlet
    are granted in priority order (then session index) while its free VM slots and
    memory last. Room freed by sessions leaving is not counted: a source keeps its
    VM until the destination commits. Returns (target, column), -1 where no move.
    `cand` and the rest are of sessions `rows` (default: all of them).
    """
    net = state.network
    s = state.sessions
    host = s.host if rows is None else s.host[rows]
    memory = s.memory_bytes if rows is None else s.memory_bytes[rows]
    m = len(host)
    if (cand.ndim != 2 or len(cand) != m or score.shape != cand.shape
            or ok.shape != cand.shape or np.shape(priority) != (m,)):
        raise InvalidArgument("assign: one row of candidates, scores and flags and one "
                              "priority per session")
    by_priority = highest_first(priority)
    return kernels.assign_greedy(
        np.ascontiguousarray(cand, dtype=np.int64),
        np.ascontiguousarray(score, dtype=np.float64), np.ascontiguousarray(ok),
        np.ascontiguousarray(host, dtype=np.int64), by_priority,
        np.ascontiguousarray(memory, dtype=np.float64),
        (net.capacity_vms - state.vms).astype(np.float64),
        np.array(net.capacity_memory_bytes - state.memory_used_bytes, dtype=np.float64))


def _moves(state: ClusterState, target: IntArray, gain_ms: FloatArray,
           score: FloatArray, budget: LinkBudget, priority: FloatArray) -> Moves:
    """The chosen moves that the links admit (`congestion.admit`, in `priority`
    order), priced at the share of their path they will get."""
    chosen = np.flatnonzero(target >= 0)
    if len(chosen) == 0:
        return Moves.empty()
    s = state.sessions
    chosen = chosen[admit(state, budget, s.host[chosen], target[chosen], priority[chosen])]
    if len(chosen) == 0:
        return Moves.empty()
    src = s.host[chosen]
    dst = target[chosen]
    ahead = ahead_of(state, src, dst, priority[chosen])
    est = price(state, budget, src, dst, s.overlay_bytes[chosen], s.memory_bytes[chosen],
                s.dirty_rate_bytes_s[chosen], ahead).estimate
    return Moves(session=chosen, source=src, target=dst,
                 expected_gain_ms=gain_ms[chosen], score=score[chosen],
                 wire_bytes=est.wire_bytes, duration_s=est.duration_s,
                 downtime_s=est.downtime_s, rounds=est.rounds)


def _pick(values: FloatArray, column: IntArray) -> FloatArray:
    out: FloatArray = np.where(
        column >= 0, values[np.arange(len(column)), np.maximum(column, 0)], 0.0)
    return out


@dataclass(frozen=True)
class NeverPolicy(Policy):
    """Sessions stay where they started: what a cloud without handoff gives."""

    name: ClassVar[str] = "never"
    never_moves: ClassVar[bool] = True

    def decide(self, state: ClusterState) -> Moves:
        return Moves.empty()


@dataclass(frozen=True)
class NearestPolicy(Policy):
    """Follow-me: move to the lowest-RTT cloudlet whenever it is not the host.

    `score` is the RTT saved now (ms).
    """

    name: ClassVar[str] = "nearest"
    # Follow-me as the literature states it: no admission control unless asked.
    max_link_migrations: int = 0

    def decide(self, state: ClusterState) -> Moves:
        if state.sessions.count == 0:
            return Moves.empty()
        queue = state.network.latency.queue_ms(state.load)
        c, _ = _candidates(state, queue)
        gain = c.rtt_ms[:, :1] - c.rtt_ms
        ok = state.sessions.movable[:, None] & (gain > 1e-9)
        target, column = _assign(state, c.cand, c.rtt_ms, ok, gain.max(axis=1))
        g = _pick(gain, column)
        return _moves(state, target, g, g, LinkBudget(self.max_link_migrations), g)


@dataclass(frozen=True)
class ThresholdPolicy(Policy):
    """React to a broken budget: over budget -> the best cloudlet, with hysteresis.

    A session moves when its latency (RTT plus service time) is over its budget
    less `margin_ms` (room for jitter the mean RTT does not show), its last move
    was at least `cooldown_s` ago, and the target's RTT is at least
    `hysteresis_ms` lower. `score` is the RTT saved now (ms). At most
    `max_link_migrations` migrations cross a backhaul link at once (congestion.py);
    the rest wait for a later round, the most over budget first.
    """

    name: ClassVar[str] = "threshold"
    hysteresis_ms: float = 3.0
    cooldown_s: float = 30.0
    margin_ms: float = 2.0
    max_link_migrations: int = MAX_LINK_MIGRATIONS

    def __post_init__(self) -> None:
        LinkBudget(self.max_link_migrations)
        if self.hysteresis_ms < 0 or self.cooldown_s < 0 or self.margin_ms < 0:
            raise InvalidArgument("hysteresis_ms, cooldown_s and margin_ms must be >= 0")

    def decide(self, state: ClusterState) -> Moves:
        s = state.sessions
        if s.count == 0:
            return Moves.empty()
        queue = state.network.latency.queue_ms(state.load)
        c, _ = _candidates(state, queue)
        host_rtt = c.rtt_ms[:, 0]
        over = host_rtt + s.service_ms > s.budget_ms - self.margin_ms
        ready = s.movable & over & (state.time_s - s.last_move_s >= self.cooldown_s)
        gain = host_rtt[:, None] - c.rtt_ms
        ok = ready[:, None] & (gain >= max(self.hysteresis_ms, 1e-9))
        over_ms = host_rtt + s.service_ms - s.budget_ms
        target, column = _assign(state, c.cand, c.rtt_ms, ok, over_ms)
        g = _pick(gain, column)
        return _moves(state, target, g, g, LinkBudget(self.max_link_migrations), over_ms)


@dataclass(frozen=True)
class PredictivePolicy(Policy):
    """Plan ahead: hand off before the budget breaks, when it pays.

    Positions are extrapolated linearly (position + velocity x t) at `samples`+1
    instants over `horizon_s`. For the host and each candidate the latency model
    predicts each instant's latency; an instant over budget (less `margin_ms`, room
    for jitter) costs one violating
    interaction per interaction (`interaction_rate_hz`), plus `latency_weight` per
    ms so that among equals the faster wins. A move to a candidate takes the cost
    model's `duration_s` at the share of its path the migrations in flight leave
    it, after the wait for a free slot on a full link (congestion.py); until then
    the host serves. Its value:

        gain  = interactions x (penalty staying - penalty moving), over the horizon
        cost  = interactions stalled by the downtime + gib_cost x GiB moved
        score = gain - (1 + cost_margin) x cost   (unit: violating interactions avoided)

    A move starts when score > min_gain, the session is not in its cool-down,
    the host's latency is predicted to break the budget within the move's
    duration plus `lead_s` (earlier would serve from the target while the user is
    still closer to the host; later would break the budget), the move would end
    within the horizon with the target predicted to meet the budget then (a user
    who leaves the target's range before the VM arrives gains nothing from it;
    where no candidate will, because every cloudlet in reach is over-full, the
    gain alone decides),
    and its path's links admit it (`max_link_migrations`, the most valuable first).
    """

    name: ClassVar[str] = "predictive"
    horizon_s: float = 30.0
    samples: int = 15
    lead_s: float = 2.0
    cooldown_s: float = 10.0
    min_gain: float = 1.0
    latency_weight: float = 0.001
    gib_cost: float = 0.5
    margin_ms: float = 2.0
    # A move's expected gain is a forecast; its cost is certain. Half again the
    # cost keeps a move whose gain hangs on an extrapolated path from breaking
    # even at best.
    cost_margin: float = 0.5
    max_link_migrations: int = MAX_LINK_MIGRATIONS

    def __post_init__(self) -> None:
        LinkBudget(self.max_link_migrations)
        if not self.horizon_s > 0 or self.samples < 1:
            raise InvalidArgument("horizon_s must be > 0 and samples >= 1")
        for name in ("lead_s", "cooldown_s", "latency_weight", "gib_cost", "margin_ms",
                     "cost_margin"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0")

    def decide(self, state: ClusterState) -> Moves:
        s = state.sessions
        m = s.count
        if m == 0:
            return Moves.empty()
        net = state.network
        queue = net.latency.queue_ms(state.load)
        k = self.samples
        taus = np.linspace(0.0, self.horizon_s, k + 1)
        ready = s.movable & (state.time_s - s.last_move_s >= self.cooldown_s)
        rows = np.flatnonzero(ready)
        if len(rows) == 0:
            return Moves.empty()
        # Most sessions are fine for the whole horizon, and two instants prove it: a
        # session attached to one cloudlet at both ends of its straight path stays in
        # that cloudlet's (convex) Voronoi cell throughout, where its latency grows
        # with its distance to the access point, which is convex along the path; so
        # its latency peaks at an end. (With measurements a trend is added and this
        # does not hold: every instant is computed.)
        screen = s.rtt_ms is None
        if screen and len(rows) >= ONE_PASS_MIN_ROWS:
            # Many sessions: one pass. Halving looks each path's ends up first, with
            # the hints the two-instant screen gives them, and a steady session's
            # instants between are neither looked up nor computed.
            path = self._at_host(state, queue, taus, rows, True, screen=True)
            unsettled = np.flatnonzero(~path.steady)
            if len(unsettled) < HALVING_MIN_ROWS:
                # Few unsettled: every instant looked up, as the two-pass screen did.
                rows = rows[unsettled]
                path = self._at_host(state, queue, taus, rows, False)
        else:
            if screen:
                ends = self._at_host(state, queue, taus[[0, -1]], rows,
                                     len(rows) >= HALVING_MIN_ROWS)
                steady = ((ends.attach[:, 0] == ends.attach[:, 1])
                          & ~ends.over_at_ends.any(axis=1))
                rows = rows[~steady]
            path = self._at_host(state, queue, taus, rows, len(rows) >= HALVING_MIN_ROWS)
        # Only sessions whose host is predicted to break the budget can be due.
        rows = rows[path.due]
        if len(rows) == 0:
            return Moves.empty()
        target = np.full(m, -1, dtype=np.int64)
        gain_ms = np.zeros(m)
        score = np.zeros(m)
        first = taus[path.first]
        att = path.due_attach
        acc = path.due_access
        host = s.host[rows]
        half = max(net.near.shape[1] // 2, 1)
        cand = np.concatenate([host[:, None], net.near[att[:, 0], :half],
                               net.near[att[:, -1], :half]], axis=1)
        backhaul, last = state.network.backhaul.rtt_along(att, cand)
        at_cand = s.measured(rows, cand)
        # Measurements correct the model by a per-(session, cloudlet) offset, and
        # their trend extends it (kernels.py).
        measured, slope = at_cand if at_cand is not None else (_NO_MEASUREMENTS,
                                                                 _NO_MEASUREMENTS)
        paths = _Paths(acc, backhaul, last, np.ascontiguousarray(queue[cand]),
                       np.ascontiguousarray(measured), np.ascontiguousarray(slope), taus,
                       np.ascontiguousarray(s.service_ms[rows]),
                       s.budget_ms[rows] - self.margin_ms,
                       np.ascontiguousarray(s.interaction_rate_hz[rows]))
        budget_links = LinkBudget(self.max_link_migrations)
        priced = price(state, budget_links, host[:, None], cand, s.overlay_bytes[rows, None],
                       s.memory_bytes[rows, None], s.dirty_rate_bytes_s[rows, None])
        shape = cand.shape
        runs = priced.runs
        run = (np.arange(cand.size).reshape(shape) if priced.run is None
               else np.ascontiguousarray(priced.run.reshape(shape)))
        wait = _dense(priced.wait_s, shape)
        duration, downtime, wire = (np.ascontiguousarray(x, dtype=np.float64).ravel() for x in
                                    (runs.duration_s, runs.downtime_s, runs.wire_bytes))
        full = np.ascontiguousarray(np.broadcast_to(priced.full, shape))

        def value(lo: int, hi: int) -> tuple[FloatArray, BoolArray, BoolArray, FloatArray]:
            return kernels.predictive_value(
                *paths.rows(lo, hi), run[lo:hi], wait[lo:hi], duration, downtime, wire,
                full[lo:hi], first[lo:hi], self.latency_weight, self.gib_cost,
                self.cost_margin, self.min_gain, self.horizon_s, self.lead_s)

        net_gain, ok, over_full, saved_ms = slices.by_rows(len(rows), value)
        sub_target, column = _assign(state, cand, -net_gain, ok, net_gain.max(axis=1), rows)
        self._share_links(state, budget_links, paths, rows, host, sub_target, column,
                          net_gain, over_full)
        target[rows] = sub_target
        gain_ms[rows] = _pick(saved_ms, column)
        score[rows] = _pick(net_gain, column)
        return _moves(state, target, gain_ms, score, budget_links, score)

    def _at_host(self, state: ClusterState, queue: FloatArray, taus: FloatArray,
                 rows: IntArray, halving: bool, screen: bool = False) -> _HostPath:
        """Sessions `rows` at each instant of `taus` (extrapolated positions) at their
        hosts (kernels.host_breaks)."""
        s = state.sessions
        net = state.network
        host = s.host[rows]
        position, velocity = s.position_m[rows], s.velocity_m_s[rows]
        # Many sessions: halve each path (kernels.nearest_along). Few: look every
        # instant up, which gave these answers before halving existed (the two differ
        # only at positions exactly between two cloudlets).
        order = _halving_order(len(taus)) if halving else None
        attach = net.index.nearest_along(position, velocity, taus, host, order)
        backhaul, last = net.backhaul.rtt_along(attach, host[:, None])
        at_host = s.measured(rows, host)
        # A measurement replaces the model's "now"; its trend (clients without
        # position reports have only that) extends it over the horizon.
        measured, slope = ((np.ascontiguousarray(at_host[0]), np.ascontiguousarray(at_host[1]))
                           if at_host is not None else (_NONE, _NONE))
        lat = net.latency
        got = kernels.host_breaks(
            attach, np.ascontiguousarray(position, dtype=np.float64),
            np.ascontiguousarray(velocity, dtype=np.float64), net.index.x_m, net.index.y_m,
            backhaul, last, np.ascontiguousarray(queue[host]), measured, slope,
            np.ascontiguousarray(taus, dtype=np.float64),
            np.ascontiguousarray(s.service_ms[rows], dtype=np.float64),
            np.ascontiguousarray(s.budget_ms[rows] - self.margin_ms, dtype=np.float64),
            float(lat.radio_rtt_ms), float(lat.propagation_rtt_ms_per_km * 1e-3),
            float(lat.access_range_m), float(lat.out_of_range_rtt_ms),
            screen and at_host is None)
        return _HostPath(attach, *got)

    def _share_links(self, state: ClusterState, budget: LinkBudget, paths: _Paths,
                     rows: IntArray, host: IntArray, target: IntArray, column: IntArray,
                     net_gain: FloatArray, over_full: BoolArray) -> None:
        """Price again, sharing their links, the moves chosen this round that start
        together (each was priced as if it alone joined the migrations in flight),
        and drop (set `target` to -1) those that no longer pay or arrive in time.
        Two moves across one link each get half of it: a burst of handoffs at one
        border would otherwise start two migrations that each take four times as
        long as one (pre-copy converges slower at half the rate) and arrive after
        their users have gone."""
        chosen = np.flatnonzero(target >= 0)
        if len(chosen) < 2:
            return
        s = state.sessions
        col = column[chosen]
        src, dst = host[chosen], target[chosen]
        ahead = ahead_of(state, src, dst, net_gain[chosen, col])
        if not ahead.any():
            return
        at_rows = rows[chosen]
        priced = price(state, budget, src, dst, s.overlay_bytes[at_rows],
                       s.memory_bytes[at_rows], s.dirty_rate_bytes_s[at_rows], ahead)
        n = len(chosen)
        keep = kernels.predictive_keep(
            chosen, np.ascontiguousarray(col), *paths.arrays(), over_full,
            _dense(priced.start_to_end_s, n), _dense(priced.estimate.downtime_s, n),
            _dense(priced.estimate.wire_bytes, n),
            np.ascontiguousarray(np.broadcast_to(priced.full, n)), self.latency_weight,
            self.gib_cost, self.cost_margin, self.min_gain, self.horizon_s)
        target[chosen[~keep]] = -1


class _HostPath(NamedTuple):
    """PredictivePolicy._at_host's answer for m sessions over S instants: each one's
    access point at each instant (m, S); of those whose host breaks the budget (d of
    them), their rows in the m, access points and access RTTs (d, S) and first
    instant over budget (d); then per session whether over budget at the first and
    last instants (m, 2) and whether steady (m)."""

    attach: IntArray
    due: IntArray
    due_attach: IntArray
    due_access: FloatArray
    first: IntArray
    over_at_ends: BoolArray
    steady: BoolArray


@dataclass(frozen=True)
class _Paths:
    """What predictive's value needs of the sessions it weighs (kernels.py): each
    instant's access RTT (m, S), the backhaul RTT by access-point change (q, C) with
    each instant's change (m, S), the candidates' queueing (m, C), measurements
    ((m, C) each, or (0, 0) for none), the instants, service times, budgets less the
    margin, and interaction rates (m)."""

    access: FloatArray
    backhaul: FloatArray
    last: IntArray
    queue: FloatArray
    measured: FloatArray
    slope: FloatArray
    taus: FloatArray
    service: FloatArray
    budget: FloatArray
    rate: FloatArray

    def arrays(self) -> tuple[FloatArray, FloatArray, IntArray, FloatArray, FloatArray,
                              FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
        return (self.access, self.backhaul, self.last, self.queue, self.measured,
                self.slope, self.taus, self.service, self.budget, self.rate)

    def rows(self, lo: int, hi: int) -> tuple[FloatArray, FloatArray, IntArray, FloatArray,
                                              FloatArray, FloatArray, FloatArray, FloatArray,
                                              FloatArray, FloatArray]:
        """`arrays` of sessions lo..hi-1 (`last` still indexes the whole `backhaul`)."""
        return (self.access[lo:hi], self.backhaul, self.last[lo:hi], self.queue[lo:hi],
                self.measured[lo:hi], self.slope[lo:hi], self.taus, self.service[lo:hi],
                self.budget[lo:hi], self.rate[lo:hi])


_NO_MEASUREMENTS = np.zeros((0, 0))
_NONE = np.zeros(0)


def _dense(values: FloatArray, shape: tuple[int, ...] | int) -> FloatArray:
    """`values` broadcast to `shape` as a contiguous float array (a kernel's input)."""
    out: FloatArray = np.ascontiguousarray(np.broadcast_to(values, shape), dtype=np.float64)
    return out


def _halving_order(k: int) -> IntArray:
    """Instants 1..k-2 as rows (middle, low end, high end), each interval's middle
    after the interval's ends: the order in which halving fills a path of k instants."""
    out: list[tuple[int, int, int]] = []
    spans = [(0, k - 1)] if k > 2 else []
    while spans:
        nxt = []
        for lo, hi in spans:
            mid = (lo + hi) // 2
            if lo < mid < hi:
                out.append((mid, lo, hi))
                nxt += [(lo, mid), (mid, hi)]
        spans = nxt
    return np.array(out, dtype=np.int64).reshape(-1, 3)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (NeverPolicy, NearestPolicy, ThresholdPolicy, PredictivePolicy)
}


def make_policy(name: str, **params: Any) -> Policy:
    """A policy by name with its parameters (unknown names or parameters are errors)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
    try:
        return cls(**params)
    except TypeError as exc:
        raise InvalidArgument(f"policy {name!r}: {exc}") from None
