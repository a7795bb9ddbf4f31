"""The CPU wake-up latency request a move holds (edge_agent/wake_latency.py).

On the real device: while a hold is held, the machine's bound reads 0 µs and this
process has the device open; once every hold is released, or its deadline passed,
the process no longer has it open (the request is gone with the file). Whether
the bound is back at the default cannot be asserted: other processes (a daemon
of a test running beside this one) may hold their own. Then two real daemons:
the destination holds it from the final round to the landing, the source from
its pause to its end, and a move stuck after the final round (its `Commit` held
on the way) lets go of it by the hold's deadline, not at the move's end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.protocol import Location
from edge_agent import live_migration
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.live_migration import WAKE_HOLD_MAX_S, Outgoing
from edge_agent.vm_host import VMHost
from edge_agent.wake_latency import DEVICE, WakeLatency, release
from mobile_client import CloudletClient
from tests.daemons import Daemon, daemon_pair
from tests.test_migration_standby import (
    KVSTORE,
    SETTINGS,
    Caller,
    HoldAfterAccept,
    check_exactly_once,
    homes,
    migrate,
)
from tests.waiting import async_wait_until

ALICE = Principal("alice", is_peer=False)
THERE = Location("east", "http://127.0.0.1:1")

writable = pytest.mark.skipif(not os.access(DEVICE, os.W_OK),
                              reason=f"{DEVICE} is not writable here (not root?)")


def holds_device(pid: int) -> bool:
    """Whether process `pid` has the PM QoS device open (so its request is in force)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(DEVICE):
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def machine_bound_us() -> int:
    """The bound in force on this machine (the strictest request of any process)."""
    fd = os.open(DEVICE, os.O_RDONLY)
    try:
        value: int = struct.unpack("=i", os.read(fd, 4))[0]
        return value
    finally:
        os.close(fd)


@writable
def test_a_hold_puts_the_bound_in_force_until_the_last_release() -> None:
    async def run() -> None:
        wake = WakeLatency()
        assert not holds_device(os.getpid())
        first, second = wake.hold(30), wake.hold(30)
        assert wake.active and holds_device(os.getpid())
        assert machine_bound_us() == 0
        first.release()
        first.release()  # idempotent: the second hold still counts
        assert wake.active and machine_bound_us() == 0
        second.release()
        assert not wake.active and not holds_device(os.getpid())
        again = wake.hold(30)  # the device opens again for a later move
        assert wake.active and machine_bound_us() == 0
        wake.close()
        assert again.released and not holds_device(os.getpid())

    asyncio.run(run())


@writable
def test_a_hold_never_released_ends_by_its_deadline() -> None:
    async def run() -> None:
        wake = WakeLatency()
        forgotten = wake.hold(0.05)
        assert holds_device(os.getpid())
        await asyncio.sleep(0.3)
        assert forgotten.released and not wake.active and not holds_device(os.getpid())

    asyncio.run(run())


def test_a_device_that_cannot_be_opened_is_said_once_and_moves_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        wake = WakeLatency(device=tmp_path / "no-such-device")
        with caplog.at_level(logging.WARNING, logger="edge_agent.wake_latency"):
            holds = [wake.hold(30) for _ in range(3)]
        assert all(h.released for h in holds) and not wake.active and not wake.enabled
        said = [r for r in caplog.records if "wake-up latency" in r.getMessage()]
        assert len(said) == 1 and "no-such-device" in said[0].getMessage()
        holds[0].release()  # an empty hold's release is harmless

    asyncio.run(run())


def test_a_disabled_request_never_opens_the_device(tmp_path: Path) -> None:
    async def run() -> None:
        device = tmp_path / "device"
        device.write_bytes(b"")
        device.chmod(0o000)  # opening it would fail for anyone but root
        wake = WakeLatency(enabled=False, device=device)
        hold = wake.hold(30)
        assert hold.released and not wake.active and device.read_bytes() == b""

    asyncio.run(run())


@writable
def test_the_source_holds_it_only_once_paused_not_while_a_call_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause waits for the running call (its lock): a long call in a worker
    thread, which the VM's owner can make, must not keep the host's CPUs polling
    meanwhile."""
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", 0.01)

    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            image = await host.add_image(ALICE, KVSTORE.read_bytes(), None)
            # Past the daemon's inline deadline: its calls run in worker threads.
            hosted = await host.create(ALICE, image.digest, {"deadline_ms": 5000})
            assert not hosted.inline
            wake = WakeLatency()
            outgoing = Outgoing(host, hosted, THERE, "m1", wake)
            await hosted.lock.acquire()  # a call running in a worker thread
            pausing = asyncio.create_task(outgoing.pause())
            try:
                await asyncio.sleep(0.2)  # the answer wait is long over; the lock is not
                waiting = not pausing.done()
                held_while_waiting = wake.active or holds_device(os.getpid())
            finally:
                hosted.lock.release()  # the call ends: the VM pauses
            try:
                await asyncio.wait_for(pausing, 10)
                assert waiting and not held_while_waiting
                assert outgoing.paused and wake.active and machine_bound_us() == 0
                release(outgoing.wake_hold)
                assert not wake.active and not holds_device(os.getpid())
            finally:
                wake.close()
                outgoing.release()  # the host's close waits for its VMs' locks

    asyncio.run(run())


# --- between real daemons -------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    yield from daemon_pair(tmp_path, **SETTINGS)


@writable
@pytest.mark.slow
def test_a_move_held_after_its_final_round_lets_go_by_the_deadline(
        pair: tuple[Daemon, Daemon]) -> None:
    """The `Commit` is held on its way: the destination, ready and waiting for it,
    holds the request; the source, whose end came with `Ready`, does not. The held
    move outlasts the hold's deadline, and the destination lets go then. After the
    landing neither holds it, and every call applied once."""
    east, west = pair
    token = east.token("wanda")
    assert east.proc is not None and west.proc is not None
    east_pid, west_pid = east.proc.pid, west.proc.pid

    async def run() -> None:
        async with HoldAfterAccept(west.port, hold_commit=True) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, keep=True) as s:
            async with Caller(s) as caller:
                await caller.more()
                assert not holds_device(east_pid) and not holds_device(west_pid)
                move = asyncio.ensure_future(migrate(east, s.vm_id, proxy.endpoint))
                await async_wait_until(lambda: proxy.commit_held.is_set(), 20,
                                       what="the commit on its way")
                await async_wait_until(lambda: holds_device(west_pid), 10, 0.002,
                                       what="the destination's hold")
                held_at = asyncio.get_running_loop().time()
                await async_wait_until(lambda: not holds_device(east_pid), 10,
                                       what="the source's hold ended")
                await async_wait_until(lambda: not holds_device(west_pid),
                                       WAKE_HOLD_MAX_S + 10, what="the deadline's release")
                assert asyncio.get_running_loop().time() - held_at < WAKE_HOLD_MAX_S + 5
                assert s.pending  # not landed: the deadline ended the hold, not the move
                proxy.release()
                status, body = await move
                assert status == 200, body
                await caller.more()
                assert not holds_device(east_pid) and not holds_device(west_pid)
                assert homes([east, west], token, s.vm_id) == ["west"]
            await check_exactly_once(s, caller.calls, west, token)

    asyncio.run(run())
