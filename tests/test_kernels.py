"""The compiled lookups (cloudlet/placement/kernels.py) answer what the numpy code
they replaced answered, bit for bit: that code is kept here as the reference, and
both run on grids (ties on every border), random layouts, off-raster positions and
hash tables with long probe chains."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import AccessIndex, GraphBackhaul, LatencyModel, kernels, slices
from cloudlet.placement.congestion import highest_first
from cloudlet.placement.cost import PrecopyModel

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _reference_nearest(index: AccessIndex, xy_m: NDArray[np.float64],
                       hint: NDArray[np.int64] | None
                       ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """AccessIndex.nearest as numpy arrays computed it."""
    def plain(xy: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        cell = np.floor((xy - index.origin_m) / index.cell_m).astype(np.int64)
        cx = np.clip(cell[:, 0], 0, index.shape[0] - 1)
        cy = np.clip(cell[:, 1], 0, index.shape[1] - 1)
        cand = index.candidates[cx * index.shape[1] + cy]
        x, y = index.position_m[:, 0], index.position_m[:, 1]
        dx = x[cand] - xy[:, :1]
        dy = y[cand] - xy[:, 1:]
        d2 = dx * dx + dy * dy
        best = np.argmin(d2, axis=1)
        rows = np.arange(len(xy))
        out = cand[rows, best]
        best_d2 = d2[rows, best]
        outside = (cx != cell[:, 0]) | (cy != cell[:, 1])
        if outside.any():
            far = xy[outside]
            dd = ((far[:, None, :] - index.position_m[None, :, :]) ** 2).sum(axis=-1)
            out[outside] = np.argmin(dd, axis=1)
            best_d2[outside] = dd.min(axis=1)
        return out, np.sqrt(best_d2)

    if hint is None:
        return plain(xy_m)
    known = hint >= 0
    at = np.where(known, hint, 0)
    dx = index.position_m[at, 0] - xy_m[:, 0]
    dy = index.position_m[at, 1] - xy_m[:, 1]
    d2 = dx * dx + dy * dy
    sure_d2 = kernels_sure_d2(index)
    unsure = np.flatnonzero(~(known & (d2 < sure_d2[at])))
    out, dist = at.copy(), np.sqrt(d2)
    if len(unsure):
        out[unsure], dist[unsure] = plain(xy_m[unsure])
    return out, dist


def kernels_sure_d2(index: AccessIndex) -> NDArray[np.float64]:
    return index._sure_d2  # noqa: SLF001 - the reference needs the index's own radii


def _layouts() -> list[NDArray[np.float64]]:
    rng = np.random.default_rng(11)
    grid = np.stack(np.meshgrid(np.arange(12) * 400.0, np.arange(12) * 400.0,
                                indexing="ij"), -1).reshape(-1, 2)
    return [rng.uniform(0, 5000, (300, 2)), grid, np.array([[100.0, 100.0]]),
            np.array([[0.0, 0.0], [0.0, 0.0], [800.0, 0.0]])]


@pytest.mark.parametrize("layout", range(4))
def test_nearest_matches_the_numpy_reference(layout: int) -> None:
    pos = _layouts()[layout]
    index = AccessIndex(pos, extent_m=(0.0, 0.0, 5000.0, 5000.0))
    rng = np.random.default_rng(layout)
    xy = np.concatenate([
        rng.uniform(-300, 5300, (20_000, 2)),
        rng.uniform(-80_000, 80_000, (200, 2)),  # off the raster
        np.repeat(np.arange(0, 5001, 200.0), 2).reshape(-1, 2),  # borders and corners
        np.array([[np.nan, 1.0], [1e300, -1e300]]),
    ])
    for hint in (None, rng.integers(-1, len(pos), len(xy)), np.full(len(xy), -1)):
        with np.errstate(all="ignore"):  # the 1e300 position overflows, as it should
            want, want_d = _reference_nearest(index, xy, hint)
        got, got_d = index.nearest(xy, hint)
        assert np.array_equal(got, want)
        assert np.array_equal(got_d, want_d, equal_nan=True)


def _hash(key: NDArray[np.int64], bits: int) -> NDArray[np.int64]:
    out: NDArray[np.int64] = ((key.astype(np.uint64) * GOLDEN)
                              >> np.uint64(64 - bits)).astype(np.int64)
    return out


def test_find_keys_finds_every_key_and_only_those() -> None:
    rng = np.random.default_rng(3)
    bits = 12
    table = np.full(1 << bits, -1, dtype=np.int64)
    keys = rng.choice(10**12, 3000, replace=False).astype(np.int64)  # 73% full: long chains
    for k in keys:
        s = int(_hash(np.array([k]), bits)[0])
        while table[s] >= 0:
            s = (s + 1) & ((1 << bits) - 1)
        table[s] = k
    absent = rng.choice(10**12, 3000).astype(np.int64)
    absent = absent[~np.isin(absent, keys)]
    got = kernels.find_keys(table, bits, np.concatenate([keys, absent]))
    assert np.array_equal(table[got[:len(keys)]], keys)
    assert (got[len(keys):] == -1).all()


def test_find_in_rows_probes_within_each_row() -> None:
    rng = np.random.default_rng(4)
    rows, bits = 50, 5
    width = 1 << bits
    key = np.full(rows * width, -1, dtype=np.int32)
    kept: dict[tuple[int, int], int] = {}
    for r in range(rows):
        for c in rng.choice(100_000, 24, replace=False):  # 75% of each row's slots
            s = int(_hash(np.array([c]), bits)[0])
            while key[r * width + s] >= 0:
                s = (s + 1) & (width - 1)
            key[r * width + s] = c
            kept[(r, int(c))] = r * width + s
    row = np.array([r for r, _ in kept] + list(rng.integers(0, rows, 500)), dtype=np.int64)
    col = np.array([c for _, c in kept] + list(rng.integers(100_000, 200_000, 500)),
                   dtype=np.int64)
    got = kernels.find_in_rows(key, width, bits, row, col)
    assert list(got[:len(kept)]) == list(kept.values())
    assert (got[len(kept):] == -1).all()


def _reference_value(access, backhaul, last, queue, measured, slope, taus, service,  # type: ignore[no-untyped-def]
                     budget, rate, arrive, downtime, wire, full, first, w, gib_cost,
                     cost_margin, min_gain, horizon_s, lead_s):
    """Predictive's value as numpy arrays computed it, (m, C, S) at once."""
    k = len(taus) - 1
    dt = horizon_s / k
    rtt = access[:, None, :] + backhaul[last].transpose(0, 2, 1) + queue[:, :, None]
    if measured.shape[0]:
        rtt = (rtt + np.where(np.isnan(measured), 0.0, measured - rtt[:, :, 0])[:, :, None]
               + slope[:, :, None] * taus[None, None, :])
    lat = rtt + service[:, None, None]
    pen = (lat > budget[:, None, None]) + w * lat
    served = taus[None, None, :] >= arrive[:, :, None]
    gain = rate[:, None] * dt * ((pen[:, :1, :] - pen) * served).sum(axis=2)
    cost = rate[:, None] * downtime + gib_cost * wire / float(1 << 30)
    net_gain = gain - (1.0 + cost_margin) * cost
    at = np.minimum(np.ceil(arrive / dt - 1e-9).astype(np.int64), k)
    fine = np.take_along_axis(lat, at[:, :, None], axis=2)[:, :, 0] <= budget[:, None]
    over_full = ~fine.any(axis=1)
    fine |= over_full[:, None]
    ok = ((first[:, None] <= arrive + lead_s) & (net_gain > min_gain) & (arrive <= horizon_s)
          & fine & ~full)
    saved = (((rtt[:, :1, :] - rtt) * served).sum(axis=2)
             / np.maximum(served.sum(axis=2), 1))
    return net_gain, ok, over_full, saved


