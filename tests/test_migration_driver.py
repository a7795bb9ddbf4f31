"""The async drivers over in-memory channels and real TCP, with faults at each phase.

Table-driven: a message is lost, the channel drops, the destination raises, or
a wait times out. Before the commit the VM must serve on at the source with its
state intact; after it, it lives at the destination. Never both, never neither.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
from typing import Any

import msgpack
import pytest

from cloudlet.errors import ImageNotFound, MigrationChannelLost, VMMoved
from cloudlet.linkproxy import shaped_link
from cloudlet.migration import (
    BecomeTombstone,
    ChunkStore,
    MemoryChannel,
    MigrationStats,
    PreCopyPolicy,
    Received,
    StreamChannel,
    VMGate,
    memory_channel_pair,
    run_destination,
    run_source,
)
from cloudlet.vm import VM, Image, ImageStore
from tests.waiting import async_wait_until

DEADLINE_S = 0.3  # faults end in timeouts: keep them short


def state(vm: VM) -> tuple[Any, ...]:
    return hashlib.sha256(vm.memory_view()).hexdigest(), vm.globals_state(), vm.seq


class FaultyChannel:
    """Wraps a channel; on the first message of type `kind` it drops it or closes."""

    def __init__(self, inner: MemoryChannel, kind: str | None, fault: str) -> None:
        self.inner, self.kind, self.fault, self.fired = inner, kind, fault, False

    async def send(self, data: bytes) -> None:
        t = msgpack.unpackb(data, strict_map_key=False)["t"]
        if t == self.kind and not self.fired:
            self.fired = True
            if self.fault == "close":
                self.inner.close()
                raise MigrationChannelLost("dropped")
            return  # lost
        await self.inner.send(data)

    async def recv(self) -> bytes:
        return await self.inner.recv()


class BrokenImages:
    """A destination whose image lookup raises (e.g. its disk failed)."""

    def __init__(self, real: ImageStore) -> None:
        self.real = real

    def __contains__(self, digest: str) -> bool:
        return True

    def get(self, digest: str) -> Image:
        raise ImageNotFound("the disk is gone")

    def add(self, wasm: bytes) -> Image:
        return self.real.add(wasm)


async def migrate(vm: VM, src_ch: Any, dst_ch: Any, images: Any, *,
                  calls: int = 0, policy: PreCopyPolicy | None = None,
                  deadline_s: float = DEADLINE_S) -> tuple[MigrationStats, Received, VMGate, int]:
    gate = VMGate(annex={"replies": {vm.seq: b"last"}})
    outcomes: dict[str, bool] = {}
    served = 0

    async def client() -> None:
        nonlocal served
        for i in range(calls):
            try:
                async with gate.call():
                    vm.call("hog_dirty", 8, 1000 + i)
                    served += 1
            except VMMoved:
                return
            await asyncio.sleep(0.002)

    async def resolve(migration_id: str) -> bool:  # asks the source's tombstone
        await async_wait_until(lambda: "source" in outcomes)
        return outcomes["source"]

    async def source() -> MigrationStats:
        stats = await run_source(vm, src_ch, hooks=gate, policy=policy, deadline_s=deadline_s)
        outcomes["source"] = stats.outcome == "committed"
        return stats

    async with asyncio.TaskGroup() as tg:
        tg.create_task(client())
        s = tg.create_task(source())
        d = tg.create_task(run_destination(dst_ch, images, ChunkStore(), resolve=resolve,
                                           deadline_s=deadline_s))
    return s.result(), d.result(), gate, served


def make_vm(image: Image) -> VM:
    vm = VM.create(image, clock="virtual", random_seed=bytes(32))
    vm.call("hog_grow", 4)
    vm.call("hog_dirty", 600, 7)
    return vm


def twin_of(image: Image, served: int) -> VM:
    twin = make_vm(image)
    for i in range(served):
        twin.call("hog_dirty", 8, 1000 + i)
    return twin


FAULTS = [  # (direction, message type, fault, where the VM must end up)
    ("src", "offer", "drop", "source"),
    ("src", "offer", "close", "source"),
    ("dst", "accept", "drop", "source"),
    ("src", "chunks", "drop", "source"),
    ("src", "chunks", "close", "source"),
    ("dst", "ack", "close", "source"),
    ("src", "round_end", "drop", "source"),
    ("src", "final", "drop", "source"),
    ("src", "final", "close", "source"),
    ("dst", "ready", "drop", "source"),
    ("dst", "ready", "close", "source"),
    ("src", "commit", "drop", "destination"),
    ("src", "commit", "close", "destination"),
]


@pytest.mark.parametrize(("side", "kind", "fault", "where"), FAULTS,
                         ids=[f"{s}-{k}-{f}" for s, k, f, _ in FAULTS])
def test_fault_at_each_phase(store: ImageStore, workload: dict[str, Image], side: str,
                             kind: str, fault: str, where: str) -> None:
    image = workload["memhog"]
    vm = make_vm(image)
    a, b = memory_channel_pair()
    src_ch: Any = FaultyChannel(a, kind, fault) if side == "src" else a
    dst_ch: Any = FaultyChannel(b, kind, fault) if side == "dst" else b
    stats, got, gate, served = asyncio.run(migrate(vm, src_ch, dst_ch, store, calls=20))
    twin = twin_of(image, served)
    if where == "source":
        assert stats.outcome == "aborted" and got.outcome == "aborted" and got.vm is None
        assert not gate.paused and gate.tombstoned is None  # serving again
        assert state(vm) == state(twin)
        vm.call("hog_dirty", 1, 1)  # and usable
    else:
        assert stats.outcome == "committed" and got.outcome == "committed"
        assert gate.tombstoned is not None  # never both: the source refuses calls
        assert got.vm is not None and state(got.vm) == state(twin)
        assert got.annex == {"replies": {2: b"last"}}


def test_destination_raising_aborts_and_the_source_resumes(store: ImageStore,
                                                           workload: dict[str, Image]) -> None:
    vm = make_vm(workload["memhog"])
    before = state(vm)
    a, b = memory_channel_pair()
    stats, got, gate, _ = asyncio.run(migrate(vm, a, b, BrokenImages(store)))
    assert stats.outcome == got.outcome == "aborted" and stats.abort_code == "image_not_found"
    assert not gate.paused and state(vm) == before


class DiskFullAtTheDecision(VMGate):
    """Source hooks whose commit point cannot be written (a full disk)."""

    async def tombstone(self, event: BecomeTombstone) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_decision_that_cannot_be_written_aborts_both_ends_and_the_source_resumes(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """The hook's error is an OSError, like a lost channel's; taken for one after the
    machine's commit, the driver returned "committed" without sending `Commit`: the
    source dropped the VM and the destination, asking, heard "no"."""
    vm = make_vm(workload["memhog"])
    before = state(vm)
    gate = DiskFullAtTheDecision()

    async def main() -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        return await asyncio.gather(run_source(vm, a, hooks=gate, deadline_s=DEADLINE_S),
                                    run_destination(b, store, ChunkStore(),
                                                    deadline_s=DEADLINE_S))

    stats, got = asyncio.run(main())
    assert stats.outcome == "aborted" and stats.abort_code == "migration_decision_failed"
    assert stats.committed_s is None
    assert got.outcome == "aborted" and got.vm is None  # told to drop what it held
    assert not gate.paused and gate.tombstoned is None and state(vm) == before
    vm.call("hog_dirty", 1, 1)  # serving here again


def test_the_hooks_hear_committed_once_the_decision_is_durable(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """`committed()` (the daemon tells the VM's clients then) comes after the decision,
    before the `Commit` is on the channel, once."""
    order: list[str] = []

    class Recording(VMGate):
        async def tombstone(self, event: BecomeTombstone) -> None:
            await super().tombstone(event)
            order.append("decided")

        def committed(self) -> None:
            order.append("clients told")

    class Watching(MemoryChannel):
        async def send(self, data: bytes) -> None:
            await super().send(data)
            if msgpack.unpackb(data).get("t") == "commit":
                order.append("commit written")

    vm = make_vm(workload["memhog"])
    gate = Recording()

    async def main() -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        a.__class__ = Watching
        return await asyncio.gather(run_source(vm, a, hooks=gate, deadline_s=DEADLINE_S),
                                    run_destination(b, store, ChunkStore(),
                                                    deadline_s=DEADLINE_S))

    stats, got = asyncio.run(main())
    assert stats.outcome == got.outcome == "committed"
    assert order == ["decided", "clients told", "commit written"]


class SlowDecision(VMGate):
    """Source hooks whose decision takes a while (a large round written in a worker
    thread), and then is written (`fails=False`) or refused."""

    def __init__(self, fails: bool) -> None:
        super().__init__()
        self.fails = fails
        self.deciding = asyncio.Event()
        self.decided = False

    async def tombstone(self, event: BecomeTombstone) -> None:
        self.deciding.set()
        await asyncio.sleep(0.05)
        if self.fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().tombstone(event)
        self.decided = True


@pytest.mark.parametrize("fails", [False, True], ids=["written", "refused"])
def test_a_driver_cancelled_while_it_decides_waits_and_follows_the_decision(
        store: ImageStore, workload: dict[str, Image], fails: bool) -> None:
    """Cancelled mid-decision, the source driver lets the decision finish, then
    stops: a written decision leaves the VM moved (not resumed: the destination,
    in doubt, will hear "committed"); a refused one resumes it here."""
    vm = make_vm(workload["memhog"])
    before = state(vm)
    gate = SlowDecision(fails)

    async def main() -> Received:
        a, b = memory_channel_pair()
        source = asyncio.ensure_future(run_source(vm, a, hooks=gate, deadline_s=DEADLINE_S))
        destination = asyncio.ensure_future(
            run_destination(b, store, ChunkStore(), deadline_s=DEADLINE_S))
        await gate.deciding.wait()
        source.cancel()
        with pytest.raises(asyncio.CancelledError):
            await source
        if not fails:  # moved: a call here hears so, it does not run
            with pytest.raises(VMMoved):
                async with gate.call():
                    pass
        return await destination

    got = asyncio.run(main())
    assert gate.decided is not fails
    assert got.outcome == "in_doubt"  # no Commit came: the destination asks the source
    if fails:
        assert not gate.paused and gate.tombstoned is None and state(vm) == before
        vm.call("hog_dirty", 1, 1)  # serving here again
    else:
        assert gate.tombstoned is not None


def test_a_committed_hook_that_fails_still_lets_the_commit_go(
        store: ImageStore, workload: dict[str, Image],
        caplog: pytest.LogCaptureFixture) -> None:
    """The decision is durable before `committed()` runs, so its failure (a client's
    socket, say) is logged and the `Commit` still goes: the destination lands the VM
    at once, not after asking in doubt."""
    vm = make_vm(workload["memhog"])
    before = state(vm)

    class Broken(VMGate):
        def committed(self) -> None:
            raise RuntimeError("telling the clients broke")

    async def main() -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        return await asyncio.gather(
            run_source(vm, a, hooks=Broken(), deadline_s=DEADLINE_S),
            run_destination(b, store, ChunkStore(), deadline_s=DEADLINE_S))

    stats, got = asyncio.run(main())
    assert stats.outcome == got.outcome == "committed" and got.vm is not None
    assert state(got.vm) == before
    assert any("committed hook failed" in r.getMessage() for r in caplog.records)


def test_the_destination_hooks_see_the_vm_held_then_at_the_commit(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """`ready` gets the VM whole and held, with the source's annex, before the source
    decides; `activate` the same VM at the `Commit`; both before the driver ends.
    The VM they saw is the one returned, in the source's state."""
    seen: list[tuple[str, VM, dict[str, Any], tuple[Any, ...] | None]] = []
    annex = {"replies": [[1, "a", {"ok": 2}]], "generation": 3}

    class Watching(MemoryChannel):
        async def send(self, data: bytes) -> None:
            if msgpack.unpackb(data).get("t") == "commit":
                seen.append(("commit sent", vm, {}, None))
            await super().send(data)

    class Deciding(VMGate):
        async def tombstone(self, event: BecomeTombstone) -> None:
            await super().tombstone(event)
            seen.append(("decided", vm, {}, None))

    vm = make_vm(workload["memhog"])
    before = state(vm)

    def ready(held: VM, got_annex: dict[str, Any]) -> None:
        seen.append(("ready", held, got_annex, state(held)))

    def activate(held: VM, got_annex: dict[str, Any]) -> None:
        seen.append(("activate", held, got_annex, None))

    async def main() -> Received:
        a, b = memory_channel_pair()
        a.__class__ = Watching
        _, got = await asyncio.gather(
            run_source(vm, a, hooks=Deciding(annex=annex), deadline_s=DEADLINE_S),
            run_destination(b, store, ChunkStore(), deadline_s=DEADLINE_S,
                            ready=ready, activate=activate))
        return got

    got = asyncio.run(main())
    assert got.outcome == "committed" and got.vm is not None
    assert [name for name, *_ in seen] == ["ready", "decided", "commit sent", "activate"]
    (_, at_ready, annex_at_ready, state_at_ready), (_, at_commit, annex_at_commit, _) = (
        seen[0], seen[3])
    assert at_ready is got.vm and at_commit is got.vm
    assert annex_at_ready == annex_at_commit == annex
    assert state_at_ready == before and state(got.vm) == before


def test_destination_hooks_that_fail_are_logged_and_the_vm_still_lands(
        store: ImageStore, workload: dict[str, Image],
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon's hook failing is the daemon's problem, never the migration's: the
    VM is committed and returned, for the caller to land the usual way."""
    vm = make_vm(workload["memhog"])
    before = state(vm)

    def broken(held: VM, annex: dict[str, Any]) -> None:
        raise RuntimeError("hook broke")

    async def main() -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        return await asyncio.gather(
            run_source(vm, a, deadline_s=DEADLINE_S),
            run_destination(b, store, ChunkStore(), deadline_s=DEADLINE_S,
                            ready=broken, activate=broken))

    stats, got = asyncio.run(main())
    assert stats.outcome == got.outcome == "committed" and got.vm is not None
    assert state(got.vm) == before
    failures = [r.getMessage() for r in caplog.records if "hook failed" in r.getMessage()]
    assert len(failures) == 2 and "ready" in failures[0] and "activate" in failures[1]


def test_destination_silent_times_out_and_the_source_resumes(workload: dict[str, Image]) -> None:
    vm = make_vm(workload["memhog"])
    before = state(vm)

    async def main() -> MigrationStats:
        a, _b = memory_channel_pair()  # nobody answers on the other end
        return await run_source(vm, a, deadline_s=0.1)

    stats = asyncio.run(main())
    assert stats.outcome == "aborted" and stats.abort_code == "migration_timeout"
    assert state(vm) == before


def test_cancelling_the_source_driver_resumes_the_vm(workload: dict[str, Image]) -> None:
    vm = make_vm(workload["memhog"])
    gate = VMGate()

    async def main() -> None:
        a, b = memory_channel_pair()
        task = asyncio.create_task(run_source(vm, a, hooks=gate))
        await b.recv()  # its Offer: the migration is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not gate.paused


async def _tcp_pair(proxy_rate_mbit_s: float | None) -> Any:
    accepted: asyncio.Queue[StreamChannel] = asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(StreamChannel(r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


@pytest.mark.parametrize("rate_mbit_s", [None, 100.0])
def test_over_real_tcp(store: ImageStore, workload: dict[str, Image],
                       rate_mbit_s: float | None) -> None:
    image = workload["memhog"]
    vm = make_vm(image)

    async def main() -> tuple[MigrationStats, Received, int]:
        server, port, accepted = await _tcp_pair(rate_mbit_s)
        async with server:
            if rate_mbit_s is None:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                src = StreamChannel(r, w)
                dst = await accepted.get()
                stats, got, _, served = await migrate(vm, src, dst, store, calls=30,
                                                      deadline_s=5)
            else:
                async with shaped_link("127.0.0.1", port, rate_mbit_s) as proxy:
                    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                    src = StreamChannel(r, w)
                    dst = await accepted.get()
                    stats, got, _, served = await migrate(vm, src, dst, store, calls=30,
                                                          deadline_s=5)
            await src.close()
            await dst.close()
        return stats, got, served

    stats, got, served = asyncio.run(main())
    assert stats.outcome == got.outcome == "committed" and got.vm is not None
    assert state(got.vm) == state(twin_of(image, served))
    assert stats.downtime_s is not None and stats.total_s is not None
    d = stats.to_dict()
    assert d["bytes_sent"] == stats.bytes_sent and len(d["bytes_per_round"]) == len(stats.rounds)


def test_no_garbage_collection_runs_inside_the_pause_and_it_runs_again_after(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """A full collection of a large heap takes milliseconds: both ends hold the
    collector off on the downtime's path (the source from the pause to its end, the
    destination from the final round to just after the landing), and let it run
    again afterwards, also when the migration aborts."""
    seen: dict[str, bool] = {}

    class Watching(VMGate):
        async def pause(self) -> None:
            await super().pause()
            seen["pause"] = gc.isenabled()

        async def tombstone(self, event: BecomeTombstone) -> None:
            seen["decision"] = gc.isenabled()
            await super().tombstone(event)

    async def main(gate: VMGate) -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        return await asyncio.gather(run_source(make_vm(workload["memhog"]), a, hooks=gate,
                                               deadline_s=DEADLINE_S),
                                    run_destination(b, store, ChunkStore(),
                                                    deadline_s=DEADLINE_S))

    assert gc.isenabled()
    stats, got = asyncio.run(main(Watching()))
    assert stats.outcome == got.outcome == "committed"
    assert seen == {"pause": False, "decision": False}
    assert gc.isenabled()  # the destination's hold ended with its loop
    stats, got = asyncio.run(main(DiskFullAtTheDecision()))
    assert stats.outcome == "aborted" and gc.isenabled()
    gc.disable()  # an application that runs without it keeps it so
    try:
        asyncio.run(main(VMGate()))
        assert not gc.isenabled()
    finally:
        gc.enable()
