"""The shipped monitoring config reads metrics that exist: every series a Grafana
panel queries is one the daemon (with its orchestrator role) exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]

from edge_agent.metrics import Metrics
from edge_agent.orchestrator.metrics import OrchestratorMetrics
from edge_agent.storage import StorageHealth

MONITORING = Path(__file__).resolve().parent.parent / "configs" / "monitoring"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "unknown": ("",)}


def exported_series() -> set[str]:
    """Every series name a daemon running the orchestrator role may export (labelled
    families count even before their first sample)."""
    metrics = Metrics()
    OrchestratorMetrics(metrics.registry)
    metrics.watch_storage(StorageHealth())
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def test_every_dashboard_query_names_metrics_that_exist() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {name for e in exprs for name in re.findall(r"\bcloudlet_\w+", e)}
    missing = used - exported_series()
    assert not missing, f"the dashboard queries series nobody exports: {sorted(missing)}"


def test_the_scrape_config_sends_a_token_to_the_cloudlets() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cloudlets = next(j for j in config["scrape_configs"] if j["job_name"] == "cloudlet")
    assert cloudlets["metrics_path"] == "/metrics"
    assert cloudlets["authorization"]["type"] == "Bearer"
    assert cloudlets["authorization"]["credentials_file"]
