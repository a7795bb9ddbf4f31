"""What the state machines ask of their driver: send bytes, wait for bytes, or act.

Why objects and not callbacks: the protocol stays a pure function of the
messages it is fed (h11's design), and the order of outputs is the contract.
A driver loops on `next_event()` and does what each event says, in order:
above all, it performs `BecomeTombstone` (durably) before sending the `Commit`
that follows it, because that message is what makes the move irrevocable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cloudlet.migration.messages import Message
from cloudlet.vm import VM, Snapshot


@dataclass(frozen=True)
class Send:
    """Send `data` (the encoded `message`) to the peer, as one channel message."""

    data: bytes
    message: Message


@dataclass(frozen=True)
class NeedData:
    """Nothing to do until the peer's next message: `receive()` it (with a deadline)."""


@dataclass(frozen=True)
class PauseVM:
    """Source: stop calls into the VM (incoming calls wait), then call `paused()`."""


@dataclass(frozen=True)
class ResumeVM:
    """Source: the migration aborted; serve calls at the source again. Idempotent:
    it comes with every abort, also when the VM was never paused."""

    code: str
    reason: str


@dataclass(frozen=True)
class Throttle:
    """Source: the guest dirties memory faster than pre-copy can follow (auto-converge).
    Let calls into the VM in no closer together than `call_interval_s` from now on
    (0: no spacing). The VM keeps serving; the spacing ends with the migration."""

    call_interval_s: float
    dirty_rate_bytes_s: float
    link_rate_bytes_s: float


@dataclass(frozen=True)
class BecomeTombstone:
    """Source: the VM now lives at the destination. Record that durably (the tombstone
    answers "where did it go?" and "did migration X commit?"), redirect waiting
    calls, drop the VM; only then send the `Commit` that follows this event.

    `final_round` is the final round as the destination received it (the delta
    since the last pre-copy round, with the annex): kept with the decision, in the
    same flush, it is what a destination that lost its own unsynced copy fetches
    (so the destination need not flush it before `Ready`)."""

    migration_id: str
    vm_id: str
    final_round: Snapshot | None = None


@dataclass(frozen=True)
class KeepFinal:
    """Source (one that keeps the final round, `keeps_final`): the final round is
    on its way (its `Final` was just sent), and
    `BecomeTombstone` will carry it if the destination says `Ready`. A driver whose
    hooks keep it with the decision may write it now, undecided, while waiting:
    the decision then only flips its byte and flushes. Optional: ignoring it is
    correct, only slower."""

    final_round: Snapshot


@dataclass(frozen=True)
class PersistRound:
    """Destination: a round was applied to the held VM. Make `snapshot` (the round's
    overlay or delta, in order) durable before going on: its acknowledgement (or
    the `Ready` after the final one) promises that a crash here loses nothing the
    source may commit (a source that decides at `Final` does so once every earlier
    round is acknowledged). Unless
    `source_keeps` (a final round the source keeps durable with its decision): then
    it may be written after the landing, and fetched from the source if lost."""

    migration_id: str
    vm_id: str
    round: int
    snapshot: Snapshot
    final: bool
    source_keeps: bool = False


@dataclass(frozen=True)
class ActivateVM:
    """Destination: the migration committed; serve `vm` from now on. `annex` is the
    source driver's opaque state (e.g. the reply cache for exactly-once calls)."""

    vm: VM
    annex: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DiscardVM:
    """Destination: the migration aborted; everything received is already dropped."""

    code: str
    reason: str


@dataclass(frozen=True)
class Done:
    """The migration is over (see the machine's `outcome`); no more events."""

    outcome: str


Event = (Send | NeedData | PauseVM | ResumeVM | Throttle | KeepFinal | BecomeTombstone
         | PersistRound | ActivateVM | DiscardVM | Done)


def take_send(events: deque[Event]) -> Send | None:
    """The next queued event if it is a message for the peer (the Abort that a
    machine's `abort` queues), taken off the queue; None leaves every event queued.
    Both machines' `next_send`: for a driver that sends one last message, best
    effort, before it stops."""
    if events and isinstance(events[0], Send):
        send = events.popleft()
        assert isinstance(send, Send)
        return send
    return None
