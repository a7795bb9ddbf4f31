"""The mobile-handoff simulator: mobility, topology, workloads, policies side by side.

It exists to show, fast and reproducibly, what each placement policy buys as
users move: `simulate(load_scenario(path))` runs every policy of a scenario on
the same seeded world and `write_outputs` leaves summary.json, CSV timelines and
PNG plots (`cloudlet sim SCENARIO.toml` does both). Like the placer it imports
no network code, so it runs anywhere numpy does.
"""

from cloudlet.sim.engine import PolicyResult, SimResult, scenario_topology, simulate
from cloudlet.sim.mobility import GaussMarkov, ManhattanGrid, Mobility, RandomWaypoint
from cloudlet.sim.report import summary, table, write_outputs
from cloudlet.sim.scenario import Scenario, load_scenario
from cloudlet.sim.traces import Frame, TraceMobility, read_csv_frames, read_fcd_frames, scan_trace

__all__ = [
    "Frame",
    "GaussMarkov",
    "ManhattanGrid",
    "Mobility",
    "PolicyResult",
    "RandomWaypoint",
    "Scenario",
    "SimResult",
    "TraceMobility",
    "load_scenario",
    "read_csv_frames",
    "read_fcd_frames",
    "scan_trace",
    "scenario_topology",
    "simulate",
    "summary",
    "table",
    "write_outputs",
]