def _by_run(args):  # type: ignore[no-untyped-def]
    """The reference's arguments as the kernel takes them: each move's arrival,
    downtime and wire bytes as one run each, after no wait."""
    arrive, downtime, wire = args[10], args[11], args[12]
    m, c = arrive.shape
    run = np.arange(m * c).reshape(m, c)
    return (*args[:10], run, np.zeros((m, c)), arrive.ravel(), downtime.ravel(),
            wire.ravel(), *args[13:])


@pytest.mark.parametrize("with_measurements", [False, True])
def test_predictive_value_matches_the_numpy_formula(with_measurements: bool) -> None:
    rng = np.random.default_rng(5 + with_measurements)
    m, c, s = 4000, 9, 16
    taus = np.linspace(0.0, 30.0, s)
    last = np.cumsum(rng.random((m, s)) < 0.2, axis=1) + 3 * np.arange(m)[:, None]
    backhaul = rng.uniform(0, 40, (int(last.max()) + 1, c))
    measured = np.zeros((0, 0))
    slope = np.zeros((0, 0))
    if with_measurements:
        measured = np.where(rng.random((m, c)) < 0.5, rng.uniform(5, 60, (m, c)), np.nan)
        slope = rng.normal(0, 0.5, (m, c))
    args = (rng.uniform(2, 20, (m, s)), backhaul, last, rng.uniform(0, 5, (m, c)),
            measured, slope, taus, rng.uniform(1, 10, m), rng.uniform(20, 60, m),
            rng.uniform(1, 30, m), rng.uniform(0, 40, (m, c)), rng.uniform(0, 0.2, (m, c)),
            rng.uniform(1e8, 1e9, (m, c)), rng.random((m, c)) < 0.1, rng.uniform(0, 30, m),
            0.001, 0.5, 0.5, 1.0, 30.0, 2.0)
    want = _reference_value(*args)
    got = kernels.predictive_value(*_by_run(args))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-12, atol=1e-9)
    assert np.array_equal(got[2], want[2])
    # `ok` compares the net gain with min_gain: equal wherever it is not a hair away.
    clear = np.abs(want[0] - 1.0) > 1e-6
    assert np.array_equal(got[1][clear], want[1][clear])
    assert want[1].any() and not want[1].all()


