"""A source that decides as it sends the final round, with real VMs, driven by hand.

The source passes its commit point as `Final` goes (its decision keeps that
round; every earlier round is durable at the destination), so the decision's
flush overlaps the destination's work instead of following its `Ready`. These
check the order of events on both sides, that nothing after the decision undoes
it, and that a destination which may face a decided source never discards on its
own once a round is durable there.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgpack
import pytest

from cloudlet.errors import MigrationChannelLost, MigrationInDoubt
from cloudlet.migration import (
    ActivateVM,
    BecomeTombstone,
    ChunkStore,
    DestinationMigration,
    DiscardVM,
    Done,
    Event,
    KeepFinal,
    MemoryChannel,
    MigrationStats,
    NeedData,
    PauseVM,
    PersistRound,
    PreCopyPolicy,
    Received,
    ResumeVM,
    Send,
    SourceMigration,
    VMGate,
    memory_channel_pair,
    run_destination,
    run_source,
)
from cloudlet.migration.messages import Abort, Commit, Final, Offer, Ready, RoundEnd, encode
from cloudlet.vm import VM, Image, ImageStore
from tests.test_migration import fingerprint, pair
from tests.test_migration_driver import FaultyChannel

ANNEX: dict[str, Any] = {"replies": {}}


def source(vm: VM, **kwargs: Any) -> SourceMigration:
    return SourceMigration(vm, policy=PreCopyPolicy(stop_dirty_bytes=16 * 4096),
                           keeps_final=True, decides_at_final=True, **kwargs)


def until_final_arrives(src: SourceMigration, dst: DestinationMigration,
                        between: Any = lambda: None) -> list[object]:
    """Drive both until the destination has taken in `Final`; what the source did
    not send yet stays queued. Returns the source's non-send events so far."""
    src.start()
    seen: list[object] = []
    for _ in range(10_000):
        ev = src.next_event()
        if isinstance(ev, Send):
            dst.receive(ev.data)
            if isinstance(ev.message, Final):
                return seen
            if isinstance(ev.message, RoundEnd):
                between()
        elif isinstance(ev, PauseVM):
            src.paused(ANNEX)
        elif not isinstance(ev, NeedData):
            seen.append(ev)
        dev = dst.next_event()
        while isinstance(dev, Send | PersistRound):
            if isinstance(dev, Send):
                src.receive(dev.data)
            dev = dst.next_event()
    raise AssertionError("the final round never went")


def drain(machine: SourceMigration | DestinationMigration) -> list[Event]:
    """The machine's queued events, up to its next wait."""
    out: list[Event] = []
    while not isinstance(ev := machine.next_event(), NeedData | Done):
        out.append(ev)
    return out


def take_sends(machine: SourceMigration | DestinationMigration) -> list[Send]:
    return [ev for ev in drain(machine) if isinstance(ev, Send)]


def test_the_source_decides_as_the_final_round_goes_and_commits_at_ready(
        store: ImageStore, workload: dict[str, Image]) -> None:
    vm, twin = pair(workload["memhog"], [("hog_grow", (2,)), ("hog_dirty", (100, 1))])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("hog_dirty", 4, 9))
    twin.call("hog_dirty", 4, 9)
    assert dst.offer is not None and dst.offer.decides_at_final
    # Decided before any Ready: the decision carries the final round; nothing is
    # written ahead of it (no KeepFinal), and the Commit follows the decision.
    ev = src.next_event()
    assert isinstance(ev, BecomeTombstone) and ev.final_round is not None
    assert ev.final_round.annex == ANNEX and ev.final_round.seq == vm.seq
    assert src.outcome == "committed" and src.state.value == "decided"
    commit = take_sends(src)
    assert [type(s.message) for s in commit] == [Commit]
    # The destination checks the round, says Ready (read after Final: in order),
    # then reads the Commit and activates.
    ready = [s for s in take_sends(dst) if isinstance(s.message, Ready)]
    assert len(ready) == 1 and dst.has_final
    dst.receive(commit[0].data)
    moved = dst.next_event()
    assert isinstance(moved, ActivateVM) and fingerprint(moved.vm) == fingerprint(twin)
    # The source waited for Ready only to end: the channel stayed open for it.
    assert src.state.value == "decided" and isinstance(src.next_event(), NeedData)
    src.receive(ready[0].data)
    assert src.state.value == "committed" and take_sends(src) == []
    assert dst.outcome == "committed"


def test_an_abort_from_the_destination_after_the_decision_changes_nothing(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """Past its commit point the source keeps the VM moved: the destination asks
    it (and hears "committed") rather than being obeyed."""
    vm, _ = pair(workload["kvstore"], [("kv_put", (k, k)) for k in range(50)])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("kv_put", 1, 2))
    assert isinstance(src.next_event(), BecomeTombstone)
    assert [type(e) for e in drain(src)] == [Send]  # the Commit, written
    src.receive(encode(Abort(src.migration_id, code="migration_aborted", reason="late")))
    assert src.outcome == "committed"
    assert isinstance(src.next_event(), NeedData)  # nothing resumes the VM here
    src.abort("migration_timeout", "no Ready")  # the driver giving up: a no-op too
    assert src.outcome == "committed"


