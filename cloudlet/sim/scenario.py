"""Scenario files: the TOML that describes one simulation, read strictly.

A scenario is read once into frozen objects and checked key by key: a typo or a
value out of range stops the run before it starts with a `ScenarioError` that
names the file and the key (`city.toml: key 'mobility.users': must be an integer
>= 1 (got -5)`), because a silently ignored key gives a plausible, wrong result.
Every key, its default and its unit is listed in docs/sim.md.

`[migration] calibration = "PARAMS.toml"` includes the `[migration]` table of a
file written by `cloudlet calibrate` (fitted to live migrations): its keys
replace the defaults, and keys the scenario writes itself win over it, so one
scenario can pin a parameter while the rest follows the measurements.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from cloudlet.errors import InvalidArgument, ScenarioError
from cloudlet.placement import POLICIES, Policy, make_policy

MOBILITY_MODELS = ("random_waypoint", "gauss_markov", "manhattan", "trace")
LAYOUTS = ("grid", "random", "list", "file")
BACKHAUL_KINDS = ("mesh", "star", "full", "links")
TRACE_FORMATS = ("auto", "csv", "fcd")
TRACE_COORDS = ("auto", "plane", "geo")

# Keys each mobility model reads besides `model` (and `users` for synthetic ones).
_MOBILITY_KEYS = {
    "random_waypoint": {"users", "speed_min_m_s", "speed_max_m_s", "pause_min_s",
                        "pause_max_s"},
    "gauss_markov": {"users", "mean_speed_m_s", "speed_std_m_s", "direction_std_rad",
                     "alpha", "edge_margin_m"},
    "manhattan": {"users", "block_m", "speed_min_m_s", "speed_max_m_s", "turn_probability",
                  "speed_change_probability"},
    "trace": {"file", "format", "coords", "elements"},
}


@dataclass(frozen=True)
class MobilitySpec:
    model: str = "random_waypoint"
    users: int = 20
    speed_min_m_s: float = 1.0
    speed_max_m_s: float = 15.0
    pause_min_s: float = 0.0
    pause_max_s: float = 30.0
    mean_speed_m_s: float = 8.0
    speed_std_m_s: float = 3.0
    direction_std_rad: float = 0.4
    alpha: float = 0.85
    edge_margin_m: float = 100.0
    block_m: float = 200.0
    turn_probability: float = 0.5
    speed_change_probability: float = 0.1
    file: Path | None = None
    format: str = "auto"
    coords: str = "auto"
    elements: tuple[str, ...] = ("vehicle", "person")


@dataclass(frozen=True)
class CloudletSpec:
    name: str
    x_m: float
    y_m: float
    capacity_vms: int | None = None
    memory_gib: float | None = None


@dataclass(frozen=True)
class TopologySpec:
    layout: str = "grid"
    count: int = 4
    rows: int | None = None
    file: Path | None = None
    cloudlets: tuple[CloudletSpec, ...] = ()
    capacity_vms: int = 64
    memory_gib: float = 64.0
    access_range_m: float = 1000.0
    radio_rtt_ms: float = 8.0
    out_of_range_rtt_ms: float = 30.0


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    bandwidth_mbit_s: float | None = None
    rtt_ms: float | None = None


@dataclass(frozen=True)
class BackhaulSpec:
    kind: str = "mesh"
    neighbours: int = 3
    bandwidth_mbit_s: float = 1000.0
    link_rtt_ms: float = 2.0
    hop_rtt_ms: float = 1.0
    core_rtt_ms: float = 5.0
    links: tuple[LinkSpec, ...] = ()


@dataclass(frozen=True)
class LatencySpec:
    propagation_rtt_ms_per_km: float = 0.01
    queue_service_ms: float = 1.0
    max_utilisation: float = 0.95


@dataclass(frozen=True)
class MigrationSpec:
    stop_mib: float = 1.0
    max_rounds: int = 30
    resume_ms: float = 10.0
    wire_ratio: float = 1.0
    setup_s: float = 0.0
    setup_s_per_gib: float = 0.0
    send_s_per_gib: float = 0.0
    calibration: Path | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "vdi"
    share: float = 1.0
    memory_mib: float = 512.0
    overlay_mib: float = 128.0
    dirty_rate_mib_s: float = 8.0
    interaction_rate_hz: float = 5.0
    budget_ms: float = 30.0
    service_ms: float = 5.0
    jitter_ms: float = 2.0


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    seed: int
    duration_s: float | None
    step_s: float
    decision_interval_s: float
    policies: tuple[str, ...]
    ping_pong_window_s: float
    trajectories: int
    area_m: tuple[float, float] | None
    mobility: MobilitySpec
    topology: TopologySpec
    backhaul: BackhaulSpec
    latency: LatencySpec
    migration: MigrationSpec
    workloads: tuple[WorkloadSpec, ...]
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def policy(self, name: str) -> Policy:
        return make_policy(name, **self.policy_params.get(name, {}))

    def with_trace(self, trace: Path) -> Scenario:
        """The same scenario with its mobility replaced by a trace file (`--trace`)."""
        mob = replace(MobilitySpec(), model="trace", file=trace,
                      elements=self.mobility.elements)
        dur = self.duration_s if self.mobility.model == "trace" else None
        return replace(self, mobility=mob, duration_s=dur, area_m=None)

    def with_duration(self, duration_s: float) -> Scenario:
        """The same scenario for `duration_s` simulated seconds (`--duration-s`): a
        short look at a long scenario, or a trace cut before its end."""
        if not math.isfinite(duration_s) or duration_s <= 0:
            raise ScenarioError(f"--duration-s: must be a positive number of seconds "
                                f"(got {duration_s:g})")
        return replace(self, duration_s=duration_s)

    def with_policies(self, names: tuple[str, ...]) -> Scenario:
        for name in names:
            if name not in POLICIES:
                raise ScenarioError(
                    f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
        return replace(self, policies=names)


class _Table:
    """One TOML table being read: typed getters, then `done()` rejects unknown keys."""

    def __init__(self, data: Any, key: str, file: Path) -> None:
        self.file = file
        self.key = key
        if not isinstance(data, dict):
            self.fail("", f"must be a table (got {type(data).__name__})")
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key and key else (self.key or key)

    def fail(self, key: str, why: str) -> NoReturn:
        raise ScenarioError(f"{self.file}: key '{self.path(key)}': {why}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def number(self, key: str, default: float, *, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False) -> float:
        if key not in self.data:
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number (got {value!r})")
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(key, f"must be a finite number (got {value!r})")
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.fail(key, f"must be {'>' if lo_open else '>='} {lo:g} (got {value!r})")
        if hi is not None and v > hi:
            self.fail(key, f"must be <= {hi:g} (got {value!r})")
        return v

    def integer(self, key: str, default: int, *, lo: int | None = None) -> int:
        if key not in self.data:
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer (got {value!r})")
        if lo is not None and value < lo:
            self.fail(key, f"must be an integer >= {lo} (got {value!r})")
        return int(value)

    def opt_integer(self, key: str, *, lo: int) -> int | None:
        return self.integer(key, 0, lo=lo) if key in self.data else None

    def opt_number(self, key: str, *, lo: float, lo_open: bool = False) -> float | None:
        return self.number(key, 0.0, lo=lo, lo_open=lo_open) if key in self.data else None

    def string(self, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        if key not in self.data:
            return default
        value = self.raw(key)
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string (got {value!r})")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return str(value)

    def file_path(self, key: str) -> Path | None:
        if key not in self.data:
            return None
        value = self.string(key, "")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.file.parent / p)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if key not in self.data:
            return default
        value = self.raw(key)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v for v in value)):
            self.fail(key, f"must be a non-empty list of strings (got {value!r})")
        return tuple(value)

    def table(self, key: str) -> _Table:
        value = self.raw(key) if key in self.data else {}
        return _Table(value, self.path(key), self.file)

    def tables(self, key: str) -> list[_Table]:
        if key not in self.data:
            return []
        value = self.raw(key)
        if not isinstance(value, list):
            self.fail(key, f"must be an array of tables ([[{self.path(key)}]])")
        return [_Table(v, f"{self.path(key)}[{i}]", self.file) for i, v in enumerate(value)]

    def done(self, allowed: set[str] | None = None) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if allowed is not None:
            unknown = sorted(set(unknown) | (set(self.data) - allowed))
        if unknown:
            self.fail(unknown[0], "unknown key (see docs/sim.md for the keys of this table)")


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; any problem is a `ScenarioError` naming file and key."""
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{file}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{file}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{file}: not valid TOML: {exc}") from None
    return parse_scenario(data, file)


