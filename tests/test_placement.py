"""The placer: latency and cost models, and each policy on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from cloudlet.errors import InvalidArgument
from cloudlet.placement import (
    AccessIndex,
    ClusterState,
    GraphBackhaul,
    LatencyModel,
    Move,
    NearestPolicy,
    Network,
    NeverPolicy,
    PrecopyModel,
    PredictivePolicy,
    Sessions,
    ThresholdPolicy,
    make_policy,
)

MiB = float(1 << 20)
GiB = float(1 << 30)

# --- cost model -------------------------------------------------------------------


def _iterate(model: PrecopyModel, overlay: float, memory: float, dirty: float,
             bw_mbit_s: float) -> tuple[float, float, float, int]:
    """Pre-copy round by round, the way the simulator runs it."""
    rate = bw_mbit_s * 1e6 / 8
    r = model.wire_ratio
    v = overlay
    sent = 0.0
    precopy_s = 0.0
    rounds = 0
    while True:
        t = v * r / rate
        sent += v * r
        precopy_s += t
        rounds += 1
        nxt, stop = model.next_round(np.array([v]), np.array([t]), np.array([memory]),
                                     np.array([dirty]), np.array([rounds]))
        v = float(nxt[0])
        if stop[0]:
            break
    downtime = v * r / rate + model.resume_s
    return sent + v * r, precopy_s, downtime, rounds


@pytest.mark.parametrize(("overlay_mib", "dirty_mib_s", "bw"), [
    (128, 8, 1000), (512, 40, 400), (64, 0, 100), (0, 10, 1000), (256, 200, 1000),
    (256, 119, 1000), (1024, 1, 10_000),
])
def test_cost_closed_form_matches_the_rounds(overlay_mib: float, dirty_mib_s: float,
                                             bw: float) -> None:
    model = PrecopyModel(wire_ratio=0.8)
    est = model.estimate(overlay_mib * MiB, 1024 * MiB, dirty_mib_s * MiB, bw)
    wire, pre, down, rounds = _iterate(model, overlay_mib * MiB, 1024 * MiB,
                                       dirty_mib_s * MiB, bw)
    assert float(est.wire_bytes) == pytest.approx(wire, rel=1e-6, abs=1)
    assert float(est.precopy_s) == pytest.approx(pre, rel=1e-6, abs=1e-9)
    assert float(est.downtime_s) == pytest.approx(down, rel=1e-6)
    assert int(est.rounds) == rounds
    assert float(est.duration_s) == pytest.approx(pre + down, rel=1e-9)


def test_cost_is_pre_copy_shaped() -> None:
    model = PrecopyModel()
    # Converging: bytes slightly above the overlay, downtime below 1 MiB's worth.
    est = model.estimate(128 * MiB, 512 * MiB, 8 * MiB, 1000.0)
    assert 128 * MiB < float(est.wire_bytes) < 140 * MiB
    assert float(est.downtime_s) <= 1 * MiB * 8 / 1e9 + model.resume_s + 1e-9
    # Dirtying faster than the link: one pre-copy round, then a big stop-and-copy.
    est = model.estimate(128 * MiB, 512 * MiB, 200 * MiB, 1000.0)
    assert int(est.rounds) == 1
    assert float(est.downtime_s) > 0.9
    # More bandwidth, less time; more dirtying, more bytes.
    a = model.estimate(256 * MiB, 1 * GiB, np.array([1.0, 30.0]) * MiB,
                       np.array([[100.0], [1000.0]]))
    assert (a.duration_s[0] > a.duration_s[1]).all()
    assert (a.wire_bytes[:, 0] < a.wire_bytes[:, 1]).all()
    with pytest.raises(InvalidArgument):
        PrecopyModel(max_rounds=0)


# --- latency model ----------------------------------------------------------------


def test_latency_model_adds_its_parts() -> None:
    lm = LatencyModel(radio_rtt_ms=5, propagation_rtt_ms_per_km=0.01, access_range_m=500,
                      out_of_range_rtt_ms=40, service_ms=2, max_utilisation=0.9)
    assert lm.access_rtt_ms(np.array([0.0, 400.0, 600.0])).tolist() == pytest.approx(
        [5.0, 5.004, 45.006])
    assert lm.queue_ms(np.array([0.0, 0.5, 0.99])).tolist() == pytest.approx([0, 2, 18])
    with pytest.raises(InvalidArgument):
        LatencyModel(max_utilisation=1.0)


def test_shortest_rtt_and_next_hop() -> None:
    # 0 - 1 - 2 in a line, plus a slow direct 0 - 2.
    bh = GraphBackhaul(3, 3, np.array([0, 1, 0]), np.array([1, 2, 2]),
                       np.array([2.0, 3.0, 9.0]), np.full(3, 100.0))
    idx = np.arange(3)
    rtt = bh.rtt_ms(idx[:, None], idx[None, :])
    assert rtt[0, 2] == 5.0 and rtt[2, 0] == 5.0
    # The first hop: link 0 (0 -> 1) from 0, link 1 reversed (2 -> 1) from 2.
    assert bh.path(np.array(0), np.array(2)).tolist() == [0, 2]
    assert bh.path(np.array(2), np.array(0)).tolist() == [3, 1]
    assert np.diag(rtt).tolist() == [0, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_access_index_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 5000, (int(rng.integers(1, 200)), 2))
    index = AccessIndex(pos, extent_m=(0, 0, 5000, 5000))
    pts = rng.uniform(-3000, 8000, (5000, 2))  # inside, near and far outside the area
    got, dist = index.nearest(pts)
    d = np.hypot(*(pts[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    assert np.allclose(dist, d.min(axis=1))
    assert np.allclose(d[np.arange(len(pts)), got], d.min(axis=1))


# --- hand-made cases ----------------------------------------------------------------

BUDGET_MS = 20.0
SERVICE_MS = 5.0


def line_network(n: int = 2, spacing_m: float = 2000.0, capacity_vms: int = 10,
                 link_rtt_ms: float = 10.0, bandwidth_mbit_s: float = 1000.0) -> Network:
    """Cloudlets on a line, `spacing_m` apart, each linked to the next."""
    pos = np.column_stack([np.arange(n) * spacing_m, np.zeros(n)])
    idx = np.arange(n)
    rtt = np.abs(idx[:, None] - idx[None, :]) * link_rtt_ms
    return Network.build(
        pos, np.full(n, capacity_vms), np.full(n, 64 * GiB), rtt,
        np.full((n, n), bandwidth_mbit_s),
        latency=LatencyModel(radio_rtt_ms=8, access_range_m=1500, service_ms=0.0),
        extent_m=(-1000, -1000, n * spacing_m, 1000))


def state(net: Network, x_m: list[float], host: list[int], vx_m_s: list[float] | None = None,
          t_s: float = 100.0, last_move_s: list[float] | None = None,
          vms: list[int] | None = None, overlay_mib: float = 128.0) -> ClusterState:
    m = len(x_m)
    hosts = np.array(host, dtype=np.int64)
    used = np.bincount(hosts, minlength=net.size) if vms is None else np.array(vms)
    return ClusterState(
        time_s=t_s, network=net, vms=used.astype(np.int64),
        memory_used_bytes=used * 512 * MiB,
        sessions=Sessions(
            host=hosts, position_m=np.column_stack([x_m, np.zeros(m)]),
            velocity_m_s=np.column_stack([vx_m_s or [0.0] * m, np.zeros(m)]),
            memory_bytes=np.full(m, 512 * MiB), overlay_bytes=np.full(m, overlay_mib * MiB),
            dirty_rate_bytes_s=np.full(m, 4 * MiB), budget_ms=np.full(m, BUDGET_MS),
            service_ms=np.full(m, SERVICE_MS), interaction_rate_hz=np.full(m, 5.0),
            last_move_s=np.array(last_move_s or [-np.inf] * m),
            previous_host=np.full(m, -1), movable=np.ones(m, dtype=bool)))


POLICIES = [NeverPolicy(), NearestPolicy(), ThresholdPolicy(margin_ms=0),
            PredictivePolicy(margin_ms=0)]


def first_move_x(policy: object, net: Network, speed_m_s: float = 10.0) -> float | None:
    """A user walks from cloudlet 0 towards cloudlet 1; where does the policy move it?"""
    assert hasattr(policy, "decide")
    for x in np.arange(0.0, 2000.0, speed_m_s):
        moves = policy.decide(state(net, [float(x)], [0], [speed_m_s]))
        if len(moves):
            assert moves.target[0] == 1
            return float(x)
    return None


def test_crossing_between_two_cloudlets() -> None:
    net = line_network()
    # Attached to cloudlet 1 past x = 1000 m (a tie goes to the lower index), where
    # the host's RTT becomes 8 + 10 = 18 ms + 5 ms service: over the 20 ms budget.
    assert first_move_x(NeverPolicy(), net) is None
    assert first_move_x(NearestPolicy(), net) == 1010.0
    assert first_move_x(ThresholdPolicy(margin_ms=0), net) == 1010.0
    # Predictive moves before the border, early enough for the migration
    # (~1.1 s here) plus its lead to finish before the budget breaks.
    x = first_move_x(PredictivePolicy(margin_ms=0), net)
    assert x is not None and 900.0 <= x < 1000.0
    est = net.cost.estimate(128 * MiB, 512 * MiB, 4 * MiB, 1000.0)
    assert (1010.0 - x) / 10.0 >= float(est.duration_s)  # done before the budget breaks


def test_threshold_waits_for_a_broken_budget_and_hysteresis() -> None:
    net = line_network(link_rtt_ms=4.0)  # neighbour: 8 + 4 + 5 = 17 ms, within budget
    assert len(ThresholdPolicy(margin_ms=0).decide(state(net, [1900.0], [0]))) == 0
    assert len(NearestPolicy().decide(state(net, [1900.0], [0]))) == 1
    # Over budget but the gain is under the hysteresis: stay.
    net = line_network(link_rtt_ms=8.0)
    assert len(ThresholdPolicy(margin_ms=0, hysteresis_ms=9).decide(
        state(net, [1900.0], [0]))) == 0
    assert len(ThresholdPolicy(margin_ms=0, hysteresis_ms=7).decide(
        state(net, [1900.0], [0]))) == 1


def test_cooldown_holds_a_session_that_just_moved() -> None:
    net = line_network()
    for policy in (ThresholdPolicy(cooldown_s=30), PredictivePolicy(cooldown_s=30)):
        assert len(policy.decide(state(net, [1900.0], [0], last_move_s=[80.0]))) == 0
        assert len(policy.decide(state(net, [1900.0], [0], last_move_s=[60.0]))) == 1


def test_a_full_cloudlet_takes_no_one() -> None:
    net = line_network(n=3, capacity_vms=2)
    # Three users now at cloudlet 1, hosted at 0; cloudlet 1 has room for one more.
    st = state(net, [2000.0, 2010.0, 2020.0], [0, 0, 0], vms=[2, 1, 0])
    for policy in POLICIES[1:]:
        moves = policy.decide(st)
        got = np.bincount(moves.target, minlength=3)
        assert got[1] == 1, policy.name  # the free slot, once
        # The others go to the next best with room (cloudlet 2: 8 + 10 = 18 ms vs
        # 28 ms at home) or stay; never over capacity.
        assert (st.vms + got <= net.capacity_vms).all()
    # Nothing free anywhere: nobody moves.
    full = state(net, [2000.0], [0], vms=[2, 2, 2])
    for policy in POLICIES:
        assert len(policy.decide(full)) == 0


def test_the_ping_pong_trap() -> None:
    """A user lingers on the border, a few metres either side: both cloudlets are
    within budget, so only follow-me keeps moving the VM back and forth."""
    net = line_network(link_rtt_ms=4.0)
    moves = {p.name: 0 for p in POLICIES}
    for p in POLICIES:
        host = 0
        last = -np.inf
        for step in range(60):
            x = 1000.0 + (15.0 if step % 2 else -15.0)
            vx = 30.0 if step % 2 == 0 else -30.0  # jitter looks like motion
            out = p.decide(state(net, [x], [host], [vx], t_s=float(step), last_move_s=[last]))
            if len(out):
                host = int(out.target[0])
                last = float(step)
                moves[p.name] += 1
    assert moves["nearest"] >= 50
    assert moves["never"] == moves["threshold"] == moves["predictive"] == 0


def test_moves_carry_gain_and_cost_and_are_deterministic() -> None:
    net = line_network(n=4)
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 6000, 200).tolist()
    host = rng.integers(0, 4, 200).tolist()
    vx = rng.normal(0, 10, 200).tolist()
    st = state(net, x, host, vx, vms=[0, 0, 0, 0])
    net2 = Network.build(net.position_m, np.full(4, 1000), net.capacity_memory_bytes,
                         net.backhaul,
                         latency=net.latency, extent_m=(-1000, -1000, 8000, 1000))
    st = state(net2, x, host, vx, vms=[0, 0, 0, 0])
    for p in POLICIES[1:]:
        a = p.decide(st)
        b = p.decide(st)
        assert len(a) > 0
        for field in ("session", "target", "expected_gain_ms", "wire_bytes"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        plan = p.plan(st)
        assert all(isinstance(m, Move) for m in plan)
        assert all(m.source != m.target and m.cost.duration_s > m.cost.downtime_s > 0
                   for m in plan)
        assert all(m.expected_gain_ms > 0 for m in plan)


def test_measured_rtts_override_the_model() -> None:
    net = line_network()
    st = state(net, [500.0], [0])
    measured = np.array([[40.0, 9.0]])  # the host is congested, whatever the model says
    s = st.sessions
    st2 = ClusterState(time_s=st.time_s, network=net, vms=st.vms,
                       memory_used_bytes=st.memory_used_bytes,
                       sessions=Sessions(**{**s.__dict__, "rtt_ms": measured}))
    assert len(ThresholdPolicy().decide(st)) == 0
    moves = ThresholdPolicy().decide(st2)
    assert moves.target.tolist() == [1]
    assert moves.expected_gain_ms[0] == pytest.approx(31.0)


def test_make_policy_checks_names_and_parameters() -> None:
    assert make_policy("threshold", hysteresis_ms=5).hysteresis_ms == 5  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        make_policy("teleport")
    with pytest.raises(InvalidArgument):
        make_policy("nearest", horizon_s=3)
    with pytest.raises(InvalidArgument):
        PredictivePolicy(samples=0)


def _metro(sessions: int, side: int, away: float, speed_m_s: float,
           seed: int) -> ClusterState:
    """`side` x `side` cloudlets 1 km apart on a grid backhaul, sessions spread over
    them and moving, a fraction `away` hosted at a random cloudlet."""
    rng = np.random.default_rng(seed)
    n = side * side
    xs = (np.arange(side) + 0.5) * 1000.0
    pos = np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    idx = np.arange(n)
    right, down = idx[(idx % side) + 1 < side], idx[idx + side < n]
    a, b = np.concatenate([right, down]), np.concatenate([right + 1, down + side])
    backhaul = GraphBackhaul(n, n, a, b, np.full(len(a), 5.0), np.full(len(a), 1000.0),
                             dense_max=0)
    net = Network.build(pos, np.full(n, 40), np.full(n, 64 * GiB), backhaul,
                        latency=LatencyModel(access_range_m=800),
                        extent_m=(0.0, 0.0, side * 1000.0, side * 1000.0))
    users = rng.uniform(0, side * 1000.0, (sessions, 2))
    host, _ = net.index.nearest(users)
    moved = rng.random(sessions) < away
    host[moved] = rng.integers(0, n, int(moved.sum()))
    vms = np.bincount(host, minlength=n)
    return ClusterState(
        time_s=1000.0, network=net, vms=vms, memory_used_bytes=vms * 512 * MiB,
        sessions=Sessions(
            host=host, position_m=users, velocity_m_s=rng.normal(0, speed_m_s, (sessions, 2)),
            memory_bytes=np.full(sessions, 512 * MiB),
            overlay_bytes=rng.choice([64.0, 128.0], sessions) * MiB,
            dirty_rate_bytes_s=np.full(sessions, 6 * MiB), budget_ms=np.full(sessions, 25.0),
            service_ms=np.full(sessions, 5.0), interaction_rate_hz=np.full(sessions, 5.0),
            last_move_s=np.full(sessions, -np.inf), previous_host=np.full(sessions, -1),
            movable=np.ones(sessions, dtype=bool)))


@pytest.mark.parametrize(("sessions", "away", "speed"), [(14_000, 1 / 3, 8.0),
                                                          (6000, 0.02, 3.0)])
def test_predictive_screens_in_one_pass_what_it_screened_in_two(
        monkeypatch: pytest.MonkeyPatch, sessions: int, away: float, speed: float) -> None:
    """Many sessions are screened for steady ones and followed over the horizon in
    one pass; the moves are exactly those of the two passes (the screen, then the
    unsettled). With few unsettled the second pass looks every instant up, as
    before: the second case takes that branch."""
    from cloudlet.placement import policies

    st = _metro(sessions, 20, away, speed, seed=7)
    policy = make_policy("predictive")
    passes: list[tuple[int, bool]] = []
    at_host = policies.PredictivePolicy._at_host  # noqa: SLF001 - spied on

    def spy(self, state, queue, taus, rows, halving, screen=False):  # type: ignore[no-untyped-def]
        passes.append((len(taus), halving))
        return at_host(self, state, queue, taus, rows, halving, screen)

    monkeypatch.setattr(policies.PredictivePolicy, "_at_host", spy)
    one = policy.decide(st)
    # One pass with halving, then (few unsettled) every instant of those looked up.
    assert passes == ([(16, True)] if away > 0.1 else [(16, True), (16, False)])
    monkeypatch.setattr(policies, "ONE_PASS_MIN_ROWS", 10**9)
    two = policy.decide(st)
    assert len(one.session) > 10
    for field in ("session", "source", "target", "expected_gain_ms", "score", "wire_bytes",
                  "duration_s", "downtime_s", "rounds"):
        assert np.array_equal(getattr(one, field), getattr(two, field)), field
