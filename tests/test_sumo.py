"""`cloudlet trace sumo` with the real Eclipse SUMO: small networks, a minute of
traffic, each trace read back by the simulator's own reader."""

from __future__ import annotations

import gzip
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cloudlet.cli import main
from cloudlet.errors import (
    InvalidArgument,
    MissingDependency,
    TraceInputInvalid,
    TraceToolFailed,
)
from cloudlet.sim.sumo import (
    INSTALL_HINT,
    NetSpec,
    TraceSpec,
    find_sumo,
    make_trace,
    netgenerate_args,
    random_trips_args,
    sumo_args,
)
from cloudlet.sim.traces import read_fcd_frames, scan_trace

pytestmark = pytest.mark.slow

try:
    TOOLS = find_sumo()
except MissingDependency as exc:
    pytest.skip(f"SUMO is not installed ({exc.message})", allow_module_level=True)

# A 300 m grid, a vehicle every 4 s for a minute: ~0.5 s of SUMO.
SMALL = ["--grid-number", "3", "--grid-length-m", "150", "--period", "4",
         "--duration-s", "60", "--junction", "priority"]


def _presence(path: Path) -> tuple[list[float], dict[str, float], dict[str, float]]:
    times: list[float] = []
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for frame in read_fcd_frames(path):
        times.append(frame.t_s)
        for ident in frame.ids:
            first.setdefault(ident, frame.t_s)
            last[ident] = frame.t_s
    return times, first, last