def test_nearest_settled_keeps_what_a_full_dijkstra_finds_within_the_radius() -> None:
    from scipy.sparse import csr_matrix  # type: ignore[import-untyped]
    from scipy.sparse.csgraph import dijkstra  # type: ignore[import-untyped]

    rng = np.random.default_rng(8)
    nodes, cloudlets, keep = 300, 200, 12
    a, b = rng.integers(0, nodes, 900), rng.integers(0, nodes, 900)
    w = rng.choice([1.0, 2.0, 2.5], 900)  # few weights: many ties in distance
    ok = a != b
    g = csr_matrix((np.r_[w[ok], w[ok]], (np.r_[a[ok], b[ok]], np.r_[b[ok], a[ok]])),
                   shape=(nodes, nodes))
    g.sum_duplicates()
    full = dijkstra(g, directed=True)
    sources = np.arange(cloudlets)
    row, col, dist, pred, radius = kernels.nearest_settled(
        g.indptr.astype(np.int64), g.indices.astype(np.int64), g.data, sources, cloudlets,
        keep)
    for s in sources:
        d = full[s]
        finite = np.sort(d[:cloudlets][np.isfinite(d[:cloudlets])])
        want_r = finite[keep - 1] if len(finite) >= keep else np.inf
        assert radius[s] == want_r
        want = set(np.flatnonzero(d <= want_r) if np.isfinite(want_r)
                   else np.flatnonzero(np.isfinite(d)))
        mine = row == s
        assert set(col[mine]) == want
        assert np.array_equal(dist[mine], d[col[mine]])
        # Every predecessor lies on a shortest path; the source has none.
        p, v = pred[mine], col[mine]
        assert (p[v == s] == -1).all()
        inner = v != s
        assert np.allclose(d[p[inner]] + np.asarray(g[p[inner], v[inner]]).ravel(), d[v[inner]])


def test_manhattan_driving_matches_the_numpy_reference_and_keeps_to_the_streets() -> None:
    from cloudlet.sim import mobility

    dirs = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    grid = mobility.ManhattanGrid(3000, 4000.0, 3000.0, np.random.default_rng(2),
                                  block_m=250.0, speed_max_m_s=60.0)
    for _ in range(50):
        grid.step(1.0)
    xy, direction = grid.xy.copy(), grid.direction.copy()
    travel = np.random.default_rng(3).uniform(0, 700, len(xy))
    idx = np.arange(len(xy))
    # The reference: numpy, as the grid drove before its loop was compiled.
    want_xy, want_travel = xy.copy(), travel.copy()
    d = direction[idx]
    c = want_xy[idx, d % 2] / 250.0
    nxt = np.where(d < 2, np.floor(c + 1e-9) + 1.0, np.ceil(c - 1e-9) - 1.0)
    dist = np.abs(nxt - c) * 250.0
    reach = want_travel[idx] >= dist
    go, hit = idx[~reach], idx[reach]
    want_xy[go] += dirs[direction[go]] * want_travel[go][:, None]
    want_travel[go] = 0.0
    want_xy[hit] += dirs[direction[hit]] * dist[reach][:, None]
    want_xy[hit] = np.round(want_xy[hit] / 250.0) * 250.0
    want_travel[hit] -= dist[reach]
    got_hit = mobility._drive(xy, direction, travel, idx, 250.0)  # noqa: SLF001
    assert np.array_equal(got_hit, hit)
    assert np.array_equal(xy, want_xy) and np.array_equal(travel, want_travel)
    # After a whole step every user is on a street, inside the grid.
    grid.step(1.0)
    on_x = np.isclose(grid.xy[:, 0] / 250.0, np.round(grid.xy[:, 0] / 250.0))
    on_y = np.isclose(grid.xy[:, 1] / 250.0, np.round(grid.xy[:, 1] / 250.0))
    assert (on_x | on_y).all()
    assert (grid.xy >= 0).all() and (grid.xy <= grid.max_c).all()


