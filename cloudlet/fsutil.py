"""Files that are either whole or absent: write to a temporary name, fsync, rename.

A crash at any moment leaves the old file or the new one, never half of one.
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
from collections.abc import Iterator, Sequence
from pathlib import Path

from cloudlet.errors import StorageFull

Buffer = bytes | bytearray | memoryview

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
        if exc.errno in STORAGE_ERRNOS and not isinstance(exc, StorageFull):
            raise storage_full(exc, f"cannot write {name}") from exc
        raise


def storage_full(exc: OSError, doing: str) -> StorageFull:
    """`exc` as the typed error, its errno kept, its cause named in the message
    (`doing` + ": No space left on device")."""
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    err = StorageFull(f"{doing}: {reason}")
    err.errno = exc.errno
    return err


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
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