def test_a_small_trace_has_vehicles_entering_and_leaving(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.fcd.xml.gz"
    assert main(["trace", "sumo", "--out", str(out), *SMALL, "--seed", "5"]) == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    times, first, last = _presence(out)
    assert times == [float(t) for t in range(60)]  # every second, from 0
    assert len(first) >= 10  # one every 4 s, some perhaps not routable
    assert min(first.values()) == 0 and max(first.values()) >= 40  # they keep entering
    assert any(t < times[-1] for t in last.values())  # and some arrive and leave
    info = scan_trace(out)
    assert info.ids == len(first) and 0 < info.max_active < info.ids
    assert 250 <= info.bbox[2] - info.bbox[0] <= 350  # the 300 m grid
    captured = capsys.readouterr()
    assert f"{info.ids} vehicles" in captured.out
    assert "cloudlet trace sumo: sumo:" in captured.err  # progress lines
    # The trace says how it was made (and not SUMO's date or temporary paths).
    text = gzip.decompress(out.read_bytes()).decode()
    assert "grid-number=3" in text and "seed=5" in text and "generated on" not in text


def test_the_same_seed_gives_the_same_file(tmp_path: Path) -> None:
    spec = TraceSpec(duration_s=40, seed=9, period_s=4, net=NetSpec(grid_number=3,
                                                                     grid_length_m=150))
    one, two, other = (tmp_path / f"{n}.fcd.xml.gz" for n in ("one", "two", "other"))
    make_trace(spec, one, TOOLS)
    make_trace(spec, two, TOOLS)
    make_trace(TraceSpec(duration_s=40, seed=10, period_s=4, net=spec.net), other, TOOLS)
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() != other.read_bytes()


def test_a_warm_up_opens_the_trace_on_traffic(tmp_path: Path) -> None:
    out = tmp_path / "warm.fcd.xml.gz"
    make_trace(TraceSpec(duration_s=30, warmup_s=40, seed=2, period_s=2,
                         net=NetSpec(grid_number=3, grid_length_m=150)), out, TOOLS)
    frames = list(read_fcd_frames(out))
    assert [f.t_s for f in frames] == [float(t) for t in range(30)]  # counted from its start
    assert len(frames[0].ids) >= 5  # the city is not empty at time 0


def _user_net(tmp_path: Path) -> Path:
    net = tmp_path / "mine.net.xml"
    args = netgenerate_args(TOOLS, TraceSpec(seed=1, net=NetSpec(grid_number=3,
                                                                 grid_length_m=200)), net)
    subprocess.run(args, check=True, capture_output=True)
    return net


def test_a_user_net_and_routes(tmp_path: Path) -> None:
    net = _user_net(tmp_path)
    # Random trips on the user's network.
    out = tmp_path / "on-mine.fcd.xml.gz"
    make_trace(TraceSpec(duration_s=30, period_s=3, net_file=net), out, TOOLS)
    assert scan_trace(out).ids >= 5
    # The user's own demand: two named vehicles between two of the network's streets.
    edges = [e.get("id") for e in ET.parse(net).getroot().iter("edge")
             if e.get("function") != "internal"]
    routes = tmp_path / "mine.rou.xml"
    routes.write_text(
        f'<routes>\n  <trip id="alice" depart="0" from="{edges[0]}" to="{edges[-1]}"/>\n'
        f'  <trip id="bob" depart="5" from="{edges[-1]}" to="{edges[0]}"/>\n</routes>\n')
    out = tmp_path / "routed.fcd.xml.gz"
    make_trace(TraceSpec(duration_s=30, net_file=net, routes_file=routes), out, TOOLS)
    _, first, _ = _presence(out)
    assert first == {"alice": 0.0, "bob": 5.0}


def test_command_lines_carry_the_spec(tmp_path: Path) -> None:
    spec = TraceSpec(duration_s=120, seed=4, period_s=2.5, min_trip_m=500, warmup_s=60,
                     max_speed_m_s=10,
                     net=NetSpec(kind="spider", spider_arms=5, lanes=2))
    net = netgenerate_args(TOOLS, spec, tmp_path / "n.net.xml")
    assert net[:2] == [str(TOOLS.netgenerate), "--spider"]
    assert net[net.index("--spider.arm-number") + 1] == "5"
    assert net[net.index("--default.speed") + 1] == "10"
    assert net[net.index("--default.lanenumber") + 1] == "2"
    trips = random_trips_args(TOOLS, spec, tmp_path / "n", tmp_path / "r", tmp_path / "t")
    assert trips[trips.index("--end") + 1] == "180"  # departures run on through the warm-up
    assert trips[trips.index("--period") + 1] == "2.5"
    assert 'maxSpeed="10"' in trips
    run = sumo_args(TOOLS, spec, tmp_path / "n", tmp_path / "r", tmp_path / "f")
    assert run[run.index("--end") + 1] == "180"
    assert run[run.index("--seed") + 1] == "4"
    assert spec.command("x.fcd.xml.gz") == (
        "cloudlet trace sumo --out x.fcd.xml.gz --net spider --spider-arms 5 --lanes 2 "
        "--period 2.5 --min-trip-m 500 --warmup-s 60 --duration-s 120 --seed 4 "
        "--max-speed-m-s 10")
    with pytest.raises(InvalidArgument, match="--net-file"):
        TraceSpec(routes_file=tmp_path / "r.rou.xml")
    with pytest.raises(InvalidArgument, match="--net"):
        NetSpec(kind="hexagon")


def test_errors_are_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "never.fcd.xml.gz"
    garbage = tmp_path / "garbage.net.xml"
    garbage.write_text("this is no network\n")
    with pytest.raises(TraceInputInvalid, match="not XML"):
        make_trace(TraceSpec(net_file=garbage), out, TOOLS)
    wrong = tmp_path / "wrong.net.xml"
    wrong.write_text("<routes/>\n")
    with pytest.raises(TraceInputInvalid, match="root is <routes>"):
        make_trace(TraceSpec(net_file=wrong), out, TOOLS)
    # A <net> SUMO cannot use: the tool's own words come back.
    broken = tmp_path / "broken.net.xml"
    broken.write_text('<net version="1.20"><edge id="e" from="a" to="b"/></net>\n')
    with pytest.raises(TraceToolFailed, match=r"(?s)failed.*Error: .*edge") as failed:
        make_trace(TraceSpec(net_file=broken, duration_s=10), out, TOOLS)
    assert failed.value.details["step"] in ("randomTrips.py", "sumo")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))

    # Through the command: one line naming the code, exit 1.
    assert main(["trace", "sumo", "--out", str(out), "--net-file", str(garbage)]) == 1
    assert "cloudlet: error [trace_input_invalid]:" in capsys.readouterr().err
    monkeypatch.setenv("SUMO_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDependency, match="nowhere"):
        find_sumo()
    assert main(["trace", "sumo", "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "cloudlet: error [missing_dependency]:" in err and INSTALL_HINT in err
    assert find_sumo({"PATH": str(tmp_path)}).sumo.is_file()  # the wheel's, no SUMO_HOME
    assert not out.exists()


def test_numbers_must_be_finite_and_an_empty_run_replaces_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for option, said in (("--duration-s", "--duration-s must be a finite number"),
                         ("--period", "--period must be a finite number"),
                         ("--warmup-s", "--warmup-s must be a finite number"),
                         ("--grid-length-m", "street lengths must be positive numbers")):
        assert main(["trace", "sumo", "--out", str(tmp_path / "n.fcd.xml.gz"), *SMALL,
                     option, "nan"]) == 1
        assert said in capsys.readouterr().err
    assert not (tmp_path / "n.fcd.xml.gz").exists()
    kept = tmp_path / "kept.fcd.xml.gz"
    kept.write_bytes(b"an earlier trace")
    # One vehicle, gone before the warm-up ends: nothing left to replay.
    assert main(["trace", "sumo", "--out", str(kept), "--grid-number", "2", "--grid-length-m",
                 "100", "--period", "500", "--warmup-s", "200", "--duration-s", "10",
                 "--quiet"]) == 1
    assert "not written: the SUMO run gives no trace to replay" in capsys.readouterr().err
    assert kept.read_bytes() == b"an earlier trace"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.fcd.xml.gz"]