@pytest.mark.parametrize("name", ["never", "nearest", "threshold", "predictive"])
def test_warm_up_runs_every_policy_on_its_tiny_cluster(name: str) -> None:
    from cloudlet.placement import make_policy
    from cloudlet.placement.warm import tiny_cluster, warm_up

    policy = make_policy(name)
    warm_up(policy)
    moves = policy.decide(tiny_cluster())
    # The tiny cluster has sessions far from their hosts: every policy that moves
    # weighs (and makes) moves there, so warming up reaches its kernels.
    assert (len(moves.session) > 0) == (name != "never")


def test_bad_hints_and_shapes_are_refused_before_the_kernels_read_them() -> None:
    index = AccessIndex(np.array([[0.0, 0.0], [100.0, 0.0]]))
    xy = np.zeros((3, 2))
    with pytest.raises(InvalidArgument):
        index.nearest(xy, np.array([0, 1, 2]))  # no cloudlet 2
    with pytest.raises(InvalidArgument):
        index.nearest(xy, np.array([0, 1]))  # one hint short
    with pytest.raises(InvalidArgument):
        index.nearest(np.zeros((3, 1)))
    with pytest.raises(InvalidArgument):
        index.nearest_along(xy, np.zeros((2, 2)), np.array([0.0, 1.0]), np.zeros(3))
    got, _ = index.nearest(xy, np.array([-1, 0, 1]))
    assert got.tolist() == [0, 0, 0]


# --- the placer round's other loops -----------------------------------------------------------


def _reference_changes(attach: NDArray[np.int64],
                       target: NDArray[np.int64]) -> tuple[NDArray[np.int64], ...]:
    """The pairs to look up where each access point changes, as numpy computed them."""
    m, k = attach.shape
    change = np.ones((m, k), dtype=bool)
    change[:, 1:] = attach[:, 1:] != attach[:, :-1]
    rows, at = np.nonzero(change)
    src = np.broadcast_to(attach[rows, at][:, None], (len(rows), target.shape[1]))
    last = np.cumsum(change.ravel()).reshape(m, k) - 1
    return src, target[rows], last


def test_changes_along_matches_the_numpy_reference() -> None:
    rng = np.random.default_rng(11)
    attach = np.cumsum(rng.random((500, 16)) < 0.3, axis=1) + rng.integers(0, 50, (500, 1))
    target = rng.integers(0, 60, (500, 5))
    got = kernels.changes_along(attach, target)
    for a, b in zip(got, _reference_changes(attach, target), strict=True):
        assert np.array_equal(a, b)


def _grid_backhaul(side: int, keep: int, far: int = 0) -> GraphBackhaul:
    n = side * side
    idx = np.arange(n)
    right = idx[(idx % side) + 1 < side]
    down = idx[idx + side < n]
    a = np.concatenate([right, down])
    b = np.concatenate([right + 1, down + side])
    rng = np.random.default_rng(side)
    return GraphBackhaul(n, n, a, b, rng.uniform(1, 5, len(a)),
                         rng.integers(1, 10, len(a)) * 100.0, keep=keep, dense_max=0,
                         far_capacity=far or None)


