"""The orchestrator's fencing epoch, as one cloudlet remembers it.

Every command carries the epoch of the orchestrator lease it was sent under.
A new leader takes a higher epoch; a cloudlet that has seen epoch N refuses
any command of an epoch below N, so a deposed leader that still believes it
leads (a paused process, a partitioned one) cannot move anything. The newest
epoch is written to disk (write, fsync, rename) before a command of that epoch
runs, so a restart does not forget it and let an old leader back in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cloudlet.errors import StaleEpoch, StorageFull
from cloudlet.fsutil import atomic_write

log = logging.getLogger(__name__)

EPOCH_FILE = "epoch.json"


class EpochFence:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.newest = -1
        try:
            value = json.loads(self.path.read_text()).get("epoch")
            if type(value) is int:
                self.newest = value
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            # Unreadable: refusing everything would need a human; starting from -1
            # would let any old leader in. Neither is safe alone, so say it loudly.
            log.error("cannot read %s (%r): the fencing epoch starts again from the first "
                      "command seen", self.path, exc)

    def observe(self, epoch: int) -> None:
        """A newer epoch seen on a believed lease: orders of older ones are refused
        from now on, even by a cloudlet the new leader has not ordered yet (a failed
        write is logged; the lease will be seen again at its next renewal)."""
        if epoch <= self.newest:
            return
        try:
            atomic_write(self.path, json.dumps({"epoch": epoch}).encode())
        except OSError as exc:
            log.error("cannot record fencing epoch %d from a lease: %s", epoch, exc.strerror)
            return
        self.newest = epoch

    def admit(self, epoch: int) -> None:
        """Raise `StaleEpoch` for an epoch older than the newest seen; remember a newer
        one durably first (`StorageFull` if it cannot be: then nothing runs)."""
        if epoch < self.newest:
            raise StaleEpoch(f"epoch {epoch} is older than {self.newest}, the newest this "
                             "cloudlet has seen: the order comes from a deposed leader",
                             epoch=epoch, newest=self.newest)
        if epoch > self.newest:
            try:
                atomic_write(self.path, json.dumps({"epoch": epoch}).encode())
            except OSError as exc:
                raise StorageFull(f"cannot record fencing epoch {epoch}: {exc.strerror}; "
                                  "the order was not carried out") from exc
            self.newest = epoch
