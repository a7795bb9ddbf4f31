"""The orchestrator's Prometheus metrics: its moves, its rounds, the age of what it saw.

Registered in the daemon's registry when the role runs inside `cloudlet agent`
(its `/metrics` carries them), or in a registry of its own for the standalone
`cloudlet orchestrator`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUND_BUCKETS_S = (1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 5.0)
OUTCOMES = ("started", "succeeded", "failed", "abandoned")


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.moves = Counter("cloudlet_orchestrator_moves",
                             "Moves the orchestrator ordered, by outcome (started, succeeded, "
                             "failed: to be retried, abandoned)", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.moves.labels(outcome)
        self.round_seconds = Histogram("cloudlet_orchestrator_round_seconds",
                                       "Time of one decision round (state, policy, orders)",
                                       buckets=ROUND_BUCKETS_S, registry=r)
        self.state_age = Gauge("cloudlet_orchestrator_state_age_seconds",
                               "Age of the oldest cloudlet telemetry the last round used",
                               registry=r)
        self.leader = Gauge("cloudlet_orchestrator_leader",
                            "1 while this orchestrator holds its region's lease", registry=r)
        self.epoch = Gauge("cloudlet_orchestrator_epoch", "Fencing epoch of the lease held",
                           registry=r)
        self.sessions = Gauge("cloudlet_orchestrator_sessions",
                              "Sessions the last round placed", registry=r)
        self.targets = Gauge("cloudlet_orchestrator_target_cloudlets",
                             "Cloudlets that may receive a VM (online, fresh)", registry=r)
        self.ingested = Counter("cloudlet_orchestrator_messages",
                                "Control-plane messages taken in, by kind", ["kind"],
                                registry=r)
        self.dropped = Counter("cloudlet_orchestrator_dropped",
                               "Control-plane messages not believed, by reason", ["reason"],
                               registry=r)
