"""`cloudlet sweep`: the grid, the sweep file's errors, the statistics, the cache, and
a distributed sweep that gives exactly the serial one's numbers."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cloudlet.cli import main
from cloudlet.errors import ScenarioError, SweepError
from cloudlet.sim import load_scenario, simulate
from cloudlet.sim.report import SUMMARY_KEYS
from cloudlet.sim.sweep import (
    METRICS,
    cache_key,
    load_sweep,
    mean_ci,
    plan,
    t_quantile,
)
from cloudlet.sim.sweep_outputs import CACHE_DIR, plot_name, summary_columns

ROOT = Path(__file__).resolve().parent.parent
METRO = ROOT / "configs" / "sim" / "small-metro.toml"
EXAMPLE = ROOT / "configs" / "sim" / "sweep-small.toml"

# Two access ranges x two seeds x two policies, 20 simulated seconds each: ~0.1 s a run.
SMALL = f"""
[sweep]
scenario = "{METRO}"
seeds = [3, 4]
policies = ["never", "predictive"]
[sweep.grid]
"topology.access_range_m" = [700, 1500]
"scenario.duration_s" = [20]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sweep_cli(*args: str | Path) -> int:
    return main(["sweep", *map(str, args), "--no-progress"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the grid and the sweep file ------------------------------------------------------


def test_grid_expands_last_key_fastest(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, f"""
[sweep]
scenario = "{METRO}"
seeds = [1, 2, 3]
[sweep.grid]
"topology.access_range_m" = [600, 1200]
"mobility.users" = [10, 20, 30]
"""))
    assert sweep.keys == ("topology.access_range_m", "mobility.users")
    assert sweep.points() == [(600, 10), (600, 20), (600, 30),
                              (1200, 10), (1200, 20), (1200, 30)]
    # Policies default to the scenario's.
    assert sweep.policies == load_scenario(METRO).policies
    runs = plan(sweep, code="test")
    assert len(runs) == 6 * 3
    assert [(r.point, r.seed) for r in runs[:4]] == [((600, 10), 1), ((600, 10), 2),
                                                     ((600, 10), 3), ((600, 20), 1)]
    r = runs[4]  # (600, 20), seed 2
    assert r.scenario.seed == 2
    assert r.scenario.topology.access_range_m == 600.0
    assert r.scenario.mobility.users == 20
    assert len({run.key for run in runs}) == len(runs)


def test_empty_grid_is_the_scenario_as_written(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, f'[sweep]\nscenario = "{METRO}"\nseeds = [5]\n'))
    assert sweep.points() == [()]
    (run,) = plan(sweep, code="test")
    assert run.scenario == replace(load_scenario(METRO), seed=5)


def test_scenario_path_is_relative_to_the_sweep_file() -> None:
    sweep = load_sweep(EXAMPLE)
    assert sweep.scenario_path.resolve() == METRO
    assert sweep.seeds == (1, 2, 3)
    assert sweep.policies == ("never", "predictive")


def test_the_shipped_sweeps_load_and_plan() -> None:
    shipped = sorted((ROOT / "configs" / "sim").glob("sweep-*.toml"))
    assert EXAMPLE in shipped
    for path in shipped:
        sweep = load_sweep(path)
        runs = plan(sweep, code="test")
        assert len(runs) == len(sweep.points()) * len(sweep.seeds) > 0


def test_override_reaches_tables_the_scenario_leaves_out_and_arrays_of_tables(
        tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, f"""
[sweep]
scenario = "{METRO}"
seeds = [1]
[sweep.grid]
"latency.queue_service_ms" = [2.5]
"workloads.0.budget_ms" = [25, 40]
"""))
    runs = plan(sweep, code="test")
    assert [r.scenario.latency.queue_service_ms for r in runs] == [2.5, 2.5]
    assert [r.scenario.workloads[0].budget_ms for r in runs] == [25.0, 40.0]
    # The scenario's own data is not changed by an override.
    assert "latency" not in sweep.scenario_data
    assert sweep.scenario_data["workloads"][0]["budget_ms"] == 20


