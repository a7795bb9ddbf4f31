"""The `[orchestrator]` table of a node config: whether this cloudlet runs the
placer's live loop, with which policy, how often, and how it ages its inputs.

Read as strictly as `[node]`: an unknown key, a wrong type or a value out of
range is a `ConfigError` naming the file and the key, because a typo in a
placement setting silently becoming a default moves (or strands) real VMs.
Every key, its default and its reason are in docs/orchestrator.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cloudlet.errors import ConfigError, InvalidArgument
from cloudlet.placement import make_policy

REGION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class OrchestratorConfig:
    """Settings of the orchestrator role. Units are in the names."""

    enabled: bool = False
    # The placement policy (never, nearest, threshold, predictive) and its parameters
    # (`[orchestrator.params]`, the same keys as a scenario's `[policies.NAME]`).
    policy: str = "predictive"
    params: dict[str, Any] = field(default_factory=dict)
    # One decision round this often.
    interval_s: float = 1.0
    # One leader per region; the lease says who, until when, and its fencing epoch.
    region: str = "default"
    lease_s: float = 10.0
    # A scenario file: the network (backhaul RTTs and bandwidths, latency and cost
    # models, capacities) and the sessions' budget, service time and overlay share
    # are taken from it, exactly as `cloudlet sim` builds them. Node names must be
    # the scenario's cloudlet names. Empty: a full mesh from the cloudlets'
    # presence positions, with the settings below.
    scenario: str = ""
    backhaul_bandwidth_mbit_s: float = 1000.0
    backhaul_link_rtt_ms: float = 2.0
    # What a session asks for, when no scenario says it.
    budget_ms: float = 30.0
    service_ms: float = 5.0
    overlay_share: float = 1.0  # of a VM's memory a migration's round 0 sends
    # Inputs older than these are not believed any more (docs/orchestrator.md).
    client_report_max_age_s: float = 10.0
    telemetry_max_age_intervals: float = 3.0
    # A failed move is retried after retry_s, 2x retry_s, ... up to max_attempts in all,
    # then abandoned (with an event). A move not finished in move_timeout_s is failed.
    retry_s: float = 5.0
    max_attempts: int = 3
    move_timeout_s: float = 120.0
    # Where the standalone `cloudlet orchestrator` serves /metrics (0: any free port,
    # -1: none). Inside a daemon, its own /metrics carries them.
    metrics_port: int = -1

    def __post_init__(self) -> None:
        checks = [
            ("interval_s", 0.05 <= self.interval_s <= 3600),
            ("region", bool(self.region) and set(self.region) <= REGION_CHARS),
            ("lease_s", 1.0 <= self.lease_s <= 3600),
            ("backhaul_bandwidth_mbit_s", self.backhaul_bandwidth_mbit_s > 0),
            ("backhaul_link_rtt_ms", self.backhaul_link_rtt_ms >= 0),
            ("budget_ms", self.budget_ms > 0),
            ("service_ms", self.service_ms >= 0),
            ("overlay_share", 0 < self.overlay_share <= 1),
            ("client_report_max_age_s", self.client_report_max_age_s > 0),
            ("telemetry_max_age_intervals", self.telemetry_max_age_intervals >= 1),
            ("retry_s", self.retry_s > 0),
            ("max_attempts", 1 <= self.max_attempts <= 100),
            ("move_timeout_s", self.move_timeout_s > 0),
            ("metrics_port", -1 <= self.metrics_port <= 65535),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is out of range")
        make_policy(self.policy, **self.params)  # InvalidArgument names what is wrong

    @property
    def scenario_path(self) -> Path | None:
        return Path(os.path.expanduser(self.scenario)) if self.scenario else None


FIELDS = {f.name: f for f in fields(OrchestratorConfig)}


def orchestrator_config_from_dict(data: dict[str, Any], source: str,
                                  base: Path | None = None) -> OrchestratorConfig:
    """Validate an [orchestrator] table; errors name `source` and the key. A relative
    `scenario` is relative to `base` (the config file's directory)."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} in [orchestrator] "
                          f"(known: {', '.join(sorted(FIELDS))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "params":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [orchestrator.params] must be a table")
            values[key] = dict(value)
            continue
        want = {"str": str, "int": int, "float": float, "bool": bool}[str(FIELDS[key].type)]
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"{source}: [orchestrator] {key} must be a {want.__name__}, "
                              f"got {type(value).__name__} {value!r}")
        values[key] = value
    scenario = values.get("scenario")
    if isinstance(scenario, str) and scenario and base is not None \
            and not scenario.startswith(("~", "/")):
        values["scenario"] = str(base / scenario)
    try:
        config = OrchestratorConfig(**values)
    except (ConfigError, InvalidArgument) as exc:
        raise ConfigError(f"{source}: [orchestrator] {exc.message}") from None
    path = config.scenario_path
    if path is not None and not path.is_file():
        raise ConfigError(f"{source}: [orchestrator] scenario = {config.scenario!r}: "
                          "no such file")
    return config
