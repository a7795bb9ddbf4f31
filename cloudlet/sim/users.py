"""The simulated users as tables: the workloads they run and their user slots.

Every policy sees the same users (common random numbers), so these belong to
the world, not to a policy. A slot is one row: a trace's vehicle or a mobility
model's user, active while it is on the map; its workload is drawn when it
enters and kept while it stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloudlet.sim.columns import Columns, column
from cloudlet.sim.scenario import WorkloadSpec

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

MiB = float(1 << 20)


@dataclass(frozen=True, eq=False)
class Workloads:
    """One row per workload of the scenario, in bytes and seconds where the
    scenario writes MiB; indexed by a slot's `workload`."""

    share: FloatArray  # the chance a new user runs it (sums to 1)
    memory_bytes: FloatArray
    overlay_bytes: FloatArray
    dirty_rate_bytes_s: FloatArray
    budget_ms: FloatArray
    service_ms: FloatArray
    interaction_rate_hz: FloatArray
    jitter_ms: FloatArray

    @classmethod
    def of(cls, specs: tuple[WorkloadSpec, ...]) -> Workloads:
        shares = np.array([x.share for x in specs])
        return cls(share=shares / shares.sum(),
                   memory_bytes=np.array([x.memory_mib * MiB for x in specs]),
                   overlay_bytes=np.array([x.overlay_mib * MiB for x in specs]),
                   dirty_rate_bytes_s=np.array([x.dirty_rate_mib_s * MiB for x in specs]),
                   budget_ms=np.array([x.budget_ms for x in specs]),
                   service_ms=np.array([x.service_ms for x in specs]),
                   interaction_rate_hz=np.array([x.interaction_rate_hz for x in specs]),
                   jitter_ms=np.array([x.jitter_ms for x in specs]))

    def __len__(self) -> int:
        return len(self.share)


@dataclass(eq=False)
class Users(Columns):
    """One row per user slot, as of the last tick: grows when a trace brings more
    vehicles than it had, never shrinks (a slot that leaves is inactive)."""

    workload: IntArray = field(metadata=column(0, np.int64))
    active: BoolArray = field(metadata=column(False, np.bool_))
    xy_m: FloatArray = field(metadata=column(0.0, np.float64, (2,)))
