"""One process per state directory: an advisory lock, and who holds it.

Two daemons (or two `cloudlet up`) on one state directory would each restore
the same checkpoints, serve the same VMs from two places with diverging
states, and overwrite each other's checkpoints. So the first to start takes an
exclusive `flock` on `STATE/cloudlet.lock` and holds it while it runs, and
writes in it who it is (pid, command, start time). A second finds the lock
taken, reads who holds it, and refuses at once with a `StateDirLocked` naming
the holder, before it has restored, written, bound or started anything.

`flock`, not a pid file: the kernel releases the lock when its holder dies,
however it dies (kill -9 included), so a crash never leaves a lock for a human
to clear, and a pid reused by another program cannot keep a directory locked.
The lock file is never replaced (a rename would put a new, unlocked inode at
the path), only rewritten in place. The lock is advisory: it stops Cloudlet's
own processes, not a human with `rm`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
from pathlib import Path
from types import TracebackType

from cloudlet.errors import StateDirLocked

log = logging.getLogger(__name__)

LOCK_FILE = "cloudlet.lock"
HOLDER_MAX_BYTES = 4096  # what a holder writes is ~100 bytes; never read more


class StateLock:
    """`with StateLock(state_dir, "cloudlet up"):` holds the directory or raises
    `StateDirLocked`. The lock's file descriptor is not inherited by children (a
    child outliving its parent must not keep the parent's directory locked)."""

    def __init__(self, state_dir: Path, command: str) -> None:
        self.state_dir = state_dir
        self.command = command
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, HOLDER_MAX_BYTES, 0))
            os.close(fd)
            raise StateDirLocked(
                f"{self.state_dir} is in use by {holder}; stop it first, or give this "
                "one another state directory", state_dir=str(self.state_dir)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_holder(fd)

    def _write_holder(self, fd: int) -> None:
        """Say who holds the lock, for the message a second process prints. Best
        effort: on a full disk the lock holds all the same, and that message then
        names no pid."""
        since = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "command": self.command, "since": since})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
        except OSError as exc:
            log.warning("holding %s, but cannot write who holds it: %s", self.path, exc)

    def release(self) -> None:
        """Let go (closing the descriptor releases the lock). The file stays: removing
        it could let a third process lock a new file while a second holds the old."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # nobody holds it now; a stale pid would mislead
            os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(raw: bytes) -> str:
    """'pid 1234 (cloudlet up, since 2024-05-01 12:00:03+02:00)', or as much as the
    file says (it is empty for a moment while a new holder writes it)."""
    try:
        info = json.loads(raw)
        pid, command, since = int(info["pid"]), str(info["command"]), str(info["since"])
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which)"
    return f"pid {pid} ({command}, since {since})"