def test_pair_lookups_answer_what_the_slot_tables_answer_near_far_and_new() -> None:
    """rtt_ms and path_bandwidth_mbit_s (one compiled pass, far pairs never asked
    computed after it) give what the tables' slots hold, and count lookups the same."""
    g = _grid_backhaul(12, keep=6)
    ref = _grid_backhaul(12, keep=6)
    rng = np.random.default_rng(3)
    for round_ in range(3):
        src = rng.integers(0, 144, (400, 7))
        dst = rng.integers(0, 144, (400, 7))
        dst[:, 0] = src[:, 0]  # self pairs (bandwidth inf)
        got_rtt = g.rtt_ms(src, dst)
        got_bw = g.path_bandwidth_mbit_s(src, dst)
        slot = ref._slots(src.ravel(), dst.ravel())  # noqa: SLF001 - the reference
        assert np.array_equal(got_rtt, ref._rtt[slot].reshape(src.shape))  # noqa: SLF001
        slot = ref._slots(src.ravel(), dst.ravel())  # noqa: SLF001
        assert np.array_equal(got_bw, ref._bw[slot].reshape(src.shape))  # noqa: SLF001
        assert np.isinf(got_bw[:, 0]).all() and np.isfinite(got_rtt).all()
        assert g.stats.far_lookups > 0, round_
    assert g.stats == ref.stats
    with pytest.raises(InvalidArgument):
        g.rtt_ms(np.array([0, 144]), np.array([1, 2]))
    with pytest.raises(InvalidArgument):
        g.path_bandwidth_mbit_s(np.array([-1]), np.array([1]))


def test_rtt_along_on_a_far_table_that_empties_mid_call() -> None:
    """Far pairs found in the far table are kept when the same call's new far pairs
    then empty it (a bounded table): every answer equals the reference's."""
    g = _grid_backhaul(10, keep=4, far=8)
    g._max_far_slots = 64  # noqa: SLF001 - a table that must empty to take a call's pairs
    dense = _grid_backhaul(10, keep=100)  # every pair kept: the reference
    rng = np.random.default_rng(9)
    attach = rng.integers(0, 100, (30, 6))
    target = rng.integers(0, 100, (30, 4))
    for call in range(3):
        # Pairs asked before (in the far table now), then many new ones: their fill
        # empties the table the earlier ones were found in.
        fresh = rng.integers(0, 100, (270, 6))
        ask = np.concatenate([attach[:30], fresh]) if call else attach[:30]
        ask_target = np.concatenate([target, rng.integers(0, 100, (270, 4))]) if call else target
        got, last = g.rtt_along(ask, ask_target)
        src, dst, want_last = _reference_changes(ask, ask_target)
        assert np.array_equal(last, want_last)
        np.testing.assert_allclose(got, dense.rtt_ms(src, dst), rtol=1e-12)
    assert g.stats.clears >= 2


def _reference_host(attach, dist, backhaul, last, queue_host, measured, slope, taus,  # type: ignore[no-untyped-def]
                    service, budget, lat: LatencyModel):
    """The host's latency and violations as numpy computed them."""
    access = lat.access_rtt_ms(dist)
    host_rtt = access + backhaul[last, 0] + queue_host[:, None]
    if measured.shape[0]:
        host_rtt = (host_rtt + np.where(np.isnan(measured), 0.0,
                                        measured - host_rtt[:, 0])[:, None]
                    + slope[:, None] * taus[None, :])
    return access, host_rtt + service[:, None] > budget[:, None]


@pytest.mark.parametrize("with_measurements", [False, True])
def test_host_breaks_matches_the_numpy_formula(with_measurements: bool) -> None:
    rng = np.random.default_rng(21 + with_measurements)
    m, s, n = 3000, 16, 40
    x, y = rng.uniform(0, 5000, n), rng.uniform(0, 5000, n)
    position, velocity = rng.uniform(0, 5000, (m, 2)), rng.normal(0, 10, (m, 2))
    taus = np.linspace(0.0, 30.0, s)
    attach = np.where(rng.random((m, 1)) < 0.5, rng.integers(0, n, (m, 1)),
                      rng.integers(0, n, (m, s)))
    dist = np.array([[kernels.distance_along(*position[i], *velocity[i], taus[t],
                                             x[attach[i, t]], y[attach[i, t]])
                      for t in range(s)] for i in range(m)])
    backhaul, last = rng.uniform(0, 20, (m * s, 1)), np.arange(m * s).reshape(m, s)
    queue, service, budget = rng.uniform(0, 3, m), rng.uniform(1, 5, m), rng.uniform(8, 40, m)
    measured, slope = np.zeros(0), np.zeros(0)
    if with_measurements:
        measured = np.where(rng.random(m) < 0.5, rng.uniform(5, 50, m), np.nan)
        slope = rng.normal(0, 0.5, m)
    lat = LatencyModel(access_range_m=800.0, out_of_range_rtt_ms=9.0)
    access, viol = _reference_host(attach, dist, backhaul, last, queue, measured, slope,
                                   taus, service, budget, lat)
    for screen in ([False] if with_measurements else [False, True]):
        due, due_attach, due_access, first, ends, steady = kernels.host_breaks(
            attach, position, velocity, x, y, backhaul, last, queue, measured, slope, taus,
            service, budget, lat.radio_rtt_ms, lat.propagation_rtt_ms_per_km * 1e-3,
            lat.access_range_m, lat.out_of_range_rtt_ms, screen)
        want_steady = ((attach[:, 0] == attach[:, -1]) & ~viol[:, 0] & ~viol[:, -1]
                       if screen else np.zeros(m, dtype=bool))
        assert np.array_equal(steady, want_steady)
        breaking = viol.any(axis=1) & ~want_steady
        assert np.array_equal(due, np.flatnonzero(breaking))
        assert np.array_equal(due_attach, attach[due])
        assert np.array_equal(due_access, access[due])
        assert np.array_equal(first, np.argmax(viol[due], axis=1))
        assert np.array_equal(ends[~want_steady], viol[~want_steady][:, [0, -1]])
        assert 0 < len(due) < m


