"""Compiled loops for the placer's per-session lookups, where numpy's array-at-a-time
style costs more than the work: a hash probe or a nearest-cloudlet search is a few
comparisons per session, but in numpy each probe round or candidate column is a pass
over every session's arrays (and a temporary the size of them). At 100,000 users the
simulator's tick spent a fifth of its time in two such lookups.

The lookups compute exactly what the numpy code they replace computed: the same
integer hashing, the same float expressions in the same order (no fast-math, so no
reassociation or fused multiply-adds), the same tie-breaking (the first minimum).
`tests/test_kernels.py` checks them bit for bit against that numpy code. Predictive's
value sums its instants in instant order; numpy's order had depended on the arrays'
memory layout (sequential for some shapes, pairwise for others), so a sum can differ
from numpy's in its last bit, and two sessions whose gains tie exactly can be
served in the other order.

numba compiles them on first use (cloudlet/jit.py; the `sim` extra installs it).
Without numba they run as plain Python, which gives the same answers, slowly: fine
for a live orchestrator's few sessions, not for the simulator at scale.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cloudlet.jit import compiled

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@compiled
def find_in_rows(key: NDArray[np.int32], width: int, bits: int, row: IntArray,
                 col: IntArray) -> IntArray:
    """Open addressing, one table of `width` slots per row: the slot holding each
    (row, col), -1 where it is not kept. Linear probing within the row from the
    Fibonacci hash of `col`, stopping at an empty slot (-1)."""
    mask = width - 1
    shift = np.uint64(64 - bits)
    out = np.full(len(row), -1, dtype=np.int64)
    for i in range(len(row)):
        c = col[i]
        h = np.int64((np.uint64(c) * GOLDEN) >> shift)
        base = row[i] * width
        while True:
            k = key[base + h]
            if k == c:
                out[i] = base + h
                break
            if k < 0:
                break
            h = (h + 1) & mask
    return out


@compiled
def find_keys(table: IntArray, bits: int, key: IntArray) -> IntArray:
    """Open addressing over one table of int64 keys: the slot of each key, -1 where
    it is absent."""
    mask = len(table) - 1
    shift = np.uint64(64 - bits)
    out = np.full(len(key), -1, dtype=np.int64)
    for i in range(len(key)):
        k = key[i]
        s = np.int64((np.uint64(k) * GOLDEN) >> shift)
        while True:
            got = table[s]
            if got == k:
                out[i] = s
                break
            if got < 0:
                break
            s = (s + 1) & mask
    return out


@compiled
def pair_values(source: IntArray, target: IntArray, key: NDArray[np.int32], width: int,
                bits: int, far_key: IntArray, far_bits: int, nodes: int,
                field: FloatArray) -> tuple[FloatArray, int, int]:
    """A backhaul field (RTT, bandwidth) of each pair (source[e], target[e]) from
    GraphBackhaul's tables: each source's open-addressing row of `width` slots in
    `key`, then the far pairs' table `far_key` (key source * nodes + target), the
    field by slot, the far table's slots after the rows'. Returns the values (NaN
    where the pair is stored nowhere: the caller computes those), the count found in
    the far table, and the count found nowhere; or -1 twice if a pair is not of two
    cloudlets (rows of the tables).

    Repeated pairs are looked up again: copying them (a third of predictive's
    candidates repeat) made this twice as slow, as the lookups' cache misses no
    longer overlapped."""
    n = len(source)
    out = np.empty(n)
    mask = width - 1
    shift = np.uint64(64 - bits)
    far_mask = len(far_key) - 1
    far_shift = np.uint64(64 - far_bits)
    base_far = len(key)
    rows = len(key) // width
    far_found = 0
    missing = 0
    for e in range(n):
        a = source[e]
        b = target[e]
        if a < 0 or a >= rows or b < 0 or b >= rows:
            return out, -1, -1
        value = np.nan
        found = False
        h = np.int64((np.uint64(b) * GOLDEN) >> shift)
        base = a * width
        while True:
            k = key[base + h]
            if k == b:
                value = field[base + h]
                found = True
                break
            if k < 0:
                break
            h = (h + 1) & mask
        if not found:
            fk = a * nodes + b
            f = np.int64((np.uint64(fk) * GOLDEN) >> far_shift)
            while True:
                got = far_key[f]
                if got == fk:
                    value = field[base_far + f]
                    found = True
                    far_found += 1
                    break
                if got < 0:
                    break
                f = (f + 1) & far_mask
            if not found:
                missing += 1
        out[e] = value
    return out, far_found, missing


@compiled
def changes_along(attach: IntArray, target: IntArray
                  ) -> tuple[IntArray, IntArray, IntArray]:
    """The pairs to look up for each instant's access point (`attach`, (m, S)) and
    each of its session's targets ((m, C)), only where the access point changes:
    (source (q, C), target (q, C), last (m, S): session i's pairs at instant t are
    row last[i, t])."""
    m, s = attach.shape
    n_cand = target.shape[1]
    last = np.empty((m, s), dtype=np.int64)
    q = 0
    for i in range(m):
        for t in range(s):
            if t == 0 or attach[i, t] != attach[i, t - 1]:
                q += 1
            last[i, t] = q - 1
    src = np.empty((q, n_cand), dtype=np.int64)
    dst = np.empty((q, n_cand), dtype=np.int64)
    r = 0
    for i in range(m):
        for t in range(s):
            if t > 0 and attach[i, t] == attach[i, t - 1]:
                continue
            for j in range(n_cand):
                src[r, j] = attach[i, t]
                dst[r, j] = target[i, j]
            r += 1
    return src, dst, last


@compiled
def _sure_d2(px: float, py: float, hx: float, hy: float, sure: float) -> float:
    """The squared distance from (px, py) to a hinted cloudlet at (hx, hy) if the
    position is within its `sure` radius (squared), so that it is the nearest; -1 if
    not."""
    dx = hx - px
    dy = hy - py
    d2 = dx * dx + dy * dy
    return d2 if d2 < sure else -1.0


@compiled
def _search(px: float, py: float, x: FloatArray, y: FloatArray, candidates: IntArray,
            shape0: int, shape1: int, origin_x: float, origin_y: float,
            cell_m: float) -> tuple[int, float]:
    """The nearest cloudlet to (px, py) and the squared distance to it, without a
    hint: the raster cell's candidates, or every cloudlet off the raster."""
    fx = np.floor((px - origin_x) / cell_m)
    fy = np.floor((py - origin_y) / cell_m)
    if 0.0 <= fx <= shape0 - 1 and 0.0 <= fy <= shape1 - 1:
        row = int(fx) * shape1 + int(fy)
        best = candidates[row, 0]
        dx = x[best] - px
        dy = y[best] - py
        best_d2 = dx * dx + dy * dy
        for j in range(1, candidates.shape[1]):
            c = candidates[row, j]
            dx = x[c] - px
            dy = y[c] - py
            d2 = dx * dx + dy * dy
            if d2 < best_d2:
                best, best_d2 = c, d2
        return best, best_d2
    best = 0
    dx = px - x[0]
    dy = py - y[0]
    best_d2 = dx * dx + dy * dy
    for c in range(1, len(x)):
        dx = px - x[c]
        dy = py - y[c]
        d2 = dx * dx + dy * dy
        if d2 < best_d2:
            best, best_d2 = c, d2
    return best, best_d2