def test_a_decision_that_cannot_be_made_durable_resumes_and_drops_the_copy(
        store: ImageStore, workload: dict[str, Image]) -> None:
    vm, _ = pair(workload["kvstore"], [("kv_put", (k, k)) for k in range(50)])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("kv_put", 1, 2))
    assert isinstance(src.next_event(), BecomeTombstone)
    src.decision_failed("storage_full", "no space")
    events = drain(src)
    assert [type(e) for e in events] == [Send, ResumeVM] and src.outcome == "aborted"
    sent = events[0]
    assert isinstance(sent, Send) and isinstance(sent.message, Abort)
    take_sends(dst)  # its Ready, which the source no longer wants
    dst.receive(sent.data)
    assert isinstance(dst.next_event(), DiscardVM) and dst.outcome == "aborted"


def test_a_vm_that_grew_past_the_offer_is_decided_at_ready(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """The destination admitted the offer's memory size: a final round larger than
    that is one it may refuse, so the decision waits for its Ready."""
    vm, _ = pair(workload["memhog"], [("hog_grow", (2,)), ("hog_dirty", (100, 1))])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("hog_grow", 3))
    assert src.stats.memory_bytes < vm.memory_bytes
    assert isinstance(src.next_event(), KeepFinal)
    assert src.outcome != "committed" and src.state.value == "final"
    ready = [s for s in take_sends(dst) if isinstance(s.message, Ready)]
    src.receive(ready[0].data)
    assert isinstance(src.next_event(), BecomeTombstone) and src.outcome == "committed"


def test_deciding_at_the_final_round_needs_the_source_to_keep_it(
        workload: dict[str, Image]) -> None:
    vm, _ = pair(workload["kvstore"], [])
    with pytest.raises(ValueError, match="keeps_final"):
        SourceMigration(vm, decides_at_final=True)


@pytest.mark.parametrize("failure", ["channel_lost", "malformed_message"])
def test_the_destination_doubts_instead_of_discarding_once_a_round_is_durable(
        store: ImageStore, workload: dict[str, Image], failure: str) -> None:
    """From a source that decides at `Final`, a failure after the first round end
    (the final round may be decided and on its way) leaves the machine in doubt,
    holding what arrived; the source is told if the channel still works. Without
    the final round it cannot land the VM from memory, whatever the answer."""
    vm, _ = pair(workload["kvstore"], [("kv_put", (k, k)) for k in range(50)])
    src = source(vm, migration_id="m1")
    dst = DestinationMigration(store, ChunkStore())
    src.start()
    # Everything up to round 0's end, whose acknowledgement the source never sees.
    for _ in range(1000):
        ev = src.next_event()
        if isinstance(ev, NeedData):
            for answer in take_sends(dst):  # the Accept, the batches' acks
                src.receive(answer.data)
            continue
        assert isinstance(ev, Send)
        dst.receive(ev.data)
        if isinstance(ev.message, RoundEnd):
            break
    assert dst.state.value == "receiving"
    if failure == "channel_lost":
        dst.abort("migration_channel_lost", "reset", tell_peer=False)
        told = take_sends(dst)
    else:
        dst.receive(b"\x81\xa1v\x01")  # a map without a type: a protocol error
        told = take_sends(dst)
    assert dst.outcome == "in_doubt" and not dst.has_final and dst.vm is not None
    assert [type(s.message) for s in told] == ([] if failure == "channel_lost" else [Abort])
    with pytest.raises(MigrationInDoubt, match="final round never arrived"):
        dst.resolve(True)
    dst.resolve(False)
    assert isinstance(dst.next_event(), DiscardVM) and dst.outcome == "aborted"


def test_before_any_durable_round_the_destination_still_discards_on_its_own(
        store: ImageStore, workload: dict[str, Image]) -> None:
    vm, _ = pair(workload["kvstore"], [])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    src.start()
    offer = src.next_event()
    assert isinstance(offer, Send) and isinstance(offer.message, Offer)
    dst.receive(offer.data)
    take_sends(dst)
    dst.abort("migration_channel_lost", "reset", tell_peer=False)
    assert isinstance(dst.next_event(), DiscardVM) and dst.outcome == "aborted"


def test_after_ready_a_message_that_does_not_check_out_puts_the_destination_in_doubt(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """Whatever the source's mode: after Ready it may have committed, so garbage in
    place of the Commit is no reason to drop the VM."""
    vm, _ = pair(workload["kvstore"], [("kv_put", (k, k)) for k in range(50)])
    src = SourceMigration(vm, policy=PreCopyPolicy(stop_dirty_bytes=16 * 4096))
    dst = DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("kv_put", 1, 2))
    assert any(isinstance(s.message, Ready) for s in take_sends(dst))
    dst.receive(b"\xc1")  # not msgpack
    assert dst.outcome == "in_doubt" and dst.has_final
    assert [type(s.message) for s in take_sends(dst)] == [Abort]
    dst.resolve(True)
    assert isinstance(dst.next_event(), ActivateVM)


