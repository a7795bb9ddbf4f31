"""Parameter sweeps: one scenario, a grid of overrides, several seeds, the policies.

One simulation is one draw of a random world: a policy that wins on seed 7 may
lose on seed 8. A sweep runs every point of a grid of scenario overrides over
several seeds, so each number it reports comes with a 95% confidence interval
(Student t over the seeds), and shows how a metric moves as a parameter does.

This module is the pure part: it reads the sweep file, expands the grid into
runs, names each run by a hash of everything that decides its result (the cache
key), runs one of them (`run_unit`), and aggregates. Where the runs execute, in
this process or on a Dask cluster, is the caller's choice (`cloudlet.sweep_dask`):
a run's result depends on its inputs only, so both give the same numbers, bit
for bit.

The unit of work is one `simulate` of a grid point and a seed with every policy:
the policies share one world per seed (common random numbers), and each policy's
own random stream is drawn from the seed by its position among the policies, so
running a policy alone would not give the numbers it gets beside the others.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cloudlet import __version__
from cloudlet.errors import ScenarioError, SweepError
from cloudlet.placement import POLICIES
from cloudlet.sim.engine import simulate
from cloudlet.sim.report import SUMMARY_KEYS
from cloudlet.sim.scenario import Scenario, load_scenario, parse_scenario

# The metrics a sweep reports: summary.json's per-policy keys (cloudlet sim's contract).
METRICS = SUMMARY_KEYS
CI_LEVEL = 0.95

# Scenario keys a sweep sets itself, so a grid may not.
_RESERVED = {
    "scenario.seed": "the seeds are [sweep] seeds",
    "scenario.policies": "the policies are [sweep] policies",
}
_SWEEP_KEYS = {"scenario", "seeds", "policies", "grid"}

Value = bool | int | float | str
# policy -> metric -> value (None where the run had nothing to measure, e.g. no
# interaction for a percentile).
Metrics = dict[str, dict[str, float | int | None]]


@dataclass(frozen=True, eq=False)
class Sweep:
    path: Path
    scenario_path: Path
    scenario_data: dict[str, Any]  # the scenario file's TOML, before any override
    name: str
    seeds: tuple[int, ...]
    policies: tuple[str, ...]
    grid: tuple[tuple[str, tuple[Value, ...]], ...]  # dotted key -> values, file order

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.grid)

    def points(self) -> list[tuple[Value, ...]]:
        """Every combination of the grid's values, the last key varying fastest;
        one empty point for an empty grid (the scenario as written)."""
        return list(itertools.product(*(values for _, values in self.grid)))


@dataclass(frozen=True, eq=False)
class Run:
    """One unit of work: a grid point and a seed, every policy of the sweep."""

    point: tuple[Value, ...]  # one value per grid key
    seed: int
    scenario: Scenario  # overrides applied, seed and policies set
    key: str  # the cache key: a hash of everything that decides the result


@dataclass(frozen=True)
class Stat:
    """A metric over the seeds of one grid point and policy: n finite values, their
    mean, and the half-width of its confidence interval (NaN below two values)."""

    n: int
    mean: float
    ci_half: float

    @property
    def low(self) -> float:
        return self.mean - self.ci_half

    @property
    def high(self) -> float:
        return self.mean + self.ci_half


@dataclass(frozen=True)
class SummaryRow:
    point: tuple[Value, ...]
    policy: str
    seeds: int
    stats: dict[str, Stat]  # by metric


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file and its scenario, and check every value of the
    grid against the scenario parser: any problem is a `SweepError` naming the
    sweep file and the key (a scenario that is wrong by itself is the scenario
    parser's `ScenarioError`, naming the scenario file)."""
    file = Path(path)
    data = _read_toml(file, "sweep")
    if set(data) != {"sweep"}:
        extra = sorted(set(data) - {"sweep"})
        _fail(file, extra[0] if extra else "sweep",
              "unknown table (a sweep file has one [sweep] table)" if extra
              else "is required")
    sw = data["sweep"]
    if not isinstance(sw, dict):
        _fail(file, "sweep", "must be a table")
    for key in sw:
        if key not in _SWEEP_KEYS:
            _fail(file, f"sweep.{key}",
                  f"unknown key (known: {', '.join(sorted(_SWEEP_KEYS))})")
    scenario_path = _scenario_path(file, sw)
    base = load_scenario(scenario_path)
    scenario_data = _read_toml(scenario_path, "scenario")
    seeds = _seeds(file, sw.get("seeds"))
    policies = _policies(file, sw.get("policies"), base.policies)
    grid = _grid(file, sw.get("grid", {}))
    sweep = Sweep(path=file, scenario_path=scenario_path, scenario_data=scenario_data,
                  name=base.name, seeds=seeds, policies=policies, grid=grid)
    for key, values in grid:
        for value in values:
            scenario_for(sweep, ((key, value),))
    return sweep