@compiled
def nearest(xy: FloatArray, hint: IntArray, x: FloatArray, y: FloatArray,
            sure_d2: FloatArray, candidates: IntArray, shape0: int, shape1: int,
            origin_x: float, origin_y: float, cell_m: float) -> tuple[IntArray, FloatArray]:
    """The nearest cloudlet of each position and the distance to it.

    A hint (-1 for none) answers a position within its `sure_d2`; otherwise the
    position's raster cell lists the cloudlets that can be nearest, and a position
    off the raster is compared with every cloudlet. Ties go to the first candidate
    in the cell's order (the raster orders them by distance, then index), or to the
    lowest index off the raster."""
    m = len(xy)
    index = np.empty(m, dtype=np.int64)
    distance = np.empty(m, dtype=np.float64)
    for i in range(m):
        px = xy[i, 0]
        py = xy[i, 1]
        h = hint[i]
        d2 = _sure_d2(px, py, x[h], y[h], sure_d2[h]) if h >= 0 else -1.0
        if d2 >= 0.0:
            best = h
        else:
            best, d2 = _search(px, py, x, y, candidates, shape0, shape1, origin_x,
                               origin_y, cell_m)
        index[i] = best
        distance[i] = np.sqrt(d2)
    return index, distance


@compiled
def nearest_along(position: FloatArray, velocity: FloatArray, taus: FloatArray,
                  host: IntArray, halving: IntArray, x: FloatArray, y: FloatArray,
                  sure_d2: FloatArray, candidates: IntArray, shape0: int, shape1: int,
                  origin_x: float, origin_y: float, cell_m: float) -> IntArray:
    """The nearest cloudlet at each instant of each session's straight path
    `position + velocity * tau`, (m, S) (`distance_along` gives the distance to it).

    Without `halving` ((0, 3)) every instant is looked up, hinted with the host
    (the first) or the instant before (the rest).
    With it (rows of middle, low end, high end, as policies._halving_order orders
    them), the ends are looked up and then each middle whose interval's ends attach
    to one cloudlet attaches there too: a straight path between two points of a
    convex Voronoi cell stays in it. The answers differ only where a position is
    exactly as far from two cloudlets."""
    m = len(position)
    s = len(taus)
    attach = np.empty((m, s), dtype=np.int64)
    look = np.empty(s, dtype=np.bool_)
    for i in range(m):
        x0, y0 = position[i, 0], position[i, 1]
        vx, vy = velocity[i, 0], velocity[i, 1]
        # Which instants to look up: every one, or the ends and then the halving rows.
        if halving.shape[0] == 0:
            look[:] = True
        else:
            look[:] = False
            look[0] = True
            look[s - 1] = True
        for step in range(s + halving.shape[0]):
            if step < s:
                t = step
                if not look[t]:
                    continue
                # The host hints the first instant, each answer the next instant's.
                h = host[i] if t == 0 else attach[i, t - 1 if halving.shape[0] == 0 else 0]
            else:
                r = step - s
                t, lo, hi = halving[r, 0], halving[r, 1], halving[r, 2]
                if attach[i, lo] == attach[i, hi]:
                    attach[i, t] = attach[i, lo]
                    continue
                h = attach[i, lo]
            px = x0 + vx * taus[t]
            py = y0 + vy * taus[t]
            d2 = _sure_d2(px, py, x[h], y[h], sure_d2[h]) if h >= 0 else -1.0
            if d2 >= 0.0:
                attach[i, t] = h
            else:
                attach[i, t] = _search(px, py, x, y, candidates, shape0, shape1, origin_x,
                                       origin_y, cell_m)[0]
    return attach