@pytest.mark.parametrize(("body", "key", "why"), [
    ('"topology.acces_range_m" = [600]', 'sweep.grid."topology.acces_range_m"',
     "unknown key"),
    ('"topology.access_range_m" = [-5]', 'sweep.grid."topology.access_range_m"',
     "must be >= 0"),
    ('"mobility.users" = [10, 2.5]', 'sweep.grid."mobility.users"', "must be an integer"),
    ('"topolgy.count" = [4]', 'sweep.grid."topolgy.count"', "unknown key"),
    ('"scenario.seed" = [1, 2]', 'sweep.grid."scenario.seed"', "cannot be swept"),
    ('"scenario.policies" = ["never"]', 'sweep.grid."scenario.policies"',
     "cannot be swept"),
    ('"users" = [10]', 'sweep.grid."users"', "must name a table and a key"),
    ('"mobility.users" = []', 'sweep.grid."mobility.users"', "non-empty list"),
    ('"mobility.users" = [10, 10]', 'sweep.grid."mobility.users"', "twice"),
    ('"workloads.3.budget_ms" = [10]', 'sweep.grid."workloads.3.budget_ms"',
     "has 1 entries"),
    ('"mobility.model.x" = [1]', 'sweep.grid."mobility.model.x"',
     "'mobility.model' is not a table"),
    ('"workloads.budget_ms" = [10]', 'sweep.grid."workloads.budget_ms"',
     "'workloads' is not a table"),
    ('topology.access_range_m = [600]', 'sweep.grid."topology"', "quoted"),
])
def test_bad_grid_keys_are_typed_errors_naming_the_sweep_file_and_key(
        tmp_path: Path, body: str, key: str, why: str) -> None:
    path = write(tmp_path, f'[sweep]\nscenario = "{METRO}"\nseeds = [1]\n'
                           f'[sweep.grid]\n{body}\n')
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    message = info.value.message
    assert message.startswith(f"{path}: key '{key}'")
    assert why in message
    assert info.value.code == "sweep_invalid"
    assert isinstance(info.value, ScenarioError)  # caught as a scenario problem too


@pytest.mark.parametrize(("text", "key", "why"), [
    ('[sweep]\nscenario = "{m}"\nseeds = [1]\nseed = 4\n', "sweep.seed", "unknown key"),
    ('[sweep]\nscenario = "{m}"\nseeds = []\n', "sweep.seeds", "non-empty list"),
    ('[sweep]\nscenario = "{m}"\nseeds = [1, -2]\n', "sweep.seeds", "integers >= 0"),
    ('[sweep]\nscenario = "{m}"\nseeds = [1, 1]\n', "sweep.seeds", "twice"),
    ('[sweep]\nscenario = "{m}"\nseeds = [1]\npolicies = ["never", "magic"]\n',
     "sweep.policies", "unknown policy 'magic'"),
    ('[sweep]\nseeds = [1]\n', "sweep.scenario", "is required"),
    ('[sweep]\nscenario = "nowhere.toml"\nseeds = [1]\n', "sweep.scenario",
     "no such scenario file"),
    ('[sweep]\nscenario = "{m}"\nseeds = [1]\n[other]\n', "other", "unknown table"),
    ('[sweep]\nscenario = "{m}"\nseeds = [1]\ngrid = 3\n', "sweep.grid", "must be a table"),
])
def test_bad_sweep_files_are_typed_errors_naming_the_key(
        tmp_path: Path, text: str, key: str, why: str) -> None:
    path = write(tmp_path, text.format(m=METRO))
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert info.value.message.startswith(f"{path}: key '{key}': ")
    assert why in info.value.message


