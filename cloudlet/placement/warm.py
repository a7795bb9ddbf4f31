"""Load a policy's compiled loops before the round that counts.

The placer's kernels (kernels.py) compile, or load from numba's cache, on their
first call: ~0.6 s with a warm cache, seconds without one. A live orchestrator
decides on its event loop, which also renews its leadership lease; a first
round that stalls it that long can let the lease lapse. `warm_up` runs the
policy once on a tiny cluster (every kernel the policy calls, with the types a
real round passes) and prices a large round's worth of moves, off the event
loop before the orchestrator competes for the lease.
"""

from __future__ import annotations

import numpy as np

from cloudlet.placement.backhaul import GraphBackhaul
from cloudlet.placement.cost import DEDUP_MIN_MOVES, PrecopyModel
from cloudlet.placement.policies import Policy
from cloudlet.placement.state import ClusterState, Network, Sessions

GiB = float(1 << 30)


def tiny_cluster() -> ClusterState:
    """Three cloudlets 1 km apart in a row and five moving sessions, three of them far
    from their host (so that every policy weighs moves), with a measured RTT."""
    pos = np.array([[0.0, 0.0], [1000.0, 0.0], [2000.0, 0.0]])
    # A graph backhaul without its small-network matrices, so that its kept and far
    # tables are probed (a national backhaul's path), not a dense matrix.
    backhaul = GraphBackhaul(3, 3, np.array([0, 1]), np.array([1, 2]), np.full(2, 5.0),
                             np.full(2, 1000.0), keep=2, dense_max=0)
    net = Network.build(pos, np.full(3, 8), np.full(3, 8 * GiB), backhaul, candidates=2)
    m = 5
    # Sessions 0 and 4 leave cloudlet 0 for 2 together: their moves share the link,
    # which predictive prices again (its second kernel).
    host = np.array([0, 0, 2, 1, 0])
    rtt = np.full((m, 3), np.nan)
    rtt[1, 0] = 30.0
    return ClusterState(
        time_s=100.0, network=net, vms=np.bincount(host, minlength=3),
        memory_used_bytes=np.bincount(host, minlength=3).astype(np.float64) * (0.5 * GiB),
        sessions=Sessions(
            host=host, position_m=np.array([[1900.0, 0.0], [100.0, 10.0], [50.0, 0.0],
                                            [1000.0, 0.0], [1950.0, 5.0]]),
            velocity_m_s=np.array([[10.0, 0.0], [20.0, 0.0], [-5.0, 0.0], [0.0, 1.0],
                                   [5.0, 0.0]]),
            memory_bytes=np.full(m, 0.5 * GiB), overlay_bytes=np.full(m, 0.1 * GiB),
            dirty_rate_bytes_s=np.full(m, 1e6), budget_ms=np.full(m, 20.0),
            service_ms=np.full(m, 2.0), interaction_rate_hz=np.full(m, 10.0),
            last_move_s=np.full(m, -1e9), previous_host=np.full(m, -1),
            movable=np.ones(m, dtype=bool), rtt_ms=rtt))


def warm_up(policy: Policy) -> None:
    """Run `policy` once on `tiny_cluster` (nothing for a policy that never moves),
    and price as many moves as a large round prices, in the layouts it passes (the
    cost model prices runs of equal inputs from DEDUP_MIN_MOVES moves on)."""
    if policy.never_moves:
        return
    policy.decide(tiny_cluster())
    model = PrecopyModel()
    n = DEDUP_MIN_MOVES
    column = np.full((n, 1), 1e8)
    model.estimate(column, column, column, np.full((n, 2), 1000.0))  # candidates
    flat = np.full(n, 1e8)
    model.estimate(flat, flat, flat, np.full(n, 1000.0))  # a round's chosen moves
