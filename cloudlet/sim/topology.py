"""The simulated cloudlets and the backhaul between them.

Built once per run from the scenario: where the cloudlets stand (a grid or a
random layout spanning the mobility's area, a list, or a CSV file), their
capacity, and a backhaul graph (grid mesh or k-nearest mesh, a star through a
core router, a full mesh, or explicit links). From the graph it derives what
the placer needs (`Network`, whose `GraphBackhaul` answers RTT and bottleneck
bandwidth by pair, from shortest paths kept near each cloudlet) and what the
simulator needs to share bandwidth between overlapping migrations: each
directed link's capacity and each (source, destination) path as link ids.
Links are full duplex, so migrations in opposite directions do not compete.
Nothing here is n x n: a national backhaul of 10,000 cloudlets builds in
seconds and holds megabytes (cloudlet/placement/backhaul.py says how).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import ScenarioError
from cloudlet.placement import GraphBackhaul, LatencyModel, Network, PrecopyModel
from cloudlet.sim.scenario import BackhaulSpec, CloudletSpec, Scenario, TopologySpec

if TYPE_CHECKING:
    from scipy.spatial import cKDTree  # type: ignore[import-untyped]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
GiB = 1 << 30
MiB = 1 << 20


@dataclass(eq=False)
class Topology:
    """Cloudlets 0..n-1 (plus, for a star, one core router as node n)."""

    names: tuple[str, ...]
    position_m: FloatArray
    node_position_m: FloatArray
    link_a: IntArray
    link_b: IntArray
    link_bandwidth_mbit_s: FloatArray
    link_rtt_ms: FloatArray
    backhaul: GraphBackhaul
    network: Network

    @property
    def size(self) -> int:
        return len(self.position_m)

    @property
    def directed_bandwidth_mbit_s(self) -> FloatArray:
        """Capacity per directed link: id 2e is a->b of link e, 2e+1 is b->a."""
        bw: FloatArray = np.repeat(self.link_bandwidth_mbit_s, 2)
        return bw

    def path_links(self, src: int, dst: int) -> IntArray:
        """The directed link ids from `src` to `dst` along the shortest-RTT path."""
        got = self.backhaul.path(np.array(src), np.array(dst))
        out: IntArray = got[got >= 0]
        return out


def build_topology(sc: Scenario, extent_m: tuple[float, float, float, float],
                   rng: np.random.Generator) -> Topology:
    spec = sc.topology
    cloudlets, cols = _layout(spec, extent_m, rng, sc.path)
    n = len(cloudlets)
    names = tuple(c.name for c in cloudlets)
    pos = np.array([[c.x_m, c.y_m] for c in cloudlets], dtype=np.float64)
    cap_vms = np.array([spec.capacity_vms if c.capacity_vms is None else c.capacity_vms
                        for c in cloudlets], dtype=np.int64)
    cap_mem = np.array([(spec.memory_gib if c.memory_gib is None else c.memory_gib) * GiB
                        for c in cloudlets], dtype=np.float64)
    latency = LatencyModel(
        radio_rtt_ms=spec.radio_rtt_ms,
        propagation_rtt_ms_per_km=sc.latency.propagation_rtt_ms_per_km,
        access_range_m=spec.access_range_m, out_of_range_rtt_ms=spec.out_of_range_rtt_ms,
        hop_rtt_ms=sc.backhaul.hop_rtt_ms, service_ms=sc.latency.queue_service_ms,
        max_utilisation=sc.latency.max_utilisation)
    bh = sc.backhaul
    node_pos = pos
    a, b, bw, own = _links(bh, cols, names, pos, sc.path)
    if bh.kind == "star":
        node_pos = np.vstack([pos, pos.mean(axis=0)])
    nodes = len(node_pos)
    length = np.hypot(*(node_pos[a] - node_pos[b]).T)
    link_rtt = latency.link_rtt_ms(length, own)
    backhaul = GraphBackhaul(n, nodes, a, b, link_rtt, bw)
    apart = backhaul.disconnected()
    if apart is not None:
        i, j = apart
        raise ScenarioError(f"{sc.path}: key 'backhaul': cloudlets {names[i]!r} and "
                            f"{names[j]!r} are not connected")
    cost = PrecopyModel(stop_bytes=sc.migration.stop_mib * MiB,
                        max_rounds=sc.migration.max_rounds,
                        resume_s=sc.migration.resume_ms / 1000.0,
                        wire_ratio=sc.migration.wire_ratio,
                        setup_s=sc.migration.setup_s,
                        setup_s_per_gib=sc.migration.setup_s_per_gib,
                        send_s_per_gib=sc.migration.send_s_per_gib)
    network = Network.build(pos, cap_vms, cap_mem, backhaul, latency=latency, cost=cost,
                            names=names, extent_m=extent_m)
    return Topology(names=names, position_m=pos, node_position_m=node_pos, link_a=a,
                    link_b=b, link_bandwidth_mbit_s=bw, link_rtt_ms=link_rtt,
                    backhaul=backhaul, network=network)


def _layout(spec: TopologySpec, extent: tuple[float, float, float, float],
            rng: np.random.Generator, file: Path) -> tuple[list[CloudletSpec], int | None]:
    """The cloudlets, and the number of columns when they form a grid."""
    x0, y0, x1, y1 = extent
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    if spec.layout == "list":
        return list(spec.cloudlets), None
    if spec.layout == "file":
        assert spec.file is not None
        return _read_cloudlets(spec.file, file), None
    if spec.layout == "random":
        pts = rng.uniform((x0, y0), (x1, y1), (spec.count, 2))
        return [CloudletSpec(f"c{i}", float(x), float(y)) for i, (x, y) in enumerate(pts)], None
    rows = spec.rows or max(1, round(math.sqrt(spec.count * h / w)))
    cols = math.ceil(spec.count / rows)
    out = []
    for i in range(spec.count):
        r, c = divmod(i, cols)
        out.append(CloudletSpec(f"c{i}", x0 + (c + 0.5) * w / cols, y0 + (r + 0.5) * h / rows))
    return out, cols


def _read_cloudlets(path: Path, scenario: Path) -> list[CloudletSpec]:
    out: list[CloudletSpec] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if not row or row[0].strip().lower() in ("name", "#"):
                    continue
                try:
                    out.append(CloudletSpec(
                        row[0].strip(), float(row[1]), float(row[2]),
                        int(row[3]) if len(row) > 3 and row[3].strip() else None,
                        float(row[4]) if len(row) > 4 and row[4].strip() else None))
                except (IndexError, ValueError):
                    raise ScenarioError(
                        f"{scenario}: key 'topology.file': {path}: bad row {row!r} "
                        "(expected name,x_m,y_m[,capacity_vms,memory_gib])") from None
    except OSError as exc:
        raise ScenarioError(f"{scenario}: key 'topology.file': cannot read {path}: {exc}") \
            from None
    if not out:
        raise ScenarioError(f"{scenario}: key 'topology.file': {path} lists no cloudlet")
    return out


# A backhaul kind's links: node pairs, each link's bandwidth and its own RTT.
_LinkList = tuple[list[tuple[int, int]], list[float], list[float]]


def _links(bh: BackhaulSpec, cols: int | None, names: tuple[str, ...], pos: FloatArray,
           file: Path) -> tuple[IntArray, IntArray, FloatArray, FloatArray]:
    """The backhaul's links as arrays (a, b, bandwidth, own RTT), by its kind."""
    pairs, bws, owns = _LINK_KINDS[bh.kind](bh, cols, names, pos, file)
    n = len(pos)
    if not pairs and n > 1:
        raise ScenarioError(f"{file}: key 'backhaul': no links between {n} cloudlets")
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    return a, b, np.array(bws, dtype=np.float64), np.array(owns, dtype=np.float64)


