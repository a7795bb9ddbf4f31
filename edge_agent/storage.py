"""Can this cloudlet write its state? What /health, the metrics and the log say.

A full disk (or a failing or read-only one) must not stop a cloudlet: its VMs
keep serving from memory, and every checkpoint that failed is tried again by
the next round, since the VM's checkpointed sequence number did not advance.
But it must be seen, because until the disk takes writes again nothing new is
durable: a kill -9 would lose every call since the last good checkpoint, and a
SIGTERM cannot save the VMs either.

So the cloudlet is *degraded* from the first write of its state that fails (a
checkpoint round's, or a request's: an image upload, a VM's first checkpoint)
until a checkpoint round writes everything it had to. A round with nothing to
write writes a small probe file instead, so a cloudlet whose disk was freed
says so within one checkpoint interval even when no VM changed meanwhile.

The reasons /health gives are public (it answers without credentials): they
say what cannot be written and why, never a path or a VM id; the log has those.
The log says it once, when it starts and when it ends, not once a round: on a
full disk a line per VM every two seconds would eat what little room is left.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.errors import CloudletError
from cloudlet.fsutil import atomic_write

log = logging.getLogger(__name__)

# One page: a disk with room for file names but not for data fails it, as it
# would fail a checkpoint; a bigger probe would only wear the disk.
PROBE_BYTES = 4096
PROBE_FILE = ".storage-probe"  # in the checkpoints' directory; no checkpoint's name
MAX_REASONS = 4  # /health names a few distinct failures, not one per VM
WHAT = ("checkpoint", "request", "probe")  # where a failed write came from (metric label)


@dataclass(frozen=True)
class CheckpointRound:
    """What one round of checkpoints did: how many it wrote, which VMs it could not
    write and why, and, for a round with nothing to write while degraded, whether
    the probe standing in for it was written."""

    written: int = 0
    failed: dict[str, Exception] = field(default_factory=dict)
    probed: bool = False
    probe_error: Exception | None = None

    @property
    def clean(self) -> bool:
        """Wrote something and failed at nothing: the storage takes writes."""
        return (not self.failed and self.probe_error is None
                and (self.written > 0 or self.probed))


def public_reason(exc: BaseException, what: str) -> str:
    """One line for /health: `"storage_full: cannot write checkpoints (No space left
    on device)"`. Any OSError means the state cannot be written, whatever its
    errno; anything else is a bug, named by its class only."""
    if isinstance(exc, OSError):
        cause = os.strerror(exc.errno) if exc.errno else "cause unknown"
        return f"storage_full: cannot write {what} ({cause})"
    code = exc.code if isinstance(exc, CloudletError) else "internal_error"
    return f"{code}: cannot write {what} ({type(exc).__name__})"


def write_probe(directory: Path) -> None:
    """Write and remove a small file where checkpoints go (raises what the write raised)."""
    probe = directory / PROBE_FILE
    atomic_write(probe, bytes(PROBE_BYTES))
    probe.unlink(missing_ok=True)


class StorageHealth:
    """Whether the cloudlet's state writes succeed, with the reasons when not."""

    def __init__(self) -> None:
        self.reasons: list[str] = []  # empty while ok; newest last
        self.failures_total = dict.fromkeys(WHAT, 0)
        self.failing_vms: set[str] = set()  # VMs whose last checkpoint attempt failed

    @property
    def ok(self) -> bool:
        return not self.reasons

    def write_failed(self, what: str, reason: str) -> None:
        """A write outside the checkpoint rounds failed (a request's)."""
        self.failures_total[what] += 1
        self._degrade([reason])

    def round_done(self, done: CheckpointRound, vms: Iterable[str]) -> None:
        """Take in a checkpoint round; `vms` are the VMs hosted now (a failing VM
        that was destroyed or moved away is nobody's concern any more)."""
        self.failing_vms &= set(vms) & set(done.failed)
        reasons = []
        for vm_id, exc in done.failed.items():
            self.failures_total["checkpoint"] += 1
            if vm_id not in self.failing_vms:
                log.error("cannot checkpoint VM %s: %s; it keeps serving from memory, its "
                          "last good checkpoint stays on disk, and the next round tries "
                          "again", vm_id, _detail(exc))
                self.failing_vms.add(vm_id)
            reasons.append(public_reason(exc, "checkpoints"))
        if done.probe_error is not None:
            self.failures_total["probe"] += 1
            reasons.append(public_reason(done.probe_error, "checkpoints"))
        if reasons:
            self._degrade(reasons)
        elif done.clean and self.reasons:
            log.warning("state writes succeed again (%s); the cloudlet is no longer degraded",
                        f"{done.written} checkpoints written" if done.written else "a probe")
            self.reasons = []

    def _degrade(self, reasons: list[str]) -> None:
        if self.ok:
            log.error("the cloudlet is degraded: %s", reasons[0])
        for reason in dict.fromkeys(reasons):
            if reason in self.reasons:
                self.reasons.remove(reason)
            self.reasons.append(reason)
        del self.reasons[:-MAX_REASONS]


def _detail(exc: BaseException) -> str:
    if isinstance(exc, CloudletError):
        return exc.message
    return str(exc) if isinstance(exc, OSError) else repr(exc)
