"""What a live migration does beside the calls of its VMs, kept out of their way:
it pauses a VM on a call boundary (`Outgoing.pause`: right after the next answer,
when one comes within `PAUSE_ON_ANSWER_WAIT_S`), and fills the chunk store after
an arrival in short slices. On a real VMHost with a real kvstore VM; the wait's
bound is made huge where a test must show that an answer, not the bound, ended it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cloudlet.migration.chunkstore import chunk_digests
from cloudlet.protocol import Location
from cloudlet.vm.chunks import CHUNK_BYTES
from edge_agent import live_migration
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.live_migration import LiveMigrations, Outgoing
from edge_agent.metrics import Metrics
from edge_agent.stream_calls import StreamCalls
from edge_agent.vm_host import HostedVM, VMHost

ROOT = Path(__file__).resolve().parent.parent
KVSTORE = (ROOT / "workloads" / "kvstore.wasm").read_bytes()
ALICE = Principal("alice", is_peer=False)
THERE = Location("east", "http://127.0.0.1:1")
NEVER_S = 3600.0  # a bound no test waits out
SETTLED_S = 10.0  # what a test waits, at most, for what must happen


def with_vm(tmp_path: Path, body: Callable[[StreamCalls, HostedVM], Awaitable[None]],
            limits: dict[str, Any] | None = None) -> None:
    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            image = await host.add_image(ALICE, KVSTORE, None)
            hosted = await host.create(ALICE, image.digest, limits)
            await body(StreamCalls(host, Metrics(), hosted, 4096), hosted)
    asyncio.run(run())


def call(calls: StreamCalls, fn: str, *args: int) -> dict[str, Any]:
    out = calls.answer_now(msgpack.packb({"id": 1, "fn": fn, "args": list(args)}))
    assert isinstance(out, bytes), out
    reply: dict[str, Any] = msgpack.unpackb(out)
    return reply


async def turns(n: int = 20) -> None:
    """Let the loop run `n` times round."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_the_pause_starts_right_after_the_next_answer(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", NEVER_S)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        assert hosted.inline
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        pausing = asyncio.create_task(outgoing.pause())
        await turns()
        assert not pausing.done() and not hosted.lock.locked()  # still serving
        assert call(calls, "add", 1, 2)["result"] == 3  # answered, on the fast path
        await asyncio.wait_for(pausing, SETTLED_S)
        assert outgoing.paused and hosted.lock.locked()
        assert hosted.answered is None  # nothing left behind for later calls
        assert not calls.host.can_call_now(hosted)
        await outgoing.resume()
        assert not hosted.lock.locked()
    with_vm(tmp_path, body)


def test_a_failed_call_is_an_answer_too(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", NEVER_S)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        pausing = asyncio.create_task(outgoing.pause())
        await turns()
        assert call(calls, "no_such_function")["error"]["code"] == "bad_call"
        await asyncio.wait_for(pausing, SETTLED_S)
        assert hosted.lock.locked()
        outgoing.release()  # the host's close waits for its VMs' locks
    with_vm(tmp_path, body)


def test_with_no_call_the_pause_starts_at_the_bound(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", 0.05)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        await asyncio.wait_for(outgoing.pause(), SETTLED_S)
        assert hosted.lock.locked() and hosted.answered is None
        # The VM is paused: a call now waits (it is not answered on the fast path).
        assert not calls.host.can_call_now(hosted)
        outgoing.release()
    with_vm(tmp_path, body)


def test_a_vm_called_in_worker_threads_pauses_at_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Its calls do not pass `call_now`; the lock already waits for a running one."""
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", NEVER_S)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        assert not hosted.inline
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        await asyncio.wait_for(outgoing.pause(), SETTLED_S)
        assert hosted.lock.locked() and hosted.answered is None
        outgoing.release()
    with_vm(tmp_path, body, limits={"deadline_ms": 5000})


def test_a_cancelled_pause_leaves_no_waiter(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration stopped while it waits (a shutdown) neither pauses the VM nor
    leaves the next call to wake a future nobody awaits."""
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", NEVER_S)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        pausing = asyncio.create_task(outgoing.pause())
        await turns()
        pausing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pausing
        assert hosted.answered is None and not hosted.lock.locked()
        assert call(calls, "add", 2, 2)["result"] == 4
    with_vm(tmp_path, body)


def test_filling_the_chunk_store_gives_the_loop_turns(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An arrival's chunks go into the store after it landed, in short slices: a
    move's pause (another VM's, or this one's out again) that falls on the fill
    waits for at most one slice. With a zero time budget the fill yields every
    `CHUNK_STORE_CHECK_EVERY` chunks, and every chunk still goes in. (Counted
    between two turns of the loop: the turns spent waiting for the digests'
    thread would hide a fill that never yields.)"""
    monkeypatch.setattr(live_migration, "CHUNK_STORE_DELAY_S", 0.0)
    monkeypatch.setattr(live_migration, "CHUNK_STORE_SLICE_S", 0.0)
    n_chunks = 1024
    data = os.urandom(n_chunks * CHUNK_BYTES)

    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            migrations = LiveMigrations(host)
            store = migrations.chunks
            put, puts = store.put, [0]

            def counted_put(digest: bytes, chunk: bytes) -> None:
                puts[0] += 1
                put(digest, chunk)
            monkeypatch.setattr(store, "put", counted_put)
            filling = asyncio.create_task(migrations._remember_chunks([data]))  # noqa: SLF001
            seen, most_in_one_turn = 0, 0
            while not filling.done():
                await asyncio.sleep(0)
                most_in_one_turn, seen = max(most_in_one_turn, puts[0] - seen), puts[0]
            await filling
            assert puts[0] == n_chunks
            assert all(d in store for d in chunk_digests(data))
            assert most_in_one_turn <= live_migration.CHUNK_STORE_CHECK_EVERY + 1
    asyncio.run(run())


def test_a_vm_whose_calls_are_spaced_apart_pauses_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto-converge spaces its calls: the next one would bring a whole interval's
    dirtying into the final round, so the pause does not wait for it."""
    monkeypatch.setattr(live_migration, "PAUSE_ON_ANSWER_WAIT_S", NEVER_S)

    async def body(calls: StreamCalls, hosted: HostedVM) -> None:
        assert hosted.inline
        hosted.pacer.set_interval(0.08)
        outgoing = Outgoing(calls.host, hosted, THERE, "m1")
        await asyncio.wait_for(outgoing.pause(), SETTLED_S)
        assert hosted.lock.locked() and hosted.answered is None
        outgoing.release()
        hosted.pacer.set_interval(0.0)
    with_vm(tmp_path, body)
