"""The sparse backhaul (cloudlet/placement/backhaul.py) against the dense all-pairs
reference it replaced: RTTs, routes, bottlenecks, far pairs, memory at 10,000
cloudlets, and the simulator's results on a backhaul without equal-RTT routes.

The reference (Floyd-Warshall with next hops, O(n^3)) lives here, not in the
product: it is what the simulator used before, and what the graph must agree with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from cloudlet.placement import GraphBackhaul, Network
from cloudlet.placement import backhaul as backhaul_module
from cloudlet.placement.backhaul import Backhaul
from cloudlet.sim import engine as sim_engine
from cloudlet.sim import load_scenario, simulate
from cloudlet.sim.topology import Topology

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sim"


def floyd_warshall(n: int, a: IntArray, b: IntArray,
                   w: FloatArray) -> tuple[FloatArray, IntArray]:
    """All-pairs shortest RTT and next hop, as the simulator computed them before."""
    dist = np.full((n, n), np.inf)
    nxt = np.full((n, n), -1, dtype=np.int64)
    np.fill_diagonal(dist, 0.0)
    idx = np.arange(n)
    nxt[idx, idx] = idx
    for u, v, x in zip(a.tolist(), b.tolist(), w.tolist(), strict=True):
        if x < dist[u, v]:
            dist[u, v] = dist[v, u] = x
            nxt[u, v] = v
            nxt[v, u] = u
    for k in range(n):
        via = dist[:, k:k + 1] + dist[k:k + 1, :]
        better = via < dist
        if better.any():
            dist = np.where(better, via, dist)
            nxt = np.where(better, nxt[:, k:k + 1], nxt)
    return dist, nxt


class ReferenceBackhaul(Backhaul):
    """The dense reference behind GraphBackhaul's interface: Floyd-Warshall RTTs,
    next-hop routes (the first link listed between two nodes) and their bottleneck."""

    def __init__(self, cloudlets: int, nodes: int, a: IntArray, b: IntArray, w: FloatArray,
                 bw: FloatArray) -> None:
        self.size = cloudlets
        self.rtt, nxt = floyd_warshall(nodes, a, b, w)
        ids: dict[tuple[int, int], int] = {}
        for e, (u, v) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            ids.setdefault((u, v), 2 * e)
            ids.setdefault((v, u), 2 * e + 1)
        link_bw = np.repeat(bw, 2)
        routes: dict[tuple[int, int], list[int]] = {}
        self.bw = np.full((nodes, nodes), np.inf)
        for i in range(cloudlets):
            for j in range(cloudlets):
                out, cur = [], i
                while cur != j:
                    step = int(nxt[cur, j])
                    out.append(ids[(cur, step)])
                    cur = step
                routes[(i, j)] = out
                if out:
                    self.bw[i, j] = link_bw[out].min()
        width = max(max(len(r) for r in routes.values()), 1)
        self.routes = np.full((cloudlets, cloudlets, width), -1, dtype=np.int64)
        for (i, j), r in routes.items():
            self.routes[i, j, :len(r)] = r

    def rtt_ms(self, source: Any, target: Any) -> FloatArray:
        out: FloatArray = self.rtt[source, target]
        return out

    def path_bandwidth_mbit_s(self, source: Any, target: Any) -> FloatArray:
        out: FloatArray = self.bw[source, target]
        return out

    def near(self, k: int) -> IntArray:
        n = self.size
        return np.argsort(self.rtt[:n, :n], axis=1, kind="stable")[:, :min(k, n)]

    @property
    def nbytes(self) -> int:
        return int(self.rtt.nbytes + self.bw.nbytes + self.routes.nbytes)

    def path(self, source: Any, target: Any) -> IntArray:
        got: IntArray = self.routes[source, target]
        longest = max(int((got >= 0).sum(axis=-1).max()) if got.size else 0, 1)
        return got[..., :longest]


def random_graph(rng: np.random.Generator, n: int, routers: int = 0,
                 integer: bool = False) -> tuple[int, IntArray, IntArray, FloatArray,
                                                 FloatArray]:
    """A connected random graph on n cloudlets (+ routers): a random spanning tree and
    as many random links again, some parallel, some loops."""
    nodes = n + routers
    a = np.arange(1, nodes)
    b = np.array([int(rng.integers(0, i)) for i in range(1, nodes)], dtype=np.int64)
    extra = int(rng.integers(0, 2 * nodes))
    a = np.r_[a, rng.integers(0, nodes, extra)]
    b = np.r_[b, rng.integers(0, nodes, extra)]
    # Integer RTTs give many equal-RTT routes; real ones none.
    w = (rng.integers(1, 4, len(a)).astype(np.float64) if integer
         else rng.uniform(0.5, 5.0, len(a)))
    bw = rng.integers(1, 10, len(a)) * 100.0
    return nodes, a, b, w, bw


def _check_routes(g: GraphBackhaul, ref: ReferenceBackhaul, a: IntArray, b: IntArray,
                  w: FloatArray, bw: FloatArray) -> None:
    n = g.size
    src, dst = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rtt = g.rtt_ms(src, dst)
    assert np.allclose(rtt, ref.rtt[:n, :n], rtol=1e-12, atol=1e-12)
    path = g.path(src, dst)
    valid = path >= 0
    # Contiguous, from source to target, link by link.
    tail = np.stack([a, b], axis=1).ravel()
    head = np.stack([b, a], axis=1).ravel()
    hops = valid.sum(axis=-1)
    assert (valid == (np.arange(path.shape[-1]) < hops[..., None])).all()
    first = path[..., 0]
    assert (np.where(hops > 0, tail[np.maximum(first, 0)], src) == src).all()
    last = np.take_along_axis(path, np.maximum(hops - 1, 0)[..., None], axis=-1)[..., 0]
    assert (np.where(hops > 0, head[np.maximum(last, 0)], dst) == dst).all()
    step_ok = (~valid[..., 1:]) | (head[np.maximum(path[..., :-1], 0)]
                                    == tail[np.maximum(path[..., 1:], 0)])
    assert step_ok.all()
    # A shortest route: its links' RTTs add up to the pair's RTT.
    lw = np.repeat(np.maximum(w, 1e-12), 2)
    assert np.allclose(np.where(valid, lw[np.maximum(path, 0)], 0.0).sum(axis=-1),
                       ref.rtt[:n, :n], rtol=1e-12, atol=1e-12)
    # The bottleneck is that route's narrowest link.
    lb = np.repeat(bw, 2)
    bottleneck = np.where(valid, lb[np.maximum(path, 0)], np.inf).min(axis=-1)
    assert np.array_equal(g.path_bandwidth_mbit_s(src, dst), bottleneck)


@pytest.mark.parametrize("seed", range(12))
def test_graph_backhaul_matches_all_pairs_on_random_graphs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 90))
    routers = int(rng.integers(0, 3))
    nodes, a, b, w, bw = random_graph(rng, n, routers, integer=seed % 2 == 1)
    keep = int(rng.integers(1, 12))
    g = GraphBackhaul(n, nodes, a, b, w, bw, keep=keep, dense_max=0)
    ref = ReferenceBackhaul(n, nodes, a, b, w, bw)
    _check_routes(g, ref, a, b, w, bw)
    # The matrices a small backhaul keeps hold the very numbers of the tables.
    small = GraphBackhaul(n, nodes, a, b, w, bw, keep=keep)
    assert small.dense and not g.dense
    src, dst = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert np.array_equal(small.rtt_ms(src, dst), g.rtt_ms(src, dst))
    assert np.array_equal(small.path_bandwidth_mbit_s(src, dst),
                          g.path_bandwidth_mbit_s(src, dst))
    _check_routes(small, ref, a, b, w, bw)
    # The same when filling the matrices grows or empties the far table midway.
    for cap in (4, 1 << 22):
        tight = GraphBackhaul(n, nodes, a, b, w, bw, keep=keep, far_capacity=4,
                              max_far_slots=cap)
        _check_routes(tight, ref, a, b, w, bw)
    # The K closest: the same RTTs rank by rank, so the same lists up to equal RTTs.
    k = g.keep
    near, want = g.near(k), ref.near(k)
    assert near[:, 0].tolist() == list(range(n))
    assert np.allclose(np.take_along_axis(ref.rtt[:n, :n], near, axis=1),
                       np.take_along_axis(ref.rtt[:n, :n], want, axis=1), rtol=1e-12)
    if seed % 2 == 0:  # real-valued RTTs: no ties, the very same lists
        assert np.array_equal(near, want)


def test_a_star_routes_through_its_core_router() -> None:
    n = 6
    a = np.arange(n)
    b = np.full(n, n)  # node n is the core
    w = np.linspace(1.0, 2.0, n)
    bw = np.linspace(100.0, 600.0, n)
    g = GraphBackhaul(n, n + 1, a, b, w, bw, keep=3, dense_max=0)
    assert g.path(np.array(1), np.array(4)).tolist() == [2, 9]  # 1 -> core -> 4
    assert float(g.rtt_ms(np.array(1), np.array(4))) == pytest.approx(w[1] + w[4])
    assert float(g.path_bandwidth_mbit_s(np.array(1), np.array(4))) == 200.0
    _check_routes(g, ReferenceBackhaul(n, n + 1, a, b, w, bw), a, b, w, bw)


def test_far_pairs_are_exact_and_counted_and_the_cache_is_bounded() -> None:
    # A 12 x 12 grid keeping 4 cloudlets each: nearly every pair is far.
    side = 12
    n = side * side
    idx = np.arange(n)
    right = idx[idx % side + 1 < side]
    down = idx[idx + side < n]
    a, b = np.r_[right, down], np.r_[right + 1, down + side]
    rng = np.random.default_rng(3)
    w = rng.uniform(1.0, 2.0, len(a))
    bw = rng.integers(1, 10, len(a)) * 100.0
    ref = ReferenceBackhaul(n, n, a, b, w, bw)
    g = GraphBackhaul(n, n, a, b, w, bw, keep=4, far_capacity=64, dense_max=0,
                      max_far_slots=256)
    src = rng.integers(0, n, 500)
    dst = rng.integers(0, n, 500)
    # RTT and bandwidth first (no routes kept), then routes, then again.
    assert np.allclose(g.rtt_ms(src, dst), ref.rtt[src, dst], rtol=1e-12)
    before = g.path_bandwidth_mbit_s(src, dst)
    path = g.path(src, dst)
    lb = np.repeat(bw, 2)
    assert np.array_equal(np.where(path >= 0, lb[np.maximum(path, 0)], np.inf).min(axis=1),
                          g.path_bandwidth_mbit_s(src, dst))
    # Real-valued RTTs: one shortest route, so the bandwidth did not depend on the order.
    assert np.array_equal(before, g.path_bandwidth_mbit_s(src, dst))
    st = g.stats
    assert st.far_lookups > 0 and st.dijkstra_sources > 0
    assert st.far_lookups <= st.lookups
    # 256 slots at most: the table was emptied rather than left to grow.
    assert st.clears >= 1 and g.nbytes < GraphBackhaul(
        n, n, a, b, w, bw, keep=4, dense_max=0).nbytes + 256 * 64
    _check_routes(g, ref, a, b, w, bw)
    # Below its bound it grows instead, keeping what it holds: asked again, the same
    # pairs cost no search.
    roomy = GraphBackhaul(n, n, a, b, w, bw, keep=4, far_capacity=16, dense_max=0)
    first = roomy.path(src, dst)
    searched = roomy.stats.dijkstra_sources
    assert roomy.stats.clears == 0 and searched > 0
    assert np.array_equal(roomy.path(src, dst), first)
    assert np.allclose(roomy.rtt_ms(src, dst), ref.rtt[src, dst], rtol=1e-12)
    assert roomy.stats.dijkstra_sources == searched


def grid_backhaul(side: int) -> GraphBackhaul:
    n = side * side
    idx = np.arange(n)
    right = idx[idx % side + 1 < side]
    down = idx[idx + side < n]
    a, b = np.r_[right, down], np.r_[right + 1, down + side]
    return GraphBackhaul(n, n, a, b, np.full(len(a), 5.0), np.full(len(a), 1000.0))


def test_ten_thousand_cloudlets_build_small() -> None:
    g = grid_backhaul(100)
    n = g.size
    dense_bytes = 2 * n * n * 8  # the two (n, n) float64 matrices it replaces
    assert g.nbytes < 64 << 20, g.nbytes
    assert g.nbytes < dense_bytes / 20
    # Manhattan distance on a grid of 5 ms hops, near and far.
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, n, 200), rng.integers(0, n, 200)
    manhattan = (np.abs(src // 100 - dst // 100) + np.abs(src % 100 - dst % 100)) * 5.0
    assert np.array_equal(g.rtt_ms(src, dst), manhattan)
    assert (g.path(src[:50], dst[:50]) >= 0).sum(axis=1).tolist() == (manhattan[:50]
                                                                        / 5).tolist()
    net = Network.build(np.zeros((n, 2)) + np.arange(n)[:, None], np.full(n, 4),
                        np.full(n, 1e9), g)
    assert net.near.shape == (n, 8) and (net.near[:, 0] == np.arange(n)).all()


def _reference_topology(topo: Topology) -> Topology:
    ref = ReferenceBackhaul(topo.size, len(topo.node_position_m), topo.link_a, topo.link_b,
                            topo.link_rtt_ms, topo.link_bandwidth_mbit_s)
    near = ref.near(topo.network.near.shape[1])
    net = dataclasses.replace(topo.network, backhaul=ref,  # type: ignore[arg-type]
                              near=near,
                              near_rtt_ms=ref.rtt[np.arange(topo.size)[:, None], near])
    return dataclasses.replace(topo, backhaul=ref, network=net)  # type: ignore[arg-type]


def _summaries(result: Any) -> dict[str, dict[str, Any]]:
    return {name: {k: v for k, v in p.summary.items()
                   if k not in ("wall_s", "user_steps_per_s")}
            for name, p in result.policies.items()}


@pytest.mark.parametrize("matrices", [False, True])
def test_simulator_results_equal_the_all_pairs_reference_without_ties(
        monkeypatch: pytest.MonkeyPatch, matrices: bool) -> None:
    """small-metro on a backhaul whose routes are all of different RTT (cloudlets at
    irregular places, links of their own RTT): every policy's summary is the same,
    bit for bit, with the sparse backhaul (its tables alone, or with the matrices a
    small one keeps) and with the dense reference."""
    if not matrices:
        monkeypatch.setattr(backhaul_module, "DENSE_MAX_CLOUDLETS", 0)
    sc = load_scenario(CONFIGS / "small-metro.toml")
    sc = dataclasses.replace(sc, duration_s=600.0)
    irregular = dataclasses.replace(
        sc, topology=dataclasses.replace(sc.topology, layout="random", count=9),
        backhaul=dataclasses.replace(sc.backhaul, neighbours=3))
    graph = simulate(irregular)
    assert graph.topology.backhaul.dense == matrices
    real = sim_engine.build_topology
    monkeypatch.setattr(sim_engine, "build_topology",
                        lambda *args: _reference_topology(real(*args)))
    dense = simulate(irregular)
    assert matrices or graph.topology.backhaul.stats.lookups > 0
    ref_rtt = dense.topology.backhaul.rtt  # type: ignore[attr-defined]
    n = graph.topology.size
    idx = np.arange(n)
    got = graph.topology.backhaul.rtt_ms(idx[:, None], idx[None, :])
    assert np.allclose(got, ref_rtt[:n, :n], rtol=1e-12)
    assert sum(p.summary["migrations"] for p in graph.policies.values()) > 0
    assert _summaries(graph) == _summaries(dense)


@pytest.mark.parametrize("name", ["small-metro.toml", "sumo-dense-light.toml"])
def test_shipped_backhauls_agree_with_the_reference(name: str) -> None:
    """On the shipped grids: the same RTTs (to float rounding), the same K closest
    up to equal RTTs, and every route a shortest one."""
    from cloudlet.sim.engine import scenario_topology

    topo = scenario_topology(load_scenario(CONFIGS / name))
    ref = ReferenceBackhaul(topo.size, len(topo.node_position_m), topo.link_a, topo.link_b,
                            topo.link_rtt_ms, topo.link_bandwidth_mbit_s)
    _check_routes(topo.backhaul, ref, topo.link_a, topo.link_b, topo.link_rtt_ms,
                  topo.link_bandwidth_mbit_s)
    n = topo.size
    k = topo.network.near.shape[1]
    assert np.allclose(np.take_along_axis(ref.rtt[:n, :n], topo.network.near, axis=1),
                       np.take_along_axis(ref.rtt[:n, :n], ref.near(k), axis=1), rtol=1e-12)


def test_one_cloudlet_parallel_links_and_a_split_graph() -> None:
    alone = GraphBackhaul(1, 1, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                          np.zeros(0), np.zeros(0), dense_max=0)
    assert alone.rtt_ms(np.array([0]), np.array([0])).tolist() == [0.0]
    assert alone.path(np.array(0), np.array(0)).tolist() == [-1]
    assert alone.near(8).tolist() == [[0]]
    # Two links between the same cloudlets: the faster one carries the route.
    twice = GraphBackhaul(2, 2, np.array([0, 0]), np.array([1, 1]), np.array([2.0, 1.0]),
                          np.array([10.0, 20.0]), dense_max=0)
    assert float(twice.rtt_ms(np.array(0), np.array(1))) == 1.0
    assert twice.path(np.array(0), np.array(1)).tolist() == [2]
    assert float(twice.path_bandwidth_mbit_s(np.array(1), np.array(0))) == 20.0
    split = GraphBackhaul(3, 3, np.array([0]), np.array([1]), np.array([1.0]),
                          np.array([10.0]))
    assert split.disconnected() == (0, 2)
