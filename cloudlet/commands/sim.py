"""`cloudlet sim SCENARIO.toml`: run the placement policies side by side on a scenario.

Thin, like every command: read the scenario (strictly: a bad key is an error
naming the file and the key), optionally swap its mobility for a trace file or
pick policies, simulate with a progress bar, write the outputs and print the
table. The work is in cloudlet.sim.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cloudlet.errors import ScenarioError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sim", help="simulate mobile users and the placement policies side by side",
        description="Run every policy of SCENARIO.toml on the same seeded world and write "
                    "summary.json, timeline-POLICY.csv and PNG plots (latency_cdf, "
                    "violations, migrations, map) to --out. Scenario keys: docs/sim.md.")
    p.add_argument("scenario", metavar="SCENARIO.toml")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default sim-out/SCENARIO_NAME)")
    p.add_argument("--trace", metavar="FILE",
                   help="replace the scenario's mobility by this trace: CSV t,id,x,y or "
                        "SUMO FCD XML, gzipped or not")
    p.add_argument("--policies", metavar="a,b,c",
                   help="the policies to run (default: the scenario's; known: never, "
                        "nearest, threshold, predictive)")
    p.add_argument("--duration-s", metavar="N", type=float,
                   help="simulate N seconds instead of the scenario's duration_s (or the "
                        "trace's length)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from cloudlet.sim import load_scenario, simulate, table, write_outputs

    sc = load_scenario(args.scenario)
    if args.trace:
        sc = sc.with_trace(Path(args.trace))
    if args.duration_s is not None:
        sc = sc.with_duration(args.duration_s)
    if args.policies:
        names = tuple(n.strip() for n in args.policies.split(",") if n.strip())
        if not names:
            raise ScenarioError("--policies: name at least one policy")
        sc = sc.with_policies(names)
    out = Path(args.out) if args.out else Path("sim-out") / sc.name
    t0 = time.perf_counter()
    result = simulate(sc, progress=not args.no_progress)
    sim_s = time.perf_counter() - t0
    write_outputs(result, out, plots=not args.no_plots)
    print(f"{sc.name}: {result.topology.size} cloudlets, {result.user_steps:,} user-steps "
          f"({result.ticks:,} ticks of {sc.step_s:g} s), simulated in {sim_s:.1f} s")
    print(table(result))
    print(f"outputs in {out}/", file=sys.stderr)
    return 0
