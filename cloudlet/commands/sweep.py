"""`cloudlet sweep SWEEP.toml --out DIR`: the simulator over a grid x seeds x policies.

Thin, like every command: read the sweep file (strictly: a bad key, or an
override the scenario parser rejects, is an error naming the sweep file and the
key), pick the engine (a Dask LocalCluster by default, an existing cluster with
`--scheduler`, this process with `--workers 0`), run, and say where the outputs
are. The work is in cloudlet.sim.sweep*, the Dask part in cloudlet.sweep_dask.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from cloudlet.cli_registry import missing_dependency
from cloudlet.errors import InvalidArgument


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sweep", help="run the simulator over a grid of scenario parameters and seeds",
        description="Run a scenario's policies over every point of SWEEP.toml's grid of "
                    "overrides and every seed, on Dask, and write results.csv, summary.csv "
                    "(mean and 95%% confidence interval over the seeds), sweep.json and "
                    "PNG plots to --out. Finished runs are cached in DIR/cache/: a "
                    "stopped sweep resumes. File format: docs/sim.md.")
    p.add_argument("sweep", metavar="SWEEP.toml")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--workers", metavar="N", type=int,
                   help="a local Dask cluster of N worker processes (default: one per "
                        "core); 0 runs everything in this process")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run on this existing Dask cluster instead of a local one")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from cloudlet.sim.sweep import load_sweep
    from cloudlet.sim.sweep_run import Engine, SerialEngine, run_sweep

    if args.workers is not None and args.workers < 0:
        raise InvalidArgument(f"--workers: must be >= 0 (got {args.workers})")
    if args.workers is not None and args.scheduler:
        raise InvalidArgument("--workers and --scheduler: give one (a cluster you start "
                              "sets its own workers)")
    sweep = load_sweep(args.sweep)
    out = Path(args.out)
    engine: AbstractContextManager[Engine]
    if args.workers == 0:
        engine = nullcontext(SerialEngine())
    else:
        try:
            from cloudlet.sweep_dask import dask_engine
        except ModuleNotFoundError as exc:
            # `distributed` comes with dask[distributed]: no extra names it itself.
            raise missing_dependency(exc.name or "?", "sweep") from None
        engine = dask_engine(args.workers, args.scheduler)
    with engine as e:
        report = run_sweep(sweep, out, e, progress=not args.no_progress,
                           plots=not args.no_plots)
    m = report.meta
    print(f"{sweep.name}: {report.runs} runs ({report.computed} computed, "
          f"{report.cached} cached) x {len(sweep.policies)} policies on {m['engine']} "
          f"({m['workers']} workers) in {report.wall_s:.1f} s", flush=True)
    print(f"outputs in {out}/", file=sys.stderr)
    return 0