def parse_scenario(data: dict[str, Any], file: Path) -> Scenario:
    """Read a scenario table by table, in the order its errors are reported."""
    root = _Table(data, "", file)
    sc = root.table("scenario")
    run = _run(sc, file)
    area = _area(root)
    mobility = _mobility(root.table("mobility"))
    if mobility.model != "trace":
        # A synthetic mobility has no extent nor end of its own.
        if area is None:
            root.fail("area", f"is required with mobility model '{mobility.model}'")
        if run["duration_s"] is None:
            sc.fail("duration_s", f"is required with mobility model '{mobility.model}'")
    topology = _topology(root.table("topology"))
    backhaul = _backhaul(root.table("backhaul"), topology)
    latency = _latency(root.table("latency"))
    migration = _migration(root.table("migration"))
    workloads = _workloads(root)
    params = _policy_params(root.table("policies"))
    root.done({"scenario", "area", "mobility", "topology", "backhaul", "latency",
               "migration", "workloads", "policies"})
    return Scenario(path=file, **run, area_m=area, mobility=mobility, topology=topology,
                    backhaul=backhaul, latency=latency, migration=migration,
                    workloads=workloads, policy_params=params)


def _run(sc: _Table, file: Path) -> dict[str, Any]:
    """The [scenario] table, as the `Scenario` fields it sets."""
    name = sc.string("name", file.stem)
    seed = sc.integer("seed", 1, lo=0)
    duration = sc.opt_number("duration_s", lo=0.0, lo_open=True)
    step = sc.number("step_s", 1.0, lo=0.0, lo_open=True)
    run = dict(name=name, seed=seed, duration_s=duration, step_s=step,
               decision_interval_s=sc.number("decision_interval_s", step, lo=0.0,
                                             lo_open=True),
               policies=_policy_names(sc),
               ping_pong_window_s=sc.number("ping_pong_window_s", 120.0, lo=0.0),
               trajectories=sc.integer("trajectories", 12, lo=0))
    sc.done()
    return run