@compiled
def distance_along(x0: float, y0: float, vx: float, vy: float, tau: float, ax: float,
                   ay: float) -> float:
    """From the point at `tau` on the path (x0, y0) + (vx, vy) tau to (ax, ay)."""
    dx = ax - (x0 + vx * tau)
    dy = ay - (y0 + vy * tau)
    return float(np.sqrt(dx * dx + dy * dy))


@compiled
def _access_rtt(d: float, radio_ms: float, ms_per_m: float, access_range_m: float,
                out_of_range_ms: float) -> float:
    """LatencyModel.access_rtt_ms at distance `d`, its floats in its order."""
    return (radio_ms + ms_per_m * d) + (out_of_range_ms if d > access_range_m else 0.0)


@compiled
def host_breaks(attach: IntArray, position: FloatArray, velocity: FloatArray, x: FloatArray,
                y: FloatArray, backhaul: FloatArray, last: IntArray,
                queue_host: FloatArray, measured: FloatArray, slope: FloatArray,
                taus: FloatArray, service: FloatArray, budget_less_margin: FloatArray,
                radio_ms: float, ms_per_m: float, access_range_m: float,
                out_of_range_ms: float, screen: bool
                ) -> tuple[IntArray, IntArray, FloatArray, IntArray, NDArray[np.bool_],
                           NDArray[np.bool_]]:
    """Which sessions' hosts break the budget over their paths, and from when.

    A session's latency at its host at each instant: the latency model's access RTT
    (from the distance to its access point `attach`, at x, y, from its path
    `position` + `velocity` tau: `distance_along`), plus the backhaul to the host
    (row last[i, t] of `backhaul`, (q, 1)), plus the host's queueing, corrected where
    measured (`measured`, `slope`: (m,) or (0,) for none) as `_rtt_rows` corrects;
    over budget when that plus the service time exceeds the budget less the margin.
    The float expressions are PredictivePolicy's, in its order (`_access_rtt` the
    latency model's).

    Returns, for the sessions that break it (in order): their rows, their access
    points and access RTTs at each instant, and the first instant over budget; and
    for every session whether it is over budget at the first and last instants, and
    (with `screen`, no measurements) whether it is steady: attached to one cloudlet
    at both ends and within budget at both (PredictivePolicy.decide says why it then
    never breaks it; its instants between are not computed)."""
    m, s = attach.shape
    due = np.empty(m, dtype=np.int64)
    due_attach = np.empty((m, s), dtype=np.int64)
    due_access = np.empty((m, s))
    first = np.empty(m, dtype=np.int64)
    ends = np.zeros((m, 2), dtype=np.bool_)
    steady = np.zeros(m, dtype=np.bool_)
    corrected = measured.shape[0] > 0
    n_due = 0
    for i in range(m):
        q = queue_host[i]
        x0, y0 = position[i, 0], position[i, 1]
        vx, vy = velocity[i, 0], velocity[i, 1]
        if screen and attach[i, 0] == attach[i, s - 1]:
            for e in range(2):
                t = 0 if e == 0 else s - 1
                c = attach[i, t]
                a = _access_rtt(distance_along(x0, y0, vx, vy, taus[t], x[c], y[c]),
                                radio_ms, ms_per_m, access_range_m, out_of_range_ms)
                ends[i, e] = ((a + backhaul[last[i, t], 0]) + q + service[i]
                              > budget_less_margin[i])
            if not ends[i, 0] and not ends[i, 1]:
                steady[i] = True
                continue
        offset = 0.0
        first_t = -1
        for t in range(s):
            c = attach[i, t]
            a = _access_rtt(distance_along(x0, y0, vx, vy, taus[t], x[c], y[c]),
                            radio_ms, ms_per_m, access_range_m, out_of_range_ms)
            due_access[n_due, t] = a
            rtt = (a + backhaul[last[i, t], 0]) + q
            if corrected:
                if t == 0:
                    g = measured[i]
                    offset = 0.0 if np.isnan(g) else g - rtt
                rtt = (rtt + offset) + slope[i] * taus[t]
            over = rtt + service[i] > budget_less_margin[i]
            if over and first_t < 0:
                first_t = t
            if t == 0:
                ends[i, 0] = over
            if t == s - 1:
                ends[i, 1] = over
        if first_t >= 0:
            for t in range(s):
                due_attach[n_due, t] = attach[i, t]
            due[n_due] = i
            first[n_due] = first_t
            n_due += 1
    return (due[:n_due], due_attach[:n_due], due_access[:n_due], first[:n_due], ends,
            steady)


