"""Migrations share the backhaul: what a new move would get, and whether it may start.

The cost model (cost.py) prices a migration at a bandwidth. Priced at its path's
bandwidth alone, a burst of handoffs across one border looks cheap to each of
them, and the placer starts them all: each then gets a sliver of the link, the
rounds stop converging, and every session waits for its migration while its
budget breaks. Two rules, on the links each move's path crosses (`Links`, or
each ordered pair as its own link):

    n_l    = migrations in flight on link l (ClusterState.in_flight)
    K      = LinkBudget.max_migrations, the concurrent migrations a link admits
    B      = min over the path's links of bandwidth_l / (min(n_l, K - 1) + 1)
    over   = max over the path's links of n_l - K + 1, at least 0
    wait_s = over / K * T(B_K) / 2    T: the cost model's duration at the
                                      link's share B_K = bandwidth / K

A move is priced at `B`, plus `wait_s` before it can start (the moves in flight
are, on average, half done); it is admitted only while every link on its path has fewer than K
migrations, counting those in flight and the higher-priority moves of the same
round (`admit`). The source's own work (cost.py's `n`) is not shared in the
price: a move in flight from the same source nearly always ends long before a
new one does, and pricing the overlap as if it lasted the whole move delayed
handoffs that paid (emulate-small lost 3 pp of its within-budget share). A move
that is not admitted is not lost: the placer sees the session again next round,
when a slot may have freed. Queueing beats sharing:
K migrations at B/K each finish, on average, no later than 2K migrations at
B/2K, and the first ones free their sessions' budgets twice as early.

Everything is arrays over the moves considered; no loop over sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import kernels
from cloudlet.placement.cost import MigrationEstimate, each_move
from cloudlet.placement.state import ClusterState

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Concurrent migrations a link admits. Two keep a link busy while one migration
# is in its setup or its short last rounds, without halving each migration's
# rate more than once: a 128 MiB overlay over 500 Mbit/s takes ~2 s alone and
# ~4.3 s shared by two, and its rounds still converge at a dirty rate of 8 MiB/s
# (q ~ 0.27). The simulator's dense traces (docs/placement.md) do best at 2.
MAX_LINK_MIGRATIONS = 2


@dataclass(frozen=True)
class LinkBudget:
    """Admission control per backhaul link: at most `max_migrations` at once
    (0: no limit, each move priced at its equal share of the links)."""

    max_migrations: int = MAX_LINK_MIGRATIONS

    def __post_init__(self) -> None:
        if self.max_migrations < 0:
            raise InvalidArgument("max_migrations must be >= 0")


@dataclass(frozen=True, eq=False)
class Pricing:
    """A move's price under the migrations in flight (arrays shaped as the moves, but
    `runs`: one entry per run of equal inputs)."""

    # At the bandwidth it would get once started: per run of equal inputs, with each
    # move's run (PrecopyModel.estimate_runs), or per move where `run` is None.
    runs: MigrationEstimate
    run: IntArray | None
    wait_s: FloatArray  # before it can start (a full link)
    full: BoolArray  # a link on its path is at its budget: not admitted now
    bandwidth_mbit_s: FloatArray

    @cached_property
    def estimate(self) -> MigrationEstimate:
        """Each move's estimate."""
        return self.runs if self.run is None else each_move(self.runs, self.run)

    @property
    def start_to_end_s(self) -> FloatArray:
        """From now until the VM resumes at its target."""
        out: FloatArray = self.wait_s + self.estimate.duration_s
        return out


def _in_flight_links(state: ClusterState) -> tuple[IntArray, IntArray]:
    """The links the migrations in flight use (sorted ids) and how many use each."""
    f = state.in_flight
    if f is None or len(f) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    links = state.path_links(f.source, f.target).ravel()
    ids, counts = np.unique(links[links >= 0], return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


def busy(state: ClusterState, links: IntArray) -> IntArray:
    """Migrations in flight on each link of `links` (0 where -1)."""
    ids, counts = _in_flight_links(state)
    if len(ids) == 0:
        return np.zeros(links.shape, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, links), len(ids) - 1)
    out: IntArray = np.where((links >= 0) & (ids[at] == links), counts[at], 0)
    return out