def _reference_assign(cand, score, ok, host, priority, memory, free_vms, free_mem):  # type: ignore[no-untyped-def]
    """policies._assign as numpy computed it, round by round."""
    m, c = cand.shape
    target = np.full(m, -1, dtype=np.int64)
    column = np.full(m, -1, dtype=np.int64)
    ok = ok & (cand != host[:, None])
    active = np.flatnonzero(ok.any(axis=1))
    if len(active) == 0:
        return target, column
    free_vms, free_mem = free_vms.copy(), free_mem.copy()
    sub_ok, sub_cand = ok[active], cand[active]
    order = np.argsort(np.where(sub_ok, score[active], np.inf), axis=1, kind="stable")
    pending = np.ones(len(active), dtype=bool)
    for rank in range(c):
        col = order[:, rank]
        rows = np.flatnonzero(pending & sub_ok[np.arange(len(active)), col])
        if len(rows) == 0:
            break
        t = sub_cand[rows, col[rows]]
        sess = active[rows]
        o = np.lexsort((sess, -priority[sess], t))
        rows, t, sess = rows[o], t[o], sess[o]
        mem = memory[sess]
        starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
        group = np.repeat(starts, np.diff(np.r_[starts, len(t)]))
        cum_n = np.arange(len(t)) - group + 1
        cum_mem = np.cumsum(mem)
        cum_mem = cum_mem - (cum_mem[group] - mem[group])
        accept = (cum_n <= free_vms[t]) & (cum_mem <= free_mem[t])
        target[sess[accept]] = t[accept]
        column[sess[accept]] = col[rows[accept]]
        pending[rows[accept]] = False
        np.subtract.at(free_vms, t[accept], 1.0)
        np.subtract.at(free_mem, t[accept], mem[accept])
    return target, column


@pytest.mark.parametrize("seed", range(6))
def test_assign_greedy_matches_the_numpy_rounds(seed: int) -> None:
    """Crowded cloudlets (few slots, little memory), tied scores and priorities, NaN
    priorities, sessions with nothing acceptable, fractional and NaN byte counts."""
    rng = np.random.default_rng(seed)
    m, c, n = 2000, 9, 60
    cand = rng.integers(0, n, (m, c))
    host = cand[:, 0].copy()
    score = rng.integers(0, 5, (m, c)).astype(np.float64)
    ok = rng.random((m, c)) < 0.6
    priority = rng.integers(0, 20, m).astype(np.float64)
    priority[rng.random(m) < 0.05] = np.nan
    if seed % 2:
        memory = rng.integers(1, 4, m).astype(np.float64) * (1 << 29)
        free_mem = rng.integers(0, 16, n).astype(np.float64) * (1 << 30)
    else:
        # Fractional MiB (a scenario's memory_mib: 300.7) and capacities that are exact
        # sums of them: the float sums decide at the boundary. And one NaN.
        sizes = np.array([100.1, 300.7, 51.3]) * (1 << 20)
        memory = rng.choice(sizes, m)
        memory[rng.integers(0, m)] = np.nan
        free_mem = (rng.choice(sizes, (n, 3)) * rng.integers(0, 30, (n, 3))).sum(axis=1)
    free_vms = rng.integers(0, 30, n).astype(np.float64)
    want = _reference_assign(cand, score, ok, host, priority, memory, free_vms, free_mem)
    got = kernels.assign_greedy(cand, score, ok, host, highest_first(priority), memory,
                                free_vms.copy(), free_mem.copy())
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert (want[0] >= 0).any() and (want[0] < 0).any()