# --- predictive's value of each candidate ---------------------------------------------------
#
# The model's RTT of session i at candidate c and instant t is
#     (access[i, t] + backhaul[last[i, t], c]) + queue[i, c]
# plus, where the session has measurements, an offset that makes instant 0 the
# measured RTT and the measured trend: (rtt + offset) + slope * tau. Sums over
# instants run in instant order.


@compiled
def _rtt_rows(i: int, cols: IntArray, access: FloatArray, backhaul: FloatArray,
              last: IntArray, queue: FloatArray, measured: FloatArray, slope: FloatArray,
              taus: FloatArray, out: FloatArray) -> None:
    """Session i's RTT at each candidate of `cols` over every instant, into the rows
    of `out` (one call per session: a call passing arrays costs ~30 ns)."""
    s = len(taus)
    corrected = measured.shape[0] > 0
    for r in range(len(cols)):
        c = cols[r]
        q = queue[i, c]
        for t in range(s):
            out[r, t] = (access[i, t] + backhaul[last[i, t], c]) + q
        if corrected:
            g = measured[i, c]
            offset = 0.0 if np.isnan(g) else g - out[r, 0]
            sl = slope[i, c]
            for t in range(s):
                out[r, t] = (out[r, t] + offset) + sl * taus[t]


@compiled
def _penalty(latency: float, budget: float, latency_weight: float) -> float:
    """One instant's penalty: 1 over budget, plus `latency_weight` per ms."""
    return (1.0 if latency > budget else 0.0) + latency_weight * latency


