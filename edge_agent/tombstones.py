"""Tombstones: where the VMs that left this cloudlet went.

A VM handed over to another cloudlet leaves a tombstone here, kept on disk as
`STATE/vms/ID.moved` (JSON: the new location and the migration that moved it),
so that a client that comes back is answered `vm_moved` with the new address,
and so that a restart never brings a VM back to life here once it lives
elsewhere. Writing a live migration's tombstone is that migration's commit
point (docs/migration.md), hence written atomically (write, fsync, rename).
A live migration splits that in two (`prepare`, then `commit_prepared`), so that
the record's own write and fsync happen while the destination applies the final
round, and only the rename and its directory's fsync remain at the commit point.

Synchronous on purpose: a tombstone is a few hundred bytes, and the commit must
be durable before the destination is told; the host decides which thread runs
each write.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cloudlet.fsutil import STORAGE_ERRNOS, atomic_write, storage_full
from cloudlet.protocol import Location

log = logging.getLogger(__name__)

SUFFIX = ".moved"
PREPARED = ".prepared"  # a record written ahead, not a tombstone until renamed


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
        for path in self.vm_dir.glob(f"*{SUFFIX}{PREPARED}"):
            path.unlink(missing_ok=True)  # a migration that stopped before its decision

    def write(self, vm_id: str, where: Location, migration_id: str | None) -> None:
        """Durably record that `vm_id` lives at `where` now."""
        record = {**where.to_wire(), "migration": migration_id}
        atomic_write(self.path(vm_id), json.dumps(record).encode())
        self.where[vm_id] = where
        if migration_id:
            self._moved_by[migration_id] = vm_id

    def prepare(self, vm_id: str, where: Location, migration_id: str) -> Path:
        """The first half of `write`, ahead of the decision: the record, written and
        fsynced under a name no restart reads as a tombstone."""
        path = self.vm_dir / f"{vm_id}{SUFFIX}{PREPARED}"
        atomic_write(path, json.dumps({**where.to_wire(), "migration": migration_id}).encode())
        return path

    def commit_prepared(self, prepared: Path, vm_id: str, where: Location,
                        migration_id: str) -> None:
        """The second half, the decision itself: the prepared record becomes
        `vm_id`'s tombstone (a rename, made durable by its directory's fsync)."""
        try:
            os.replace(prepared, self.path(vm_id))
            dir_fd = os.open(self.vm_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if exc.errno in STORAGE_ERRNOS:
                raise storage_full(exc, f"cannot write {self.path(vm_id).name}") from exc
            raise
        self.where[vm_id] = where
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