# --- the drivers, over in-memory channels with faults -------------------------------------


def test_a_bad_message_after_the_decision_does_not_undo_it(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """The source reads on after deciding (for `Ready`): garbage there is no reason
    to resume a VM its tombstone says moved."""
    vm, _ = pair(workload["kvstore"], [("kv_put", (k, k)) for k in range(50)])
    src, dst = source(vm), DestinationMigration(store, ChunkStore())
    until_final_arrives(src, dst, lambda: vm.call("kv_put", 1, 2))
    assert isinstance(src.next_event(), BecomeTombstone)
    src.receive(b"\xc1")  # not msgpack
    assert src.outcome == "committed" and src.state.value == "decided"
    assert [type(e) for e in drain(src)] == [Send]  # the Commit, no Abort, no ResumeVM


@pytest.mark.parametrize("fault", ["close", "cancel"])
def test_a_final_round_that_cannot_be_sent_resumes_the_vm_undecided(
        store: ImageStore, workload: dict[str, Image], fault: str) -> None:
    """The decision is queued behind `Final`: if `Final` cannot go (the channel
    closes, or the driver is cancelled while it waits to write it), nothing was
    decided and the VM serves on at the source."""
    vm, _ = pair(workload["memhog"], [("hog_grow", (2,)), ("hog_dirty", (100, 1))])
    before = fingerprint(vm)
    gate = VMGate()
    sent = asyncio.Event()

    class FinalFails(MemoryChannel):
        async def send(self, data: bytes) -> None:
            if msgpack.unpackb(data, strict_map_key=False)["t"] == "final":
                sent.set()
                if fault == "close":
                    self.close()
                    raise MigrationChannelLost("dropped")
                await asyncio.sleep(3600)  # a link that does not drain
            await super().send(data)

    async def main() -> tuple[MigrationStats | BaseException, Received]:
        a, b = memory_channel_pair()
        a.__class__ = FinalFails
        src = asyncio.ensure_future(run_source(vm, a, hooks=gate, keeps_final=True,
                                               decides_at_final=True, deadline_s=5,
                                               policy=PreCopyPolicy(stop_dirty_bytes=16 * 4096)))
        dst = asyncio.ensure_future(run_destination(b, store, ChunkStore(), deadline_s=0.5))
        if fault == "cancel":
            await sent.wait()
            src.cancel()
        stats = (await asyncio.gather(src, return_exceptions=True))[0]
        if fault == "cancel":
            b.close()
        return stats, await dst

    stats, got = asyncio.run(main())
    if fault == "close":
        assert isinstance(stats, MigrationStats) and stats.outcome == "aborted"
        assert stats.committed_s is None
    else:
        assert isinstance(stats, asyncio.CancelledError)
    assert gate.tombstoned is None and not gate.paused and fingerprint(vm) == before
    vm.call("hog_dirty", 1, 1)  # serving here again
    # The destination cannot know: it kept what it had, in doubt, without the round.
    assert got.outcome == "in_doubt" and got.migration is not None
    assert not got.migration.has_final


def test_a_final_round_lost_on_the_way_lands_from_the_kept_copy(
        store: ImageStore, workload: dict[str, Image]) -> None:
    """`Final` sent, never delivered: the source decided (and kept the round), the
    destination, reading the `Commit` where `Final` should be, is in doubt without
    it. Its pre-copy copy plus the kept round is the VM as the source paused it."""
    vm, _ = pair(workload["memhog"], [("hog_grow", (2,)), ("hog_dirty", (100, 1))])
    gate = VMGate()

    async def main() -> tuple[MigrationStats, Received]:
        a, b = memory_channel_pair()
        lossy = FaultyChannel(a, "final", "drop")
        return await asyncio.gather(
            run_source(vm, lossy, hooks=gate, keeps_final=True, decides_at_final=True,
                       deadline_s=0.5, policy=PreCopyPolicy(stop_dirty_bytes=16 * 4096)),
            run_destination(b, store, ChunkStore(), deadline_s=0.5))

    stats, got = asyncio.run(main())
    assert stats.outcome == "committed" and gate.tombstoned is not None
    kept = gate.tombstoned.final_round
    assert kept is not None
    assert got.outcome == "in_doubt" and got.migration is not None
    held = got.migration.vm
    assert held is not None and not got.migration.has_final
    # Rebased onto the copy's last round, as a daemon's recovery does with the
    # rounds on its disk (`kept_round_onto`).
    held.apply_delta(dataclasses.replace(kept, base_id=held.last_snapshot_id))
    assert fingerprint(held) == fingerprint(vm)
