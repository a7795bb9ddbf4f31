"""Real vehicular traces from Eclipse SUMO: a network, demand, a run, an FCD file.

Synthetic mobility models move users evenly; real traffic bunches at lights,
fills some streets and empties others, and vehicles enter and leave the city.
SUMO (the `eclipse-sumo` wheel, `pip install 'cloudlet[sumo]'`) simulates that,
and its floating-car data (`sumo --fcd-output`) is what `cloudlet sim --trace`
replays. Making one takes three of SUMO's programs in a row: `netgenerate` (a
grid, spider or random street network, unless the user brings one),
`randomTrips.py` (random trips routed by `duarouter`: the demand, unless the user
brings routes) and `sumo` itself.

The command lines are pure functions of a `TraceSpec` (and a test reads them);
`make_trace` is the one place that runs them, as subprocesses in a temporary
directory. Its output is reproducible: SUMO is deterministic for a seed, and the
header SUMO writes (the date, the temporary paths) is replaced by one naming the
SUMO version and the options, and gzip gets no timestamp, so the same spec gives
the same bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from cloudlet.errors import (
    InvalidArgument,
    MissingDependency,
    ScenarioError,
    TraceInputInvalid,
    TraceToolFailed,
)
from cloudlet.sim.traces import scan_trace

INSTALL_HINT = "pip install 'cloudlet[sumo]'"
NETS = ("grid", "spider", "random")
JUNCTIONS = ("traffic_light", "priority", "right_before_left")
# 50 km/h: the usual urban speed limit, as m/s.
URBAN_SPEED_M_S = 13.89
# What the trace keeps of SUMO's FCD attributes (id and time always): the
# simulator reads x and y; speed is kept for whoever plots the trace. Dropping
# angle, lane, pos, slope and type halves the file.
FCD_ATTRIBUTES = ("x", "y", "speed")
# How much of a failing tool's stderr the error shows: its "Error: ..." lines
# and its last line, or (none such) its last lines, enough for a traceback.
STDERR_TAIL_CHARS = 2000
GZIP_MAGIC = b"\x1f\x8b"

_STEP = re.compile(rb"Step #(\d+(?:\.\d+)?)")
_VERSION = re.compile(r"by Eclipse SUMO sumo (\S+)")
_TIMESTEP = re.compile(r'(\s*<timestep time=")([0-9.]+)"(.*\n?)', re.S)


@dataclass(frozen=True)
class SumoTools:
    """Where one SUMO install keeps what a trace needs."""

    home: Path
    sumo: Path
    netgenerate: Path
    random_trips: Path


def find_sumo(environ: Mapping[str, str] | None = None) -> SumoTools:
    """The SUMO install to use: `$SUMO_HOME` when set (SUMO's own convention; a
    wrong one is an error, never silently skipped), else the `eclipse-sumo`
    wheel's, else a `sumo` on `$PATH` with its tools beside it."""
    env = os.environ if environ is None else environ
    if env.get("SUMO_HOME"):
        home = Path(env["SUMO_HOME"])
        tools = _tools_in(home)
        if tools is None:
            raise MissingDependency(
                f"SUMO_HOME={home} holds no SUMO (bin/sumo, bin/netgenerate, "
                f"tools/randomTrips.py): fix or unset it, or {INSTALL_HINT}")
        return tools
    spec = importlib.util.find_spec("sumo")
    if spec is not None and spec.origin is not None:
        tools = _tools_in(Path(spec.origin).parent)
        if tools is not None:
            return tools
    on_path = shutil.which("sumo", path=env.get("PATH", ""))
    if on_path is not None:
        prefix = Path(on_path).resolve().parent.parent
        for home in (prefix, prefix / "share" / "sumo"):
            tools = _tools_in(home)
            if tools is not None:
                return tools
    raise MissingDependency(f"SUMO is not installed: {INSTALL_HINT}")