def _fail(file: Path, key: str, why: str) -> NoReturn:
    raise SweepError(f"{file}: key '{key}': {why}")


def _read_toml(file: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{file}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{file}: not valid TOML: {exc}") from None


def _scenario_path(file: Path, sw: dict[str, Any]) -> Path:
    value = sw.get("scenario")
    if not isinstance(value, str) or not value:
        _fail(file, "sweep.scenario", f"is required: the scenario file, relative to this "
                                      f"one or absolute (got {value!r})")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else file.parent / p
    if not p.is_file():
        _fail(file, "sweep.scenario", f"no such scenario file {p}")
    return p


def _seeds(file: Path, value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                       for s in value)):
        _fail(file, "sweep.seeds", f"must be a non-empty list of integers >= 0 "
                                   f"(got {value!r})")
    if len(set(value)) != len(value):
        _fail(file, "sweep.seeds", "lists a seed twice")
    return tuple(value)


def _policies(file: Path, value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if (not isinstance(value, list) or not value
            or not all(isinstance(p, str) for p in value)):
        _fail(file, "sweep.policies", f"must be a non-empty list of policy names "
                                      f"(got {value!r})")
    for p in value:
        if p not in POLICIES:
            _fail(file, "sweep.policies",
                  f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    if len(set(value)) != len(value):
        _fail(file, "sweep.policies", "lists a policy twice")
    return tuple(value)


def _grid(file: Path, value: Any) -> tuple[tuple[str, tuple[Value, ...]], ...]:
    if not isinstance(value, dict):
        _fail(file, "sweep.grid", "must be a table of \"table.key\" = [values]")
    grid = []
    for key, values in value.items():
        where = f'sweep.grid."{key}"'
        if isinstance(values, dict):
            _fail(file, where, "must be a list of values; write the scenario key quoted, "
                               'as one dotted name: "topology.access_range_m" = [...]')
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            _fail(file, where, "must name a table and a key of the scenario, dotted "
                               "(\"topology.access_range_m\")")
        if key in _RESERVED:
            _fail(file, where, f"cannot be swept: {_RESERVED[key]}")
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, bool | int | float | str) for v in values)):
            _fail(file, where, f"must be a non-empty list of numbers, strings or booleans "
                               f"(got {values!r})")
        if len({json.dumps(v) for v in values}) != len(values):
            _fail(file, where, "lists a value twice")
        grid.append((key, tuple(values)))
    return tuple(grid)


def override(data: dict[str, Any], key: str, value: Value, file: Path) -> dict[str, Any]:
    """A copy of the scenario's TOML with the dotted `key` set to `value`: tables are
    made as needed (a scenario may leave [latency] out); a numeric part indexes an
    array of tables (`workloads.0.budget_ms`). Whether the key exists is the scenario
    parser's to say, as it says it for a key written in the file."""
    out = copy.deepcopy(data)
    *tables, last = key.split(".")
    node: Any = out
    walked: list[str] = []
    for part in tables:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                _fail(file, f'sweep.grid."{key}"', f"'{'.'.join(walked)}' has "
                      f"{len(node)} entries; '{part}' is not one of their indexes")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        walked.append(part)
        if not isinstance(node, dict | list):
            break
    if not isinstance(node, dict):
        _fail(file, f'sweep.grid."{key}"', f"'{'.'.join(walked)}' is not a table")
    node[last] = value
    return out


