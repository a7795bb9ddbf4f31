"""Checkpoints: every hosted VM's latest state on disk, and back on start.

Nothing lost: every VM that applied calls since its last checkpoint is
snapshotted every `checkpoint_interval_s` and at shutdown, to `STATE/vms/ID.snap`,
atomically (write, fsync, rename, fsync the directory: `Snapshot.write`, and
`atomic_write_all` for a round's batch of small VMs under about one flush). On
start every checkpoint is restored. So a clean restart loses nothing, and a
kill -9 loses at most the calls applied in the last checkpoint interval
(docs/daemon.md, "Nothing lost").

The capture of a VM's state runs on a checkpoint thread unless the VM is small,
and the write always does: the event loop keeps serving every other VM, and a
VM's own calls wait only for its capture. A VM busy when its round comes (a long
call, a migration) is not waited for: its checkpoint follows as soon as it is
free, in a task this object owns and shutdown waits for.

A checkpoint that cannot be written leaves the VM serving and its checkpointed
`seq` where it was, so no answer claims it durable (`durable` in a call's answer
is only ever a written checkpoint's `seq`); `storage` says so to /health and the
metrics, and the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

from cloudlet.errors import CloudletError, SnapshotCorrupt, VMInterrupted
from cloudlet.fsutil import atomic_write_all, storage_full
from cloudlet.vm import VM, ImageStore, Snapshot
from cloudlet.vm.snapshot import HEAD_BYTES, check_head
from edge_agent.hosted import HostedVM
from edge_agent.storage import CheckpointRound, StorageHealth, public_reason, write_probe
from edge_agent.tombstones import Tombstones
from edge_agent.workers import Workers

log = logging.getLogger(__name__)

# A VM this small is captured right on the event loop: at most ~1 ms of hashing
# and copying, less than handing it to a thread would cost its owner (the hop
# needs the GIL back and forth while the loop is busy, and the VM's calls wait
# for the capture). Larger VMs are captured on a checkpoint thread.
INLINE_CAPTURE_MAX_BYTES = 2 << 20
# A round writes the VMs it captured together, under about one flush, once their
# memory adds up to this much (and at its end): many small VMs share a flush, and a
# large VM's capture is not held in memory while others are captured.
BATCH_MAX_BYTES = 8 << 20
BATCH_MAX_FILES = 64
SUFFIX = ".snap"
RETIRED = ".retired"  # a checkpoint set aside for deletion: its VM left (`retire`)


class Checkpoints:
    """The checkpoints of the VMs in `vms` (the host's registry, read here: a VM no
    longer in it is not written), in `vm_dir`, on the pools `workers()` gives.
    `closing()` is true once the daemon shuts down: no checkpoint is deferred then."""

    def __init__(self, vm_dir: Path, vms: dict[str, HostedVM],
                 workers: Callable[[], Workers], closing: Callable[[], bool]) -> None:
        self.vm_dir = vm_dir
        self._vms = vms
        self._workers = workers
        self._closing = closing
        self.failures = 0
        self.storage = StorageHealth()  # what /health and the metrics say of the disk
        # Checkpoints of VMs that were busy (a long call, a migration) when their round
        # came: each waits for its VM without holding up the round's other VMs.
        self._deferred: dict[str, asyncio.Task[None]] = {}

    def path(self, vm_id: str) -> Path:
        return self.vm_dir / f"{vm_id}{SUFFIX}"

    def retire(self, vm_id: str) -> Path | None:
        """Rename the checkpoint of a VM that left aside, for its deletion later
        (`VMHost.free_moved`): if the VM comes back first, the checkpoint it then
        writes is not the file deleted. A rename, not synced: on the event loop.
        A restart removes what was left aside (the tombstone says the VM left)."""
        path = self.path(vm_id)
        aside = path.with_name(path.name + RETIRED)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        return aside

    async def first(self, hosted: HostedVM) -> None:
        """A new VM's checkpoint, before anyone hears of it. A write the disk refused
        (any OSError) is `StorageFull`, said without the server's paths (it goes to
        the client, who may try another cloudlet). Shielded: a request deadline must
        not leave the write running unwatched, to land after the client was told
        the VM does not exist; it is waited for, and removed if it landed."""
        write = asyncio.ensure_future(self.write(hosted, force=True))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            try:
                await write
            except Exception as exc:  # the VM is going anyway; the write's fate is logged
                log.warning("checkpoint of VM %s during its removal failed: %r", hosted.id,
                            exc)
            if write.done() and not write.cancelled() and write.exception() is None:
                self.path(hosted.id).unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise storage_full(exc, "cannot write the new VM's first checkpoint") from exc

    async def write(self, hosted: HostedVM, *, force: bool = False, wait: bool = True) -> bool:
        """Snapshot `hosted` to disk if it applied calls since its last checkpoint.

        The capture (a scan of all the VM's memory if it wrote all of it) runs on a
        checkpoint thread unless the VM is small, and the write always does: the
        loop keeps serving every other VM meanwhile, and this VM's calls wait only
        for the capture. With `wait` false, a VM that is busy (a long call, a
        migration) is not waited for: its checkpoint follows on its own as soon as
        it is free."""
        if not wait and self._busy(hosted):
            self._defer(hosted)
            return False
        async with hosted.persist_lock:
            snap = await self._capture(hosted, force=force)
            if not isinstance(snap, Snapshot):
                return False
            # Written as segments: no joined copy of a big guest's memory. The capture
            # is handed to the writing thread, which frees it too (unmapping a large
            # one takes milliseconds).
            path, seq, handed = self.path(hosted.id), snap.seq, [snap]
            del snap
            await self._workers().checkpoints.run(Workers.NODE,
                                                  lambda: handed.pop().write(path))
            self._landed(hosted, seq)
            return True

    @staticmethod
    def _busy(hosted: HostedVM) -> bool:
        return hosted.lock.locked() or hosted.persist_lock.locked()

    async def _capture(self, hosted: HostedVM, *, force: bool,
                       wait: bool = True) -> Snapshot | _Busy | None:
        """`hosted`'s state now (the caller holds its `persist_lock`), or None when
        there is nothing to write: gone, failed, or no call since its checkpoint.
        Without `wait`, `_BUSY` when its lock is not free now (a call or a move)."""
        if wait:
            await hosted.lock.acquire()
        elif not await _take_now(hosted.lock):
            return _BUSY
        try:
            if self._vms.get(hosted.id) is not hosted or hosted.vm.failed is not None:
                return None
            if not force and hosted.vm.seq == hosted.checkpointed_seq:
                return None
            if hosted.vm.memory_bytes <= INLINE_CAPTURE_MAX_BYTES:
                return hosted.snapshot()
            return await self._workers().checkpoints.run(Workers.NODE, hosted.snapshot)
        finally:
            hosted.lock.release()

    @staticmethod
    def _landed(hosted: HostedVM, seq: int) -> None:
        hosted.checkpointed_seq = seq
        hosted.checkpointed_at = time.monotonic()

    def _defer(self, hosted: HostedVM) -> None:
        if hosted.id in self._deferred or self._closing():
            return

        async def when_free() -> None:
            try:
                await self.write(hosted)
            except Exception as exc:  # as in a round: retried by the next one
                self.failures += 1
                log.error("checkpoint of VM %s failed: %r", hosted.id, exc)
                self.storage.write_failed("checkpoint", public_reason(exc, "checkpoints"))

        task = asyncio.get_running_loop().create_task(when_free())
        self._deferred[hosted.id] = task  # owned: `drain` waits for it
        task.add_done_callback(lambda _: self._deferred.pop(hosted.id, None))

    async def round(self, *, force: bool = False) -> CheckpointRound:
        """Checkpoint every VM that applied calls since its last checkpoint (every VM
        with `force`). A VM whose checkpoint cannot be written keeps serving and its
        checkpointed seq stays where it was (so no answer claims it durable, and the
        next round tries again); the round says which failed, and `storage` takes it
        in. While degraded, a round with nothing to write probes the disk instead.
        The periodic round (without `force`) waits for no busy VM (`write`).

        The captures are written in batches (`_Batch`), each under about one flush
        and with one hand-off to the checkpoint thread, instead of two flushes and a
        hand-off per VM: a round of 64 small VMs took 48 ms of CPU written one by
        one, 24 ms in one batch. Each VM's `persist_lock` is held from its capture
        until its batch is written, as `write` holds it. The round never waits while
        it holds a batch: before a wait for a VM's lock, or a capture on a thread (a
        large VM), it writes the batch first. So it neither deadlocks with another
        round nor holds other VMs up behind someone else's long call or move."""
        failed: dict[str, Exception] = {}
        batch = _Batch()
        try:
            for hosted in list(self._vms.values()):
                if hosted.vm.memory_bytes > INLINE_CAPTURE_MAX_BYTES:
                    await self._write_batch(batch, failed)  # its capture awaits a thread
                if not await _take_now(hosted.persist_lock):
                    if not force:
                        self._defer(hosted)
                        continue
                    await self._write_batch(batch, failed)
                    await hosted.persist_lock.acquire()
                try:
                    snap = await self._capture(hosted, force=force, wait=False)
                    if snap is _BUSY:
                        if not force:
                            hosted.persist_lock.release()
                            self._defer(hosted)
                            continue
                        await self._write_batch(batch, failed)
                        snap = await self._capture(hosted, force=force)
                except Exception as exc:  # a full disk must not stop the daemon
                    hosted.persist_lock.release()
                    self.failures += 1
                    failed[hosted.id] = exc
                    continue
                except BaseException:  # cancelled: the lock must not outlive the round
                    hosted.persist_lock.release()
                    raise
                if not isinstance(snap, Snapshot):
                    hosted.persist_lock.release()
                    continue
                batch.add(hosted, snap, reply_bytes=hosted.replies.size_bytes)
                del snap  # the batch's writer frees it, not this frame (a large one)
                if batch.full():
                    await self._write_batch(batch, failed)
                else:
                    await asyncio.sleep(0)  # other clients' calls between captures
            await self._write_batch(batch, failed)
        finally:
            batch.release()  # only if cancelled between a capture and its write
        written = batch.written
        probed, probe_error = False, None
        if not written and not failed and not self.storage.ok:
            probed = True
            try:
                await asyncio.to_thread(write_probe, self.vm_dir)  # rare, tiny: any thread
            except OSError as exc:
                probe_error = exc
        done = CheckpointRound(written, failed, probed, probe_error)
        self.storage.round_done(done, self._vms)
        return done

    async def _write_batch(self, batch: _Batch, failed: dict[str, Exception]) -> None:
        """Write the batch's captures (one hand-off, `atomic_write_all`) and release
        their VMs' locks; each written VM's checkpointed seq moves on, each failed one
        goes into `failed`."""
        entries = batch.take()
        if not entries:
            return
        landing = [(hosted, snap.seq) for hosted, snap in entries]
        # The captures go to the writing thread, which frees them (as in `write`).
        files = [(self.path(hosted.id), snap) for hosted, snap in entries]
        del entries
        try:
            errors: list[Exception | None] = list(await self._workers().checkpoints.run(
                Workers.NODE, partial(_write_all, files)))
        except Exception as exc:  # not one file's error: the whole batch failed
            errors = [exc] * len(landing)
        finally:
            for hosted, _ in landing:
                hosted.persist_lock.release()
        for (hosted, seq), error in zip(landing, errors, strict=True):
            if error is None:
                self._landed(hosted, seq)
                batch.written += 1
            else:
                self.failures += 1
                failed[hosted.id] = error

    async def drain(self) -> None:
        """Wait for the deferred checkpoints still running (at shutdown)."""
        if self._deferred:
            await asyncio.gather(*self._deferred.values(), return_exceptions=True)

    async def restored(self, tombstones: Tombstones,
                       images: ImageStore) -> AsyncIterator[tuple[VM, Snapshot]]:
        """Every checkpoint on disk, restored (on the boot threads), for the host to
        serve again; called once, on start, before anything is served."""
        # Halves of writes a kill interrupted. Safe to remove: the state directory's
        # lock (edge_agent.statelock) says no other process is writing here.
        for tmp in self.vm_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for aside in self.vm_dir.glob(f"*{SUFFIX}{RETIRED}"):  # of VMs that left
            aside.unlink(missing_ok=True)
        boots = self._workers().boots
        for path in sorted(self.vm_dir.glob(f"*{SUFFIX}")):
            where = tombstones.get(path.stem)
            if where is not None:
                if tombstones.moved_live(path.stem):
                    # Moved live: the protocol settled who owns it (the destination).
                    path.unlink(missing_ok=True)
                else:
                    # Handed over by stop-and-copy, and stopped before the handover was
                    # confirmed: the destination probably holds it, but nothing says so.
                    # Not served here (never in two places), and not deleted either.
                    aside = path.with_suffix(".handed-over")
                    path.rename(aside)
                    log.warning("VM %s was being handed to %s when this cloudlet stopped; "
                                "its checkpoint is kept as %s until someone confirms the "
                                "destination holds it", path.stem, where.node, aside.name)
                continue
            try:
                restored = await boots.run(Workers.NODE, partial(_restore_file, path, images))
            except VMInterrupted as exc:
                # Its image's boot overran this node's boot limits (lowered since, or a
                # loaded machine): nothing is wrong with the file. It stays where it is,
                # to come back on a start with limits it fits in.
                log.error("cannot boot %s within boot_fuel and boot_deadline_ms (%s); left "
                          "in place", path.name, exc)
                continue
            except CloudletError as exc:
                # Keep the file for a human to look at; never delete state we cannot read.
                aside = path.with_suffix(".unreadable")
                path.rename(aside)
                log.error("cannot restore %s (%s); moved aside to %s", path.name, exc, aside.name)
                continue
            yield restored