def _tools_in(home: Path) -> SumoTools | None:
    sumo = shutil.which("sumo", path=str(home / "bin"))
    netgenerate = shutil.which("netgenerate", path=str(home / "bin"))
    random_trips = home / "tools" / "randomTrips.py"
    if sumo is None or netgenerate is None or not random_trips.is_file():
        return None
    return SumoTools(home=home, sumo=Path(sumo), netgenerate=Path(netgenerate),
                     random_trips=random_trips)


@dataclass(frozen=True)
class NetSpec:
    """A network for `netgenerate` to build. Sizes: a grid spans
    (grid_number - 1) x grid_length_m each way; a spider has circles
    spider_radius_m apart; a random net grows `random_iterations` edges."""

    kind: str = "grid"
    grid_number: int = 11
    grid_length_m: float = 300.0
    spider_arms: int = 8
    spider_circles: int = 6
    spider_radius_m: float = 250.0
    random_iterations: int = 200
    lanes: int = 1
    junction: str = "traffic_light"

    def __post_init__(self) -> None:
        if self.kind not in NETS:
            raise InvalidArgument(f"--net: one of {', '.join(NETS)} (got {self.kind!r})")
        if self.junction not in JUNCTIONS:
            raise InvalidArgument(
                f"--junction: one of {', '.join(JUNCTIONS)} (got {self.junction!r})")
        if min(self.grid_number, self.spider_arms, self.spider_circles,
               self.random_iterations, self.lanes) < 1 or self.grid_number < 2:
            raise InvalidArgument("network sizes must be positive (a grid: 2+ junctions)")
        if not min(self.grid_length_m, self.spider_radius_m) > 0 or not all(
                math.isfinite(x) for x in (self.grid_length_m, self.spider_radius_m)):
            raise InvalidArgument("street lengths must be positive numbers")


