"""One VM as this cloudlet hosts it: the VM, its owner, its locks, what it has
promised its clients (its exactly-once reply log, its checkpointed `seq`) and
what telemetry reads of it.

A module of its own because three others hold it: the host that registers it
(edge_agent/vm_host.py), the checkpoints that write it (edge_agent/checkpoints.py)
and the moves that hand it over (edge_agent/handoff.py, live_migration.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from cloudlet.migration.pacing import CallPacer
from cloudlet.vm import VM, Snapshot
from edge_agent.exactly_once import ExactlyOnce
from edge_agent.replies import ANNEX_KEY, GENERATION_KEY, ReplyLog


@dataclass
class HostedVM:
    vm: VM
    owner: str
    inline: bool  # short deadline: calls run on the event loop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Serialises a checkpoint's snapshot-to-file and destroy: without it a write in
    # flight could resurrect a destroyed VM, or an older write land after a newer one.
    persist_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checkpointed_seq: int = -1
    checkpointed_at: float = field(default_factory=time.monotonic)
    calls: int = 0  # applied calls, for telemetry rates
    last_dirty_rate: float = 0.0
    exactly_once: ExactlyOnce = field(default_factory=ExactlyOnce)
    # Arrived by live migration: when the source served its last call, until the
    # first call here, which turns it into the migration's downtime as users see it.
    arrived_last_call_unix: float = 0.0
    arrival_downtime_ms: float | None = None
    # Set by a move about to pause the VM: resolved by the next call answered on the
    # event loop (`VMHost.call_now`), so the pause can start on a call boundary.
    answered: asyncio.Future[None] | None = None
    generation: int = 0  # moves between cloudlets so far (see replies.GENERATION_KEY)
    # Auto-converge: while a live migration outruns the link, calls are spaced apart.
    pacer: CallPacer = field(default_factory=CallPacer)

    @property
    def id(self) -> str:
        return self.vm.id

    @property
    def replies(self) -> ReplyLog:
        """The answers kept for resends (what a snapshot's annex carries)."""
        return self.exactly_once.replies

    def describe(self) -> dict[str, Any]:
        return {"vm": self.vm.id, "owner": self.owner, "image": self.vm.image.digest,
                "seq": self.vm.seq, "memory_bytes": self.vm.memory_bytes,
                "limits": self.vm.limits.to_wire()}

    def snapshot(self, *, moving: bool = False) -> Snapshot:
        """A full snapshot carrying the VM's reply log and its count of moves (call
        under the VM's lock); `moving` counts the move it is taken for."""
        generation = self.generation + 1 if moving else self.generation
        return replace(self.vm.snapshot(), annex={ANNEX_KEY: self.replies.to_wire(),
                                                  GENERATION_KEY: generation})