def _listed_links(bh: BackhaulSpec, cols: int | None, names: tuple[str, ...],
                  pos: FloatArray, file: Path) -> _LinkList:
    """kind 'links': the scenario's own list, each link's values over the backhaul's."""
    index = {name: i for i, name in enumerate(names)}
    pairs: list[tuple[int, int]] = []
    bws: list[float] = []
    owns: list[float] = []
    for k, link in enumerate(bh.links):
        for end in (link.a, link.b):
            if end not in index:
                raise ScenarioError(f"{file}: key 'backhaul.links[{k}]': no cloudlet "
                                    f"named {end!r}")
        pairs.append((index[link.a], index[link.b]))
        bws.append(link.bandwidth_mbit_s or bh.bandwidth_mbit_s)
        owns.append(bh.link_rtt_ms if link.rtt_ms is None else link.rtt_ms)
    return pairs, bws, owns


def _star_links(bh: BackhaulSpec, cols: int | None, names: tuple[str, ...],
                pos: FloatArray, file: Path) -> _LinkList:
    """kind 'star': every cloudlet to one core router, node n."""
    n = len(pos)
    return [(i, n) for i in range(n)], [bh.bandwidth_mbit_s] * n, [bh.core_rtt_ms] * n


def _full_links(bh: BackhaulSpec, cols: int | None, names: tuple[str, ...],
                pos: FloatArray, file: Path) -> _LinkList:
    """kind 'full': every pair of cloudlets."""
    n = len(pos)
    return _alike(bh, [(i, j) for i in range(n) for j in range(i + 1, n)])


