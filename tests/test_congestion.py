"""Migrations share the backhaul: pricing, admission control, and a burst of handoffs
across one border over a thin link (cloudlet.placement.congestion)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cloudlet.placement import ClusterState, InFlight, Links, PredictivePolicy, ThresholdPolicy
from cloudlet.placement.congestion import LinkBudget, Pricing, admit, ahead_of, busy, price
from cloudlet.sim.engine import TIMELINE_COLUMNS, simulate
from cloudlet.sim.scenario import load_scenario
from tests.test_placement import MiB, line_network, state

ACTIVE = TIMELINE_COLUMNS.index("migrations_active")


def _busy_state(moves_in_flight: int, x_m: list[float] | None = None) -> ClusterState:
    net = line_network()
    x = x_m or [1900.0]
    st = state(net, x, [0] * len(x), [10.0] * len(x))
    src = np.zeros(moves_in_flight, dtype=np.int64)
    return replace(st, in_flight=InFlight(src, np.ones(moves_in_flight, dtype=np.int64)))


def _price(st: ClusterState, budget: LinkBudget) -> Pricing:
    return price(st, budget, np.array([0]), np.array([1]), np.array([128.0 * MiB]),
                 np.array([512.0 * MiB]), np.array([4.0 * MiB]))


def test_a_move_on_a_busy_link_costs_more_and_waits_when_it_is_full() -> None:
    alone = _price(_busy_state(0), LinkBudget(2))
    shared = _price(_busy_state(1), LinkBudget(2))
    full = _price(_busy_state(3), LinkBudget(2))
    assert float(shared.bandwidth_mbit_s[0]) == 500.0  # half of the 1000 Mbit/s link
    assert float(shared.estimate.duration_s[0]) > 1.9 * float(alone.estimate.duration_s[0])
    assert not alone.full[0] and not shared.full[0] and float(shared.wait_s[0]) == 0.0
    assert full.full[0] and float(full.wait_s[0]) > 0.0
    assert float(full.start_to_end_s[0]) > float(shared.start_to_end_s[0])
    # The other direction is another link: nothing in flight there.
    back = price(_busy_state(3), LinkBudget(2), np.array([1]), np.array([0]),
                 np.array([128.0 * MiB]), np.array([512.0 * MiB]), np.array([4.0 * MiB]))
    assert not back.full[0] and float(back.bandwidth_mbit_s[0]) == 1000.0


def test_links_are_shared_along_a_path() -> None:
    # Three cloudlets on a line: 0 -> 2 crosses links 0 (0->1) and 2 (1->2).
    net = line_network(3)
    links = Links(bandwidth_mbit_s=np.array([1000.0, 1000.0, 100.0, 100.0]),
                  path=np.array([[[-1, -1], [0, -1], [0, 2]],
                                 [[1, -1], [-1, -1], [2, -1]],
                                 [[3, 1], [3, -1], [-1, -1]]]))
    st = replace(state(net, [0.0], [0]), links=links,
                 in_flight=InFlight(np.array([1]), np.array([2])))
    assert busy(st, st.path_links(np.array([0]), np.array([2]))).tolist() == [[0, 1]]
    got = price(st, LinkBudget(2), np.array([0, 0]), np.array([1, 2]),
                np.full(2, 128.0 * MiB), np.full(2, 512.0 * MiB), np.full(2, 4.0 * MiB))
    # 0 -> 1 alone on its 1000 Mbit/s link; 0 -> 2 shares the 100 Mbit/s link 1 -> 2.
    assert got.bandwidth_mbit_s.tolist() == [1000.0, 50.0]


def test_admission_keeps_each_link_within_its_budget_in_priority_order() -> None:
    st = _busy_state(1)
    src = np.zeros(5, dtype=np.int64)
    dst = np.array([1, 1, 1, 1, 1])
    priority = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    ok = admit(st, LinkBudget(3), src, dst, priority)
    assert ok.tolist() == [False, True, False, True, False]  # 1 in flight + the best 2
    assert admit(st, LinkBudget(0), src, dst, priority).all()  # no limit
    # The other direction has its own budget.
    both = admit(st, LinkBudget(2), np.array([0, 1, 1, 1]), np.array([1, 0, 0, 0]),
                 np.ones(4))
    assert both.tolist() == [True, True, True, False]


def test_predictive_defers_a_move_while_its_link_is_full() -> None:
    policy = PredictivePolicy(margin_ms=0)
    # Past the border, over budget at the host: due now.
    assert len(policy.decide(_busy_state(0))) == 1
    assert len(policy.decide(_busy_state(1))) == 1  # room for a second
    assert len(policy.decide(_busy_state(2))) == 0  # full: wait a round
    assert len(ThresholdPolicy(margin_ms=0).decide(_busy_state(2))) == 0
    assert len(PredictivePolicy(margin_ms=0, max_link_migrations=0).decide(_busy_state(2))) == 1
    # Ten sessions due at once: two start, the most valuable first.
    many = _busy_state(0, [1900.0 + i for i in range(10)])
    assert len(policy.decide(many)) == 2
    assert len(ThresholdPolicy(margin_ms=0).decide(many)) == 2


def test_moves_that_start_in_one_round_share_their_link() -> None:
    """Two sessions due at once across one 100 Mbit/s link: alone, a move takes
    ~16 s; two at once get half the link each and the second would arrive too
    late to pay, so only one starts. Over a wider link both start, the second
    priced at its half."""
    policy = PredictivePolicy(margin_ms=0, horizon_s=30.0)
    thin = line_network(bandwidth_mbit_s=100.0)
    assert len(policy.decide(state(thin, [1900.0], [0], [10.0], overlay_mib=128.0))) == 1
    two = state(thin, [1900.0, 1901.0], [0, 0], [10.0, 10.0], overlay_mib=128.0)
    assert len(policy.decide(two)) == 1
    wide = line_network(bandwidth_mbit_s=150.0)
    both = policy.decide(state(wide, [1900.0, 1901.0], [0, 0], [10.0, 10.0], overlay_mib=128.0))
    assert len(both) == 2
    first, second = sorted(both.duration_s)
    assert second > 2 * first  # half the rate, and pre-copy converges slower


def test_ahead_counts_the_rounds_higher_priority_moves_on_each_link() -> None:
    st = _busy_state(0, [1900.0, 1901.0, 1902.0])
    src = np.array([0, 0, 1])
    dst = np.array([1, 1, 0])
    # Each ordered pair is its own link here: the two 0 -> 1 moves share one.
    got = ahead_of(st, src, dst, np.array([1.0, 5.0, 3.0]))
    assert got[:, 0].tolist() == [1, 0, 0]


def test_a_move_that_cannot_end_before_the_user_leaves_does_not_start() -> None:
    policy = PredictivePolicy(margin_ms=0, horizon_s=30.0)
    st = _busy_state(0)
    # A huge overlay over a thin link: the VM would arrive after the horizon.
    net = line_network(bandwidth_mbit_s=20.0)
    slow = state(net, [1900.0], [0], [10.0], overlay_mib=500.0)
    assert len(policy.decide(st)) == 1
    assert len(policy.decide(slow)) == 0


BURST = """
[scenario]
name = "burst"
seed = 1
step_s = 1.0
policies = ["never", "threshold", "predictive"]