@compiled
def predictive_value(access: FloatArray, backhaul: FloatArray, last: IntArray,
                     queue: FloatArray, measured: FloatArray, slope: FloatArray,
                     taus: FloatArray, service: FloatArray, budget: FloatArray,
                     rate: FloatArray, run: IntArray, wait: FloatArray,
                     duration_by_run: FloatArray, downtime_by_run: FloatArray,
                     wire_by_run: FloatArray, full: NDArray[np.bool_], first: FloatArray,
                     latency_weight: float, gib_cost: float, cost_margin: float,
                     min_gain: float, horizon_s: float, lead_s: float
                     ) -> tuple[FloatArray, NDArray[np.bool_], NDArray[np.bool_], FloatArray]:
    """For each session and candidate (column 0 the host): the move's net gain, whether
    it may start, and the RTT it saves on average while it serves; per session,
    whether no candidate meets the budget when it would arrive (over-full).

    What PredictivePolicy's docstring states, per session: a penalty per instant of
    1 over budget plus `latency_weight` per ms; the gain is the penalty saved over
    the instants the target serves (those at or after its arrival); the cost the
    interactions stalled by the downtime plus `gib_cost` per GiB moved.

    A move's price is its run's (`run`, PrecopyModel.estimate_runs): it arrives
    after wait + duration, stalls for the downtime, and sends the wire bytes."""
    m, s = access.shape
    n_cand = queue.shape[1]
    k = s - 1
    dt = horizon_s / k
    gib = float(1 << 30)
    net_gain = np.empty((m, n_cand))
    ok = np.zeros((m, n_cand), dtype=np.bool_)
    over_full = np.zeros(m, dtype=np.bool_)
    saved = np.zeros((m, n_cand))
    rtt = np.empty((n_cand, s))
    pen = np.empty((n_cand, s))
    fine = np.empty(n_cand, dtype=np.bool_)
    arrive = np.empty(n_cand)
    cols = np.arange(n_cand)
    for i in range(m):
        _rtt_rows(i, cols, access, backhaul, last, queue, measured, slope, taus, rtt)
        for c in range(n_cand):
            for t in range(s):
                pen[c, t] = _penalty(rtt[c, t] + service[i], budget[i], latency_weight)
        any_fine = False
        for c in range(n_cand):
            r = run[i, c]
            a = wait[i, c] + duration_by_run[r]
            arrive[c] = a
            from_t = 0  # the first instant at or after the arrival
            while from_t < s and not taus[from_t] >= a:
                from_t += 1
            gain = 0.0
            saved_ms = 0.0
            for t in range(from_t, s):
                gain += pen[0, t] - pen[c, t]
                saved_ms += rtt[0, t] - rtt[c, t]
            gain = (rate[i] * dt) * gain
            cost = rate[i] * downtime_by_run[r] + gib_cost * wire_by_run[r] / gib
            net_gain[i, c] = gain - (1.0 + cost_margin) * cost
            saved[i, c] = saved_ms / max(s - from_t, 1)
            v = np.ceil(a / dt - 1e-9)
            at = k if not v < k else int(v)
            fine[c] = rtt[c, at] + service[i] <= budget[i]
            any_fine = any_fine or fine[c]
        over_full[i] = not any_fine
        for c in range(n_cand):
            a = arrive[c]
            ok[i, c] = (first[i] <= a + lead_s and net_gain[i, c] > min_gain
                        and a <= horizon_s and (fine[c] or not any_fine) and not full[i, c])
    return net_gain, ok, over_full, saved


@compiled
def predictive_keep(rows: IntArray, cols: IntArray, access: FloatArray,
                    backhaul: FloatArray, last: IntArray, queue: FloatArray,
                    measured: FloatArray, slope: FloatArray, taus: FloatArray,
                    service: FloatArray, budget: FloatArray, rate: FloatArray,
                    over_full: NDArray[np.bool_], arrive: FloatArray, downtime: FloatArray,
                    wire: FloatArray, full: NDArray[np.bool_], latency_weight: float,
                    gib_cost: float, cost_margin: float, min_gain: float,
                    horizon_s: float) -> NDArray[np.bool_]:
    """Whether each chosen move (session rows[j] to its column cols[j]) still pays
    and arrives in time at the arrival `arrive[j]` it gets sharing its links: the
    value `predictive_value` computes, for one candidate at another arrival."""
    s = len(taus)
    k = s - 1
    dt = horizon_s / k
    gib = float(1 << 30)
    keep = np.zeros(len(rows), dtype=np.bool_)
    rtt = np.empty((2, s))
    pair = np.zeros(2, dtype=np.int64)
    for j in range(len(rows)):
        i, a = rows[j], arrive[j]
        pair[1] = cols[j]
        _rtt_rows(i, pair, access, backhaul, last, queue, measured, slope, taus, rtt)
        from_t = 0
        while from_t < s and not taus[from_t] >= a:
            from_t += 1
        gain = 0.0
        for t in range(from_t, s):
            gain += (_penalty(rtt[0, t] + service[i], budget[i], latency_weight)
                     - _penalty(rtt[1, t] + service[i], budget[i], latency_weight))
        gain = (rate[i] * dt) * gain
        cost = rate[i] * downtime[j] + gib_cost * wire[j] / gib
        v = np.ceil(a / dt - 1e-9)
        at = k if not v < k else int(v)
        fine = rtt[1, at] + service[i] <= budget[i] or over_full[i]
        keep[j] = (gain - (1.0 + cost_margin) * cost > min_gain and a <= horizon_s
                   and fine and not full[j])
    return keep