def test_overrides_that_conflict_only_together_name_both_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[sweep]
scenario = "{METRO}"
seeds = [1]
[sweep.grid]
"mobility.speed_min_m_s" = [1.0, 12.0]
"mobility.speed_max_m_s" = [10.0]
""")
    sweep = load_sweep(path)  # each value is fine alone
    with pytest.raises(SweepError) as info:
        plan(sweep, code="test")
    assert info.value.message.startswith(
        f"{path}: key 'sweep.grid.\"mobility.speed_min_m_s\"' = 12.0, "
        f"'sweep.grid.\"mobility.speed_max_m_s\"' = 10.0: ")
    assert "speed_max_m_s" in info.value.message


def test_the_cli_reports_a_bad_sweep_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'[sweep]\nscenario = "{METRO}"\nseeds = [1]\n'
                           f'[sweep.grid]\n"topology.nope" = [1]\n')
    assert sweep_cli(path, "--workers", "0", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cloudlet: error [sweep_invalid]: {path}: key "
                          f"'sweep.grid.\"topology.nope\"' = 1: ")
    assert not (tmp_path / "out").exists()


# --- cache keys and statistics --------------------------------------------------------


def test_cache_key_names_every_input_and_nothing_else() -> None:
    data = {"scenario": {"name": "a", "duration_s": 30}, "topology": {"count": 4}}
    same_order = {"topology": {"count": 4}, "scenario": {"duration_s": 30, "name": "a"}}
    key = cache_key(data, 1, ("never", "predictive"), "v1")
    assert cache_key(same_order, 1, ("never", "predictive"), "v1") == key
    changed = [
        cache_key(data, 2, ("never", "predictive"), "v1"),
        cache_key(data, 1, ("predictive", "never"), "v1"),  # a policy's seed is its place
        cache_key(data, 1, ("never", "predictive"), "v2"),
        cache_key({**data, "topology": {"count": 5}}, 1, ("never", "predictive"), "v1"),
        cache_key(data, 1, ("never", "predictive"), "v1", {"mobility.file": "ab"}),
    ]
    assert len({key, *changed}) == 1 + len(changed)


def test_t_quantiles_match_closed_forms_and_tables() -> None:
    # With 1 and 2 degrees of freedom the t quantile has a closed form: tan(pi (p - 1/2))
    # and (2p - 1) sqrt(2 / (4 p (1 - p))).
    p = 0.975
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))),
                                             rel=1e-12)
    # Two-sided 95% critical values from a statistics table (to its 9 places).
    for df, t in [(4, 2.776445105), (10, 2.228138852), (30, 2.042272456)]:
        assert t_quantile(p, df) == pytest.approx(t, abs=1e-9)


T2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # t(0.975, 2), closed form


def test_mean_ci_by_hand() -> None:
    # 1, 2, 3: mean 2, sample standard deviation 1, so the 95% half-width is
    # t(0.975, 2) / sqrt(3).
    s = mean_ci([1, 2, 3])
    assert (s.n, s.mean) == (3, 2.0)
    assert s.ci_half == pytest.approx(T2 / math.sqrt(3), rel=1e-12)
    assert (s.low, s.high) == (s.mean - s.ci_half, s.mean + s.ci_half)
    # Against numpy for an uneven sample of five.
    xs = [0.91, 0.95, 0.88, 0.97, 0.93]
    s = mean_ci(xs)
    sem = np.std(xs, ddof=1) / math.sqrt(5)
    assert s.mean == pytest.approx(np.mean(xs), rel=1e-15)
    assert s.ci_half == pytest.approx(2.776445105 * sem, rel=1e-9)
    # Missing values (a percentile with no interactions) are left out; one value
    # has no interval; none has no mean.
    s = mean_ci([None, 4.0, float("nan"), 6.0])
    assert (s.n, s.mean) == (2, 5.0)
    assert s.ci_half == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)  # sem 1
    one = mean_ci([7])
    assert (one.n, one.mean) == (1, 7.0) and math.isnan(one.ci_half)
    assert mean_ci([None]).n == 0 and math.isnan(mean_ci([]).mean)


# --- running it -----------------------------------------------------------------------


def test_serial_sweep_outputs_and_numbers(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    assert sweep_cli(path, "--workers", "0", "--out", out) == 0
    assert "4 runs (4 computed, 0 cached) x 2 policies on serial (0 workers)" in (
        capsys.readouterr().out)
    rows = read_csv(out / "results.csv")
    keys = ["topology.access_range_m", "scenario.duration_s"]
    assert list(rows[0]) == [*keys, "seed", "policy", *SUMMARY_KEYS]
    assert len(rows) == 2 * 2 * 2
    assert [(r["topology.access_range_m"], r["seed"], r["policy"]) for r in rows[:4]] == [
        ("700", "3", "never"), ("700", "3", "predictive"),
        ("700", "4", "never"), ("700", "4", "predictive")]
    # A row holds exactly what `cloudlet sim` gets for that scenario and seed.
    sc = load_scenario(METRO)
    sc = replace(sc, seed=4, policies=("never", "predictive"), duration_s=20.0,
                 topology=replace(sc.topology, access_range_m=1500.0))
    direct = simulate(sc).policies["predictive"].summary
    row = next(r for r in rows if r["topology.access_range_m"] == "1500"
               and r["seed"] == "4" and r["policy"] == "predictive")
    for k in SUMMARY_KEYS:
        assert float(row[k]) == direct[k], k
    assert float(row["migrations"]) > 0 or float(row["interactions"]) > 0

    summary = read_csv(out / "summary.csv")
    sweep = load_sweep(path)
    assert list(summary[0]) == summary_columns(sweep)
    assert len(summary) == 2 * 2
    s = summary[3]
    assert (s["topology.access_range_m"], s["policy"], s["seeds"]) == (
        "1500", "predictive", "2")
    values = [float(r["within_budget"]) for r in rows
              if r["topology.access_range_m"] == "1500" and r["policy"] == "predictive"]
    ref = mean_ci(values)
    assert float(s["within_budget_mean"]) == ref.mean
    assert float(s["within_budget_ci_low"]) == ref.low
    assert float(s["within_budget_ci_high"]) == ref.high
    assert float(s["within_budget_ci_low"]) <= ref.mean <= float(s["within_budget_ci_high"])

    meta = json.loads((out / "sweep.json").read_text())
    assert {"engine", "workers", "runs", "wall_s"} <= set(meta)
    assert (meta["engine"], meta["workers"], meta["runs"]) == ("serial", 0, 4)
    assert meta["wall_s"] > 0
    assert (meta["computed"], meta["cached"]) == (4, 0)
    for metric in METRICS:
        png = out / plot_name(metric, keys[0])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # A key held at one value is no axis.
        assert not (out / plot_name(metric, keys[1])).exists()
    assert len(list((out / CACHE_DIR).glob("*.json"))) == 4


def test_cache_resumes_an_interrupted_sweep(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    assert sweep_cli(path, "--workers", "0", "--out", out, "--no-plots") == 0
    first = (out / "results.csv").read_bytes()
    assert sweep_cli(path, "--workers", "0", "--out", out, "--no-plots") == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["runs"], meta["computed"], meta["cached"]) == (4, 0, 4)
    assert (out / "results.csv").read_bytes() == first
    # A run that did not finish (its file missing) or left a broken file is run again.
    cached = sorted((out / CACHE_DIR).glob("*.json"))
    cached[0].unlink()
    cached[1].write_text('{"metrics": {"never": ')
    # ... and so is one whose metrics are not numbers (hostile or damaged).
    doc = json.loads(cached[2].read_text())
    doc["metrics"] = {p: {k: "__import__('os')" for k in m} for p, m in doc["metrics"].items()}
    cached[2].write_text(json.dumps(doc))
    assert sweep_cli(path, "--workers", "0", "--out", out, "--no-plots") == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["computed"], meta["cached"]) == (3, 1)
    assert (out / "results.csv").read_bytes() == first
    # Another seed adds its runs only.
    more = write(tmp_path, SMALL.replace("seeds = [3, 4]", "seeds = [3, 4, 5]"))
    assert sweep_cli(more, "--workers", "0", "--out", out, "--no-plots") == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["runs"], meta["computed"], meta["cached"]) == (6, 2, 4)


def test_workers_and_scheduler_are_exclusive(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SMALL)
    assert sweep_cli(path, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1",
                     "--out", tmp_path / "o") == 1
    assert "--workers and --scheduler" in capsys.readouterr().err
    assert sweep_cli(path, "--workers", "-1", "--out", tmp_path / "o") == 1
    assert "--workers: must be >= 0" in capsys.readouterr().err


# --- on Dask --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """One LocalCluster for the module (it costs a few seconds to start)."""
    import logging

    from distributed import LocalCluster

    from cloudlet.sweep_dask import NO_FIXED_HTTP_PORT

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR,
                      scheduler_kwargs=NO_FIXED_HTTP_PORT) as cluster:
        yield str(cluster.scheduler_address)


@pytest.fixture(scope="module")
def serial_results(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("serial")
    assert sweep_cli(write(tmp, SMALL), "--workers", "0", "--out", tmp / "out",
                     "--no-plots") == 0
    return (tmp / "out" / "results.csv").read_bytes()


@pytest.mark.slow
def test_a_local_cluster_gives_exactly_the_serial_numbers(
        tmp_path: Path, serial_results: bytes) -> None:
    out = tmp_path / "out"
    assert sweep_cli(write(tmp_path, SMALL), "--workers", "2", "--out", out,
                     "--no-plots") == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["engine"], meta["workers"], meta["runs"], meta["computed"]) == (
        "dask", 2, 4, 4)
    assert (out / "results.csv").read_bytes() == serial_results


@pytest.mark.slow
def test_an_existing_cluster_gives_exactly_the_serial_numbers(
        tmp_path: Path, cluster_address: str, serial_results: bytes) -> None:
    out = tmp_path / "out"
    path = write(tmp_path, SMALL)
    assert sweep_cli(path, "--scheduler", cluster_address, "--out", out) == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["engine"], meta["workers"], meta["computed"]) == ("dask", 2, 4)
    assert (out / "results.csv").read_bytes() == serial_results
    assert (out / plot_name("p95_ms", "topology.access_range_m")).is_file()
    # Resumed on the cluster: nothing is sent to it.
    assert sweep_cli(path, "--scheduler", cluster_address, "--out", out) == 0
    meta = json.loads((out / "sweep.json").read_text())
    assert (meta["computed"], meta["cached"]) == (0, 4)
    assert (out / "results.csv").read_bytes() == serial_results


@pytest.mark.slow
def test_a_failing_run_fails_the_sweep_with_its_own_error(
        tmp_path: Path, cluster_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A Manhattan block wider than the area passes the parser but not the world's
    # construction, on the worker: its ScenarioError reaches the user as it is.
    scenario = write(tmp_path, """
[scenario]
duration_s = 20
policies = ["never"]
[area]
width_m = 1000
height_m = 1000
[mobility]
model = "manhattan"
users = 5
""", "manhattan.toml")
    path = write(tmp_path, f"""
[sweep]
scenario = "{scenario.name}"
seeds = [1]
[sweep.grid]
"mobility.block_m" = [100, 5000]
""")
    assert sweep_cli(path, "--scheduler", cluster_address, "--out", tmp_path / "out",
                     "--no-plots") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cloudlet: error [scenario_invalid]: {scenario}: key "
                          f"'mobility.block_m': must be <= the area's smaller side")
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_local_cluster_runs_each_placer_on_one_thread() -> None:
    """Its workers take a core each: the placer's per-row threads (placement/slices.py)
    would only contend with the other workers."""
    import os

    from cloudlet.sweep_dask import dask_engine

    with dask_engine(workers=1) as engine:
        # os.getenv, not os.environ.get: a bound method would carry this process's
        # environment along with it.
        seen = engine.client.run(os.getenv, "CLOUDLET_PLACER_THREADS")
    assert list(seen.values()) == ["1"]
