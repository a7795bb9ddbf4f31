"""Calibration of the migration cost model: the fit, the comparison, the scenario
include, `cloudlet calibrate` end to end, the simulator against the closed form,
and queueing that follows the VMs serving at a cloudlet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudlet.commands import calibrate as calibrate_cmd
from cloudlet.errors import InvalidArgument, ScenarioError
from cloudlet.placement import ClusterState, PrecopyModel
from cloudlet.placement.calibration import (
    MigrationRecord,
    compare,
    fit,
    records_from_benchmark,
)
from cloudlet.sim import load_scenario, simulate
from cloudlet.sim.engine import PolicyRun

ROOT = Path(__file__).resolve().parent.parent
MiB = float(1 << 20)
TRUE = PrecopyModel(stop_bytes=64 * 1024, max_rounds=12, resume_s=0.008, wire_ratio=0.9,
                    setup_s=0.15, setup_s_per_gib=1.5, send_s_per_gib=12.0)


def synthetic(model: PrecopyModel, n: int = 40, seed: int = 3) -> list[dict[str, Any]]:
    """Records a model would measure, memory, overlay, links and dirty rates varied."""
    rng = np.random.default_rng(seed)
    memory = rng.choice([64, 128, 256, 512], n) * MiB
    overlay = memory * rng.uniform(0.05, 1.0, n)
    bw = rng.choice([25.0, 100.0, 1000.0, 10_000.0], n)
    dirty = rng.choice([0.0, 0.5, 1.0, 4.0], n) * MiB
    est = model.estimate(overlay, memory, dirty, bw)
    return [{"vm": f"v{i}", "source": "a", "target": "b", "memory_bytes": float(memory[i]),
             "overlay_bytes": float(overlay[i]), "dirty_rate_bytes_s": float(dirty[i]),
             "bandwidth_mbit_s": float(bw[i]), "duration_s": float(est.duration_s[i]),
             "downtime_s": float(est.downtime_s[i]), "wire_bytes": float(est.wire_bytes[i]),
             "rounds": int(est.rounds[i]) + 1} for i in range(n)]


# --- the fit -------------------------------------------------------------------------


def test_fit_recovers_known_parameters() -> None:
    start = PrecopyModel(stop_bytes=TRUE.stop_bytes, max_rounds=TRUE.max_rounds)
    result = fit(synthetic(TRUE), start)
    for name, want in (("wire_ratio", 0.9), ("setup_s", 0.15), ("setup_s_per_gib", 1.5),
                       ("send_s_per_gib", 12.0), ("resume_s", 0.008)):
        assert result.params[name] == pytest.approx(want, rel=0.02, abs=1e-3), name
    assert result.n == 40
    assert result.after.duration_error_p90 < 0.01
    assert result.after.downtime_error_p90 < 0.01
    assert result.before.duration_error_p50 > 0.1  # the defaults miss the setup


def test_fit_is_robust_to_a_record_the_model_cannot_explain() -> None:
    recs = synthetic(TRUE)
    # 256 MiB that compressed 35x: the one wire ratio cannot follow it.
    recs[0] = {**recs[0], "wire_bytes": recs[0]["wire_bytes"] / 35,
               "duration_s": recs[0]["duration_s"] / 20}
    start = PrecopyModel(stop_bytes=TRUE.stop_bytes, max_rounds=TRUE.max_rounds)
    result = fit(recs, start)
    assert result.params["send_s_per_gib"] == pytest.approx(12.0, rel=0.05)
    assert result.params["setup_s_per_gib"] == pytest.approx(1.5, rel=0.1)
    assert abs(result.after.duration_error[0]) > 1.0  # still reported, not hidden


def test_compare_gives_the_table_for_a_model() -> None:
    recs = synthetic(TRUE, n=10)
    same = compare(recs, TRUE)
    assert same.n == 10
    assert np.allclose(same.duration_error, 0.0, atol=1e-12)
    assert same.duration_error_p50 == pytest.approx(0.0, abs=1e-12)
    assert list(same.predicted_rounds) == [r["rounds"] for r in recs]
    slower = compare([MigrationRecord.from_dict(r) for r in recs],
                     PrecopyModel(stop_bytes=TRUE.stop_bytes, max_rounds=TRUE.max_rounds,
                                  resume_s=TRUE.resume_s, wire_ratio=TRUE.wire_ratio,
                                  setup_s=TRUE.setup_s + 1.0,
                                  setup_s_per_gib=TRUE.setup_s_per_gib,
                                  send_s_per_gib=TRUE.send_s_per_gib))
    want = 1.0 / np.array([r["duration_s"] for r in recs])
    assert np.allclose(slower.duration_error, want)
    assert slower.duration_error_p90 == pytest.approx(float(np.percentile(want, 90)))
    with pytest.raises(InvalidArgument):
        compare([], TRUE)
    with pytest.raises(InvalidArgument, match="wire_bytes"):
        compare([{k: v for k, v in recs[0].items() if k != "wire_bytes"}], TRUE)


def test_benchmark_results_become_records() -> None:
    results = json.loads((ROOT / "benchmarks" / "results" / "migration.json").read_text())
    recs = records_from_benchmark(results)
    assert len(recs) == len(results["runs"])
    lo = [r for r, run in zip(recs, results["runs"], strict=True) if run["link_mbit"] is None]
    assert lo and all(r.bandwidth_mbit_s == 10_000.0 for r in lo)
    assert recs[0].duration_s == results["runs"][0]["total_s"]
    assert recs[0].downtime_s == pytest.approx(results["runs"][0]["downtime_ms"] / 1000)
    jsonl = ROOT / "benchmarks" / "results" / "migration_records.jsonl"
    assert [MigrationRecord.from_dict(json.loads(line)) for line in
            jsonl.read_text().splitlines()] == recs


def test_daemon_stop_rule_matches_the_protocol() -> None:
    from cloudlet.migration.source import PreCopyPolicy

    policy = PreCopyPolicy()
    assert policy.stop_dirty_bytes == calibrate_cmd.DAEMON_STOP_BYTES
    assert policy.max_rounds == calibrate_cmd.DAEMON_MAX_ROUNDS


# --- the scenario include ----------------------------------------------------------------

BASE = "[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 100\n"


def test_calibration_file_overrides_defaults_and_the_scenario_wins(tmp_path: Path) -> None:
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "p.toml").write_text(
        "# fitted\n[migration]\nsetup_s = 0.5\nsend_s_per_gib = 12.5\nresume_ms = 7\n"
        "wire_ratio = 0.9\n")
    s = tmp_path / "s.toml"
    s.write_text(BASE + "[migration]\ncalibration = \"cal/p.toml\"\nresume_ms = 3\n")
    sc = load_scenario(s)
    m = sc.migration
    assert (m.setup_s, m.send_s_per_gib, m.wire_ratio) == (0.5, 12.5, 0.9)
    assert m.resume_ms == 3.0  # the scenario's own key wins
    assert m.stop_mib == 1.0 and m.setup_s_per_gib == 0.0  # neither: the default
    assert m.calibration == tmp_path / "cal" / "p.toml"
    res = simulate(sc)
    cost = res.topology.network.cost
    assert (cost.setup_s, cost.send_s_per_gib, cost.resume_s) == (0.5, 12.5, 0.003)


@pytest.mark.parametrize(("cal", "where", "key"), [
    ("[migration]\nwire_ratio = 0\n", "cal", "migration.wire_ratio"),
    ("[migration]\nsetup_s = -1\n", "cal", "migration.setup_s"),
    ("[migration]\nspeed = 3\n", "cal", "migration.speed"),
    ("[migration]\ncalibration = 'other.toml'\n", "cal", "migration.calibration"),
    ("[mobility]\nusers = 3\n", "cal", "migration"),
    ("[migration]\nsetup_s = 1\n[latency]\n", "cal", "latency"),
    (None, "scenario", "migration.calibration"),
])
def test_bad_calibration_files_name_the_file_and_the_key(
        tmp_path: Path, cal: str | None, where: str, key: str) -> None:
    p = tmp_path / "p.toml"
    if cal is not None:
        p.write_text(cal)
    s = tmp_path / "s.toml"
    s.write_text(BASE + "[migration]\ncalibration = \"p.toml\"\n")
    with pytest.raises(ScenarioError) as exc:
        load_scenario(s)
    assert str(p if where == "cal" else s) in exc.value.message
    assert f"key '{key}'" in exc.value.message


def test_new_scenario_keys_are_checked(tmp_path: Path) -> None:
    s = tmp_path / "s.toml"
    s.write_text(BASE + "[migration]\nsend_s_per_gib = 'fast'\n")
    with pytest.raises(ScenarioError, match=r"key 'migration\.send_s_per_gib'"):
        load_scenario(s)


# --- cloudlet calibrate, end to end ---------------------------------------------------------


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cloudlet.cli", "calibrate", *argv],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_cli_calibrate_writes_params_a_scenario_includes(tmp_path: Path) -> None:
    recs = tmp_path / "recs.jsonl"
    recs.write_text("\n".join(json.dumps(r) for r in synthetic(TRUE)) + "\n\n")
    bench = ROOT / "benchmarks" / "results" / "migration.json"
    out = tmp_path / "params.toml"
    done = _cli(str(recs), str(bench), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "duration error p50/p90" in done.stdout and "fitted:" in done.stdout
    text = out.read_text()
    assert "61 live migrations" in text and "recs.jsonl, migration.json" in text
    assert "#   duration " in text and "-> " in text
    s = tmp_path / "s.toml"
    s.write_text(BASE + "[migration]\ncalibration = \"params.toml\"\n")
    m = load_scenario(s).migration
    assert m.stop_mib == 0.0625 and m.max_rounds == 12
    assert m.send_s_per_gib > 0 and 0.5 < m.wire_ratio < 1.0


@pytest.mark.parametrize(("content", "where"), [
    (None, "no such file"),
    ('{"vm": "a"\n', "recs.jsonl:1: not JSON"),
    ('\n{"vm": "a", "source": "s"}\n', "recs.jsonl:2: record lacks key(s) target"),
    ("\n\n", "no migration records"),
    ('{"x": 1,\n "y": 2}\n', "neither migration records nor"),
])
def test_cli_calibrate_rejects_bad_input(tmp_path: Path, content: str | None,
                                         where: str) -> None:
    recs = tmp_path / "recs.jsonl"
    if content is not None:
        recs.write_text(content)
    out = tmp_path / "params.toml"
    done = _cli(str(recs), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 1
    assert "cloudlet: error [calibration_invalid]" in done.stderr
    assert where in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


# --- the simulator against the closed form, and queueing ------------------------------------


HOP = """
[scenario]
policies = ["nearest"]
trajectories = 0
[mobility]
model = "trace"
file = "hop.csv"
[topology]
layout = "list"
[[topology.cloudlets]]
name = "a"
x_m = 0
y_m = 0
[[topology.cloudlets]]
name = "b"
x_m = 1000
y_m = 0
[backhaul]
kind = "links"
[[backhaul.links]]
a = "a"
b = "b"
bandwidth_mbit_s = 100
[latency]
queue_service_ms = 20
[[workloads]]
memory_mib = 256
overlay_mib = 64
dirty_rate_mib_s = 1
"""


def _hop(tmp_path: Path, migration: str) -> Path:
    """One user hops from a to b at t = 2 s; the one migration is alone on the link."""
    lines = ["t,id,x,y"] + [f"{t},u0,{0.0 if t < 2 else 1000.0},10.0" for t in range(40)]
    (tmp_path / "hop.csv").write_text("\n".join(lines) + "\n")
    s = tmp_path / "hop.toml"
    s.write_text(HOP + migration)
    return s


@pytest.mark.parametrize("migration", [
    "",
    "[migration]\nsetup_s = 1.3\nsetup_s_per_gib = 4\nsend_s_per_gib = 20\nresume_ms = 9\n"
    "wire_ratio = 0.9\nstop_mib = 0.0625\nmax_rounds = 12\n",
])
def test_one_migration_takes_what_estimate_says(tmp_path: Path, migration: str) -> None:
    sc = load_scenario(_hop(tmp_path, migration))
    res = simulate(sc)
    tl = res.policies["nearest"].timeline
    started = np.flatnonzero(tl[:, 6] > 0)
    done = np.flatnonzero(tl[:, 7] > 0)
    assert len(started) == 1 and len(done) == 1
    net = res.topology.network
    est = net.cost.estimate(np.array([64 * MiB]), np.array([256 * MiB]),
                            np.array([1 * MiB]), np.array([100.0]))
    # Started at the end of one tick, done in the tick its last pause ends.
    took = float(done[0] - started[0])
    assert abs(took - float(est.duration_s[0])) <= sc.step_s
    assert tl[done[0], 11] == pytest.approx(float(est.downtime_s[0]), rel=0.5)
    if migration:
        assert float(est.setup_s[0]) == pytest.approx(1.3 + 4 * 0.25)


def test_queueing_follows_the_vms_serving_not_those_arriving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b's queue stays empty while the VM is on its way, and rises when it arrives;
    b's room is reserved from the start."""
    seen: list[tuple[int, float, int, int]] = []
    original = PolicyRun.refresh_queue

    def spy(self: PolicyRun) -> None:
        original(self)
        seen.append((len(self.migrations), float(self._queue_ms[1]), int(self.load.vms[1]),
                     int(self.load.serving[1])))

    monkeypatch.setattr(PolicyRun, "refresh_queue", spy)
    simulate(load_scenario(_hop(tmp_path, "[migration]\nsetup_s = 2\n")))
    before = [q for m, q, _, _ in seen[:2]]
    during = [(q, v, s) for m, q, v, s in seen if m > 0]
    after = [q for m, q, _, _ in seen[-3:]]
    assert before == [0.0, 0.0]
    assert len(during) > 3
    assert all(q == 0.0 and v == 1 and s == 0 for q, v, s in during)
    assert all(q > 0.0 for q in after)


