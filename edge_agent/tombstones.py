"""Tombstones: where the VMs that left this cloudlet went.

A VM handed over to another cloudlet leaves a tombstone here, kept on disk as
`STATE/vms/ID.moved` (JSON: the new location and the migration that moved it),
so that a client that comes back is answered `vm_moved` with the new address,
and so that a restart never brings a VM back to life here once it lives
elsewhere. Writing a live migration's tombstone is that migration's commit
point (docs/migration.md), hence written atomically (write, fsync, rename).

Synchronous on purpose: a tombstone is a few hundred bytes, and the commit must
be durable before the destination is told; the host decides which thread runs
each write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cloudlet.fsutil import atomic_write
from cloudlet.protocol import Location

log = logging.getLogger(__name__)

SUFFIX = ".moved"


class Tombstones:
    """The tombstones of one state directory (`vm_dir`), on disk and in memory."""

    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.where: dict[str, Location] = {}  # VMs moved away -> where they went
        self._moved_by: dict[str, str] = {}  # migration id -> the VM it moved away

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self.where

    def get(self, vm_id: str) -> Location | None:
        return self.where.get(vm_id)

    def path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}{SUFFIX}"

    def load(self) -> None:
        """Read every tombstone on disk; an unreadable one is logged and skipped."""
        for path in self.vm_dir.glob(f"*{SUFFIX}"):
            try:
                wire = json.loads(path.read_bytes())
                self.where[path.stem] = Location(str(wire["node"]), str(wire["endpoint"]))
                if isinstance(wire.get("migration"), str):
                    self._moved_by[wire["migration"]] = path.stem
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable tombstone %s: %r", path.name, exc)

    def write(self, vm_id: str, where: Location, migration_id: str | None) -> None:
        """Durably record that `vm_id` lives at `where` now."""
        record = {**where.to_wire(), "migration": migration_id}
        atomic_write(self.path(vm_id), json.dumps(record).encode())
        self.where[vm_id] = where
        if migration_id:
            self._moved_by[migration_id] = vm_id

    def pop(self, vm_id: str) -> Location | None:
        """Forget `vm_id`'s tombstone in memory (its file is `path`, for the caller
        to remove on the thread it chooses)."""
        return self.where.pop(vm_id, None)

    def forget(self, vm_id: str) -> None:
        """Remove `vm_id`'s tombstone, in memory and on disk (a move that did not
        happen, a VM that came back)."""
        self.where.pop(vm_id, None)
        self.path(vm_id).unlink(missing_ok=True)

    def moved_by_migration(self, migration_id: str) -> bool:
        return migration_id in self._moved_by

    def moved_live(self, vm_id: str) -> bool:
        """Whether `vm_id` left by a live migration (whose protocol settled who owns
        it), rather than by a stop-and-copy handover not yet confirmed."""
        return vm_id in self._moved_by.values()