def _restore_file(path: Path, images: ImageStore) -> tuple[VM, Snapshot]:
    snap = Snapshot.read(path)
    return VM.restore(images.get(snap.image_digest), snap), snap


def read_snapshot(path: Path, max_bytes: int) -> Snapshot:
    """A snapshot from a received file: its head is checked before the rest is read
    (what is not a snapshot costs no memory), and errors name no path of this
    machine (they go to clients)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            check_head(f.read(HEAD_BYTES), size, max_bytes)
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotCorrupt(f"cannot read the received snapshot: {exc.strerror}") from None
    return Snapshot.from_bytes(data, max_bytes)


class _Busy:
    """What `Checkpoints._capture` says of a VM whose lock it would have to wait for."""


_BUSY = _Busy()


async def _take_now(lock: asyncio.Lock) -> bool:
    """Acquire `lock` if that needs no wait; else False, holding nothing. A lock
    just released to a queued waiter reads as unlocked yet would make `acquire`
    wait its turn; a zero timeout takes it back out of the queue."""
    if lock.locked():
        return False
    try:
        async with asyncio.timeout(0):
            await lock.acquire()
    except TimeoutError:
        return False
    return True


class _Batch:
    """A round's captures not written yet; their VMs' `persist_lock`s are held.
    Full at BATCH_MAX_BYTES of what they hold in memory (chunks and reply logs) or
    BATCH_MAX_FILES files (each file's descriptor stays open until the batch's flush)."""

    def __init__(self) -> None:
        self._entries: list[tuple[HostedVM, Snapshot]] = []
        self.memory_bytes = 0
        self.written = 0  # over the round

    def add(self, hosted: HostedVM, snap: Snapshot, *, reply_bytes: int) -> None:
        self._entries.append((hosted, snap))
        self.memory_bytes += snap.overlay_bytes + reply_bytes

    def full(self) -> bool:
        return self.memory_bytes >= BATCH_MAX_BYTES or len(self._entries) >= BATCH_MAX_FILES

    def take(self) -> list[tuple[HostedVM, Snapshot]]:
        entries, self._entries, self.memory_bytes = self._entries, [], 0
        return entries

    def release(self) -> None:
        for hosted, _ in self.take():
            hosted.persist_lock.release()


def _write_all(files: list[tuple[Path, Snapshot]]) -> list[Exception | None]:
    """The snapshots written together (`atomic_write_all`), on the checkpoint
    thread: each is encoded as its file is written, and let go once it is."""
    def encoder(held: list[Snapshot]) -> Callable[[], list[bytes | memoryview]]:
        return lambda: held.pop().to_segments("auto")

    batch = [(path, encoder([snap])) for path, snap in files]
    files.clear()
    return atomic_write_all(batch)
