"""Checkpoint rounds that write their VMs in batches (edge_agent/checkpoints.py), on a
real VMHost with real kvstore VMs and real files: every VM's state lands, and the
locks a batch holds never outlive it or wait behind someone else's call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cloudlet.vm import Snapshot
from edge_agent.auth import Principal
from edge_agent.checkpoints import BATCH_MAX_FILES
from edge_agent.config import NodeConfig
from edge_agent.vm_host import HostedVM, VMHost
from tests.conftest import WORKLOADS

KVSTORE = (WORKLOADS / "kvstore.wasm").read_bytes()
ALICE = Principal("alice", is_peer=False)


def with_vms(tmp_path: Path, count: int,
             body: Callable[[VMHost, list[HostedVM]], Awaitable[None]]) -> None:
    config = NodeConfig(state_dir=str(tmp_path), client_max_memory_mib=16384,
                        client_max_vms=count)

    async def run() -> None:
        async with VMHost(config) as host:
            image = await host.add_image(ALICE, KVSTORE, None)
            vms = [await host.create(ALICE, image.digest, None) for _ in range(count)]
            await body(host, vms)
    asyncio.run(run())


def test_a_round_of_more_vms_than_a_batch_writes_each_at_its_seq(tmp_path: Path) -> None:
    """More VMs than one batch takes, each with its own number of calls: after one
    periodic round every VM's file on disk is at its seq (what a kill -9 would find),
    the round counts each, and a VM with no new call is not written again."""
    count = BATCH_MAX_FILES + 6

    async def body(host: VMHost, vms: list[HostedVM]) -> None:
        for i, hosted in enumerate(vms):
            for _ in range(i % 5 + 1):
                hosted.vm.call("add", i, 1)
        done = await host.checkpoint_all()
        assert (done.written, done.failed) == (count, {})
        for hosted in vms:
            snap = Snapshot.read(host.checkpoints.path(hosted.id))
            assert snap.seq == hosted.vm.seq == hosted.checkpointed_seq, hosted.id
        vms[3].vm.call("add", 1, 1)
        again = await host.checkpoint_all()
        assert again.written == 1
        assert Snapshot.read(host.checkpoints.path(vms[3].id)).seq == vms[3].vm.seq
        assert not list(host.vm_dir.glob(".*.tmp"))

    with_vms(tmp_path, count, body)


def test_a_round_cancelled_while_it_waits_for_a_busy_vm_releases_its_locks(
        tmp_path: Path) -> None:
    """A forced round (as shutdown runs) waits for a VM whose call is in progress and
    is cancelled meanwhile: the VM can still be checkpointed and destroyed after."""

    async def body(host: VMHost, vms: list[HostedVM]) -> None:
        first, busy = vms
        for hosted in vms:
            hosted.vm.call("add", 1, 2)
        await busy.lock.acquire()  # a call in progress
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(host.checkpoint_all(force=True), 0.2)
        finally:
            busy.lock.release()
        assert not first.persist_lock.locked() and not busy.persist_lock.locked()
        done = await asyncio.wait_for(host.checkpoint_all(force=True), 10)
        assert done.written == 2
        await asyncio.wait_for(host.destroy(busy), 10)

    with_vms(tmp_path, 2, body)


def test_a_round_does_not_hold_a_captured_vm_behind_another_vms_queued_call(
        tmp_path: Path) -> None:
    """VM B's lock is released to a queued holder (a long call) just as a periodic
    round reaches B: the round must not queue behind it while it holds VM A's
    capture, so A can be destroyed at once; B's checkpoint follows later."""

    async def body(host: VMHost, vms: list[HostedVM]) -> None:
        a, b = vms
        a.vm.call("add", 1, 2)
        b.vm.call("add", 1, 2)
        await b.lock.acquire()

        async def long_call() -> None:
            async with b.lock:
                await asyncio.sleep(2)

        queued = asyncio.create_task(long_call())
        await asyncio.sleep(0)
        round_ = asyncio.create_task(host.checkpoint_all())
        asyncio.get_running_loop().call_soon(b.lock.release)  # to the queued call
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await host.destroy(a)
        assert time.monotonic() - started < 1.0, "A waited behind B's call"
        await round_
        await queued
        await host.checkpoints.drain()  # B's deferred checkpoint
        assert Snapshot.read(host.checkpoints.path(b.id)).seq == b.vm.seq

    with_vms(tmp_path, 2, body)