def _policy_names(sc: _Table) -> tuple[str, ...]:
    policies = sc.strings("policies", tuple(POLICIES))
    for p in policies:
        if p not in POLICIES:
            sc.fail("policies", f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    if len(set(policies)) != len(policies):
        sc.fail("policies", "lists a policy twice")
    return policies


def _area(root: _Table) -> tuple[float, float] | None:
    if not root.has("area"):
        return None
    ar = root.table("area")
    area = (ar.number("width_m", 4000.0, lo=0.0, lo_open=True),
            ar.number("height_m", 4000.0, lo=0.0, lo_open=True))
    ar.done()
    return area


def _latency(t: _Table) -> LatencySpec:
    spec = LatencySpec(
        propagation_rtt_ms_per_km=t.number("propagation_rtt_ms_per_km", 0.01, lo=0.0),
        queue_service_ms=t.number("queue_service_ms", 1.0, lo=0.0),
        max_utilisation=t.number("max_utilisation", 0.95, lo=0.0, hi=0.999),
    )
    t.done()
    return spec


def _workloads(root: _Table) -> tuple[WorkloadSpec, ...]:
    workloads = tuple(_workload(t) for t in root.tables("workloads")) or (WorkloadSpec(),)
    if sum(w.share for w in workloads) <= 0:
        root.fail("workloads", "shares add up to 0")
    return workloads


def _policy_params(pt: _Table) -> dict[str, dict[str, Any]]:
    """[policies.NAME] tables: each policy's parameters, checked by building it."""
    params = {pname: _policy_param(pt, pname) for pname in list(pt.data)}
    pt.done()
    return params


def _policy_param(pt: _Table, pname: str) -> dict[str, Any]:
    if pname not in POLICIES:
        pt.fail(pname, f"unknown policy (known: {', '.join(POLICIES)})")
    sub = pt.table(pname)
    known = {f.name for f in fields(POLICIES[pname]) if f.init}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key in list(sub.data):
        if key not in known:
            sub.fail(key, f"unknown parameter of policy '{pname}' "
                          f"(known: {', '.join(sorted(known)) or 'none'})")
        values[key] = (sub.integer(key, 0) if key == "samples"
                       else sub.number(key, 0.0))
    sub.done()
    try:
        make_policy(pname, **values)
    except InvalidArgument as exc:
        pt.fail(pname, exc.message)
    return values


def _migration(t: _Table) -> MigrationSpec:
    """The scenario's [migration], over its calibration file's, over the defaults."""
    base = MigrationSpec()
    calibration = t.file_path("calibration")
    if calibration is not None:
        base = replace(_calibration(t, calibration), calibration=calibration)
    return _migration_keys(t, base)


def _migration_keys(t: _Table, d: MigrationSpec) -> MigrationSpec:
    spec = replace(
        d,
        stop_mib=t.number("stop_mib", d.stop_mib, lo=0.0),
        max_rounds=t.integer("max_rounds", d.max_rounds, lo=1),
        resume_ms=t.number("resume_ms", d.resume_ms, lo=0.0),
        wire_ratio=t.number("wire_ratio", d.wire_ratio, lo=0.0, lo_open=True),
        setup_s=t.number("setup_s", d.setup_s, lo=0.0),
        setup_s_per_gib=t.number("setup_s_per_gib", d.setup_s_per_gib, lo=0.0),
        send_s_per_gib=t.number("send_s_per_gib", d.send_s_per_gib, lo=0.0),
    )
    t.done()
    return spec


def _calibration(t: _Table, file: Path) -> MigrationSpec:
    """A calibration file: one [migration] table of cost-model keys, nothing else
    (no nested calibration: what a scenario runs with is two files deep at most)."""
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        t.fail("calibration", f"no such calibration file {file}")
    except (OSError, UnicodeDecodeError) as exc:
        t.fail("calibration", f"cannot read {file}: {exc}")
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{file}: not valid TOML: {exc}") from None
    root = _Table(data, "", file)
    if not root.has("migration"):
        root.fail("migration", "a calibration file needs a [migration] table")
    mg = root.table("migration")
    if mg.has("calibration"):
        mg.fail("calibration", "a calibration file cannot include another")
    spec = _migration_keys(mg, MigrationSpec())
    root.done({"migration"})
    return spec


def _mobility(t: _Table) -> MobilitySpec:
    model = t.string("model", "random_waypoint", MOBILITY_MODELS)
    d = MobilitySpec()
    for key in t.data:
        if key != "model" and key not in _MOBILITY_KEYS[model]:
            t.fail(key, f"is not a key of mobility model '{model}' "
                        f"(its keys: {', '.join(sorted(_MOBILITY_KEYS[model]))})")
    if model == "trace":
        file = t.file_path("file")
        if file is None:
            t.fail("file", "is required with mobility model 'trace'")
        spec = replace(d, model=model, file=file,
                       format=t.string("format", "auto", TRACE_FORMATS),
                       coords=t.string("coords", "auto", TRACE_COORDS),
                       elements=t.strings("elements", d.elements))
        t.done()
        return spec
    spec = replace(
        d, model=model, users=t.integer("users", d.users, lo=1),
        speed_min_m_s=t.number("speed_min_m_s", d.speed_min_m_s, lo=0.0, lo_open=True),
        speed_max_m_s=t.number("speed_max_m_s", d.speed_max_m_s, lo=0.0, lo_open=True),
        pause_min_s=t.number("pause_min_s", d.pause_min_s, lo=0.0),
        pause_max_s=t.number("pause_max_s", d.pause_max_s, lo=0.0),
        mean_speed_m_s=t.number("mean_speed_m_s", d.mean_speed_m_s, lo=0.0),
        speed_std_m_s=t.number("speed_std_m_s", d.speed_std_m_s, lo=0.0),
        direction_std_rad=t.number("direction_std_rad", d.direction_std_rad, lo=0.0),
        alpha=t.number("alpha", d.alpha, lo=0.0, hi=1.0),
        edge_margin_m=t.number("edge_margin_m", d.edge_margin_m, lo=0.0),
        block_m=t.number("block_m", d.block_m, lo=0.0, lo_open=True),
        turn_probability=t.number("turn_probability", d.turn_probability, lo=0.0, hi=1.0),
        speed_change_probability=t.number("speed_change_probability",
                                          d.speed_change_probability, lo=0.0, hi=1.0),
    )
    if spec.speed_max_m_s < spec.speed_min_m_s:
        t.fail("speed_max_m_s", f"must be >= speed_min_m_s ({spec.speed_min_m_s:g})")
    if spec.pause_max_s < spec.pause_min_s:
        t.fail("pause_max_s", f"must be >= pause_min_s ({spec.pause_min_s:g})")
    t.done()
    return spec


def _topology(t: _Table) -> TopologySpec:
    d = TopologySpec()
    layout = t.string("layout", d.layout, LAYOUTS)
    cloudlets: list[CloudletSpec] = []
    for c in t.tables("cloudlets"):
        cname = c.string("name", f"c{len(cloudlets)}")
        cloudlets.append(CloudletSpec(
            name=cname, x_m=c.number("x_m", 0.0), y_m=c.number("y_m", 0.0),
            capacity_vms=c.opt_integer("capacity_vms", lo=0),
            memory_gib=c.opt_number("memory_gib", lo=0.0)))
        c.done()
    spec = TopologySpec(
        layout=layout, count=t.integer("count", d.count, lo=1),
        rows=t.opt_integer("rows", lo=1), file=t.file_path("file"),
        cloudlets=tuple(cloudlets),
        capacity_vms=t.integer("capacity_vms", d.capacity_vms, lo=0),
        memory_gib=t.number("memory_gib", d.memory_gib, lo=0.0),
        access_range_m=t.number("access_range_m", d.access_range_m, lo=0.0),
        radio_rtt_ms=t.number("radio_rtt_ms", d.radio_rtt_ms, lo=0.0),
        out_of_range_rtt_ms=t.number("out_of_range_rtt_ms", d.out_of_range_rtt_ms, lo=0.0),
    )
    if layout == "list" and not cloudlets:
        t.fail("cloudlets", "layout 'list' needs [[topology.cloudlets]] entries")
    if layout == "file" and spec.file is None:
        t.fail("file", "layout 'file' needs a file (CSV: name,x_m,y_m)")
    if layout != "list" and cloudlets:
        t.fail("cloudlets", f"entries are only read with layout 'list' (layout is '{layout}')")
    if len({c.name for c in cloudlets}) != len(cloudlets):
        t.fail("cloudlets", "two cloudlets have the same name")
    t.done()
    return spec


def _backhaul(t: _Table, topo: TopologySpec) -> BackhaulSpec:
    d = BackhaulSpec()
    links: list[LinkSpec] = []
    names = {c.name for c in topo.cloudlets}
    for lt in t.tables("links"):
        a = lt.string("a", "")
        b = lt.string("b", "")
        for k, v in (("a", a), ("b", b)):
            if not v:
                lt.fail(k, "is required (a cloudlet name)")
            if names and v not in names:
                lt.fail(k, f"names no cloudlet of [[topology.cloudlets]] (got {v!r})")
        links.append(LinkSpec(a=a, b=b, bandwidth_mbit_s=lt.opt_number(
            "bandwidth_mbit_s", lo=0.0, lo_open=True),
            rtt_ms=lt.opt_number("rtt_ms", lo=0.0)))
        lt.done()
    spec = BackhaulSpec(
        kind=t.string("kind", d.kind, BACKHAUL_KINDS),
        neighbours=t.integer("neighbours", d.neighbours, lo=1),
        bandwidth_mbit_s=t.number("bandwidth_mbit_s", d.bandwidth_mbit_s, lo=0.0,
                                  lo_open=True),
        link_rtt_ms=t.number("link_rtt_ms", d.link_rtt_ms, lo=0.0),
        hop_rtt_ms=t.number("hop_rtt_ms", d.hop_rtt_ms, lo=0.0),
        core_rtt_ms=t.number("core_rtt_ms", d.core_rtt_ms, lo=0.0),
        links=tuple(links),
    )
    if spec.kind == "links" and not links:
        t.fail("links", "kind 'links' needs [[backhaul.links]] entries")
    if spec.kind != "links" and links:
        t.fail("links", f"entries are only read with kind 'links' (kind is '{spec.kind}')")
    t.done()
    return spec


def _workload(t: _Table) -> WorkloadSpec:
    d = WorkloadSpec()
    w = WorkloadSpec(
        name=t.string("name", d.name),
        share=t.number("share", d.share, lo=0.0),
        memory_mib=t.number("memory_mib", d.memory_mib, lo=0.0, lo_open=True),
        overlay_mib=t.number("overlay_mib", d.overlay_mib, lo=0.0),
        dirty_rate_mib_s=t.number("dirty_rate_mib_s", d.dirty_rate_mib_s, lo=0.0),
        interaction_rate_hz=t.number("interaction_rate_hz", d.interaction_rate_hz, lo=0.0),
        budget_ms=t.number("budget_ms", d.budget_ms, lo=0.0, lo_open=True),
        service_ms=t.number("service_ms", d.service_ms, lo=0.0),
        jitter_ms=t.number("jitter_ms", d.jitter_ms, lo=0.0),
    )
    if w.overlay_mib > w.memory_mib:
        t.fail("overlay_mib", f"must be <= memory_mib ({w.memory_mib:g})")
    t.done()
    return w
