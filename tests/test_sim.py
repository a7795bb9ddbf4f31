"""The simulator: mobility statistics, trace replay, scenarios, reproducibility, policies."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cloudlet.cli import main
from cloudlet.errors import ScenarioError
from cloudlet.sim import (
    GaussMarkov,
    ManhattanGrid,
    RandomWaypoint,
    load_scenario,
    read_csv_frames,
    read_fcd_frames,
    scan_trace,
    simulate,
)
from cloudlet.sim.report import PLOTS, SUMMARY_KEYS
from cloudlet.sim.traces import Frame, TraceMobility, write_fcd

ROOT = Path(__file__).resolve().parent.parent
METRO = ROOT / "configs" / "sim" / "small-metro.toml"
SUMO = ROOT / "configs" / "sim" / "sumo-trace.toml"

# --- mobility statistics -------------------------------------------------------------


def test_random_waypoint_statistics() -> None:
    rng = np.random.default_rng(1)
    m = RandomWaypoint(400, 1000.0, 1000.0, rng, speed_min_m_s=2.0, speed_max_m_s=10.0,
                       pause_min_s=0.0, pause_max_s=5.0)
    xs = []
    speeds = []
    prev = m.xy.copy()
    for _ in range(1500):
        m.step(1.0)
        moved = np.hypot(*(m.xy - prev).T)
        prev = m.xy.copy()
        assert moved.max() <= 10.0 + 1e-9
        speeds.append(m.speed[m.pause_left <= 0])
        xs.append(m.xy.copy())
    pos = np.concatenate(xs[500:])
    assert pos.min() >= 0 and pos.max() <= 1000
    v = np.concatenate(speeds[500:])
    # Legs draw speeds uniform in [2, 10], but a slow leg lasts longer: over time
    # the speed's density is 1/v, with median 2 sqrt(5) and mean 8 / ln 5.
    assert np.median(v) == pytest.approx(2 * np.sqrt(5), abs=0.15)
    assert v.mean() == pytest.approx(8 / np.log(5), abs=0.15)
    # The known centre bias of random waypoint: the middle ninth of the area holds
    # more than its ninth of the time, a corner ninth less.
    centre = ((np.abs(pos - 500) < 1000 / 6).all(axis=1)).mean()
    corner = ((pos < 1000 / 3).all(axis=1)).mean()
    assert centre > 1.5 / 9 and corner < 0.8 / 9


def test_gauss_markov_statistics() -> None:
    rng = np.random.default_rng(2)
    m = GaussMarkov(300, 5000.0, 5000.0, rng, mean_speed_m_s=10.0, speed_std_m_s=2.0,
                    direction_std_rad=0.3, alpha=0.8, edge_margin_m=200.0)
    speeds = []
    for _ in range(800):
        m.step(1.0)
        speeds.append(m.speed.copy())
        assert (m.xy >= 0).all() and (m.xy[:, 0] <= 5000).all() and (m.xy[:, 1] <= 5000).all()
    s = np.array(speeds[100:])
    assert s.mean() == pytest.approx(10.0, abs=0.2)
    assert s.std() == pytest.approx(2.0, abs=0.15)
    lag1 = np.corrcoef(s[:-1].ravel() - 10.0, s[1:].ravel() - 10.0)[0, 1]
    assert lag1 == pytest.approx(0.8, abs=0.03)
    # Positions spread over the whole area (no piling up at the edges).
    hist, _ = np.histogram(m.xy[:, 0], bins=5, range=(0, 5000))
    assert hist.min() > 0.3 * hist.mean()


def test_manhattan_grid_stays_on_streets_and_turns_as_told() -> None:
    rng = np.random.default_rng(3)
    m = ManhattanGrid(300, 2000.0, 2000.0, rng, block_m=100.0, speed_min_m_s=3.0,
                      speed_max_m_s=12.0, turn_probability=0.5)
    turns = straight = 0
    for _ in range(600):
        before = m.direction.copy()
        m.step(1.0)
        on_x = np.isclose(m.xy[:, 0] / 100, np.round(m.xy[:, 0] / 100))
        on_y = np.isclose(m.xy[:, 1] / 100, np.round(m.xy[:, 1] / 100))
        assert (on_x | on_y).all()
        assert (m.xy >= 0).all() and (m.xy <= 2000).all()
        interior = ((m.xy > 100) & (m.xy < 1900)).all(axis=1)
        changed = before != m.direction
        # Interior users that changed direction turned (never a U-turn there).
        assert not ((before[interior & changed] - m.direction[interior & changed]) % 4
                    == 2).any()
        turns += int((interior & changed).sum())
        straight += int((interior & ~changed).sum())
    # At 3-12 m/s on 100 m blocks, about 1 step in 13 crosses an intersection;
    # half of those crossings turn.
    assert 0.02 < turns / (turns + straight) < 0.06


# --- traces ---------------------------------------------------------------------------


def _frames() -> list[Frame]:
    """veh0 from t=0 to 4, veh1 from 2 to 5, veh0 back at 7 (a new session); a bus
    throughout (a CSV cannot say that a time has no one at all)."""
    out = []
    for t in range(9):
        ids = [i for i, (a, b) in {"veh0": (0, 5), "veh1": (2, 6)}.items() if a <= t < b]
        if t >= 7:
            ids.append("veh0")
        ids.append("bus")
        xy = np.array([[100.0 * t + 0.25 + k, 50.5 * k] for k in range(len(ids))])
        out.append(Frame(float(t), ids, xy.reshape(-1, 2)))
    return out


def _write_csv(path: Path, frames: list[Frame]) -> None:
    lines = ["t,id,x,y"]
    for fr in frames:
        lines += [f"{fr.t_s:g},{i},{x!r},{y!r}" for i, (x, y) in zip(fr.ids, fr.xy.tolist(),
                                                                     strict=True)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["csv", "fcd", "fcd.gz", "csv.gz"])
def test_trace_replay_is_exact(tmp_path: Path, kind: str) -> None:
    frames = _frames()
    path = tmp_path / f"trace.{kind}"
    if kind.startswith("csv"):
        plain = tmp_path / "plain.csv"
        _write_csv(plain, frames)
        data = plain.read_bytes()
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    else:
        write_fcd(frames, path if kind == "fcd.gz" else path.with_suffix(".xml"))
        if kind == "fcd":
            path = path.with_suffix(".xml")
    reader = read_csv_frames if kind.startswith("csv") else read_fcd_frames
    got = list(reader(path))
    assert [f.t_s for f in got] == [f.t_s for f in frames]
    for a, b in zip(got, frames, strict=True):
        assert a.ids == b.ids
        assert np.array_equal(a.xy, b.xy)  # exact: values written to 2 decimals
    info = scan_trace(path)
    assert (info.frames, info.ids, info.max_active) == (9, 3, 3)
    assert not info.geo
    mob = TraceMobility(path, info)
    seen = []
    for t in range(9):
        mob.advance(float(t))
        on = np.flatnonzero(mob.active)
        names = mob.names(on)
        seen.append(sorted(names))
        want = dict(zip(frames[t].ids, frames[t].xy.tolist(), strict=True))
        for s, n in zip(on.tolist(), names, strict=True):
            assert mob.xy[s].tolist() == want[n]
    assert seen[0] == ["bus", "veh0"] and seen[3] == ["bus", "veh0", "veh1"]
    assert seen[6] == ["bus"] and seen[7] == ["bus", "veh0"]
    mob.close()


def test_geo_fcd_is_projected_to_metres(tmp_path: Path) -> None:
    lon0, lat0 = 13.4, 52.5  # Berlin
    frames = [Frame(float(t), ["a"], np.array([[lon0 + 0.001 * t, lat0]])) for t in range(3)]
    path = tmp_path / "geo.fcd.xml.gz"
    write_fcd(frames, path, geo=True)
    info = scan_trace(path)
    assert info.geo
    mob = TraceMobility(path, info)
    mob.advance(0.0)
    x0 = mob.xy[0].copy()
    mob.advance(2.0)
    # 0.002 degrees of longitude at 52.5 N is about 135.7 m.
    assert np.hypot(*(mob.xy[0] - x0)) == pytest.approx(135.7, abs=0.5)
    mob.close()


def test_bad_traces_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("t,id,x,y\n0,a,1,2\n1,a,nope,2\n")
    with pytest.raises(ScenarioError, match=r"bad\.csv: line 3"):
        scan_trace(bad)
    back = tmp_path / "back.csv"
    back.write_text("0,a,1,2\n2,a,1,2\n1,a,1,2\n")
    with pytest.raises(ScenarioError, match="backwards"):
        scan_trace(back)
    xml = tmp_path / "broken.xml"
    xml.write_text('<fcd-export><timestep time="0"><vehicle id="a" x="1" y="2"/>')
    with pytest.raises(ScenarioError, match=r"broken\.xml"):
        scan_trace(xml)


# --- scenarios and the simulator ----------------------------------------------------------


def _scenario(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "key"), [
    ("[scenario]\nduration_s = 10\nstep = 1\n[area]\nwidth_m=1\nheight_m=1", "scenario.step"),
    ("[scenario]\nduration_s = -10\n", "scenario.duration_s"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 100\n"
     "[mobility]\nusers = 0\n", "mobility.users"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 100\n"
     "[mobility]\nmodel = 'gauss_markov'\nblock_m = 3\n", "mobility.block_m"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 100\n"
     "[policies.threshold]\nhorizon_s = 3\n", "policies.threshold.horizon_s"),
    ("[scenario]\nduration_s = 10\npolicies = ['never', 'psychic']\n[area]\nwidth_m = 1\n"
     "height_m = 1\n", "scenario.policies"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 100\n"
     "[[workloads]]\nmemory_mib = 10\noverlay_mib = 20\n", "workloads[0].overlay_mib"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 100\nheight_m = 'big'\n", "area.height_m"),
    ("[scenario]\nduration_s = 10\n", "area"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 1\nheight_m = 1\n[topology]\n"
     "layout = 'hexagonal'\n", "topology.layout"),
    ("[mobility]\nmodel = 'trace'\n", "mobility.file"),
    ("[scenario]\nduration_s = 10\n[area]\nwidth_m = 1\nheight_m = 1\n[extra]\n", "extra"),
])
def test_bad_scenarios_name_the_file_and_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = _scenario(tmp_path, text)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    assert str(path) in exc.value.message
    assert f"key '{key}'" in exc.value.message
    assert exc.value.code == "scenario_invalid"


def test_the_shipped_scenarios_load() -> None:
    scenarios = [p for p in (ROOT / "configs" / "sim").glob("*.toml")
                 if not p.name.endswith(".calibration.toml")  # included, not run
                 and not p.name.startswith("sweep-")]  # sweeps: tests/test_sweep.py
    assert len(scenarios) >= 4
    for path in scenarios:
        sc = load_scenario(path)
        assert sc.policies
    emulate = load_scenario(ROOT / "configs" / "sim" / "emulate-small.toml")
    assert emulate.migration.send_s_per_gib > 0  # its calibration is included
    city = load_scenario(ROOT / "configs" / "sim" / "city.toml")
    assert city.topology.count == 100 and city.mobility.users == 1000
    assert city.duration_s == 3600 and city.step_s == 1.0


def _short(path: Path, duration_s: float, **kw: object) -> object:
    return dataclasses.replace(load_scenario(path), duration_s=duration_s, **kw)


def test_same_seed_same_result() -> None:
    sc = _short(METRO, 300)
    a = simulate(sc)  # type: ignore[arg-type]
    b = simulate(sc)  # type: ignore[arg-type]
    c = simulate(dataclasses.replace(sc, seed=sc.seed + 1))  # type: ignore[type-var]
    for name in a.policies:
        ta, tb = a.policies[name].timeline, b.policies[name].timeline
        assert np.array_equal(ta, tb, equal_nan=True)
        sa = {k: v for k, v in a.policies[name].summary.items() if "wall" not in k
              and "per_s" not in k}
        sb = {k: v for k, v in b.policies[name].summary.items() if "wall" not in k
              and "per_s" not in k}
        assert sa == sb
    assert a.policies["never"].summary["within_budget"] != \
        c.policies["never"].summary["within_budget"]


def test_policies_rank_on_the_small_metro() -> None:
    result = simulate(load_scenario(METRO))
    share = {n: p.summary["within_budget"] for n, p in result.policies.items()}
    assert share["predictive"] > share["threshold"] > share["never"]
    s = result.policies["nearest"].summary
    assert s["migrations"] > 0 and s["bytes_moved"] > s["migrations"] * 192 * (1 << 20)
    assert result.policies["never"].summary["migrations"] == 0
    for p in result.policies.values():
        assert p.summary["interactions"] == result.policies["never"].summary["interactions"]
        assert p.summary["p50_ms"] <= p.summary["p95_ms"] <= p.summary["p99_ms"]


def test_migrations_share_backhaul_bandwidth(tmp_path: Path) -> None:
    """Users hop from cloudlet a to b at t = 2 s: two migrations over the one link
    take about twice as long as one."""
    def run(users: int) -> float:
        frames = [Frame(float(t), [f"u{i}" for i in range(users)],
                        np.array([[0.0 if t < 2 else 1000.0, 10.0 * i] for i in range(users)]))
                  for t in range(30)]
        trace = tmp_path / f"hop{users}.csv"
        _write_csv(trace, frames)
        path = _scenario(tmp_path, f"""