def _mesh_links(bh: BackhaulSpec, cols: int | None, names: tuple[str, ...],
                pos: FloatArray, file: Path) -> _LinkList:
    """kind 'mesh': a grid's neighbours, or each cloudlet's nearest ones."""
    if cols is not None:
        return _alike(bh, _grid_pairs(len(pos), cols))
    return _alike(bh, _knn_connected(pos, bh.neighbours))


_LINK_KINDS: dict[str, Callable[[BackhaulSpec, int | None, tuple[str, ...], FloatArray, Path],
                                _LinkList]] = {
    "links": _listed_links, "star": _star_links, "full": _full_links, "mesh": _mesh_links,
}


def _alike(bh: BackhaulSpec, pairs: list[tuple[int, int]]) -> _LinkList:
    """Links that all have the backhaul's bandwidth and link RTT."""
    return pairs, [bh.bandwidth_mbit_s] * len(pairs), [bh.link_rtt_ms] * len(pairs)


def _grid_pairs(n: int, cols: int) -> list[tuple[int, int]]:
    """Each grid cloudlet to its right and lower neighbours (row-major, `cols` wide)."""
    pairs: list[tuple[int, int]] = []
    for i in range(n):
        if i % cols + 1 < cols and i + 1 < n:
            pairs.append((i, i + 1))
        if i + cols < n:
            pairs.append((i, i + cols))
    return pairs


def _knn_connected(pos: FloatArray, k: int) -> list[tuple[int, int]]:
    """Each cloudlet to its k nearest (ties by index), then the closest pair between
    components joined until one component is left (a random layout must stay
    connected). A k-d tree answers both, so no n x n distance matrix is built."""
    n = len(pos)
    from scipy.spatial import cKDTree

    tree = cKDTree(pos)
    k = min(k, n - 1)
    edges: set[tuple[int, int]] = set()
    if k > 0:
        nb = _nearest_others(tree, pos, np.arange(n), k)
        for i, row in enumerate(nb.tolist()):
            for j in row:
                edges.add((min(i, j), max(i, j)))
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        parent[find(i)] = find(j)
    while True:
        roots = np.array([find(i) for i in range(n)])
        if len(set(roots.tolist())) <= 1:
            break
        u, v = _closest_across(tree, pos, roots)
        edges.add((min(u, v), max(u, v)))
        parent[find(u)] = find(v)
    return sorted(edges)


def _distance_m(pos: FloatArray, i: IntArray, j: IntArray) -> FloatArray:
    d: FloatArray = np.hypot(pos[i, 0] - pos[j, 0], pos[i, 1] - pos[j, 1])
    return d


def _nearest_others(tree: cKDTree, pos: FloatArray, rows: IntArray, k: int) -> IntArray:
    """(len(rows), k): each row's k nearest other points, ties by index. The tree is
    asked for more until the k-th distance is strictly inside what it returned."""
    n = len(pos)
    ask = min(k + 2, n)
    out = np.empty((len(rows), k), dtype=np.int64)
    todo = np.arange(len(rows))
    while len(todo):
        _, nb = tree.query(pos[rows[todo]], k=ask)
        nb = nb.reshape(len(todo), ask).astype(np.int64)
        d = _distance_m(pos, np.repeat(rows[todo], ask), nb.ravel()).reshape(nb.shape)
        d = np.where(nb == rows[todo, None], np.inf, d)
        order = np.lexsort((nb, d), axis=-1)
        nb_s = np.take_along_axis(nb, order, axis=1)
        d_s = np.take_along_axis(d, order, axis=1)
        ok = (d_s[:, k - 1] < d_s[:, -1]) | (ask >= n)
        out[todo[ok]] = nb_s[ok, :k]
        todo = todo[~ok]
        ask = min(2 * ask, n)
    return out


def _closest_across(tree: cKDTree, pos: FloatArray, roots: IntArray) -> tuple[int, int]:
    """The closest pair of points in different components (ties: the lowest (u, v))."""
    n = len(pos)
    rows = np.arange(n)
    ask = min(8, n)
    best: tuple[float, int, int] | None = None
    todo = rows
    while len(todo):
        _, nb = tree.query(pos[todo], k=ask)
        nb = nb.reshape(len(todo), ask).astype(np.int64)
        d = _distance_m(pos, np.repeat(todo, ask), nb.ravel()).reshape(nb.shape)
        other = roots[nb] != roots[todo, None]
        found = other.any(axis=1)
        # A row whose asked neighbours are all of its own component needs more
        # (or has its nearest other farther than the last one returned).
        for r in np.flatnonzero(found):
            cand = np.flatnonzero(other[r])
            dm = d[r, cand].min()
            for c in cand[d[r, cand] == dm]:
                key = (float(dm), int(todo[r]), int(nb[r, c]))
                if best is None or key < best:
                    best = key
        if ask >= n:
            break
        todo = todo[~found]
        ask = min(2 * ask, n)
    assert best is not None
    return best[1], best[2]
