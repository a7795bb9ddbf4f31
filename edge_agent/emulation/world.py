"""The simulator's world, replayed tick by tick for the emulated users.

The emulation must move its users exactly as `cloudlet sim` moves them, so it
builds the world the way `cloudlet.sim.engine.simulate` does (the same seed
streams, in the same order: mobility, topology, world) and records, per tick and
user slot, whether the user is present, where, which access point it is
attached to and the access RTT there. Everything the emulated links and the
position reports need is then a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cloudlet.sim.engine import World, setting
from cloudlet.sim.scenario import Scenario
from cloudlet.sim.topology import Topology
from cloudlet.sim.traces import TraceInfo

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class WorldFrames:
    """Per tick (rows) and user slot (columns); `delay_ms` is one-way, per cloudlet."""

    topology: Topology
    extent_m: tuple[float, float, float, float]
    step_s: float
    active: NDArray[np.bool_]  # (ticks, slots)
    xy: FloatArray  # (ticks, slots, 2)
    delay_ms: FloatArray  # (ticks, slots, cloudlets): (access + backhaul RTT) / 2
    workload: NDArray[np.int64]  # (ticks, slots): the workload each session drew
    trace: TraceInfo | None

    @property
    def ticks(self) -> int:
        return int(self.active.shape[0])

    @property
    def slots(self) -> int:
        return int(self.active.shape[1])

    def tick_at(self, t_s: float) -> int:
        return min(max(int(t_s / self.step_s), 0), self.ticks - 1)


def replay(sc: Scenario) -> WorldFrames:
    """Every tick of the scenario's world, as the simulator sees it."""
    with setting(sc) as st:
        topology, extent, ticks, info = st.topology, st.extent_m, st.ticks, st.trace
        dt = sc.step_s
        world = World(sc, st.world_seed, st.mobility, topology)
        net = topology.network
        rows: list[tuple[NDArray[np.bool_], FloatArray, FloatArray, NDArray[np.int64]]] = []
        for tick in range(ticks):
            world.tick(tick * dt, dt)
            n = world.slots
            delay = np.full((n, net.size), np.nan)
            idx = world.idx
            if len(idx):
                rtt = world.access_ms[:, None] + net.backhaul.rtt_ms(
                    world.attach[:, None], np.arange(net.size)[None, :])
                delay[idx] = rtt / 2.0
            rows.append((world.active.copy(), world.xy.copy(), delay, world.workload.copy()))
    slots = max((len(r[0]) for r in rows), default=0)
    active = np.zeros((ticks, slots), dtype=bool)
    xy = np.zeros((ticks, slots, 2))
    delay_ms = np.full((ticks, slots, topology.size), np.nan)
    workload = np.zeros((ticks, slots), dtype=np.int64)
    for t, (a, p, d, w) in enumerate(rows):
        active[t, :len(a)] = a
        xy[t, :len(a)] = p
        delay_ms[t, :len(a)] = d
        workload[t, :len(a)] = w
    return WorldFrames(topology=topology, extent_m=extent, step_s=dt, active=active, xy=xy,
                       delay_ms=delay_ms, workload=workload, trace=info)