def test_cluster_state_load_uses_serving_vms() -> None:
    from cloudlet.placement import Network, Sessions

    net = Network.build(np.array([[0.0, 0.0], [1000.0, 0.0]]), np.array([4, 4]),
                        np.array([8e9, 8e9]), np.zeros((2, 2)), np.full((2, 2), 100.0))
    empty = Sessions(*(np.zeros(0, dtype=np.int64) if k in ("host", "previous_host")
                       else np.zeros((0, 2)) if k in ("position_m", "velocity_m_s")
                       else np.zeros(0, dtype=bool) if k == "movable" else np.zeros(0)
                       for k in ("host", "position_m", "velocity_m_s", "memory_bytes",
                                 "overlay_bytes", "dirty_rate_bytes_s", "budget_ms",
                                 "service_ms", "interaction_rate_hz", "last_move_s",
                                 "previous_host", "movable")))
    vms = np.array([2, 2])
    old = ClusterState(time_s=0.0, network=net, vms=vms, memory_used_bytes=np.zeros(2),
                       sessions=empty)
    assert list(old.load) == [0.5, 0.5]
    new = ClusterState(time_s=0.0, network=net, vms=vms, memory_used_bytes=np.zeros(2),
                       sessions=empty, serving_vms=np.array([2, 1]))
    assert list(new.load) == [0.5, 0.25]