@compiled
def runs_of_equal(a: FloatArray, b: FloatArray, c: FloatArray, d: FloatArray,
                  e: FloatArray) -> tuple[IntArray, IntArray]:
    """Runs of consecutive equal tuples (a, b, c, d, e) over five (r, k) arrays of one
    shape (broadcast views welcome: nothing is copied), in row-major order: the flat
    index where each run starts, and each element's run. A placer prices each
    session's candidates side by side, and they mostly share a path bandwidth and a
    workload."""
    rows, cols = a.shape
    run = np.empty(rows * cols, dtype=np.int64)
    starts = np.empty(rows * cols, dtype=np.int64)
    count = 0
    flat = 0
    pa = pb = pc = pd = pe = 0.0
    for i in range(rows):
        for j in range(cols):
            xa, xb, xc, xd, xe = a[i, j], b[i, j], c[i, j], d[i, j], e[i, j]
            if (flat == 0 or xa != pa or xb != pb or xc != pc or xd != pd or xe != pe
                    or _zero_signs(xa, pa, xb, pb, xc, pc, xd, pd, xe, pe)):
                starts[count] = flat
                count += 1
            pa, pb, pc, pd, pe = xa, xb, xc, xd, xe
            run[flat] = count - 1
            flat += 1
    return starts[:count], run


@compiled
def _zero_signs(xa: float, pa: float, xb: float, pb: float, xc: float, pc: float,
                xd: float, pd: float, xe: float, pe: float) -> bool:
    """Whether equal inputs differ in a zero's sign (0.0 == -0.0, but not in every
    result: a run must not join them)."""
    return bool(np.signbit(xa) != np.signbit(pa) or np.signbit(xb) != np.signbit(pb)
                or np.signbit(xc) != np.signbit(pc) or np.signbit(xd) != np.signbit(pd)
                or np.signbit(xe) != np.signbit(pe))


@compiled
def take_runs(run: IntArray, a: FloatArray, b: FloatArray, c: FloatArray, d: FloatArray,
              e: FloatArray, f: IntArray
              ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, IntArray]:
    """Each element's value of six per-run arrays (`run` from runs_of_equal)."""
    n = len(run)
    oa, ob, oc, od, oe = np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    of = np.empty(n, dtype=np.int64)
    for i in range(n):
        r = run[i]
        oa[i], ob[i], oc[i], od[i], oe[i], of[i] = a[r], b[r], c[r], d[r], e[r], f[r]
    return oa, ob, oc, od, oe, of


# --- moves that start together ---------------------------------------------------------------


@compiled
def ties_by_index(order: IntArray, keys: FloatArray) -> None:
    """Make `order` (an argsort of `keys` by an unstable sort) stable: within each run
    of equal keys (NaN equal to NaN), indices ascending. numpy's stable sort of
    floats is five times slower than its quicksort, and equal keys are few."""
    n = len(order)
    start = 0
    while start < n:
        end = start + 1
        ks = keys[order[start]]
        while end < n:
            ke = keys[order[end]]
            if not (ke == ks or (np.isnan(ke) and np.isnan(ks))):
                break
            end += 1
        if end - start > 32:
            order[start:end] = np.sort(order[start:end])
        else:
            for j in range(start + 1, end):  # insertion sort: runs are short
                x = order[j]
                k = j - 1
                while k >= start and order[k] > x:
                    order[k + 1] = order[k]
                    k -= 1
                order[k + 1] = x
        start = end


@compiled
def ahead_counts(order: IntArray, links: IntArray) -> IntArray:
    """For each move (row of `links`, its path's link ids, -1 past the end) and each
    link of its path, how many moves before it in `order` cross that link too.

    One pass in that order with a counter per link, the counters in an open-addressing
    table keyed by link id (ids are sparse: a pair's own link is source * n + target)."""
    m, p = links.shape
    out = np.zeros((m, p), dtype=np.int64)
    size = 16
    while size < 2 * m * p:
        size *= 2
    bits = 0
    while (1 << bits) < size:
        bits += 1
    mask = size - 1
    shift = np.uint64(64 - bits)
    table = np.full(size, -1, dtype=np.int64)
    count = np.zeros(size, dtype=np.int64)
    for r in range(m):
        i = order[r]
        for c in range(p):
            link = links[i, c]
            if link < 0:
                continue
            h = np.int64((np.uint64(link) * GOLDEN) >> shift)
            while table[h] != link and table[h] >= 0:
                h = (h + 1) & mask
            table[h] = link
            out[i, c] = count[h]
            count[h] += 1
    return out


@compiled
def _less(a: float, b: float) -> bool:
    """numpy's sort order: NaN after everything, inf included."""
    return a < b or (np.isnan(b) and not np.isnan(a))