[scenario]
policies = ["nearest"]
trajectories = 0
[mobility]
model = "trace"
file = "{trace.name}"
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
[[workloads]]
memory_mib = 256
overlay_mib = 64
dirty_rate_mib_s = 0
""")
        res = simulate(load_scenario(path))
        tl = res.policies["nearest"].timeline
        done = np.flatnonzero(tl[:, 7] > 0)
        started = np.flatnonzero(tl[:, 6] > 0)
        assert tl[:, 7].sum() == users
        return float(done[-1] - started[0])

    one, two = run(1), run(2)
    # 64 MiB at 100 Mbit/s: ~5.4 s alone, ~10.7 s for two sharing the link.
    assert 5 <= one <= 6
    assert 10 <= two <= 12


def test_trace_vehicles_start_and_end_sessions() -> None:
    result = simulate(load_scenario(SUMO))
    assert result.trace is not None and result.trace.ids == 40
    for p in result.policies.values():
        assert p.summary["sessions"] == 40
        sessions = p.timeline[:, 1]
        assert sessions.max() == result.trace.max_active
        assert sessions[0] < sessions.max()  # vehicles enter after the start


def test_cli_sim_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    _write_csv(trace, _frames())
    out = tmp_path / "out"
    assert main(["sim", str(METRO), "--out", str(out), "--trace", str(trace),
                 "--policies", "never,predictive", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"never", "predictive"}
    for p in summary["policies"].values():
        assert set(SUMMARY_KEYS) <= set(p)
    for name in ("never", "predictive"):
        assert (out / f"timeline-{name}.csv").read_text().startswith("t_s,sessions,")
    for png in PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "predictive" in printed and "within" in printed
    # Errors: one line naming the problem, exit 1.
    assert main(["sim", str(METRO), "--policies", "never,psychic", "--no-progress"]) == 1
    assert "psychic" in capsys.readouterr().err


def test_duration_s_shortens_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sim", str(METRO), "--duration-s", "30", "--policies", "never",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["duration_s"] == 30
    assert "(30 ticks of 1 s)" in capsys.readouterr().out
    for bad in ("0", "-5", "nan", "inf"):
        assert main(["sim", str(METRO), "--duration-s", bad, "--no-progress"]) == 1
        assert "--duration-s: must be a positive number of seconds" in capsys.readouterr().err


def test_the_map_says_how_many_users_it_draws() -> None:
    from cloudlet.sim.report import map_title

    path = ROOT / "configs" / "sim" / "small-metro.toml"
    some = simulate(dataclasses.replace(load_scenario(path), duration_s=20, trajectories=12))
    assert "trajectories of 12 of 40 users (scenario.trajectories)" in map_title(some)
    every = simulate(dataclasses.replace(load_scenario(path), duration_s=20, trajectories=64))
    assert "trajectories of all 40 users" in map_title(every)
