"""`cloudlet emulate` end to end: real daemons, broker, SDK sessions, links and guests.

A short run (2 cloudlets, 2 users, 15 s) of `never` and `predictive` checks the
outputs are written with the simulator's keys and the comparison's shape, and
that every call applied exactly once (the VMs' final sequence numbers against
the clients' records). Bad input gets one line. No timed assertions: what the
policies score is the output, not the test's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloudlet.sim.report import PLOTS, SUMMARY_KEYS
from edge_agent.emulation.compare import METRICS
from edge_agent.emulation.scaling import choose_factor, scaled
from edge_agent.emulation.scenario_file import dumps, resolved_tables
from edge_agent.emulation.world import replay

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = """
[scenario]
name = "emulate-test"
seed = 3
duration_s = 10
policies = ["never", "predictive"]

[area]
width_m = 3000
height_m = 1000

[mobility]
model = "random_waypoint"
users = 2
speed_min_m_s = 15.0
speed_max_m_s = 20.0
pause_max_s = 0

[topology]
layout = "list"
access_range_m = 1100
[[topology.cloudlets]]
name = "west"
x_m = 750
y_m = 500
[[topology.cloudlets]]
name = "east"
x_m = 2250
y_m = 500

[backhaul]
kind = "full"
bandwidth_mbit_s = 200
link_rtt_ms = 8.0

[[workloads]]
name = "vdi"
memory_mib = 8
overlay_mib = 2
dirty_rate_mib_s = 0.25
interaction_rate_hz = 5
budget_ms = 20
service_ms = 3
"""


def emulate(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet.cli", "emulate", *args],
                          capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "emulate-test.toml"
    path.write_text(SCENARIO)
    return path


def test_short_emulation_end_to_end(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = emulate(str(scenario), "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("summary.json", "comparison.json", "timeline-never.csv",
                 "timeline-predictive.csv", *PLOTS, "sim/summary.json",
                 "never/migrations.jsonl", "predictive/migrations.jsonl",
                 "predictive/calibration.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scale_factor"] == 1.0
    sim = json.loads((out / "sim" / "summary.json").read_text())
    for policy in ("never", "predictive"):
        got = summary["policies"][policy]
        assert set(sim["policies"][policy]) <= set(got)
        assert set(SUMMARY_KEYS) <= set(got)
        assert got["interactions"] > 0
        assert got["lost_calls"] == 0 and got["duplicate_calls"] == 0, got
        assert got["unchecked_sessions"] == 0, got
        assert got["guest_memory_mib"] >= 7.5  # grown to the workload's size
    assert summary["policies"]["never"]["migrations"] == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["policies"]) == {"never", "predictive"}
    for metrics in comparison["policies"].values():
        assert set(metrics) == set(METRICS)
        for pair in metrics.values():
            assert set(pair) == {"sim", "emulated"}
    for line in (out / "predictive" / "migrations.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("vm", "source", "target", "memory_bytes", "overlay_bytes",
                    "dirty_rate_bytes_s", "bandwidth_mbit_s", "duration_s", "downtime_s",
                    "wire_bytes", "rounds", "predicted_duration_s", "predicted_downtime_s"):
            assert key in record, key
    assert "within (sim/emu)" in done.stdout
    assert "lost" in done.stdout


def test_missing_scenario_is_one_line(tmp_path: Path) -> None:
    done = emulate(str(tmp_path / "nope.toml"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "no such scenario file" in done.stderr


def test_unknown_policy_is_one_line(scenario: Path) -> None:
    done = emulate(str(scenario), "--policies", "never,teleport")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "unknown policy 'teleport'" in done.stderr


def test_world_and_resolved_scenario_match_the_simulator(scenario: Path) -> None:
    from cloudlet.sim import load_scenario, simulate

    sc = load_scenario(scenario)
    frames = replay(sc)
    result = simulate(sc)
    assert frames.topology.names == result.topology.names == ("west", "east")
    k = min(result.trajectories.shape[1], frames.slots)
    assert (frames.xy[:, :k].astype("float32") == result.trajectories[:, :k]).all()
    assert choose_factor(sc) == 1.0
    half = scaled(sc, 0.5)
    assert half.workloads[0].memory_mib == 4 and half.workloads[0].dirty_rate_mib_s == 0.125
    import tomllib

    from cloudlet.sim.scenario import parse_scenario

    again = parse_scenario(tomllib.loads(dumps(resolved_tables(half))), scenario)
    assert again.workloads == half.workloads and again.policies == sc.policies


def test_advertise_endpoint_is_what_a_cloudlet_tells() -> None:
    from cloudlet.errors import ConfigError
    from edge_agent.config import node_config_from_dict

    plain = node_config_from_dict({"name": "a", "port": 8601})
    assert plain.endpoint == "http://127.0.0.1:8601"
    fronted = node_config_from_dict({"name": "a", "port": 8601,
                                     "advertise_endpoint": "http://127.0.0.1:9000/"})
    assert fronted.endpoint == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="advertise_endpoint"):
        node_config_from_dict({"name": "a", "advertise_endpoint": "127.0.0.1:9000"})
