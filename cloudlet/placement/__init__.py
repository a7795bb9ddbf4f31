"""The latency-aware placer: cluster state in, moves out.

Pure and vectorised, so the same objects run inside the simulator's tick loop
and inside a live orchestrator: `LatencyModel` predicts RTTs where nothing was
measured, `PrecopyModel` says what a migration costs, and the policies
(`never`, `nearest`, `threshold`, `predictive`) turn a `ClusterState` into
`Moves`. No network code is imported here, on purpose.
"""

from cloudlet.placement.backhaul import Backhaul, BackhaulStats, DenseBackhaul, GraphBackhaul
from cloudlet.placement.cost import MigrationEstimate, PrecopyModel
from cloudlet.placement.latency import AccessIndex, LatencyModel
from cloudlet.placement.policies import (
    POLICIES,
    NearestPolicy,
    NeverPolicy,
    Policy,
    PredictivePolicy,
    ThresholdPolicy,
    make_policy,
)
from cloudlet.placement.state import (
    ClusterState,
    InFlight,
    Links,
    MeasuredRtt,
    MigrationCost,
    Move,
    Moves,
    Network,
    Sessions,
)

__all__ = [
    "POLICIES",
    "AccessIndex",
    "Backhaul",
    "BackhaulStats",
    "ClusterState",
    "DenseBackhaul",
    "GraphBackhaul",
    "InFlight",
    "LatencyModel",
    "Links",
    "MeasuredRtt",
    "MigrationCost",
    "MigrationEstimate",
    "Move",
    "Moves",
    "NearestPolicy",
    "Network",
    "NeverPolicy",
    "Policy",
    "PrecopyModel",
    "PredictivePolicy",
    "Sessions",
    "ThresholdPolicy",
    "make_policy",
]
