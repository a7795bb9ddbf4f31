"""Drives a sweep: the cache first, an engine for the runs it lacks, then the outputs.

An engine is anything that takes runs and yields each with its metrics, in any
order: `SerialEngine` runs them one after another in this process (for debugging,
and the reference a distributed sweep is compared with); `cloudlet.sweep_dask`
runs them on a Dask cluster. Each finished run is cached as it arrives, so an
interrupted sweep loses only the runs under way; the outputs are written in the
plan's order, whatever order the runs finished in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloudlet.sim.sweep import Metrics, Run, Sweep, aggregate, code_version, plan, run_unit
from cloudlet.sim.sweep_outputs import read_cached, write_cached, write_plots, write_tables


class Engine(Protocol):
    @property
    def name(self) -> str:
        """What sweep.json calls it: "serial" or "dask"."""

    @property
    def workers(self) -> int:
        """How many runs it can run at once (0: in this process)."""

    def results(self, runs: Sequence[Run]) -> Iterator[tuple[Run, Metrics]]:
        """Every run with its metrics, as each finishes."""


class SerialEngine:
    """One run after another, in this process."""

    name = "serial"
    workers = 0

    def results(self, runs: Sequence[Run]) -> Iterator[tuple[Run, Metrics]]:
        for run in runs:
            yield run, run_unit(run.scenario)


@dataclass(frozen=True)
class SweepReport:
    runs: int
    computed: int
    cached: int
    wall_s: float
    written: list[Path]
    meta: dict[str, Any]


def run_sweep(sweep: Sweep, out: Path, engine: Engine, *, progress: bool = False,
              plots: bool = True) -> SweepReport:
    """Run `sweep` on `engine` (runs cached in `out` are not run again) and write its
    outputs to `out`."""
    t0 = time.perf_counter()
    code = code_version()
    runs = plan(sweep, code)
    results: dict[str, Metrics] = {}
    for run in runs:
        cached = read_cached(out, run, sweep.policies)
        if cached is not None:
            results[run.key] = cached
    todo = [r for r in runs if r.key not in results]
    cached_n = len(runs) - len(todo)
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, nothing in a log file or a pipe.
        bar = tqdm(total=len(runs), initial=cached_n, unit="run", desc=sweep.name,
                   leave=False, mininterval=0.2, disable=None)
    try:
        for run, metrics in engine.results(todo):
            write_cached(out, sweep.keys, run, metrics)
            results[run.key] = metrics
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows = aggregate(sweep, runs, results)
    wall_s = time.perf_counter() - t0
    meta = {
        "engine": engine.name, "workers": engine.workers, "runs": len(runs),
        "wall_s": wall_s, "computed": len(todo), "cached": cached_n,
        "sweep": str(sweep.path), "scenario": str(sweep.scenario_path),
        "seeds": list(sweep.seeds), "policies": list(sweep.policies),
        "grid": {k: list(v) for k, v in sweep.grid}, "code": code,
    }
    written = write_tables(out, sweep, runs, results, rows, meta)
    if plots:
        written += write_plots(out, sweep, rows)
    return SweepReport(runs=len(runs), computed=len(todo), cached=cached_n, wall_s=wall_s,
                       written=written, meta=meta)
