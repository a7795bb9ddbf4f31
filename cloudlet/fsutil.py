"""Files that are either whole or absent: write to a temporary name, fsync, rename.

A crash at any moment leaves the old file or the new one, never half of one.
`atomic_write_all` does the same for many files at the cost of about one
flush: a daemon checkpointing hundreds of small VMs every few seconds would
otherwise spend most of its checkpoint CPU in per-file journal commits.
A write the storage cannot take (a full disk, a failing or read-only one)
raises the typed `StorageFull`, leaves the old file as it was, and leaves no
temporary file behind: a daemon on a full disk must know a checkpoint was not
written, and must not fill the disk further with the halves of failed ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cloudlet.errors import StorageFull

Buffer = bytes | bytearray | memoryview
Contents = Buffer | Sequence[Buffer]  # one buffer, or several written back to back

# The errors that say "this storage cannot take the write now" (as opposed to "this
# path is wrong", EACCES or EISDIR): a full disk, a full quota, a file over the size
# limit, a failing device, a file system remounted read-only after errors.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def atomic_write(path: str | os.PathLike[str], data: Buffer | Sequence[Buffer]) -> None:
    """`data` may be one buffer or several written back to back (no joined copy:
    a 256 MiB snapshot is written from the VM's own chunk bytes). Raises
    `StorageFull` (an `OSError` too) for the errors in `STORAGE_ERRNOS`."""
    with storage_errors(Path(path).name):
        _write_then_rename(Path(path), data)


@contextlib.contextmanager
def storage_errors(name: str) -> Iterator[None]:
    """Within: an `OSError` in `STORAGE_ERRNOS` is raised as `StorageFull`, saying it
    could not write `name` (a file's name, not its path: the message may reach a
    client); any other error as it is."""
    try:
        yield
    except OSError as exc:
        typed = _as_storage_error(exc, name)
        if typed is exc:
            raise
        raise typed from exc


def storage_full(exc: OSError, doing: str) -> StorageFull:
    """`exc` as the typed error, its errno kept, its cause named in the message
    (`doing` + ": No space left on device")."""
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    err = StorageFull(f"{doing}: {reason}")
    err.errno = exc.errno
    return err


def atomic_write_all(files: Sequence[tuple[Path, Contents | Callable[[], Contents]]]
                     ) -> list[Exception | None]:
    """Write several files, each whole or absent, as `atomic_write` does one.

    Why: each file written alone costs two flushes (its data, then its directory
    after the rename). Here every file is written to its temporary name first, then
    each is fsynced (the journal commits of flushes that follow one another are
    shared), renamed, and each directory is fsynced once at the end. Durability is
    the same: a file's data is on disk before its rename, and its rename is on disk
    before this returns None for it.

    A file's contents may be given as a function that makes them: it is called
    when that file is written, and what it made is let go before the next file's
    is made (a batch of encoded snapshots is never all in memory at once).

    One file's failure does not stop the others: the answer holds, per file in
    order, None (written and durable) or its error (`StorageFull` for the errors in
    `STORAGE_ERRNOS`; whatever a contents function raised), and a failed file's old
    version stays. A file whose
    directory's fsync failed is reported failed although renamed: its rename may
    not survive a crash, so no caller may count it durable."""
    errors: list[Exception | None] = [None] * len(files)
    staged: list[tuple[int, int, str]] = []  # (index, open fd, temporary path)
    unrenamed: set[str] = set()  # temporaries to remove if this stops half-way
    renamed: dict[Path, list[int]] = {}  # directory -> the files renamed into it
    try:
        for i, (target, contents) in enumerate(files):
            try:
                fd, tmp = _stage(target, contents() if callable(contents) else contents)
            except OSError as exc:
                errors[i] = _as_storage_error(exc, target.name)
                continue
            except Exception as exc:  # a contents function's own failure: this file's
                errors[i] = exc
                continue
            staged.append((i, fd, tmp))
            unrenamed.add(tmp)
        for i, fd, tmp in staged:
            target = files[i][0]
            try:
                os.fsync(fd)
                os.replace(tmp, target)
            except OSError as exc:
                errors[i] = _as_storage_error(exc, target.name)
                continue
            unrenamed.discard(tmp)
            renamed.setdefault(target.parent, []).append(i)
    finally:
        for _, fd, _ in staged:
            with contextlib.suppress(OSError):
                os.close(fd)
        for tmp in unrenamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    for directory, indexes in renamed.items():
        try:
            fsync_dir(directory)
        except OSError as exc:
            for i in indexes:
                errors[i] = _as_storage_error(exc, files[i][0].name)
    return errors


def _stage(target: Path, data: Buffer | Sequence[Buffer]) -> tuple[int, str]:
    """`data` written (not yet flushed) to a new temporary file beside `target`: its
    open fd and path. Removed again if the write fails."""
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd, tmp


def _as_storage_error(exc: OSError, name: str) -> OSError:
    """`exc`, as `StorageFull` when it is one of `STORAGE_ERRNOS` (as `storage_errors`)."""
    if exc.errno in STORAGE_ERRNOS and not isinstance(exc, StorageFull):
        return storage_full(exc, f"cannot write {name}")
    return exc


def fsync_dir(directory: Path) -> None:
    """Make the renames, creations and removals in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames into it durable
    finally:
        os.close(dir_fd)


def _write_then_rename(target: Path, data: Buffer | Sequence[Buffer]) -> None:
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Never mask the write's own error with the cleanup's (EROFS refuses both).
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