@dataclass(frozen=True)
class TraceSpec:
    """Everything a trace is made from. `net_file` replaces the generated network,
    `routes_file` the generated demand. Demand: randomTrips departs a vehicle every
    `period_s` from 0 to `depart_until_s` (default: the whole run), so about
    trip time / period are on the road at once; `min_trip_m` keeps trips from
    being a block long. `warmup_s` runs that long before the trace starts (its
    time 0), so a trace can open on traffic already at its level instead of an
    empty city filling up; `depart_until_s` counts from the trace's start.
    `max_speed_m_s` is the generated streets' limit and the vehicles' own top
    speed."""

    duration_s: float = 900.0
    seed: int = 1
    net: NetSpec = NetSpec()
    net_file: Path | None = None
    routes_file: Path | None = None
    period_s: float = 10.0
    depart_until_s: float | None = None
    warmup_s: float = 0.0
    min_trip_m: float | None = None
    fringe_factor: float | None = None
    max_speed_m_s: float | None = URBAN_SPEED_M_S

    def __post_init__(self) -> None:
        numbers = {"--duration-s": self.duration_s, "--period": self.period_s,
                   "--depart-until-s": self.depart_until_s, "--warmup-s": self.warmup_s,
                   "--min-trip-m": self.min_trip_m, "--fringe-factor": self.fringe_factor,
                   "--max-speed-m-s": self.max_speed_m_s}
        for option, value in numbers.items():  # NaN passes every comparison below
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{option} must be a finite number (got {value})")
        if self.duration_s <= 0:
            raise InvalidArgument("--duration-s must be positive")
        if self.period_s <= 0:
            raise InvalidArgument("--period must be positive")
        if self.depart_until_s is not None and self.depart_until_s <= 0:
            raise InvalidArgument("--depart-until-s must be positive")
        if self.warmup_s < 0:
            raise InvalidArgument("--warmup-s must be 0 or more")
        if self.max_speed_m_s is not None and self.max_speed_m_s <= 0:
            raise InvalidArgument("--max-speed-m-s must be positive")
        if self.routes_file is not None and self.net_file is None:
            raise InvalidArgument("--routes needs the --net-file its edges belong to")

    def options(self) -> list[tuple[str, str]]:
        """The `cloudlet trace sumo` options (names without dashes) that make this
        trace, the output aside; defaults of the network's shape are left out."""
        opts: list[tuple[str, str]] = []
        if self.net_file is not None:
            opts.append(("net-file", str(self.net_file)))
        else:
            n, default = self.net, NetSpec()
            opts.append(("net", n.kind))
            shapes: dict[str, list[tuple[str, object, object]]] = {
                "grid": [("grid-number", n.grid_number, default.grid_number),
                         ("grid-length-m", n.grid_length_m, default.grid_length_m)],
                "spider": [("spider-arms", n.spider_arms, default.spider_arms),
                           ("spider-circles", n.spider_circles, default.spider_circles),
                           ("spider-radius-m", n.spider_radius_m, default.spider_radius_m)],
                "random": [("random-iterations", n.random_iterations,
                            default.random_iterations)]}
            knobs = shapes[n.kind] + [("lanes", n.lanes, default.lanes),
                                       ("junction", n.junction, default.junction)]
            opts += [(name, _num(v)) for name, v, d in knobs if v != d]
        if self.routes_file is not None:
            opts.append(("routes", str(self.routes_file)))
        else:
            opts.append(("period", _num(self.period_s)))
            for name, value in (("depart-until-s", self.depart_until_s),
                                ("min-trip-m", self.min_trip_m),
                                ("fringe-factor", self.fringe_factor)):
                if value is not None:
                    opts.append((name, _num(value)))
        if self.warmup_s:
            opts.append(("warmup-s", _num(self.warmup_s)))
        opts += [("duration-s", _num(self.duration_s)), ("seed", str(self.seed))]
        if self.max_speed_m_s is not None and self.routes_file is None:
            opts.append(("max-speed-m-s", _num(self.max_speed_m_s)))
        return opts

    def command(self, out: str) -> str:
        """The shell command that makes this trace into `out`."""
        return " ".join(["cloudlet trace sumo --out", shlex.quote(out)] +
                        [f"--{k} {shlex.quote(v)}" for k, v in self.options()])