@compiled
def assign_greedy(cand: IntArray, score: FloatArray, ok: NDArray[np.bool_], host: IntArray,
                  by_priority: IntArray, memory: FloatArray, free_vms: FloatArray,
                  free_mem: FloatArray) -> tuple[IntArray, IntArray]:
    """policies._assign's rounds (its docstring states the rule): each row's
    candidates ranked by `score` where `ok` and not its `host` (stable: ties by
    column; the others after them, as +inf), then round r proposes each pending row's
    r-th if acceptable, rounds ending at the first with no proposal; within a round
    each cloudlet grants its proposals in `by_priority` order while the count and the
    memory granted so far fit what it had free at the round's start. `free_vms` and
    `free_mem` are updated. Returns (target, column) per row, -1 where none.

    The memory granted so far is computed as numpy computed it, float for float (one
    running sum over the round's proposals ordered by target, less its value where
    the target's group starts), so fractional and NaN byte counts decide as before."""
    a, c = cand.shape
    order = np.empty((a, c), dtype=np.int64)
    fits = np.empty((a, c), dtype=np.bool_)
    masked = np.empty(c)
    for i in range(a):
        for j in range(c):
            order[i, j] = j
            fits[i, j] = ok[i, j] and cand[i, j] != host[i]
            masked[j] = score[i, j] if fits[i, j] else np.inf
        for j in range(1, c):  # insertion sort, stable
            x = order[i, j]
            v = masked[x]
            k = j - 1
            while k >= 0 and _less(v, masked[order[i, k]]):
                order[i, k + 1] = order[i, k]
                k -= 1
            order[i, k + 1] = x
    target = np.full(a, -1, dtype=np.int64)
    column = np.full(a, -1, dtype=np.int64)
    # The rows still pending that can propose at all, in priority order.
    pend = np.empty(a, dtype=np.int64)
    n_pend = 0
    for r in range(a):
        i = by_priority[r]
        for j in range(c):
            if fits[i, j]:
                pend[n_pend] = i
                n_pend += 1
                break
    n = len(free_vms)
    count = np.zeros(n, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    touched = np.empty(a, dtype=np.int64)
    prop_row = np.empty(a, dtype=np.int64)
    prop_t = np.empty(a, dtype=np.int64)
    by_target = np.empty(a, dtype=np.int64)
    granted = np.zeros(a, dtype=np.bool_)
    for rank in range(c):
        # This round's proposals, in priority order.
        n_prop = 0
        n_touched = 0
        for r in range(n_pend):
            i = pend[r]
            col = order[i, rank]
            if not fits[i, col]:
                continue
            t = cand[i, col]
            prop_row[n_prop] = i
            prop_t[n_prop] = t
            n_prop += 1
            if count[t] == 0:
                touched[n_touched] = t
                n_touched += 1
            count[t] += 1
        if n_prop == 0:
            break
        # By target, then priority (a stable counting sort), as numpy's lexsort had
        # them; one running sum of memory over them all, each proposal's share of its
        # target taken as the difference from its group's start: numpy's floats.
        targets = np.sort(touched[:n_touched])
        at = 0
        for j in range(n_touched):
            offset[targets[j]] = at
            at += count[targets[j]]
        for p in range(n_prop):
            t = prop_t[p]
            by_target[offset[t]] = p
            offset[t] += 1
        total = 0.0
        base = 0.0
        start = 0
        for q in range(n_prop):
            p = by_target[q]
            i = prop_row[p]
            t = prop_t[p]
            total += memory[i]
            if q == 0 or t != prop_t[by_target[q - 1]]:
                start = q
                base = total - memory[i]
            granted[q] = (q - start + 1 <= free_vms[t]) and (total - base <= free_mem[t])
        for q in range(n_prop):
            p = by_target[q]
            t = prop_t[p]
            if granted[q]:
                i = prop_row[p]
                target[i] = t
                column[i] = order[i, rank]
                free_vms[t] -= 1.0
                free_mem[t] -= memory[i]
        for j in range(n_touched):
            count[touched[j]] = 0
        kept = 0
        for r in range(n_pend):
            i = pend[r]
            if target[i] < 0:
                pend[kept] = i
                kept += 1
        n_pend = kept
    return target, column


# --- the backhaul's kept pairs ----------------------------------------------------------------


@compiled
def _before(d_a: float, node_a: int, d_b: float, node_b: int) -> bool:
    """Heap order: distance, then node index (so equal distances settle by index)."""
    return d_a < d_b or (d_a == d_b and node_a < node_b)


@compiled
def nearest_settled(indptr: IntArray, indices: IntArray,
                    weights: FloatArray, sources: IntArray, cloudlets: int, keep: int
                    ) -> tuple[IntArray, IntArray, FloatArray, IntArray, FloatArray]:
    """Dijkstra from each source over a CSR graph, stopped once `keep` cloudlets
    (nodes below `cloudlets`, the source included) are settled and every node as near
    as the last of them is: per source, every node within that radius, with its
    distance and predecessor (-1 for the source), and the radius (inf where fewer
    than `keep` cloudlets are reachable: then every reachable node).

    Its work per source grows with the nodes within the radius, not with the graph:
    scipy's dijkstra fills a row of every node per source (n^2 at n sources)."""
    n = len(indptr) - 1
    dist = np.full(n, np.inf)
    pred = np.full(n, -1, dtype=np.int64)
    done = np.zeros(n, dtype=np.bool_)
    touched = np.empty(n, dtype=np.int64)
    cap = max(len(indices) + 1, 16)
    heap_d = np.empty(cap)
    heap_n = np.empty(cap, dtype=np.int64)
    out_row = np.empty(len(sources) * 2 * keep + 16, dtype=np.int64)
    out_col = np.empty_like(out_row)
    out_d = np.empty(len(out_row))
    out_p = np.empty_like(out_row)
    radius = np.empty(len(sources))
    count = 0
    for r in range(len(sources)):
        src = sources[r]
        n_touched = 0
        dist[src] = 0.0
        touched[n_touched] = src
        n_touched += 1
        heap_d[0] = 0.0
        heap_n[0] = src
        size = 1
        found = 0
        kth = np.inf
        while size > 0:
            d_u, u = heap_d[0], heap_n[0]
            if d_u > kth:
                break
            # Pop the top: the last element sifts down from the root.
            size -= 1
            if size > 0:
                heap_d[0], heap_n[0] = heap_d[size], heap_n[size]
                i = 0
                while True:
                    lo = 2 * i + 1
                    if lo >= size:
                        break
                    best = lo
                    if lo + 1 < size and _before(heap_d[lo + 1], heap_n[lo + 1],
                                                 heap_d[lo], heap_n[lo]):
                        best = lo + 1
                    if _before(heap_d[best], heap_n[best], heap_d[i], heap_n[i]):
                        heap_d[i], heap_d[best] = heap_d[best], heap_d[i]
                        heap_n[i], heap_n[best] = heap_n[best], heap_n[i]
                        i = best
                    else:
                        break
            if done[u] or d_u > dist[u]:
                continue  # a stale entry
            done[u] = True
            if count == len(out_row):
                grown = 2 * len(out_row)
                out_row = _grown_int(out_row, grown)
                out_col = _grown_int(out_col, grown)
                out_p = _grown_int(out_p, grown)
                more_d = np.empty(grown)
                more_d[:count] = out_d[:count]
                out_d = more_d
            out_row[count] = r
            out_col[count] = u
            out_d[count] = d_u
            out_p[count] = pred[u]
            count += 1
            if u < cloudlets:
                found += 1
                if found == keep:
                    kth = d_u
            for e in range(indptr[u], indptr[u + 1]):
                v = indices[e]
                nd = d_u + weights[e]
                if nd < dist[v]:
                    if dist[v] == np.inf:
                        touched[n_touched] = v
                        n_touched += 1
                    dist[v] = nd
                    pred[v] = u
                    if size == len(heap_d):
                        more_hd = np.empty(2 * size)
                        more_hd[:size] = heap_d
                        heap_d = more_hd
                        heap_n = _grown_int(heap_n, 2 * size)
                    # Push: sift up from the end.
                    i = size
                    heap_d[i], heap_n[i] = nd, v
                    size += 1
                    while i > 0:
                        up = (i - 1) // 2
                        if _before(heap_d[i], heap_n[i], heap_d[up], heap_n[up]):
                            heap_d[i], heap_d[up] = heap_d[up], heap_d[i]
                            heap_n[i], heap_n[up] = heap_n[up], heap_n[i]
                            i = up
                        else:
                            break
        radius[r] = kth
        for j in range(n_touched):
            t = touched[j]
            dist[t] = np.inf
            pred[t] = -1
            done[t] = False
    return out_row[:count], out_col[:count], out_d[:count], out_p[:count], radius


@compiled
def _grown_int(a: IntArray, size: int) -> IntArray:
    out = np.empty(size, dtype=np.int64)
    out[:len(a)] = a
    return out
