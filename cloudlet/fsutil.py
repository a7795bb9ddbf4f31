"""Files that are either whole or absent: write to a temporary name, fsync, rename.

A crash at any moment leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

Buffer = bytes | bytearray | memoryview


def atomic_write(path: str | os.PathLike[str], data: Buffer | Sequence[Buffer]) -> None:
    """`data` may be one buffer or several written back to back (no joined copy:
    a 256 MiB snapshot is written from the VM's own chunk bytes)."""
    target = Path(path)
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