[mobility]
model = "trace"
file = "{trace}"

[topology]
layout = "grid"
count = 2
capacity_vms = 60
memory_gib = 64
access_range_m = 700
radio_rtt_ms = 8.0
out_of_range_rtt_ms = 30.0

[backhaul]
kind = "mesh"
bandwidth_mbit_s = 100
link_rtt_ms = 6.0
hop_rtt_ms = 1.0

[[workloads]]
name = "vdi"
share = 1.0
memory_mib = 512
overlay_mib = 128
dirty_rate_mib_s = 4
interaction_rate_hz = 5
budget_ms = 22
service_ms = 5
jitter_ms = 1.0
"""


def test_a_burst_across_one_border_over_a_thin_link(tmp_path: Path) -> None:
    """Forty vehicles drive from one cloudlet's area into the other's at once, and
    back; the 100 Mbit/s link carries a 128 MiB overlay in ~11 s alone."""
    rows = ["t,id,x,y"]
    n = 40
    for t in range(241):
        for i in range(n):
            # Out and back at 12 m/s, staggered by a few metres.
            d = 12.0 * t
            x = 200.0 + (d if d <= 1500.0 else max(3000.0 - d, 0.0)) + 3.0 * i
            rows.append(f"{t},v{i},{x:.1f},{500.0 + i:.1f}")
    trace = tmp_path / "burst.csv"
    trace.write_text("\n".join(rows) + "\n")
    path = tmp_path / "burst.toml"
    path.write_text(BURST.format(trace=trace.name))
    result = simulate(load_scenario(path))
    share = {k: v.summary["within_budget"] for k, v in result.policies.items()}
    assert share["predictive"] >= share["never"] - 0.005, share
    assert share["threshold"] >= share["never"] - 0.005, share
    for name in ("threshold", "predictive"):
        run = result.policies[name]
        assert run.summary["migrations_started"] > 0
        # Two cloudlets: one link each way, each admitting two migrations.
        assert run.timeline[:, ACTIVE].max() <= 4, name