def _num(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def netgenerate_args(tools: SumoTools, spec: TraceSpec, net_out: Path) -> list[str]:
    n = spec.net
    args = [str(tools.netgenerate), f"--{'rand' if n.kind == 'random' else n.kind}"]
    if n.kind == "grid":
        args += ["--grid.number", str(n.grid_number), "--grid.length", _num(n.grid_length_m)]
    elif n.kind == "spider":
        args += ["--spider.arm-number", str(n.spider_arms),
                 "--spider.circle-number", str(n.spider_circles),
                 "--spider.space-radius", _num(n.spider_radius_m)]
    else:
        args += ["--rand.iterations", str(n.random_iterations), "--rand.grid"]
    if spec.max_speed_m_s is not None:
        args += ["--default.speed", _num(spec.max_speed_m_s)]
    args += ["--default.lanenumber", str(n.lanes), "--default-junction-type", n.junction,
             "--seed", str(spec.seed), "--no-turnarounds", "true",
             "--output-file", str(net_out)]
    return args


def random_trips_args(tools: SumoTools, spec: TraceSpec, net: Path, routes_out: Path,
                      trips_out: Path, python: str = sys.executable) -> list[str]:
    until = spec.warmup_s + (spec.duration_s if spec.depart_until_s is None
                             else spec.depart_until_s)
    args = [python, str(tools.random_trips), "--net-file", str(net),
            "--route-file", str(routes_out), "--output-trip-file", str(trips_out),
            "--begin", "0", "--end", _num(float(until)), "--period", _num(spec.period_s),
            "--seed", str(spec.seed), "--prefix", "veh", "--validate",
            "--vehicle-class", "passenger"]
    if spec.max_speed_m_s is not None:
        # With --vehicle-class, vType attributes go into the vType randomTrips writes.
        args += ["--trip-attributes", f'maxSpeed="{_num(spec.max_speed_m_s)}"']
    if spec.min_trip_m is not None:
        args += ["--min-distance", _num(spec.min_trip_m)]
    if spec.fringe_factor is not None:
        args += ["--fringe-factor", _num(spec.fringe_factor)]
    return args


def sumo_args(tools: SumoTools, spec: TraceSpec, net: Path, routes: Path,
              fcd_out: Path) -> list[str]:
    return [str(tools.sumo), "--net-file", str(net), "--route-files", str(routes),
            "--begin", "0", "--end", _num(float(spec.warmup_s + spec.duration_s)),
            "--step-length", "1",
            "--seed", str(spec.seed), "--fcd-output", str(fcd_out),
            "--fcd-output.attributes", ",".join(FCD_ATTRIBUTES),
            "--step-log.period", "30", "--duration-log.disable", "true",
            "--no-warnings", "true"]


def check_xml_root(path: Path, root: str, what: str) -> None:
    """Refuse an input before SUMO sees it: SUMO's own message for a wrong file
    comes late and names a temporary path."""
    if not path.is_file():
        raise TraceInputInvalid(f"{path}: no such {what} file", path=str(path))
    try:
        with _open_maybe_gzip(path) as f:
            _, elem = next(iter(ET.iterparse(f, events=("start",))))
    except (ET.ParseError, StopIteration, OSError, EOFError) as exc:
        raise TraceInputInvalid(f"{path}: not a SUMO {what} file (not XML: {exc})",
                                path=str(path)) from None
    if elem.tag != root:
        raise TraceInputInvalid(
            f"{path}: not a SUMO {what} file (its root is <{elem.tag}>, not <{root}>)",
            path=str(path))


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    with path.open("rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    return cast(IO[bytes], gzip.open(path, "rb")) if gz else path.open("rb")


@dataclass(frozen=True)
class TraceMade:
    out: Path
    size_bytes: int
    sumo_version: str
    wall_s: float


Progress = Callable[[str], None]


def make_trace(spec: TraceSpec, out: Path, tools: SumoTools | None = None,
               progress: Progress | None = None) -> TraceMade:
    """Run SUMO's tools for `spec` in a temporary directory and write the gzipped
    FCD trace to `out` (replaced only once complete)."""
    say = progress or (lambda _msg: None)
    tools = tools or find_sumo()
    if spec.net_file is not None:
        check_xml_root(spec.net_file, "net", "network")
    if spec.routes_file is not None:
        check_xml_root(spec.routes_file, "routes", "routes")
    t0 = time.perf_counter()
    env = {**os.environ, "SUMO_HOME": str(tools.home)}
    with tempfile.TemporaryDirectory(prefix="cloudlet-sumo-") as tmp_name:
        tmp = Path(tmp_name)
        net = spec.net_file.resolve() if spec.net_file is not None else tmp / "net.net.xml"
        if spec.net_file is None:
            say(f"netgenerate: a {spec.net.kind} network")
            _run("netgenerate", netgenerate_args(tools, spec, net), tmp, env)
        routes = (spec.routes_file.resolve() if spec.routes_file is not None
                  else tmp / "routes.rou.xml")
        if spec.routes_file is None:
            say(f"randomTrips.py: a vehicle every {spec.period_s:g} s, routed by duarouter")
            _run("randomTrips.py",
                 random_trips_args(tools, spec, net, routes, tmp / "trips.trips.xml"),
                 tmp, env)
        fcd = tmp / "fcd.xml"
        say(f"sumo: {spec.warmup_s + spec.duration_s:g} s of traffic")
        _run("sumo", sumo_args(tools, spec, net, routes, fcd), tmp, env,
             on_step=_every_tenth(spec.warmup_s + spec.duration_s, say))
        version = _finish(fcd, out, spec)
    return TraceMade(out=out, size_bytes=out.stat().st_size, sumo_version=version,
                     wall_s=time.perf_counter() - t0)


def _every_tenth(duration_s: float, say: Progress) -> Callable[[float], None]:
    shown = [0]

    def on_step(t_s: float) -> None:
        tenth = int(10 * t_s / duration_s)
        if 0 < tenth < 10 and tenth > shown[0]:
            shown[0] = tenth
            say(f"sumo: {t_s:g} / {duration_s:g} s simulated")
    return on_step


def _run(step: str, args: Sequence[str], cwd: Path, env: Mapping[str, str],
         on_step: Callable[[float], None] | None = None) -> None:
    """Run one tool; its stderr goes to a file (a pipe left unread could fill and
    stall it), its stdout is read for SUMO's step log."""
    err_path = cwd / f"{Path(step).stem}.stderr"
    with err_path.open("wb") as err:
        try:
            proc = subprocess.Popen(args, cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=err)
        except OSError as exc:
            raise TraceToolFailed(f"{step}: cannot start {args[0]}: {exc}") from None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out_tail = b""
        with proc:
            for chunk in iter(lambda: os.read(fd, 4096), b""):
                out_tail = (out_tail + chunk)[-4096:]
                if on_step is not None:
                    steps = _STEP.findall(out_tail)
                    if steps:
                        on_step(float(steps[-1]))
    if proc.returncode != 0:
        text = err_path.read_bytes().decode("utf-8", "replace") or out_tail.decode(
            "utf-8", "replace")
        lines = text.strip().splitlines()
        # SUMO's tools say what went wrong on "Error: ..." lines; a Python tool
        # that carries on then dies of it ends with a traceback that says less.
        said = [line for line in lines if line.startswith("Error")]
        tail = "\n".join((said + lines[-1:]) if said else lines)[-STDERR_TAIL_CHARS:]
        raise TraceToolFailed(f"{step} failed (exit {proc.returncode}):\n{tail}",
                              step=step, returncode=proc.returncode)


def _finish(fcd: Path, out: Path, spec: TraceSpec) -> str:
    """Gzip SUMO's FCD into `out` with a reproducible header (SUMO's own holds the
    date and the temporary paths, so every run's bytes would differ), without the
    warm-up's time steps and with times counted from the trace's start."""
    version = "?"
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A comment may not hold "--", so the options are written name=value.
    made_with = " ".join(f"{k}={v}".replace("--", "-") for k, v in spec.options())
    try:
        with fcd.open("r", encoding="utf-8") as src, partial.open("wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            in_comment = in_warmup = False
            for line in src:
                if line.startswith("<!-- generated on"):
                    m = _VERSION.search(line)
                    version = m.group(1) if m else version
                    in_comment = True
                if in_comment:
                    if line.rstrip().endswith("-->"):
                        in_comment = False
                        gz.write((f"<!-- Eclipse SUMO {version} floating-car data, made by "
                                  f"cloudlet trace sumo with:\n     {made_with}\n-->\n"
                                  ).encode())
                    continue
                if in_warmup:
                    in_warmup = line.strip() != "</timestep>"
                    continue
                step = _TIMESTEP.match(line)
                if step is not None and spec.warmup_s:
                    t_s = float(step.group(2)) - spec.warmup_s
                    if t_s < 0:
                        in_warmup = not step.group(3).startswith("/")
                        continue
                    line = f"{step.group(1)}{t_s:.2f}\"{step.group(3)}"
                gz.write(line.encode())
        try:  # a trace the simulator cannot replay replaces nothing
            scan_trace(partial, "fcd")
        except ScenarioError as exc:
            raise ScenarioError(f"{out}: not written: the SUMO run gives no trace to replay "
                                f"({exc.message.removeprefix(f'{partial}: ')})") from None
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return version