def _reference_ahead(links: NDArray[np.int64], priority: NDArray[np.float64]) -> NDArray[np.int64]:
    """congestion.ahead_of as numpy computed it (two lexsorts)."""
    m, p = links.shape
    out = np.zeros(links.shape, dtype=np.int64)
    order = np.lexsort((np.arange(m), -priority))
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)
    row, col, flat = np.repeat(np.arange(m), p), np.tile(np.arange(p), m), links.ravel()
    valid = flat >= 0
    row, col, flat = row[valid], col[valid], flat[valid]
    o = np.lexsort((rank[row], flat))
    row, col, flat = row[o], col[o], flat[o]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    out[row, col] = np.arange(len(flat)) - np.repeat(starts, np.diff(np.r_[starts, len(flat)]))
    return out


def test_ahead_counts_and_highest_first_match_the_numpy_sorts() -> None:
    rng = np.random.default_rng(4)
    m = 5000
    links = rng.integers(0, 300, (m, 4)) * 1_000_003  # sparse ids
    links[rng.random((m, 4)) < 0.3] = -1
    priority = rng.integers(0, 50, m).astype(np.float64)
    priority[rng.random(m) < 0.05] = np.nan
    priority[:40] = 7.0  # a long run of ties
    want_order = np.lexsort((np.arange(m), -priority))
    assert np.array_equal(highest_first(priority), want_order)
    got = kernels.ahead_counts(highest_first(priority), links)
    assert np.array_equal(got, _reference_ahead(links, priority))


def test_pricing_runs_of_equal_inputs_gives_each_moves_own_estimate() -> None:
    """estimate (once per run of equal inputs) is bit for bit the estimate of each move
    on its own: runs along rows and across them, 1-D and 2-D, and inputs too varied
    for runs."""
    rng = np.random.default_rng(8)
    model = PrecopyModel()
    m = 5000
    overlay = rng.choice([64.0, 128.0], (m, 1)) * (1 << 20)
    memory = np.full((m, 1), 512.0 * (1 << 20))
    dirty = rng.choice([1.0, 8.0, 40.0], (m, 1)) * (1 << 20)
    bw = np.where(rng.random((m, 9)) < 0.8, 1000.0, rng.choice([100.0, np.inf], (m, 9)))
    for args in ((overlay, memory, dirty, bw), (np.full(m, 1e8), memory[:, 0],
                                                np.full(m, 4e6), bw[:, 0], 2.0),
                 (rng.uniform(1e7, 1e9, (m, 2)), memory, dirty, bw[:, :2])):
        runs, run = model.estimate_runs(*args)
        want = model._estimate(*np.broadcast_arrays(*(np.asarray(x, dtype=np.float64)  # noqa: SLF001
                                                    for x in args)))
        got = model.estimate(*args)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and np.array_equal(a, b)
        if args[0].shape[-1] == 2 and args[0].ndim == 2:
            assert run is None  # too varied: priced move by move
        else:
            assert run is not None and len(runs.duration_s) < run.size // 2


def test_row_slices_in_threads_answer_as_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    index = AccessIndex(np.random.default_rng(2).uniform(0, 10_000, (300, 2)))
    rng = np.random.default_rng(3)
    xy, v = rng.uniform(0, 10_000, (40_000, 2)), rng.normal(0, 10, (40_000, 2))
    taus = np.linspace(0, 30, 16)
    monkeypatch.setenv("CLOUDLET_PLACER_THREADS", "1")
    one = index.nearest_along(xy, v, taus, np.zeros(len(xy), dtype=np.int64))
    monkeypatch.setenv("CLOUDLET_PLACER_THREADS", "3")
    assert slices.threads() == 3
    three = index.nearest_along(xy, v, taus, np.zeros(len(xy), dtype=np.int64))
    assert np.array_equal(one, three)
    for bad in ("0", "two", ""):
        monkeypatch.setenv("CLOUDLET_PLACER_THREADS", bad)
        assert slices.threads() == slices.threads_default()  # logged, not fatal


