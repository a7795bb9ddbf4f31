"""`cloudlet emulate SCENARIO.toml`: the command line of the emulation (edge_agent.emulation)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulate", help="play a simulator scenario with real cloudlets, VMs and clients",
        description="Run each policy of SCENARIO.toml on real `cloudlet agent` processes, an "
                    "embedded broker and one SDK session per user, links delayed by the "
                    "latency model and shaped to the backhaul; simulate the same scaled "
                    "scenario and write both side by side (docs/sim.md, Emulation).")
    p.add_argument("scenario", metavar="SCENARIO.toml")
    p.add_argument("--trace", metavar="FILE",
                   help="replace the scenario's mobility by this trace (as `cloudlet sim`)")
    p.add_argument("--policies", metavar="a,b",
                   help="the policies to run (default: the scenario's)")
    p.add_argument("--out", metavar="DIR", help="output directory (default emulate-out/NAME)")
    p.add_argument("--duration-s", type=float, metavar="N",
                   help="emulate (and simulate) only the first N seconds")
    p.add_argument("--scale", type=float, metavar="F",
                   help="guest size factor in (0, 1] (default: a power of two that brings "
                        "the largest guest to at most 32 MiB)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_emulate)


def cmd_emulate(args: argparse.Namespace) -> int:
    from edge_agent.emulation.run import emulate, make_plan

    plan = make_plan(args.scenario, trace=args.trace, policies=args.policies,
                     duration_s=args.duration_s, scale=args.scale)
    out = Path(args.out) if args.out else Path("emulate-out") / plan.scenario.name
    return emulate(plan, out, progress=not args.no_progress, plots=not args.no_plots)
