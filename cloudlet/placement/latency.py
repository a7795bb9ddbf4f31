"""The latency model: a client's round trip to each cloudlet, measured or modelled.

The placer needs an RTT from every session to every candidate cloudlet, but a
live orchestrator only has measurements for a few (the ones clients probed), and
the simulator has none. This module fills the gaps with a documented model
(docs/placement.md), built from four parts:

    rtt_ms(user, j) = access_rtt_ms(user) + backhaul_rtt_ms[a, j] + queue_ms(load[j])

    access_rtt_ms   = radio_rtt_ms + propagation_rtt_ms_per_km * d_km(user, a)
                      + out_of_range_rtt_ms * (d(user, a) > access_range_m)
    queue_ms(rho)   = service_ms * rho / (1 - rho),  rho = min(load, max_utilisation)

where `a` is the cloudlet whose access point the client is attached to (the
nearest one), and `backhaul_rtt_ms` is the shortest-path RTT over the backhaul
graph, each link costing `hop_rtt_ms` plus its own latency (backhaul.py keeps it
for the pairs near each cloudlet and computes far ones when asked).

The shape matters for speed: the part that depends on the user is one number
(`access_rtt_ms`) and one index (`a`); the backhaul part is a lookup by pair
(a, j) and the queueing part one value per cloudlet. A round for 10,000
sessions then gathers a few candidates per session instead of building a
10,000 x 1,000 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import kernels, slices

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Defaults, with their reasons (docs/placement.md has the same table):
# - 5G / Wi-Fi 6 first-hop RTT is typically 4-10 ms under load; 8 ms is mid-range.
RADIO_RTT_MS = 8.0
# - Light in fibre covers ~200 km/ms; the round trip doubles it: 0.01 ms per km.
PROPAGATION_RTT_MS_PER_KM = 0.01
# - Outside every cloudlet's access range the client reaches the edge through the
#   operator's core (macro cell, packet gateway): tens of ms more.
OUT_OF_RANGE_RTT_MS = 30.0
# - A metro Wi-Fi / small-cell access point covers a few hundred metres to ~1 km.
ACCESS_RANGE_M = 1000.0
# - Each backhaul router adds forwarding and serialisation delay (both ways).
HOP_RTT_MS = 1.0
# - A VM's mean service time slice: queueing grows as M/M/1 waiting time.
SERVICE_MS = 1.0
# Cells of raster kept around the area, so that positions extrapolated a little
# past its edge are still answered from the raster, not by brute force.
RASTER_MARGIN_CELLS = 4
# Bound on the raster's size (memory: cells x candidates x 8 bytes).
MAX_RASTER_CELLS = 1 << 21
# - Beyond this utilisation the M/M/1 formula explodes; cap it (19x service).
MAX_UTILISATION = 0.95


@dataclass(frozen=True)
class LatencyModel:
    """The parameters of the model above; every field is documented in docs/placement.md."""

    radio_rtt_ms: float = RADIO_RTT_MS
    propagation_rtt_ms_per_km: float = PROPAGATION_RTT_MS_PER_KM
    access_range_m: float = ACCESS_RANGE_M
    out_of_range_rtt_ms: float = OUT_OF_RANGE_RTT_MS
    hop_rtt_ms: float = HOP_RTT_MS
    service_ms: float = SERVICE_MS
    max_utilisation: float = MAX_UTILISATION

    def __post_init__(self) -> None:
        for name in ("radio_rtt_ms", "propagation_rtt_ms_per_km", "access_range_m",
                     "out_of_range_rtt_ms", "hop_rtt_ms", "service_ms"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0 (got {value})")
        if not 0.0 <= self.max_utilisation < 1.0:
            raise InvalidArgument(
                f"max_utilisation must be in [0, 1) (got {self.max_utilisation})")

    def access_rtt_ms(self, distance_m: FloatArray) -> FloatArray:
        """Client to its access point: radio, propagation, and the out-of-range detour."""
        rtt: FloatArray = (self.radio_rtt_ms
                           + self.propagation_rtt_ms_per_km * 1e-3 * distance_m
                           + self.out_of_range_rtt_ms * (distance_m > self.access_range_m))
        return rtt

    def queue_ms(self, load: FloatArray) -> FloatArray:
        """Mean M/M/1 waiting time at a cloudlet with utilisation `load` (0..1)."""
        rho = np.clip(load, 0.0, self.max_utilisation)
        queue: FloatArray = self.service_ms * rho / (1.0 - rho)
        return queue

    def base_rtt_ms(self, backhaul_rtt_ms: FloatArray, load: FloatArray) -> FloatArray:
        """(n, n): from access point `a` (row) to cloudlet `j` (column), backhaul plus queueing."""
        base: FloatArray = backhaul_rtt_ms + self.queue_ms(load)[None, :]
        return base

    def link_rtt_ms(self, length_m: FloatArray, own_rtt_ms: FloatArray) -> FloatArray:
        """The RTT one backhaul link adds: the hop, the link's own RTT, its fibre length."""
        rtt: FloatArray = (self.hop_rtt_ms + own_rtt_ms
                           + self.propagation_rtt_ms_per_km * 1e-3 * length_m)
        return rtt


