"""The backhaul between cloudlets: RTT, bottleneck bandwidth and route per pair, at
national scale.

The placer asks, for every session at once, the backhaul RTT from its access
point to a few candidate cloudlets; the congestion model and the simulator ask
which links a migration's path crosses and its bottleneck bandwidth. An all-pairs
table answers all of that with one gather, but costs n^2 memory and (Floyd-
Warshall) n^3 time: 10,000 cloudlets is 800 MB per matrix and minutes to build.
Yet nearly every pair asked is local: a user's access point and the cloudlets
near it, or the cloudlet its session left a few kilometres back.

`GraphBackhaul` keeps the local pairs only. From every cloudlet, Dijkstra over
the sparse backhaul graph runs until it has settled the `keep` closest cloudlets
(by backhaul RTT) and everything as near (kernels.nearest_settled, compiled:
scipy's dijkstra returns a row of every node per source, n^2 work even with a
distance limit); every node within that radius is kept (ties included, and
routers: a star's core), with its RTT, the path's bottleneck bandwidth, the
last link of the path and the entry of the node before it. A node on a
shortest path from `a` to `j` is closer to `a` than `j` is, so each kept pair's
predecessor is kept too, and the whole route is rebuilt by following them.
Memory: O(cloudlets x keep); build time: O(cloudlets x keep log keep).

Lookups are vectorised over arrays of (a, j) of any broadcastable shape: each
cloudlet's kept pairs live in its own open-addressing table (a power of two
at least 1.5 times its pairs), the slot picked by a multiplicative hash of
`j`, so a lookup is a gather and a compare, and a collision one more of each.

Far pairs. A pair beyond the kept radius (a session whose host stayed far behind
its user, common under `never`; a move from such a host) still gets an exact
answer: the missing pairs of one call are grouped by source, Dijkstra runs from
those sources in batches (scipy.sparse.csgraph, with a distance limit: four
times the kept radius, four times
wider again for the sources still short), and each pair's RTT, bottleneck and
hops are found by walking its predecessors back to a kept node. Only when a
route is asked (`path`) are the nodes of that walk stored too, linked to their
predecessors. The pairs go to a second table shared by all sources, bounded:
it starts at `far_capacity` pairs (16k) and doubles, keeping its pairs, when a
fill would take it past half full; at `max_far_slots` (4M) such a fill empties
it instead, and pairs asked again are recomputed. `stats` counts lookups, far
lookups, pairs filled, sources searched and clears. How often: the city grown
to 10,000 users and 1,000 cloudlets asked no far pair in five minutes under any
policy; a placer state whose sessions are hosted at random cloudlets across
10,000 (benchmarks/sim.py) searches from ~20,000 sources in its first round,
then none. Memory stays
O(cloudlets x keep + pairs asked), never n^2.

Ties. Dijkstra keeps, for each node, the first predecessor that reaches its
least RTT: for kept pairs nodes settle in order of RTT, then index; for far
pairs in scipy's order. Among equal-RTT routes the one chosen may differ from
what another algorithm picks, but RTTs are the same up to float rounding. A pair
of parallel links between two nodes counts once: the one of lower RTT (the
first listed on a tie). A link of zero RTT is taken as 1e-12 ms, so that a
predecessor is always strictly closer.

Small backhauls (up to `DENSE_MAX_CLOUDLETS`, 256) also keep every pair's RTT
and bottleneck as two (n, n) matrices, asked once through the tables above: the
same numbers, answered by one gather from a matrix that fits in cache (a hash
lookup cost a 100-cloudlet city's `predictive` step 20%), and their routes too
while that table stays under 32 MB. `dense_max=0` turns the matrices off.

`DenseBackhaul` answers from two given (n, n) matrices with no routes: what a
live orchestrator that models a full mesh from positions has, and what hand-made
tests state; it is for tens of cloudlets, not for a nation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import kernels, slices

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix  # type: ignore[import-untyped]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Cloudlets kept per source: the placer's candidates (state.CANDIDATES, 8) are the
# closest few; a session's host is usually within a few hops of its access point.
# 64 covers a radius of five hops on a grid (61 nodes) for ~2.5 KB per cloudlet.
KEEP = 64
# Sources per Dijkstra call: scipy answers with a dense (sources, nodes) array, so
# 256 sources over 10,000 nodes is 20 MB of distances and 10 MB of predecessors.
CHUNK_SOURCES = 256
# The far pairs' table at first, in pairs (1.4 MB): it doubles, keeping its pairs,
# each time a fill would fill it past half, up to MAX_FAR_SLOTS, so a run that asks
# few far pairs never pays for more.
MIN_FAR_CAPACITY = 1 << 14
# Up to this many cloudlets, RTT and bandwidth are also kept as (n, n) matrices
# (1 MB at 256), filled once from the tables: the same numbers, one gather. Beyond,
# asking every pair costs more than it saves (5 s at 1,000 cloudlets).
DENSE_MAX_CLOUDLETS = 256
# ... and their routes as an (n, n, longest path) table of link ids while it stays
# this small (100 cloudlets on a grid: 1.4 MB), the width of the longest route.
DENSE_ROUTES_MAX_BYTES = 32 << 20
# The far pairs' table never grows past this many slots (40 bytes each: 168 MB);
# there, a fill that would pass half of it empties it first.
MAX_FAR_SLOTS = 1 << 22
# A far pair computed for its RTT and bandwidth only: no predecessor entry.
UNLINKED = -2
# A link of zero RTT would make a predecessor as far as its successor.
MIN_LINK_RTT_MS = 1e-12
# Fibonacci hashing: the 64-bit golden-ratio multiplier spreads grid neighbours
# (j, j + 1, j + cols) over a row's table.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# Far pairs as computed: source, target, RTT, bandwidth, hops, last link, predecessor.
_Far = tuple[IntArray, IntArray, FloatArray, FloatArray, IntArray, IntArray, IntArray]


class Backhaul(ABC):
    """RTT and bottleneck bandwidth between cloudlets, by pair, vectorised."""

    size: int

    @abstractmethod
    def rtt_ms(self, source: IntArray, target: IntArray) -> FloatArray:
        """Shortest-path RTT from each `source` to each `target` cloudlet (broadcast)."""

    @abstractmethod
    def path_bandwidth_mbit_s(self, source: IntArray, target: IntArray) -> FloatArray:
        """The bottleneck bandwidth along each pair's path: what a migration alone gets."""

    @abstractmethod
    def near(self, k: int) -> IntArray:
        """(n, min(k, n)): each cloudlet's k closest cloudlets by RTT (itself first;
        ties by index)."""

    def near_rtt_ms(self, k: int) -> FloatArray:
        """(n, min(k, n)): the RTT to each of `near(k)`, row by row."""
        near = self.near(k)
        return self.rtt_ms(np.arange(self.size)[:, None], near)

    def rtt_along(self, attach: IntArray, target: IntArray) -> tuple[FloatArray, IntArray]:
        """RTT from each instant's access point (`attach`, (m, S)) to each target
        ((m, C)), as (rtt (q, C), last (m, S)): session i's RTT at instant t is
        rtt[last[i, t]]. A user keeps its access point for most instants, so pairs
        are looked up only where it changes and carried forward."""
        a = np.ascontiguousarray(attach, dtype=np.int64)
        t = np.ascontiguousarray(target, dtype=np.int64)
        if a.ndim != 2 or t.ndim != 2 or len(a) != len(t):
            raise InvalidArgument("rtt_along: attach (m, S) and target (m, C)")
        source, target_of, last = kernels.changes_along(a, t)
        got = self.rtt_ms(source, target_of)
        return got, last

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by its arrays (what it costs to keep)."""


class DenseBackhaul(Backhaul):
    """Two given (n, n) matrices: RTT and bottleneck bandwidth per ordered pair."""

    def __init__(self, rtt_ms: FloatArray, path_bandwidth_mbit_s: FloatArray) -> None:
        rtt = np.asarray(rtt_ms, dtype=np.float64)
        bw = np.asarray(path_bandwidth_mbit_s, dtype=np.float64)
        n = len(rtt)
        if rtt.shape != (n, n) or bw.shape != (n, n):
            raise InvalidArgument(f"backhaul matrices must be ({n}, {n})")
        self.size = n
        self._rtt = rtt
        self._bw = bw

    def rtt_ms(self, source: IntArray, target: IntArray) -> FloatArray:
        out: FloatArray = self._rtt[source, target]
        return out

    def path_bandwidth_mbit_s(self, source: IntArray, target: IntArray) -> FloatArray:
        out: FloatArray = self._bw[source, target]
        return out

    def near(self, k: int) -> IntArray:
        # Stable sort with the index as tie-break: the same layout, the same lists.
        return np.argsort(self._rtt, axis=1, kind="stable")[:, :min(k, self.size)].astype(
            np.int64)

    @property
    def nbytes(self) -> int:
        return int(self._rtt.nbytes + self._bw.nbytes)


@dataclass
class BackhaulStats:
    """How often lookups left the kept pairs (see the module docstring)."""

    lookups: int = 0  # pairs asked
    far_lookups: int = 0  # of which beyond the kept radius
    far_filled: int = 0  # far pairs computed (with their paths' nodes)
    dijkstra_sources: int = 0  # sources searched for far pairs
    clears: int = 0  # times the far table was emptied


class GraphBackhaul(Backhaul):
    """Shortest paths over a sparse backhaul graph, kept near each cloudlet.

    Nodes 0..`cloudlets`-1 are cloudlets, any further ones routers. Link `e`
    joins `link_a[e]` and `link_b[e]`; its directed ids are 2e (a to b) and
    2e + 1 (b to a), as the simulator's per-link bandwidth shares count them.
    """

    def __init__(self, cloudlets: int, nodes: int, link_a: IntArray, link_b: IntArray,
                 link_rtt_ms: FloatArray, link_bandwidth_mbit_s: FloatArray,
                 keep: int = KEEP, far_capacity: int | None = None,
                 dense_max: int | None = None, max_far_slots: int = MAX_FAR_SLOTS) -> None:
        a = np.asarray(link_a, dtype=np.int64)
        b = np.asarray(link_b, dtype=np.int64)
        w = np.maximum(np.asarray(link_rtt_ms, dtype=np.float64), MIN_LINK_RTT_MS)
        bw = np.asarray(link_bandwidth_mbit_s, dtype=np.float64)
        if not (a.shape == b.shape == w.shape == bw.shape) or a.ndim != 1:
            raise InvalidArgument("link arrays must be 1-D and of one length")
        if cloudlets < 1 or nodes < cloudlets:
            raise InvalidArgument("need at least one cloudlet, and nodes >= cloudlets")
        if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= nodes):
            raise InvalidArgument(f"link ends must be nodes 0..{nodes - 1}")
        if keep < 1:
            raise InvalidArgument("keep must be >= 1")
        if np.isnan(w).any() or (w < 0).any() or np.isnan(bw).any():
            # The compiled lookups take NaN for "not stored": no stored value may be.
            raise InvalidArgument("link RTTs must be numbers >= 0, and bandwidths numbers")
        self.size = cloudlets
        self.nodes = nodes
        self.keep = min(keep, cloudlets)
        self.stats = BackhaulStats()
        self._max_far_slots = max_far_slots
        self._link_bw = np.repeat(bw, 2)  # by directed id
        self._link_tail = np.stack([a, b], axis=1).ravel()  # by directed id
        self._graph, self._edge_key, self._edge_id = _graph(nodes, a, b, w)
        self._build()
        cap = far_capacity or MIN_FAR_CAPACITY
        self._far = _FarTable(1 << int(np.ceil(np.log2(max(cap, 2)) + 1)))
        self._grow_fields()
        self._dense_rtt: FloatArray | None = None
        self._dense_bw: FloatArray | None = None
        self._dense_path: IntArray | None = None
        self._dense_hops: NDArray[np.int32] = np.zeros((0, 0), dtype=np.int32)
        small = cloudlets <= (DENSE_MAX_CLOUDLETS if dense_max is None else dense_max)
        if small and self.disconnected() is None:
            self._densify(far_capacity)

    def _densify(self, far_capacity: int | None) -> None:
        """Every pair's RTT and bottleneck, asked once through the kept and far
        tables and copied into two (n, n) matrices; the far table is then let go.
        Small backhauls only: there a gather from a matrix in cache beats a hash
        lookup (20% of a 100-cloudlet city's `predictive` step)."""
        n = self.size
        idx = np.arange(n)
        slot = self._slots(np.repeat(idx, n), np.tile(idx, n))
        self._dense_rtt = self._rtt[slot].reshape(n, n)
        self._dense_bw = self._bw[slot].reshape(n, n)
        longest = int(self._hops[slot].max()) if len(slot) else 0
        if n * n * max(longest, 1) * 8 <= DENSE_ROUTES_MAX_BYTES:
            self._dense_path = self.path(idx[:, None], idx[None, :])
            # From the routes, not `slot`: asking them may have moved the far table.
            self._dense_hops = (self._dense_path >= 0).sum(axis=-1).astype(np.int32)
        self.stats = BackhaulStats()
        cap = far_capacity or MIN_FAR_CAPACITY
        self._far = _FarTable(1 << int(np.ceil(np.log2(max(cap, 2)) + 1)))
        self._grow_fields()

    @property
    def dense(self) -> bool:
        """Whether RTT and bandwidth are answered from (n, n) matrices (small n)."""
        return self._dense_rtt is not None

    # --- the graph ---------------------------------------------------------------------

    def disconnected(self) -> tuple[int, int] | None:
        """The first pair of cloudlets (in row-major order) with no path, or None."""
        from scipy.sparse.csgraph import connected_components  # type: ignore[import-untyped]

        _, label = connected_components(self._graph, directed=False)
        bad = np.flatnonzero(label[:self.size] != label[0])
        return (0, int(bad[0])) if len(bad) else None

    def _link_id(self, tail: IntArray, head: IntArray) -> IntArray:
        """The directed link id from `tail` to `head` (an edge of the graph)."""
        pos = np.searchsorted(self._edge_key, tail * self.nodes + head)
        out: IntArray = self._edge_id[pos]
        return out

    # --- the kept pairs ------------------------------------------------------------------

    def _build(self) -> None:
        n, keep = self.size, self.keep
        g = self._graph
        # Past the sum of every link's RTT, a distance is unreachable: the radius of a
        # cloudlet with fewer than `keep` cloudlets in reach.
        total = float(g.data.sum()) + 1.0
        row, col, rtt, prd, radius = kernels.nearest_settled(
            np.asarray(g.indptr, dtype=np.int64), np.asarray(g.indices, dtype=np.int64),
            np.asarray(g.data, dtype=np.float64), np.arange(n, dtype=np.int64), n, keep)
        radius = np.where(np.isfinite(radius), radius, total)
        self._total_ms = total
        order = np.lexsort((col, rtt, row))
        row, col, rtt, prd = row[order], col[order], rtt[order], prd[order]
        self.radius_ms = radius
        counts = np.bincount(row, minlength=n)
        self._width = 1 << max(int(np.ceil(np.log2(max(counts.max() * 1.5, 2.0)))), 1)
        self._bits = int(np.log2(self._width))
        # The k closest cloudlets per row, itself first, ties by index.
        is_cl = col < n
        r, c = row[is_cl], col[is_cl]
        rank = np.arange(len(r)) - np.searchsorted(r, np.arange(n))[r]
        take = rank < keep
        near = np.full((n, keep), -1, dtype=np.int64)
        near[r[take], rank[take]] = c[take]
        self._near = near
        # The per-row tables: every field by slot, -1 (or 0) in empty slots.
        slots = n * self._width
        self._key = np.full(slots, -1, dtype=np.int32)
        slot = self._insert_rows(row, col)
        self._rtt = np.full(slots, np.nan)
        self._rtt[slot] = rtt
        self._link = np.full(slots, -1, dtype=np.int32)
        has = prd >= 0
        self._link[slot[has]] = self._link_id(prd[has], col[has])
        self._parent = np.full(slots, -1, dtype=np.int32)
        self._parent[slot[has]] = self._find_rows(row[has], prd[has])
        self._hops = np.zeros(slots, dtype=np.int32)
        self._bw = np.full(slots, np.inf)
        self._settle(slot[has])

    def _hash(self, target: IntArray, bits: int) -> IntArray:
        h: IntArray = ((target.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - bits)).astype(
            np.int64)
        return h

    def _insert_rows(self, row: IntArray, col: IntArray) -> IntArray:
        """Claim a slot in each row's table for each (row, col); their slot ids."""
        mask = self._width - 1
        h = self._hash(col, self._bits)
        slot = row * self._width + h
        pending = np.arange(len(row))
        while len(pending):
            s = slot[pending]
            free = self._key[s] == -1
            self._key[s[free]] = col[pending[free]]
            won = self._key[s] == col[pending]
            pending = pending[~won]
            slot[pending] = row[pending] * self._width + ((slot[pending] + 1) & mask)
        return slot

    def _find_rows(self, row: IntArray, col: IntArray) -> IntArray:
        """The slot of each kept (row, col), -1 where not kept."""
        return kernels.find_in_rows(self._key, self._width, self._bits,
                                    np.ascontiguousarray(row, dtype=np.int64),
                                    np.ascontiguousarray(col, dtype=np.int64))

    def _settle(self, slots: IntArray) -> None:
        """Hops and bottleneck bandwidth of `slots` from their parents', parents first."""
        todo = slots
        done = np.ones(len(self._rtt), dtype=bool)
        done[todo] = False
        while len(todo):
            par = self._parent[todo]
            ready = done[par]
            s, p = todo[ready], par[ready]
            if len(s) == 0:
                raise AssertionError("backhaul: a path's predecessor was not kept")
            self._hops[s] = self._hops[p] + 1
            self._bw[s] = np.minimum(self._bw[p], self._link_bw[self._link[s]])
            done[s] = True
            todo = todo[~ready]

    # --- far pairs -------------------------------------------------------------------------

    def _slots(self, source: IntArray, target: IntArray, routes: bool = False) -> IntArray:
        """The slot of every (source, target) pair (1-D), kept or far (filled now);
        with `routes`, far pairs are linked to their predecessors (for `path`)."""
        self.stats.lookups += len(source)
        out = self._find_rows(source, target)
        miss = np.flatnonzero(out < 0)
        if len(miss) == 0:
            return out
        self.stats.far_lookups += len(miss)
        base = len(self._key)
        key = source[miss] * self.nodes + target[miss]
        got = self._far.find(key)
        lost = got < 0
        if routes:
            lost |= self._parent[base + np.maximum(got, 0)] == UNLINKED
        if lost.any():
            if self._fill(source[miss[lost]], target[miss[lost]], routes):
                # The table was emptied to make room: the pairs found before too.
                self._fill(source[miss], target[miss], routes)
            got = self._far.find(key)
        out[miss] = base + got
        return out

    def _search(self, chunk: IntArray, row: IntArray,
                target: IntArray) -> tuple[FloatArray, NDArray[np.int32]]:
        """Dijkstra from `chunk` until every (chunk[row], target) is settled: the
        radius kept around each source times four, again for the sources whose
        targets are still beyond it, until none is."""
        limit = 4.0 * self.radius_ms[chunk] + MIN_LINK_RTT_MS
        d = np.empty((len(chunk), self.nodes))
        p = np.empty((len(chunk), self.nodes), dtype=np.int32)
        todo = np.arange(len(chunk))
        from scipy.sparse.csgraph import dijkstra

        while len(todo):
            lim = float(limit[todo].max())
            d[todo], p[todo] = dijkstra(self._graph, directed=True, indices=chunk[todo],
                                        limit=lim if lim < self._total_ms else np.inf,
                                        return_predecessors=True)
            short = np.zeros(len(chunk), dtype=bool)
            short[row[~np.isfinite(d[row, target])]] = True
            if short.any() and lim >= self._total_ms:
                raise InvalidArgument("backhaul: no path between some cloudlets")
            todo = np.flatnonzero(short)
            limit[todo] = limit[todo] * 4.0
        return d, p

    def _fill(self, source: IntArray, target: IntArray, routes: bool) -> bool:
        """Compute the far pairs (source, target): their RTT, bottleneck bandwidth and
        hops; with `routes`, also every node of their paths not kept, linked to its
        predecessor. True when the far table had to be emptied first."""
        key = np.unique(source * self.nodes + target)
        src, tgt = np.divmod(key, self.nodes)
        sources = np.unique(src)
        self.stats.dijkstra_sources += len(sources)
        parts: list[_Far] = []
        for start in range(0, len(sources), CHUNK_SOURCES):
            chunk = sources[start:start + CHUNK_SOURCES]
            ask = (src >= chunk[0]) & (src <= chunk[-1])
            at = np.searchsorted(chunk, src[ask])
            d, p = self._search(chunk, at, tgt[ask])
            parts.append(self._walk(chunk, at, tgt[ask], d, p, routes))
        s, t, prd = (np.concatenate([x[i] for x in parts]) for i in (0, 1, 6))
        rtt, bw = (np.concatenate([x[i] for x in parts]) for i in (2, 3))
        hops, link = (np.concatenate([x[i] for x in parts]) for i in (4, 5))
        keys = s * self.nodes + t
        cleared = False
        need = self._far.count + len(keys)
        if need > self._far.capacity // 2:
            if 2 * need <= self._max_far_slots:
                # Room to grow: a table twice as large, its pairs carried over.
                self._rehash(1 << int(np.ceil(np.log2(max(2 * need,
                                                          2 * self._far.capacity)))))
            else:
                # At its bound: emptied, sized for this fill.
                want = max(self._max_far_slots, 4 * len(keys))
                self._far = _FarTable(1 << int(np.ceil(np.log2(want))))
                self.stats.clears += 1
                cleared = True
        fresh = self._far.find(keys) < 0
        self._far.insert(keys[fresh])
        self.stats.far_filled += int(fresh.sum())
        self._grow_fields()
        base = len(self._key)
        slot = base + self._far.find(keys)
        self._rtt[slot] = rtt
        self._bw[slot] = bw
        self._hops[slot] = hops
        self._link[slot] = link
        if not routes:
            self._parent[slot] = UNLINKED
            return cleared
        # A parent is kept, or new in this fill (its walk went through it).
        par = self._find_rows(s, prd)
        far = par < 0
        par[far] = base + self._far.find(s[far] * self.nodes + prd[far])
        self._parent[slot] = par
        return cleared

    def _walk(self, chunk: IntArray, row: IntArray, target: IntArray, d: FloatArray,
              p: NDArray[np.int32], routes: bool) -> _Far:
        """From each asked target back along the predecessors to the first kept node:
        the asked pairs' bottleneck and hops (and, with `routes`, every node met)
        as (source, target, rtt, bandwidth, hops, last link, predecessor)."""
        m = len(row)
        bw = np.full(m, np.inf)
        hops = np.zeros(m, dtype=np.int64)
        idx = np.arange(m)
        cur = target
        met_row: list[IntArray] = []
        met_node: list[IntArray] = []
        while len(idx):
            slot = self._find_rows(chunk[row[idx]], cur)
            kept = slot >= 0
            done, ks = idx[kept], slot[kept]
            bw[done] = np.minimum(bw[done], self._bw[ks])
            hops[done] += self._hops[ks]
            idx, cur = idx[~kept], cur[~kept]
            if routes:
                met_row.append(row[idx])
                met_node.append(cur)
            prev = p[row[idx], cur].astype(np.int64)
            bw[idx] = np.minimum(bw[idx], self._link_bw[self._link_id(prev, cur)])
            hops[idx] += 1
            cur = prev
        if routes:
            flat = np.unique(np.concatenate(met_row) * self.nodes + np.concatenate(met_node))
            r, t = np.divmod(flat, self.nodes)
            # Each node met is a far pair of its own: its bottleneck and hops follow
            # from its predecessor's, settled below in order of hops.
            return self._chain(chunk, r, t, d, p)
        prd = p[row, target].astype(np.int64)
        return (chunk[row], target, d[row, target], bw, hops,
                self._link_id(prd, target), prd)

    def _chain(self, chunk: IntArray, r: IntArray, t: IntArray, d: FloatArray,
               p: NDArray[np.int32]) -> _Far:
        """The nodes met by the walks, each with its bottleneck and hops, settled
        from its predecessor (kept, or met too and closer)."""
        prd = p[r, t].astype(np.int64)
        link = self._link_id(prd, t)
        src = chunk[r]
        bw = np.full(len(r), np.nan)
        hops = np.full(len(r), -1, dtype=np.int64)
        key = r * self.nodes + t
        order = np.argsort(key)
        pending = np.arange(len(r))
        while len(pending):
            slot = self._find_rows(src[pending], prd[pending])
            kept = slot >= 0
            k, ks = pending[kept], slot[kept]
            bw[k] = np.minimum(self._bw[ks], self._link_bw[link[k]])
            hops[k] = self._hops[ks] + 1
            rest = pending[~kept]
            at = order[np.searchsorted(key[order], r[rest] * self.nodes + prd[rest])]
            ready = hops[at] >= 0
            k, pa = rest[ready], at[ready]
            bw[k] = np.minimum(bw[pa], self._link_bw[link[k]])
            hops[k] = hops[pa] + 1
            if not ready.any() and not kept.any():
                raise AssertionError("backhaul: a far path's predecessor was not met")
            pending = rest[~ready]
        return src, t, d[r, t], bw, hops, link, prd

    def _rehash(self, capacity: int) -> None:
        """Move the far table to `capacity` slots, its pairs and their fields with it
        (a parent in the far table follows its pair to its new slot)."""
        base = len(self._key)
        old = self._far
        at = np.flatnonzero(old.key >= 0)
        self._far = _FarTable(capacity)
        self._far.insert(old.key[at])
        moved = self._far.find(old.key[at])
        where = np.full(old.capacity, -1, dtype=np.int64)
        where[at] = moved
        fields = {name: getattr(self, name)[base + at]
                  for name in ("_rtt", "_link", "_parent", "_hops", "_bw")}
        self._grow_fields()
        par = fields["_parent"].astype(np.int64)
        far_parent = par >= base
        par[far_parent] = base + where[par[far_parent] - base]
        fields["_parent"] = par.astype(np.int32)
        for name, values in fields.items():
            getattr(self, name)[base + moved] = values

    def _grow_fields(self) -> None:
        """Field arrays span the kept slots then the far table's (which may grow)."""
        want = len(self._key) + self._far.capacity
        have = len(self._rtt)
        if have == want:
            return
        base = len(self._key)

        def grown(arr: NDArray[np.generic], fill: float) -> NDArray[np.generic]:
            out = np.full(want, fill, dtype=arr.dtype)
            out[:base] = arr[:base]
            return out

        self._rtt = grown(self._rtt, np.nan)
        self._link = grown(self._link, -1)  # type: ignore[assignment]
        self._parent = grown(self._parent, -1)  # type: ignore[assignment]
        self._hops = grown(self._hops, 0)  # type: ignore[assignment]
        self._bw = grown(self._bw, np.inf)

    # --- the interface ---------------------------------------------------------------------

    def _pairs(self, source: IntArray, target: IntArray,
               routes: bool = False) -> tuple[IntArray, tuple[int, ...]]:
        a, j = np.broadcast_arrays(np.asarray(source, dtype=np.int64),
                                   np.asarray(target, dtype=np.int64))
        if a.size and (min(a.min(), j.min()) < 0 or max(a.max(), j.max()) >= self.size):
            raise InvalidArgument(f"cloudlet rows must be 0..{self.size - 1}")
        return self._slots(a.ravel(), j.ravel(), routes), a.shape

    def rtt_ms(self, source: IntArray, target: IntArray) -> FloatArray:
        if self._dense_rtt is not None:
            got: FloatArray = self._dense_rtt[source, target]
            return got
        return self._values("_rtt", source, target)

    def _values(self, name: str, source: IntArray, target: IntArray) -> FloatArray:
        """Field `name` (`_rtt`, `_bw`) of each pair (broadcast), looked up in one
        compiled pass (kernels.pair_values); pairs stored nowhere yet (far pairs never
        asked) are then computed through `_slots`, which stores them. Stored values are
        never NaN (an RTT is finite, a bandwidth finite or inf): NaN marks those."""
        a, j = np.broadcast_arrays(np.asarray(source, dtype=np.int64),
                                   np.asarray(target, dtype=np.int64))
        src = np.ascontiguousarray(a.ravel())
        dst = np.ascontiguousarray(j.ravel())
        field = getattr(self, name)

        def run(lo: int, hi: int) -> tuple[FloatArray, IntArray]:
            got, far, missing = kernels.pair_values(
                src[lo:hi], dst[lo:hi], self._key, self._width, self._bits, self._far.key,
                self._far.bits, self.nodes, field)
            return got, np.array([far, missing])

        got, counts = slices.by_rows(len(src), run)
        counts = counts.reshape(-1, 2)
        if (counts < 0).any():  # the kernel checks each pair is of two cloudlets
            raise InvalidArgument(f"cloudlet rows must be 0..{self.size - 1}")
        far, missing = (int(x) for x in counts.sum(axis=0))
        self.stats.lookups += len(src) - missing
        self.stats.far_lookups += far
        if missing:
            at = np.flatnonzero(np.isnan(got))
            slot = self._slots(src[at], dst[at])
            got[at] = getattr(self, name)[slot]  # after `_slots`: it may grow the fields
        out: FloatArray = got.reshape(a.shape)
        return out

    def path_bandwidth_mbit_s(self, source: IntArray, target: IntArray) -> FloatArray:
        if self._dense_bw is not None:
            got: FloatArray = self._dense_bw[source, target]
            return got
        return self._values("_bw", source, target)

    def path(self, source: IntArray, target: IntArray) -> IntArray:
        """The directed link ids of each pair's path, source to target: (..., P),
        -1 past its end (P is the longest path asked, or of all, at least 1)."""
        if self._dense_path is not None:
            # As wide as the longest route asked: the congestion model's work per
            # move grows with the width.
            hops = self._dense_hops[source, target]
            width = max(int(hops.max()) if hops.size else 0, 1)
            got: IntArray = self._dense_path[source, target][..., :width]
            return got
        slot, shape = self._pairs(source, target, routes=True)
        hops = self._hops[slot]
        width = max(int(hops.max()) if len(hops) else 0, 1)
        out = np.full((len(slot), width), -1, dtype=np.int64)
        idx = np.arange(len(slot))
        cur = slot
        h = hops.astype(np.int64)
        while True:
            go = h > 0
            if not go.any():
                break
            idx, cur, h = idx[go], cur[go], h[go]
            out[idx, h - 1] = self._link[cur]
            cur = self._parent[cur].astype(np.int64)
            h = h - 1
        return out.reshape(*shape, width)

    def near(self, k: int) -> IntArray:
        k = min(k, self.size)
        if k > self.keep:
            raise InvalidArgument(f"near: at most keep={self.keep} cloudlets are kept")
        out: IntArray = self._near[:, :k].copy()
        return out

    @property
    def nbytes(self) -> int:
        arrays = (self._key, self._rtt, self._link, self._parent, self._hops, self._bw,
                  self._near, self.radius_ms, self._link_bw, self._link_tail, self._edge_key,
                  self._edge_id, self._far.key)
        dense = sum(x.nbytes for x in (self._dense_rtt, self._dense_bw, self._dense_path)
                    if x is not None)
        return int(sum(x.nbytes for x in arrays) + dense
                   + self._graph.data.nbytes + self._graph.indices.nbytes
                   + self._graph.indptr.nbytes)


class _FarTable:
    """Open addressing over int64 keys (source * nodes + target): slot ids 0..capacity-1."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bits = int(np.log2(capacity))
        self.key = np.full(capacity, -1, dtype=np.int64)
        self.count = 0

    def clear(self) -> None:
        self.key[:] = -1
        self.count = 0

    def _hash(self, key: IntArray) -> IntArray:
        h: IntArray = ((key.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(
            np.int64)
        return h

    def find(self, key: IntArray) -> IntArray:
        return kernels.find_keys(self.key, self.bits, np.ascontiguousarray(key, dtype=np.int64))

    def insert(self, key: IntArray) -> None:
        """Insert distinct keys not yet present."""
        mask = self.capacity - 1
        slot = self._hash(key)
        pending = np.arange(len(key))
        while len(pending):
            s = slot[pending]
            free = self.key[s] == -1
            self.key[s[free]] = key[pending[free]]
            won = self.key[s] == key[pending]
            pending = pending[~won]
            slot[pending] = (slot[pending] + 1) & mask
        self.count += len(key)


def _graph(nodes: int, a: IntArray, b: IntArray,
           w: FloatArray) -> tuple[csr_matrix, IntArray, IntArray]:
    """The directed graph (both ways per link, one link per node pair: the lowest
    RTT, first on ties) and, sorted by tail * nodes + head, each edge's directed id."""
    ids = np.arange(len(a), dtype=np.int64)
    keep = a != b
    a, b, w, ids = a[keep], b[keep], w[keep], ids[keep]
    tail = np.concatenate([a, b])
    head = np.concatenate([b, a])
    ww = np.concatenate([w, w])
    did = np.concatenate([2 * ids, 2 * ids + 1])
    key = tail * nodes + head
    order = np.lexsort((did, ww, key))
    key, tail, head, ww, did = key[order], tail[order], head[order], ww[order], did[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, dtype=bool)
    key, tail, head, ww, did = key[first], tail[first], head[first], ww[first], did[first]
    from scipy.sparse import csr_matrix

    graph = csr_matrix((ww, (tail, head)), shape=(nodes, nodes))
    return graph, key, did