# --- migrations leaving one source at once -------------------------------------------------


def test_the_fit_takes_the_sources_sharing_into_account() -> None:
    """Records where two migrations left the source at once: fitted as such, the
    send term comes out right; ignored, it would absorb the sharing."""
    records = synthetic(TRUE, n=40, seed=5)
    rng = np.random.default_rng(9)
    for r in records:
        r["source_sharing"] = float(rng.choice([1.0, 2.0]))
        est = TRUE.estimate(np.array([r["overlay_bytes"]]), np.array([r["memory_bytes"]]),
                            np.array([r["dirty_rate_bytes_s"]]),
                            np.array([r["bandwidth_mbit_s"]]), r["source_sharing"])
        r["duration_s"] = float(est.duration_s[0])
        r["downtime_s"] = float(est.downtime_s[0])
    start = PrecopyModel(stop_bytes=TRUE.stop_bytes, max_rounds=TRUE.max_rounds)
    result = fit(records, start)
    assert result.params["send_s_per_gib"] == pytest.approx(12.0, rel=0.05)
    assert result.after.duration_error_p90 < 0.02
    with pytest.raises(InvalidArgument, match="source_sharing"):
        MigrationRecord.from_dict({**records[0], "source_sharing": 0.5})


FORK = """
[scenario]
name = "fork"
seed = 1
step_s = 0.1
decision_interval_s = 0.1
policies = ["nearest"]
trajectories = 0
[mobility]
model = "trace"
file = "fork.csv"
[topology]
layout = "list"
[[topology.cloudlets]]
name = "a"
x_m = 0
y_m = 0
[[topology.cloudlets]]
name = "b"
x_m = 1000
y_m = 0
[[topology.cloudlets]]
name = "c"
x_m = -1000
y_m = 0
[backhaul]
kind = "links"
[[backhaul.links]]
a = "a"
b = "b"
bandwidth_mbit_s = 1000
[[backhaul.links]]
a = "a"
b = "c"
bandwidth_mbit_s = 1000
[migration]
send_s_per_gib = 40
stop_mib = 0.0625
[[workloads]]
memory_mib = 64
overlay_mib = 64
dirty_rate_mib_s = 0
"""