def scenario_for(sweep: Sweep, overrides: tuple[tuple[str, Value], ...]
                 ) -> tuple[Scenario, dict[str, Any]]:
    """The scenario with `overrides` applied to its TOML before it is read, so every
    override is checked as strictly as a key written in the file; its errors are
    re-raised naming the sweep file and the overrides."""
    data = sweep.scenario_data
    for key, value in overrides:
        data = override(data, key, value, sweep.path)
    try:
        sc = parse_scenario(data, sweep.scenario_path)
    except ScenarioError as exc:
        where = ", ".join(f"'sweep.grid.\"{k}\"' = {v!r}" for k, v in overrides)
        raise SweepError(f"{sweep.path}: key {where or 'sweep'}: {exc.message}") from None
    return replace(sc, policies=sweep.policies), data


def plan(sweep: Sweep, code: str | None = None) -> list[Run]:
    """Every run of the sweep, in a fixed order (grid points as `points`, then seeds):
    outputs follow this order whatever order the runs finish in."""
    code = code_version() if code is None else code
    runs = []
    for point in sweep.points():
        sc, data = scenario_for(sweep, tuple(zip(sweep.keys, point, strict=True)))
        included = _included_files(sc)
        for seed in sweep.seeds:
            runs.append(Run(point=point, seed=seed, scenario=replace(sc, seed=seed),
                            key=cache_key(data, seed, sweep.policies, code, included)))
    return runs


def _included_files(sc: Scenario) -> dict[str, str]:
    """The content hashes of the files a scenario reads besides itself (a trace, a
    cloudlet layout, a calibration): a changed trace is a different run."""
    files = {"mobility.file": sc.mobility.file, "topology.file": sc.topology.file,
             "migration.calibration": sc.migration.calibration}
    return {k: hashlib.sha256(p.read_bytes()).hexdigest()
            for k, p in files.items() if p is not None and p.is_file()}


def cache_key(data: dict[str, Any], seed: int, policies: tuple[str, ...], code: str,
              included: dict[str, str] | None = None) -> str:
    """A hash of what decides a run's result: the scenario's content after the
    overrides (canonical JSON, so key order and formatting do not matter), the
    files it includes, the seed, the policies in their order, and the code."""
    doc = {"scenario": data, "included": included or {}, "seed": seed,
           "policies": list(policies), "code": code}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> str:
    """A hash of the simulator's and the placer's source and of numpy's version (its
    random streams): the code that decides a result. A changed line in either
    invalidates the cache rather than mixing results of two versions."""
    h = hashlib.sha256(f"cloudlet {__version__} numpy {np.__version__}".encode())
    pkg = Path(__file__).resolve().parent.parent
    for sub in ("sim", "placement"):
        for f in sorted((pkg / sub).rglob("*.py")):
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def run_unit(sc: Scenario) -> Metrics:
    """One unit of work: simulate `sc` and keep the sweep's metrics per policy. Plain
    Python values, so they travel between processes and to JSON exactly."""
    result = simulate(sc, progress=False)
    return {name: {k: _finite(p.summary[k]) for k in METRICS}
            for name, p in result.policies.items()}


def _finite(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"metric value {v!r} is not a number")
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def t_quantile(p: float, df: int) -> float:
    """Student t's p-quantile with `df` degrees of freedom."""
    from scipy import stats  # type: ignore[import-untyped]

    return float(stats.t.ppf(p, df))


def mean_ci(values: list[float | int | None], level: float = CI_LEVEL) -> Stat:
    """Mean and confidence interval (Student t, two-sided) of the finite values."""
    xs = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(xs)
    if n == 0:
        return Stat(0, math.nan, math.nan)
    mean = float(xs.mean())
    if n < 2:
        return Stat(n, mean, math.nan)
    sem = float(xs.std(ddof=1)) / math.sqrt(n)
    return Stat(n, mean, t_quantile(0.5 + level / 2, n - 1) * sem)


def aggregate(sweep: Sweep, runs: list[Run], results: dict[str, Metrics]
              ) -> list[SummaryRow]:
    """Per grid point and policy, every metric over the seeds (`results` by run key)."""
    rows = []
    for point in sweep.points():
        of_point = [results[r.key] for r in runs if r.point == point]
        for policy in sweep.policies:
            stats = {m: mean_ci([res[policy][m] for res in of_point]) for m in METRICS}
            rows.append(SummaryRow(point=point, policy=policy, seeds=len(of_point),
                                   stats=stats))
    return rows
