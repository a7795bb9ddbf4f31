"""What the placer sees and what it answers: cluster state in, moves out.

The same objects serve the simulator (which rebuilds a `ClusterState` from its
arrays every tick) and a live orchestrator (which fills one from telemetry and
the clients' RTT reports, then carries out `Move`s). State is a structure of
arrays, one row per session or per cloudlet, because a decision round for
10,000 sessions has to be a handful of numpy operations; `Move` is a plain
frozen object because that is what an orchestrator logs and sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement.backhaul import Backhaul, DenseBackhaul, GraphBackhaul
from cloudlet.placement.cost import PrecopyModel
from cloudlet.placement.latency import AccessIndex, LatencyModel

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Candidate cloudlets per session besides its host: the K closest (by backhaul RTT)
# to its access point. The best cloudlet is nearly always its access point or a
# neighbour; 8 keeps a full cloudlet's overflow inside the list.
CANDIDATES = 8


@dataclass(frozen=True, eq=False)
class Network:
    """The part of the cluster that does not change between rounds.

    `backhaul` answers, for arrays of cloudlet pairs (a, j), the shortest-path RTT
    from `a` to `j` and the bottleneck bandwidth along that path (what a migration
    from `a` to `j` can get when alone): a `GraphBackhaul` over the backhaul's
    links (memory O(cloudlets), any scale) or a `DenseBackhaul` of two given
    matrices. Build with `Network.build`.
    """

    position_m: FloatArray
    capacity_vms: IntArray
    capacity_memory_bytes: FloatArray
    backhaul: Backhaul
    latency: LatencyModel
    cost: PrecopyModel
    index: AccessIndex
    near: IntArray  # (n, K): each cloudlet's K closest cloudlets by backhaul RTT
    near_rtt_ms: FloatArray  # (n, K): the backhaul RTT to each of `near`
    names: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, position_m: FloatArray, capacity_vms: IntArray,
              capacity_memory_bytes: FloatArray, backhaul: Backhaul | FloatArray,
              path_bandwidth_mbit_s: FloatArray | None = None,
              latency: LatencyModel | None = None,
              cost: PrecopyModel | None = None, names: tuple[str, ...] = (),
              extent_m: tuple[float, float, float, float] | None = None,
              candidates: int = CANDIDATES) -> Network:
        """`backhaul` is a `Backhaul`, or an (n, n) RTT matrix with
        `path_bandwidth_mbit_s` beside it (a `DenseBackhaul`: tens of cloudlets)."""
        pos = np.asarray(position_m, dtype=np.float64)
        n = len(pos)
        if not isinstance(backhaul, Backhaul):
            if path_bandwidth_mbit_s is None:
                raise InvalidArgument("an RTT matrix needs path_bandwidth_mbit_s beside it")
            backhaul = DenseBackhaul(backhaul, path_bandwidth_mbit_s)
        cap_vms = np.asarray(capacity_vms, dtype=np.int64)
        cap_mem = np.asarray(capacity_memory_bytes, dtype=np.float64)
        if backhaul.size != n:
            raise InvalidArgument(f"the backhaul must join the {n} cloudlets")
        if cap_vms.shape != (n,) or cap_mem.shape != (n,):
            raise InvalidArgument(f"capacities must have one entry per cloudlet ({n})")
        if names and len(names) != n:
            raise InvalidArgument(f"names must have one entry per cloudlet ({n})")
        return cls(position_m=pos, capacity_vms=cap_vms, capacity_memory_bytes=cap_mem,
                   backhaul=backhaul, latency=latency or LatencyModel(),
                   cost=cost or PrecopyModel(), index=AccessIndex(pos, extent_m=extent_m),
                   near=backhaul.near(candidates),
                   near_rtt_ms=backhaul.near_rtt_ms(candidates), names=names)

    @property
    def size(self) -> int:
        return len(self.position_m)


@dataclass(frozen=True, eq=False)
class Sessions:
    """One row per session. Indices (`host`, `previous_host`) are cloudlet rows.

    `movable` is False for sessions a migration is already carrying (or that the
    orchestrator pinned). `rtt_ms`, when given, holds measured RTTs: an (m, n)
    matrix with NaN where nothing was measured, or a `MeasuredRtt` (a few
    cloudlets per session, with trends: what a live orchestrator has); the
    model fills the gaps.
    `last_move_s` is -inf for a session never moved.
    """

    host: IntArray
    position_m: FloatArray
    velocity_m_s: FloatArray
    memory_bytes: FloatArray
    overlay_bytes: FloatArray
    dirty_rate_bytes_s: FloatArray
    budget_ms: FloatArray
    service_ms: FloatArray
    interaction_rate_hz: FloatArray
    last_move_s: FloatArray
    previous_host: IntArray
    movable: BoolArray
    rtt_ms: FloatArray | MeasuredRtt | None = None

    def __post_init__(self) -> None:
        # One row per session in every array: the placer's compiled loops index them
        # by session without bounds checks.
        m = len(self.host)
        for name in ("host", "memory_bytes", "overlay_bytes", "dirty_rate_bytes_s",
                     "budget_ms", "service_ms", "interaction_rate_hz", "last_move_s",
                     "previous_host", "movable"):
            if np.shape(getattr(self, name)) != (m,):
                raise InvalidArgument(f"sessions: {name} must have one entry per session "
                                      f"({m}), not shape {np.shape(getattr(self, name))}")
        for name in ("position_m", "velocity_m_s"):
            if np.shape(getattr(self, name)) != (m, 2):
                raise InvalidArgument(f"sessions: {name} must be ({m}, 2), not "
                                      f"{np.shape(getattr(self, name))}")

    @property
    def count(self) -> int:
        return len(self.host)

    def measured(self, rows: IntArray, cols: IntArray) -> tuple[FloatArray, FloatArray] | None:
        """Measured RTT and its trend (ms per s; 0 where unknown) of sessions `rows`
        (1-D) at cloudlets `cols` (1-D of the same length, or (len(rows), C)); NaN
        where nothing was measured. None when nothing at all was."""
        r = self.rtt_ms
        if r is None:
            return None
        if isinstance(r, MeasuredRtt):
            return r.lookup(rows, cols)
        got: FloatArray = r[rows[:, None], cols] if cols.ndim == 2 else r[rows, cols]
        return got, np.zeros_like(got)


@dataclass(frozen=True, eq=False)
class MeasuredRtt:
    """What clients measured, sparse: per session up to R cloudlets (`node`, -1 for
    none), the RTT to each (`rtt_ms`) and its trend (`slope_ms_s`, 0 if unknown).

    A live orchestrator knows RTTs to the few cloudlets each client probes; an
    (m, n) matrix of 10,000 sessions by 1,000 cloudlets would be 80 MB of NaN.
    """

    node: IntArray
    rtt_ms: FloatArray
    slope_ms_s: FloatArray

    def lookup(self, rows: IntArray, cols: IntArray) -> tuple[FloatArray, FloatArray]:
        flat = cols.ndim == 1
        c = cols[:, None] if flat else cols
        nodes = self.node[rows][:, None, :]  # (k, 1, R)
        hit = nodes == c[:, :, None]  # (k, C, R)
        found = hit.any(axis=2)
        at = hit.argmax(axis=2)[:, :, None]
        rtt = np.take_along_axis(self.rtt_ms[rows][:, None, :].repeat(c.shape[1], axis=1),
                                 at, axis=2)[:, :, 0]
        slope = np.take_along_axis(self.slope_ms_s[rows][:, None, :].repeat(c.shape[1], axis=1),
                                   at, axis=2)[:, :, 0]
        rtt = np.where(found, rtt, np.nan)
        slope = np.where(found, slope, 0.0)
        if flat:
            return rtt[:, 0], slope[:, 0]
        return rtt, slope


@dataclass(frozen=True, eq=False)
class Links:
    """The backhaul's directed links: the bandwidth of each, and the links each
    (source, target) path crosses.

    Migrations that cross one link share it, so what a new one gets depends on
    which others are in flight on its path, not only on the path's bottleneck.
    The paths come from `routes` (a `GraphBackhaul`: the simulator's), or from
    `path[a, b]`, the link ids from `a` to `b`, -1 past the path's end (a small
    hand-made table). Without a `Links` the placer takes each ordered pair's path
    as a link of its own (`Network.backhaul`'s path bandwidth): what a full mesh,
    or a live orchestrator that knows no more of its backhaul, gives.
    """

    bandwidth_mbit_s: FloatArray  # (L,)
    path: IntArray | None = None  # (n, n, P)
    routes: GraphBackhaul | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.routes is None):
            raise InvalidArgument("give one of path and routes")
        if self.path is not None and (self.path.ndim != 3
                                      or self.path.shape[0] != self.path.shape[1]):
            raise InvalidArgument("path must be (n, n, P)")

    def of(self, source: IntArray, target: IntArray) -> IntArray:
        """The link ids of each (source, target) path, (..., P), -1 past the end."""
        if self.routes is not None:
            return self.routes.path(source, target)
        assert self.path is not None
        got: IntArray = self.path[source, target]
        return got


@dataclass(frozen=True, eq=False)
class InFlight:
    """The migrations in flight, one row each: where from and where to.

    The simulator's migration table and a live orchestrator's move tracker both
    know them; the placer prices a new move on the links these already use.
    """

    source: IntArray
    target: IntArray

    @classmethod
    def none(cls) -> InFlight:
        i = np.zeros(0, dtype=np.int64)
        return cls(i, i)

    def __len__(self) -> int:
        return len(self.source)


@dataclass(frozen=True, eq=False)
class ClusterState:
    """Everything one decision round reads.

    Two counts per cloudlet, because a migration holds room in one place and
    load in another. `vms` and `memory_used_bytes` are what capacity is checked
    against: VMs hosted plus those being migrated in (a destination reserves
    room at the start). `serving_vms` is what queues: the VMs serving calls
    there, i.e. hosted ones, including those being migrated away (a VM serves at
    its source until it resumes at its destination) and excluding those being
    migrated in. None means no migration is in flight (`vms` then counts both).
    `in_flight` lists the migrations under way and `links` the backhaul they
    cross (see `Links`), so a new move is priced at the share of its path it
    would get, and admitted only while its links have room for it.
    """

    time_s: float
    network: Network
    vms: IntArray
    memory_used_bytes: FloatArray
    sessions: Sessions
    serving_vms: IntArray | None = None
    in_flight: InFlight | None = None
    links: Links | None = None

    def path_links(self, source: IntArray, target: IntArray) -> IntArray:
        """The link ids each (source, target) path crosses, (..., P), -1 past the end.

        Without `links`, each ordered pair is its own link, `source * n + target`."""
        src = np.asarray(source, dtype=np.int64)
        dst = np.asarray(target, dtype=np.int64)
        if self.links is None:
            pair: IntArray = (src * self.network.size + dst)[..., None]
            return pair
        return self.links.of(src, dst)

    def link_bandwidth_mbit_s(self, links: IntArray, source: IntArray,
                              target: IntArray) -> FloatArray:
        """The bandwidth of each link in `links` (inf where -1); `source` and
        `target` (shaped as `links` without its last axis) serve the pair links."""
        if self.links is None:
            bw = self.network.backhaul.path_bandwidth_mbit_s(source, target)[..., None]
            return np.where(links >= 0, bw, np.inf)
        out: FloatArray = np.where(links >= 0,
                                   self.links.bandwidth_mbit_s[np.maximum(links, 0)], np.inf)
        return out

    @property
    def load(self) -> FloatArray:
        """Utilisation, the queueing model's input: VMs serving over VM capacity."""
        serving = self.vms if self.serving_vms is None else self.serving_vms
        load: FloatArray = serving / np.maximum(self.network.capacity_vms, 1)
        return load


@dataclass(frozen=True)
class MigrationCost:
    """The cost model's estimate for one move (docs/placement.md)."""

    wire_bytes: float
    duration_s: float
    downtime_s: float
    rounds: int


@dataclass(frozen=True)
class Move:
    """One migration to carry out: the session (row), from where, to where, why, at what cost.

    `expected_gain_ms` is the RTT the session is expected to save once the move
    completes (now for reactive policies, averaged over the horizon for
    `predictive`); `score` is what the policy ranked moves by (its docstring says
    in which unit).
    """

    session: int
    source: int
    target: int
    expected_gain_ms: float
    score: float
    cost: MigrationCost


@dataclass(frozen=True, eq=False)
class Moves:
    """A round's moves as arrays (the simulator's view); `list()` gives `Move`s."""

    session: IntArray
    source: IntArray
    target: IntArray
    expected_gain_ms: FloatArray
    score: FloatArray
    wire_bytes: FloatArray
    duration_s: FloatArray
    downtime_s: FloatArray
    rounds: IntArray

    @classmethod
    def empty(cls) -> Moves:
        i = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        return cls(i, i, i, f, f, f, f, f, i)

    def __len__(self) -> int:
        return len(self.session)

    def list(self) -> list[Move]:
        return [
            Move(session=int(s), source=int(a), target=int(b), expected_gain_ms=float(g),
                 score=float(sc), cost=MigrationCost(wire_bytes=float(w), duration_s=float(d),
                                                     downtime_s=float(dt), rounds=int(r)))
            for s, a, b, g, sc, w, d, dt, r in zip(
                self.session, self.source, self.target, self.expected_gain_ms, self.score,
                self.wire_bytes, self.duration_s, self.downtime_s, self.rounds, strict=True)
        ]