@pytest.mark.parametrize("users", [1, 2])
def test_migrations_leaving_one_source_at_once_share_its_send_work(
        tmp_path: Path, users: int) -> None:
    """Two users leave a at once, one towards b and one towards c: on separate links,
    each move still takes what `estimate` says for two sharing the source."""
    lines = ["t,id,x,y"]
    for k in range(100):
        t = k / 10
        lines.append(f"{t:.1f},u0,{0.0 if t < 0.5 else 1000.0},10.0")
        if users == 2:
            lines.append(f"{t:.1f},u1,{0.0 if t < 0.5 else -1000.0},-10.0")
    (tmp_path / "fork.csv").write_text("\n".join(lines) + "\n")
    s = tmp_path / "fork.toml"
    s.write_text(FORK)
    sc = load_scenario(s)
    res = simulate(sc)
    tl = res.policies["nearest"].timeline
    started = np.flatnonzero(tl[:, 6] > 0)
    done = np.flatnonzero(tl[:, 7] > 0)
    assert int(tl[:, 6].sum()) == users and int(tl[:, 7].sum()) == users
    est = res.topology.network.cost.estimate(np.array([64 * MiB]), np.array([64 * MiB]),
                                             np.array([0.0]), np.array([1000.0]), users)
    took = (done[-1] - started[0]) * sc.step_s
    assert abs(took - float(est.duration_s[0])) <= 2 * sc.step_s
