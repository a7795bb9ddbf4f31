"""Tombstones: where the VMs that left this cloudlet went.

A VM handed over to another cloudlet leaves a tombstone here, kept on disk as
`STATE/vms/ID.moved` (JSON: the new location and the migration that moved it),
so that a client that comes back is answered `vm_moved` with the new address,
and so that a restart never brings a VM back to life here once it lives
elsewhere. Writing a live migration's tombstone is that migration's commit
point (docs/migration.md), hence written atomically (write, fsync, rename).

A live migration splits that in two, so that its commit point costs one
block's overwrite. `prepare`, as pre-copy starts, writes the migration's record
(`ID.moved.MIGRATION.prepared`, its first byte `?`: undecided) and makes it
durable, file and directory. `decide` is the commit point itself: the first
byte becomes `!` in place, then `fdatasync` (an overwrite of a block the file
already has: no metadata to journal, ~0.15 ms here, against ~0.5 ms for a rename
and its directory's fsync). The decided record is the VM's tombstone from then
on; a restart reads it as one and renames it to `ID.moved` (`load`), and drops an
undecided one (its migration stopped before its commit point). A record is named
by its migration, so two moves of one VM asked at once never share one.

The record also keeps the migration's final round (`kept_at`): the destination
then need not flush its own copy before it says `ready` (a flush off the
downtime's path), since the decision's one `fdatasync` makes the round durable
here with it. The record is zero-filled that far ahead, so the decision still
writes no metadata. A decided record whose kept round does not check out (the
snapshot's digest) is a decision whose flush never finished: nobody was told,
and a restart drops it as undecided. A destination that lost its unsynced copy
fetches the kept round (`kept_final`); once it has its own copy on disk it says
so, and the record becomes a plain decided one (`release_kept`).

Synchronous on purpose: a tombstone is a few hundred bytes, and the commit must
be durable before the destination is told; the host decides which thread runs
each write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cloudlet.errors import SnapshotError
from cloudlet.fsutil import atomic_write, storage_errors
from cloudlet.protocol import Location
from cloudlet.vm import Snapshot
from cloudlet.vm.snapshot import encoded_length

log = logging.getLogger(__name__)

SUFFIX = ".moved"
PREPARED = ".prepared"  # a record written ahead: a tombstone once its first byte says so
UNDECIDED = b"?"
DECIDED = b"!"
KEPT_AT = 4096  # a record's kept final round starts here; its JSON line fits before
IOV_MAX = 1024  # buffers per `pwritev` (Linux's limit)


class Tombstones:
    """The tombstones of one state directory (`vm_dir`), on disk and in memory."""

    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.where: dict[str, Location] = {}  # VMs moved away -> where they went
        self._moved_by: dict[str, str] = {}  # migration id -> the VM it moved away
        # Removing a record and rewriting it (`release_kept`) never interleave: a
        # rewrite must not bring back a record just removed (the VM came back).
        self._files = threading.Lock()

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self.where

    def get(self, vm_id: str) -> Location | None:
        return self.where.get(vm_id)

    def path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}{SUFFIX}"

    def load(self) -> None:
        """Read every tombstone on disk; an unreadable one is logged and skipped. A
        decided record is a tombstone, renamed to the tombstone's own name if that
        can be done now (if not, it stays the tombstone on disk); an undecided one
        is dropped (its migration stopped before its commit point)."""
        for path in self.vm_dir.glob(f"*{SUFFIX}"):
            try:
                self._register(path.stem, json.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable tombstone %s: %r", path.name, exc)
        for path in self.vm_dir.glob(f"*{SUFFIX}*{PREPARED}"):
            vm_id = path.name.split(".", 1)[0]
            try:
                body = path.read_bytes()
                if body[:1] != DECIDED:
                    path.unlink(missing_ok=True)
                    continue
                wire, kept = _parse_record(body)
                if wire.get("kept_at") is not None:
                    if kept is None:
                        log.warning("dropping record %s: decided, but its kept final round "
                                    "is incomplete, so its flush never finished and no one "
                                    "was told it committed", path.name)
                        path.unlink(missing_ok=True)
                        continue
                    # The tombstone under its record's name, until its destination has
                    # its own copy of the kept round (`release_kept`).
                    self._register(vm_id, wire)
                    continue
                self._register(vm_id, wire)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable tombstone record %s: %r", path.name, exc)
                continue
            try:
                atomic_write(self.path(vm_id), json.dumps(wire).encode())
                path.unlink()
                _sync_dir(self.vm_dir)  # a crash must not bring the record back
            except OSError as exc:  # it stays the tombstone under its record's name
                log.error("cannot rename tombstone record %s: %r", path.name, exc)

    def _register(self, vm_id: str, wire: Any) -> None:
        self.where[vm_id] = Location(str(wire["node"]), str(wire["endpoint"]))
        if isinstance(wire.get("migration"), str):
            self._moved_by[wire["migration"]] = vm_id

    def write(self, vm_id: str, where: Location, migration_id: str | None) -> None:
        """Durably record that `vm_id` lives at `where` now."""
        record = {**where.to_wire(), "migration": migration_id}
        atomic_write(self.path(vm_id), json.dumps(record).encode())
        self.where[vm_id] = where
        if migration_id:
            self._moved_by[migration_id] = vm_id

    def prepare(self, vm_id: str, where: Location, migration_id: str, *,
                keep_bytes: int = 0) -> Path:
        """Migration `migration_id`'s record, written and made durable ahead of the
        decision, under a name and a first byte no restart reads as a tombstone.
        With `keep_bytes`, zero-filled for a final round that large to be kept at
        `KEPT_AT` (a larger one grows the file, and its flush then writes metadata)."""
        path = self.record_path(vm_id, migration_id)
        wire: dict[str, Any] = {**where.to_wire(), "migration": migration_id}
        if not keep_bytes:
            atomic_write(path, [UNDECIDED, json.dumps(wire).encode()])
            return path
        wire["kept_at"] = KEPT_AT
        line = json.dumps(wire).encode() + b"\n"
        if 1 + len(line) > KEPT_AT:
            raise ValueError(f"a tombstone record of {len(line)} bytes does not fit "
                             f"before its kept round ({KEPT_AT})")
        atomic_write(path, [UNDECIDED, line, bytes(KEPT_AT - 1 - len(line) + keep_bytes)])
        return path

    def keep(self, prepared: Path, kept: Sequence[bytes | memoryview]) -> None:
        """Write the final round `kept` into the undecided record `prepared`, ahead of
        the decision and not flushed (the decision's flush takes it with the byte):
        the decision is then a byte and a flush. Harmless if no decision follows."""
        with storage_errors(prepared.name):
            fd = os.open(prepared, os.O_WRONLY)
            try:
                _pwrite_all(fd, kept, KEPT_AT)
            finally:
                os.close(fd)

    def decide(self, prepared: Path, vm_id: str, where: Location, migration_id: str,
               kept: Sequence[bytes | memoryview] = ()) -> None:
        """The commit point: the prepared record's first byte says decided, and the
        final round `kept` (an encoded snapshot, prepared with `keep_bytes`; or
        written ahead by `keep`) is written at `KEPT_AT`, both durable by one
        `fdatasync` (overwritten in place: no metadata). Cheap enough for the event
        loop's thread, where a worker thread's hop would cost more than the write. If
        it fails, the record goes: a byte written but not synced must not decide at a
        restart a migration that was refused (the VM serves on here)."""
        try:
            with storage_errors(self.path(vm_id).name):
                fd = os.open(prepared, os.O_WRONLY)
                try:
                    _pwrite_all(fd, kept, KEPT_AT)
                    if os.pwrite(fd, DECIDED, 0) != 1:
                        raise OSError(errno.EIO, "short write")
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                prepared.unlink()
                # Durably gone: a decided byte and round written back by the kernel
                # must not come back after a power loss as a decision.
                _sync_dir(self.vm_dir)
            raise
        self.where[vm_id] = where
        self._moved_by[migration_id] = vm_id

    def record_path(self, vm_id: str, migration_id: str) -> Path:
        return self.vm_dir / f"{vm_id}{SUFFIX}.{migration_id}{PREPARED}"

    def kept_final(self, migration_id: str, node: str) -> bytes | None:
        """The final round migration `migration_id` kept with its decision, for the
        cloudlet `node` it moved the VM to; None if this cloudlet keeps none (never
        moved it, or released it). PermissionError if the VM went elsewhere: that is
        checked on the record's first line, before its round is read."""
        vm_id = self._moved_by.get(migration_id)
        if vm_id is None:
            return None
        path = self.record_path(vm_id, migration_id)
        try:
            with path.open("rb") as f:
                head = f.read(KEPT_AT)
                wire = _record_head(head)
                if wire.get("node") != node:
                    raise PermissionError(f"migration {migration_id} moved its VM elsewhere")
                if head[:1] != DECIDED or wire.get("kept_at") is None:
                    return None
                body = head + f.read()
        except FileNotFoundError:
            return None
        _, kept = _parse_record(body)
        return None if kept is None else bytes(kept)

    def release_kept(self, migration_id: str, node: str) -> bool:
        """The destination `node` has the final round on its own disk: the record
        becomes a plain decided one (written whole, then renamed over itself), its
        kept round gone. False if there is none to release, for `node`: a record of
        another destination is never touched."""
        with self._files:
            vm_id = self._moved_by.get(migration_id)
            if vm_id is None:
                return False
            path = self.record_path(vm_id, migration_id)
            try:
                with path.open("rb") as f:
                    head = f.read(KEPT_AT)  # the JSON line: the kept round is not read
            except FileNotFoundError:
                return False
            wire = _record_head(head)
            if head[:1] != DECIDED or wire.pop("kept_at", None) is None or wire["node"] != node:
                return False
            atomic_write(path, [DECIDED, json.dumps(wire).encode()])
            return True

    def pop(self, vm_id: str) -> Location | None:
        """Forget `vm_id`'s tombstone in memory (its file is `path`, for the caller
        to remove on the thread it chooses)."""
        return self.where.pop(vm_id, None)

    def migrations_of(self, vm_id: str) -> list[str]:
        """The live migrations that moved `vm_id` away from here (their records are
        named by them)."""
        return [m for m, moved in self._moved_by.items() if moved == vm_id]

    def forget_migrations(self, migration_ids: Iterable[str]) -> None:
        """Forget, in memory, that `migration_ids` moved a VM away: it came back, and
        their records are being removed, so a restart would not know them either.
        Without this the map grew by one entry per move for the daemon's life (and
        `migrations_of`, which scans it, with it)."""
        for migration_id in migration_ids:
            self._moved_by.pop(migration_id, None)

    def remove_files(self, vm_id: str, migration_ids: Iterable[str], *,
                     tombstone: bool = True) -> None:
        """Remove `vm_id`'s tombstone (unless `tombstone` is False) and the records of
        `migration_ids` (it came back). By name, never by pattern: a record written
        meanwhile, by a move of the VM out again, is that move's (its commit point),
        and must stay."""
        with self._files:
            if tombstone:
                self.path(vm_id).unlink(missing_ok=True)
            for migration_id in migration_ids:
                self.record_path(vm_id, migration_id).unlink(missing_ok=True)

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


def _pwrite_all(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> None:
    """`parts` back to back at `offset`, whatever the kernel takes per call (a write
    stops short at ~2 GiB, or on a signal)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _record_head(body: bytes) -> dict[str, Any]:
    """A record's JSON: after its first byte, up to the newline (or all of it, in a
    record that keeps no round). Enough to read from the first `KEPT_AT` bytes."""
    wire = json.loads(body[1:].split(b"\n", 1)[0])
    if not isinstance(wire, dict):
        raise ValueError("a tombstone record is not a JSON object")
    return wire


def _parse_record(body: bytes) -> tuple[dict[str, Any], memoryview | None]:
    """A record's JSON (after its first byte: up to the newline, or all of it in a
    record that keeps no round) and its kept final round, if whole: the encoded
    snapshot at `kept_at`, its digest checked."""
    wire = _record_head(body)
    kept_at = wire.get("kept_at")
    if not isinstance(kept_at, int) or not 0 < kept_at < len(body):
        return wire, None
    view = memoryview(body)[kept_at:]
    try:
        length = encoded_length(view)
        if length is None:
            return wire, None
        Snapshot.from_bytes(view[:length])  # the digest: a torn write fails it
    except SnapshotError:
        return wire, None
    return wire, view[:length]


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