class AccessIndex:
    """Nearest cloudlet (access point) for many positions at once, in O(users).

    A raster over the cloudlets' bounding box: each cell keeps the few cloudlets
    that can be nearest to some point inside it (within the nearest distance to the
    cell's centre plus the cell's diagonal), so a lookup computes exact distances to
    at most `K` candidates. The raster spans the cloudlets and `extent_m` (the
    mobility's area); the rare position outside it is answered by brute force.
    It exists because the simulator attaches every user every tick: a brute-force
    (users x cloudlets) distance matrix would dominate the tick.
    """

    def __init__(self, position_m: FloatArray, cell_m: float | None = None,
                 max_candidates: int = 16,
                 extent_m: tuple[float, float, float, float] | None = None) -> None:
        pos = np.asarray(position_m, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
            raise InvalidArgument("cloudlet positions must be an (n, 2) array with n >= 1")
        self.position_m = pos
        n = len(pos)
        lo = pos.min(axis=0)
        hi = pos.max(axis=0)
        if extent_m is not None:
            lo = np.minimum(lo, [extent_m[0], extent_m[1]])
            hi = np.maximum(hi, [extent_m[2], extent_m[3]])
        span = np.maximum(hi - lo, 1.0)
        if cell_m is None:
            # A third of the typical spacing between cloudlets: most cells then
            # keep 1-4 candidates (wider cells keep ~12 and lookups are 10x slower),
            # and the raster stays small (about 10 cells per cloudlet).
            cell_m = float(max(np.sqrt(span[0] * span[1] / max(n, 1)) / 3.0,
                               np.sqrt(span[0] * span[1] / MAX_RASTER_CELLS), 1.0))
        self.cell_m = cell_m
        # A margin of cells around the area: extrapolated positions overshoot it.
        margin = RASTER_MARGIN_CELLS * cell_m
        self.origin_m = lo - margin
        shape = np.ceil((span + 2 * margin) / cell_m).astype(np.int64) + 1
        self.shape = (int(shape[0]), int(shape[1]))
        gx = self.origin_m[0] + (np.arange(self.shape[0]) + 0.5) * cell_m
        gy = self.origin_m[1] + (np.arange(self.shape[1]) + 0.5) * cell_m
        centres = np.stack(np.meshgrid(gx, gy, indexing="ij"), axis=-1).reshape(-1, 2)
        k = min(max_candidates, n)
        cands = np.empty((len(centres), k), dtype=np.int64)
        diag = cell_m * np.sqrt(2.0)
        width = 1
        # The k nearest of each centre from a k-d tree (O(cells log n), where a
        # distance to every cloudlet is O(cells x n): minutes at 10,000 cloudlets),
        # then their exact distances, ordered by distance and index.
        from scipy.spatial import cKDTree  # type: ignore[import-untyped]

        tree = cKDTree(pos)
        for start in range(0, len(centres), 4096):
            block = centres[start:start + 4096]
            _, near = tree.query(block, k=k)
            near = np.asarray(near, dtype=np.int64).reshape(len(block), k)
            d = np.sqrt(((block[:, None, :] - pos[near]) ** 2).sum(axis=-1))
            by = np.lexsort((near, d), axis=-1)
            order = np.take_along_axis(near, by, axis=1)
            dsorted = np.take_along_axis(d, by, axis=1)
            # Candidates beyond nearest + diagonal can never win inside the cell:
            # repeat the nearest instead, so lookups need no mask.
            useful = dsorted <= dsorted[:, :1] + diag
            cands[start:start + 4096] = np.where(useful, order, order[:, :1])
            width = max(width, int(useful.sum(axis=1).max()))
        self.candidates = np.ascontiguousarray(cands[:, :width])
        self._x = np.ascontiguousarray(pos[:, 0])
        self._y = np.ascontiguousarray(pos[:, 1])
        # Within half the distance to its nearest neighbour, a cloudlet is strictly the
        # nearest (any other is at least twice that far from it, so farther from the
        # point): `nearest` with a hint answers most positions with one distance. A
        # hair less than half, so that rounding never turns a tie into a "sure".
        if n > 1:
            gap, _ = tree.query(pos, k=[2])
            half = np.asarray(gap, dtype=np.float64).reshape(n) * (0.5 * (1.0 - 1e-9))
        else:
            half = np.full(n, np.inf)
        self._sure_d2 = half * half

    def nearest(self, xy_m: FloatArray,
                hint: IntArray | None = None) -> tuple[IntArray, FloatArray]:
        """For (m, 2) positions: the nearest cloudlet's index and the distance to it.

        `hint` (one cloudlet per position, -1 for none) is a guess, e.g. where each
        was attached a moment ago: a position within half its hint's distance to its
        nearest neighbour is answered from that one distance, the rest as without.
        The answers are the same either way, bit for bit."""
        xy = _points(xy_m)
        guess = np.full(len(xy), -1, dtype=np.int64) if hint is None else self._hints(hint,
                                                                                      len(xy))
        return kernels.nearest(xy, guess, self._x, self._y, self._sure_d2, self.candidates,
                               self.shape[0], self.shape[1], float(self.origin_m[0]),
                               float(self.origin_m[1]), float(self.cell_m))

    def _hints(self, hint: IntArray, count: int) -> IntArray:
        """`hint` as the kernels take it: one per position, and no hint past the last
        cloudlet (the compiled kernels check only for -1 and would read out of
        bounds), so anything else is refused here."""
        out = np.ascontiguousarray(hint, dtype=np.int64)
        if out.shape != (count,):
            raise InvalidArgument(f"need one hint per position ({count}), got {out.shape}")
        if len(out) and out.max() >= len(self._x):
            raise InvalidArgument(f"hints must be cloudlet rows 0..{len(self._x) - 1} or -1")
        return out

    def nearest_along(self, position_m: FloatArray, velocity_m_s: FloatArray,
                      taus_s: FloatArray, hint: IntArray,
                      halving: IntArray | None = None) -> IntArray:
        """`nearest` at each instant `tau` of each straight path `position + velocity *
        tau`: (m, S) indices (kernels.distance_along gives the distances). `hint` is
        one cloudlet per path (where it is now, say). With `halving`
        (kernels.nearest_along) instants between two that attach to one cloudlet are
        not looked up."""
        order = (np.zeros((0, 3), dtype=np.int64) if halving is None
                 else np.ascontiguousarray(halving, dtype=np.int64))
        steps = len(taus_s)
        if steps < 1:
            raise InvalidArgument("nearest_along: need at least one instant")
        if len(order) and (order.ndim != 2 or order.shape[1] != 3
                           or not ((order[:, 1] < order[:, 0]) & (order[:, 0] < order[:, 2])
                                   & (order[:, 1] >= 0) & (order[:, 2] < steps)).all()):
            raise InvalidArgument("nearest_along: halving rows must be (middle, low, high) "
                                  f"instants with 0 <= low < middle < high < {steps}")
        position = _points(position_m)
        velocity = _points(velocity_m_s)
        if velocity.shape != position.shape:
            raise InvalidArgument("need one velocity per position")
        taus = np.ascontiguousarray(taus_s, dtype=np.float64)
        hints = self._hints(hint, len(position))
        order = np.ascontiguousarray(order)

        def run(lo: int, hi: int) -> tuple[IntArray]:
            return (kernels.nearest_along(
                position[lo:hi], velocity[lo:hi], taus, hints[lo:hi], order, self._x,
                self._y, self._sure_d2, self.candidates, self.shape[0], self.shape[1],
                float(self.origin_m[0]), float(self.origin_m[1]), float(self.cell_m)),)

        (attach,) = slices.by_rows(len(position), run)
        return attach

    @property
    def x_m(self) -> FloatArray:
        """The cloudlets' x coordinates, contiguous (as the kernels read them)."""
        return self._x

    @property
    def y_m(self) -> FloatArray:
        """The cloudlets' y coordinates, contiguous."""
        return self._y

    def distance_m(self, xy_m: FloatArray, index: IntArray) -> FloatArray:
        """Distance from each position to cloudlet `index` of it, computed as `nearest`
        computes it (the same floats)."""
        dx = self._x[index] - xy_m[:, 0]
        dy = self._y[index] - xy_m[:, 1]
        distance: FloatArray = np.sqrt(dx * dx + dy * dy)
        return distance


def _points(xy_m: FloatArray) -> FloatArray:
    """(m, 2) positions as the compiled kernels read them (they check no shapes)."""
    xy = np.ascontiguousarray(xy_m, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InvalidArgument(f"positions must be an (m, 2) array, not {xy.shape}")
    return xy
