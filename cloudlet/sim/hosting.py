"""One policy's placement as tables: where each user slot's session is hosted,
and what that costs each cloudlet.

Each policy places the same users differently, so each has its own `Hosting`
(a row per user slot) and `CloudletLoad` (a row per cloudlet). The load keeps
two counts on purpose: `vms` is what capacity is checked against and includes
VMs on their way in (a destination reserves room from a migration's start);
`serving` is what queueing delay is computed from and counts a VM only where it
serves calls (at its source until it resumes at the destination).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloudlet.sim.columns import Columns, column

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(eq=False)
class Hosting(Columns):
    """Per user slot: its session's cloudlet (-1: none yet), the one before its
    last move and when that was (for ping-pong counting), and whether it is
    being migrated (the placer must not move it again meanwhile)."""

    host: IntArray = field(metadata=column(-1, np.int64))
    previous_host: IntArray = field(metadata=column(-1, np.int64))
    last_move_s: FloatArray = field(metadata=column(-np.inf, np.float64))
    migrating: BoolArray = field(metadata=column(False, np.bool_))

    def clear(self, slots: IntArray) -> None:
        """The sessions of `slots` ended: the slots are free for new ones."""
        self.host[slots] = -1
        self.previous_host[slots] = -1
        self.last_move_s[slots] = -np.inf
        self.migrating[slots] = False

    def moved(self, slots: IntArray, source: IntArray, target: IntArray, t_s: float) -> None:
        """The sessions of `slots` now serve at `target`, having left `source` at `t_s`."""
        self.host[slots] = target
        self.previous_host[slots] = source
        self.last_move_s[slots] = t_s
        self.migrating[slots] = False


@dataclass(eq=False)
class CloudletLoad(Columns):
    """Per cloudlet: VMs hosted plus reserved by arrivals, VMs serving here, and
    memory used (reservations included)."""

    vms: IntArray = field(metadata=column(0, np.int64))
    serving: IntArray = field(metadata=column(0, np.int64))
    memory_bytes: FloatArray = field(metadata=column(0.0, np.float64))

    def has_room(self, cloudlet: int, memory_bytes: float, capacity_vms: IntArray,
                 capacity_memory_bytes: FloatArray) -> bool:
        return bool(self.vms[cloudlet] < capacity_vms[cloudlet]
                    and self.memory_bytes[cloudlet] + memory_bytes
                    <= capacity_memory_bytes[cloudlet])

    def place(self, cloudlet: int, memory_bytes: float) -> None:
        """A new session's VM starts serving at `cloudlet`."""
        self.vms[cloudlet] += 1
        self.serving[cloudlet] += 1
        self.memory_bytes[cloudlet] += memory_bytes

    def release(self, hosts: IntArray, memory_bytes: FloatArray) -> None:
        """VMs serving at `hosts` are gone (one row each; a host may repeat)."""
        np.subtract.at(self.vms, hosts, 1)
        np.subtract.at(self.serving, hosts, 1)
        np.subtract.at(self.memory_bytes, hosts, memory_bytes)

    def reserve(self, targets: IntArray, memory_bytes: FloatArray) -> None:
        """Migrations to `targets` start: room is theirs from now on."""
        np.add.at(self.vms, targets, 1)
        np.add.at(self.memory_bytes, targets, memory_bytes)

    def unreserve(self, targets: IntArray, memory_bytes: FloatArray) -> None:
        """Migrations to `targets` were cancelled before they arrived."""
        np.subtract.at(self.vms, targets, 1)
        np.subtract.at(self.memory_bytes, targets, memory_bytes)

    def arrive(self, sources: IntArray, targets: IntArray, memory_bytes: FloatArray) -> None:
        """Migrations from `sources` resumed at `targets` (whose room was reserved)."""
        np.subtract.at(self.vms, sources, 1)
        np.subtract.at(self.serving, sources, 1)
        np.add.at(self.serving, targets, 1)
        np.subtract.at(self.memory_bytes, sources, memory_bytes)
