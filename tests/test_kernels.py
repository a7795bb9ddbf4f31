"""The compiled lookups (cloudlet/placement/kernels.py) answer what the numpy code
they replaced answered, bit for bit: that code is kept here as the reference, and
both run on grids (ties on every border), random layouts, off-raster positions and
hash tables with long probe chains."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from cloudlet.placement import AccessIndex, kernels

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
    got = kernels.predictive_value(*args)
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
    from cloudlet.errors import InvalidArgument

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