def price(state: ClusterState, budget: LinkBudget, source: IntArray, target: IntArray,
          overlay_bytes: FloatArray, memory_bytes: FloatArray,
          dirty_rate_bytes_s: FloatArray, ahead: IntArray | None = None) -> Pricing:
    """What each move (`source` -> `target`, broadcast with the workload arrays)
    would cost with the migrations in flight on its path (the formula above), and
    `ahead` (per move and link, as `ahead_of` gives) this round's moves that start
    with it on its links."""
    src, dst = np.broadcast_arrays(np.asarray(source, dtype=np.int64),
                                   np.asarray(target, dtype=np.int64))
    links = state.path_links(src, dst)
    bw = state.link_bandwidth_mbit_s(links, src, dst)
    n = busy(state, links)
    if ahead is not None:
        n = n + ahead
    k = budget.max_migrations
    shape = np.broadcast_shapes(np.shape(overlay_bytes), np.shape(memory_bytes),
                                np.shape(dirty_rate_bytes_s), bw.shape[:-1])
    if k <= 0:
        got = (bw / (n + 1.0)).min(axis=-1)
        runs, run = state.network.cost.estimate_runs(overlay_bytes, memory_bytes,
                                                     dirty_rate_bytes_s, got)
        zero = np.zeros(shape)
        return Pricing(runs, run, zero, np.zeros(shape, dtype=bool), got)
    got = (bw / (np.minimum(n, k - 1) + 1.0)).min(axis=-1)
    over = np.maximum(n - k + 1, 0).max(axis=-1)
    runs, run = state.network.cost.estimate_runs(overlay_bytes, memory_bytes,
                                                 dirty_rate_bytes_s, got)
    full = over > 0
    wait = np.zeros(shape)
    if full.any():
        slot = state.network.cost.estimate(overlay_bytes, memory_bytes, dirty_rate_bytes_s,
                                           (bw / k).min(axis=-1))
        wait = np.where(full, over / k * slot.duration_s / 2.0, 0.0)
    return Pricing(runs, run, wait, np.broadcast_to(full, wait.shape).copy(), got)


def ahead_of(state: ClusterState, source: IntArray, target: IntArray,
             priority: FloatArray) -> IntArray:
    """For each of a round's moves and each link of its path (as `path_links`), how
    many of the round's higher-priority moves (ties: lower index) cross that link
    too: they start together, so they share it from the start."""
    m = len(source)
    links = state.path_links(source, target)  # (m, P)
    out = np.zeros(links.shape, dtype=np.int64)
    if np.shape(priority) != (m,) or links.shape[0] != m:
        raise InvalidArgument(f"ahead_of: one priority and one path per move ({m})")
    if m == 0:
        return out
    out = kernels.ahead_counts(highest_first(priority),
                               np.ascontiguousarray(links, dtype=np.int64))
    return out


def highest_first(priority: FloatArray) -> IntArray:
    """Indices by priority, highest first, equal priorities by index (NaN last): a
    stable sort's order, from numpy's quicksort and a pass over the ties."""
    keys = -np.asarray(priority, dtype=np.float64)
    order = np.argsort(keys).astype(np.int64)
    kernels.ties_by_index(order, keys)
    return order


def admit(state: ClusterState, budget: LinkBudget, source: IntArray, target: IntArray,
          priority: FloatArray) -> BoolArray:
    """Which of a round's moves may start: every link on the path has room once the
    migrations in flight and this round's higher-priority moves (ties: lower index)
    are counted. A move turned away is deferred to a later round, not lost."""
    m = len(source)
    k = budget.max_migrations
    if m == 0 or k <= 0:
        return np.ones(m, dtype=bool)
    links = state.path_links(source, target)  # (m, P)
    n = busy(state, links) + ahead_of(state, source, target, priority)
    fits: BoolArray = np.asarray(((links < 0) | (n + 1 <= k)).all(axis=1))
    return fits