def test_a_forked_child_runs_large_loops_on_its_own_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's pool has no threads in a forked child: a child that used it would
    wait forever. It starts its own."""
    import time

    monkeypatch.setenv("CLOUDLET_PLACER_THREADS", "2")
    rows = 4 * slices.MIN_ROWS_PER_THREAD

    def run(lo: int, hi: int) -> tuple[NDArray[np.int64]]:
        return (np.arange(lo, hi),)

    assert np.array_equal(slices.by_rows(rows, run)[0], np.arange(rows))  # the pool exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = np.array_equal(slices.by_rows(rows, run)[0], np.arange(rows))
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on its parent's thread pool")


def test_inputs_the_compiled_loops_would_read_out_of_bounds_are_refused() -> None:
    """numba does not check bounds: what reaches a kernel is checked before it."""
    from cloudlet.placement import Sessions
    from cloudlet.placement.congestion import ahead_of
    from cloudlet.placement.warm import tiny_cluster

    m = 3
    good = dict(host=np.zeros(m, dtype=np.int64), position_m=np.zeros((m, 2)),
                velocity_m_s=np.zeros((m, 2)), memory_bytes=np.ones(m),
                overlay_bytes=np.ones(m), dirty_rate_bytes_s=np.ones(m),
                budget_ms=np.ones(m), service_ms=np.ones(m),
                interaction_rate_hz=np.ones(m), last_move_s=np.zeros(m),
                previous_host=np.zeros(m, dtype=np.int64), movable=np.ones(m, dtype=bool))
    Sessions(**good)  # type: ignore[arg-type]
    for name, bad in (("memory_bytes", np.ones(1)), ("position_m", np.zeros((m, 3))),
                      ("movable", np.ones(m + 1, dtype=bool))):
        with pytest.raises(InvalidArgument):
            Sessions(**{**good, name: bad})  # type: ignore[arg-type]
    state = tiny_cluster()
    with pytest.raises(InvalidArgument):
        ahead_of(state, np.array([0, 1]), np.array([2, 2]), np.zeros(4_000_000))
    index = AccessIndex(np.array([[0.0, 0.0], [100.0, 0.0]]))
    xy = np.zeros((2, 2))
    for halving in (np.array([[5000, 0, 2]]), np.array([[1, 1, 2]]), np.array([[1, 0, 3]])):
        with pytest.raises(InvalidArgument):
            index.nearest_along(xy, xy, np.linspace(0, 1, 3), np.zeros(2, dtype=np.int64),
                                halving)
    with pytest.raises(InvalidArgument):
        index.nearest_along(xy, xy, np.zeros(0), np.zeros(2, dtype=np.int64))
    with pytest.raises(InvalidArgument):  # NaN is the lookups' "not stored"
        GraphBackhaul(2, 2, np.array([0]), np.array([1]), np.array([1.0]),
                      np.array([np.nan]))


def test_a_run_of_prices_keeps_the_sign_of_zero() -> None:
    model = PrecopyModel()
    n = 5000
    overlay = np.where((np.arange(n) // 100) % 2 == 0, 0.0, -0.0)  # runs of 100
    got = model.estimate(overlay, np.full(n, 1e8), np.zeros(n), np.full(n, 1000.0))
    want = model._estimate(overlay, np.full(n, 1e8), np.zeros(n), np.full(n, 1000.0))  # noqa: SLF001
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(np.signbit(a), np.signbit(b)) and np.array_equal(a, b)
    assert np.signbit(got.wire_bytes).any() and not np.signbit(got.wire_bytes).all()


def test_threads_default_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    assert 1 <= slices.threads_default() <= slices.MAX_THREADS


def test_compiled_code_is_cached_under_the_directory_a_daemon_names(tmp_path: Path) -> None:
    """A daemon that cannot write beside the compiled modules (a read-only install)
    keeps its placer's machine code in the directory it names (cloudlet.jit.cache_in),
    so a restart loads rather than compiles it; where it can, numba's default stays
    (one cache shared by every process). Fresh interpreters: numba reads the setting
    when it is imported."""
    import subprocess
    import sys

    cache = tmp_path / "numba-cache"

    def run(install_writable: bool) -> None:
        # A read-only install as a service user meets it (root ignores modes: the
        # check is told so).
        code = ("import os, pathlib, numpy as np\n"
                + ("" if install_writable else "os.access = lambda *a, **k: False\n")
                + "from cloudlet.jit import cache_in\n"
                f"cache_in(pathlib.Path({str(cache)!r}), pathlib.Path({str(tmp_path)!r}))\n"
                "print(os.environ.get('NUMBA_CACHE_DIR', ''))\n"
                "from cloudlet.placement import kernels\n"
                "kernels.find_keys(np.full(8, -1), 3, np.arange(4))\n")
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        out = subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120,
                             capture_output=True, text=True)
        assert out.stdout.strip() == ("" if install_writable else str(cache))

    run(install_writable=True)  # numba's own place, shared by every process
    assert not cache.exists()
    run(install_writable=False)
    assert any(p.suffix == ".nbi" for p in cache.rglob("*")), list(cache.rglob("*"))
