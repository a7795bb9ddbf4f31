"""Guest sizes that fit this machine: one factor for memory, overlay and dirty rate.

A scenario's VDI session is 512 MiB with a 192 MiB overlay; eight of them
migrating through loopback proxies in Python would measure the proxies, not the
placer. So the emulation scales every workload's `memory_mib`, `overlay_mib`
and `dirty_rate_mib_s` by one factor (a power of two, chosen so the largest
guest is at most `TARGET_GUEST_MIB`), grows and dirties the real guests to those
sizes, and simulates the same scaled scenario for the comparison. Bandwidths,
latencies and budgets are not scaled: a migration then takes `factor` times the
time it would at full size, and that is what both sides see.
"""

from __future__ import annotations

import math
from dataclasses import replace

from cloudlet.errors import ScenarioError
from cloudlet.sim.scenario import Scenario, WorkloadSpec

TARGET_GUEST_MIB = 32.0


def choose_factor(sc: Scenario, target_mib: float = TARGET_GUEST_MIB) -> float:
    """The largest 1/2^k (at most 1) that brings the largest guest to `target_mib`."""
    biggest = max(w.memory_mib for w in sc.workloads)
    if biggest <= target_mib:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(biggest / target_mib))


def scale_workload(w: WorkloadSpec, factor: float) -> WorkloadSpec:
    return replace(w, memory_mib=w.memory_mib * factor, overlay_mib=w.overlay_mib * factor,
                   dirty_rate_mib_s=w.dirty_rate_mib_s * factor)


def scaled(sc: Scenario, factor: float) -> Scenario:
    """The scenario with every workload scaled by `factor` (0 < factor <= 1)."""
    if not 0 < factor <= 1:
        raise ScenarioError(f"--scale: must be in (0, 1] (got {factor:g})")
    return replace(sc, workloads=tuple(scale_workload(w, factor) for w in sc.workloads))
