"""Make configs/sim/downtown.fcd.xml.gz, the sample SUMO trace of sumo-trace.toml.

SUMO is not installable here, so the sample is written in SUMO's FCD format
(`sumo --fcd-output`, plane coordinates, gzipped) from the Manhattan grid model:
40 vehicles on a 3 km x 3 km street grid over 15 minutes, each entering and
leaving the network at its own time, as vehicles do in a real SUMO run.
Reproducible: `python configs/sim/make_sumo_trace.py` writes the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloudlet.sim.mobility import ManhattanGrid
from cloudlet.sim.traces import Frame, write_fcd

OUT = Path(__file__).resolve().parent / "downtown.fcd.xml.gz"
VEHICLES = 40
DURATION_S = 900


def frames() -> list[Frame]:
    rng = np.random.default_rng(2024)
    grid = ManhattanGrid(VEHICLES, 3000.0, 3000.0, rng, block_m=150.0, speed_min_m_s=4.0,
                         speed_max_m_s=14.0, turn_probability=0.5,
                         speed_change_probability=0.05)
    enter = rng.uniform(0, DURATION_S * 0.5, VEHICLES).round()
    enter[:10] = 0  # some are there from the start
    leave = np.minimum(enter + rng.uniform(180, 700, VEHICLES).round(), DURATION_S)
    out = []
    for t in range(DURATION_S + 1):
        if t:
            grid.step(1.0)
        on = np.flatnonzero((enter <= t) & (t < leave))
        out.append(Frame(float(t), [f"veh{i}" for i in on.tolist()], grid.xy[on].copy()))
    return out


if __name__ == "__main__":
    write_fcd(frames(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
