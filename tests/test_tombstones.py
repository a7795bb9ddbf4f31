"""Tombstones on disk: a live migration's record written ahead, decided in place,
and what a restart makes of each stage; the final round's file at the destination."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from cloudlet.errors import MigrationProtocolError
from cloudlet.protocol import Location
from cloudlet.vm import VM, Image, Snapshot
from edge_agent import tombstones
from edge_agent.auth import Principal
from edge_agent.config import NodeConfig
from edge_agent.hosted import HostedVM
from edge_agent.live_migration import (
    CALLED_KEY,
    FINAL_ROUND,
    Outgoing,
    kept_round_onto,
    read_final,
    write_over,
    zero_fill,
)
from edge_agent.replies import ANNEX_KEY
from edge_agent.tombstones import DECIDED, KEPT_AT, PREPARED, SUFFIX, UNDECIDED, Tombstones
from edge_agent.vm_host import VMHost
from tests.conftest import WORKLOADS

WEST = Location("west", "http://127.0.0.1:1")
EAST = Location("east", "http://127.0.0.1:2")
ALICE = Principal("alice", is_peer=False)


def restarted(vm_dir: Path) -> Tombstones:
    fresh = Tombstones(vm_dir)
    fresh.load()
    return fresh


def test_an_undecided_record_is_no_tombstone_and_a_restart_drops_it(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    assert prepared.read_bytes()[:1] == UNDECIDED
    assert prepared.name == f"vm1{SUFFIX}.m1{PREPARED}"  # named by its migration
    assert "vm1" not in stones
    again = restarted(tmp_path)
    assert "vm1" not in again and not again.moved_by_migration("m1")
    assert not prepared.exists()


def test_a_decided_record_is_the_tombstone_and_a_restart_renames_it(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    size = prepared.stat().st_size
    stones.decide(prepared, "vm1", WEST, "m1")
    assert prepared.read_bytes()[:1] == DECIDED and prepared.stat().st_size == size
    assert stones.get("vm1") == WEST and stones.moved_by_migration("m1")
    again = restarted(tmp_path)  # a kill -9 after the decision
    assert again.get("vm1") == WEST and again.moved_by_migration("m1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vm1{SUFFIX}"]
    assert restarted(tmp_path).moved_by_migration("m1")  # and again, from its own name


def test_a_decided_record_stays_the_tombstone_when_the_restart_cannot_rename_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    stones.decide(prepared, "vm1", WEST, "m1")

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tombstones, "atomic_write", full)
    again = restarted(tmp_path)
    assert again.get("vm1") == WEST and again.moved_by_migration("m1")
    assert prepared.exists()  # still the tombstone on disk, for the next restart
    monkeypatch.undo()
    assert restarted(tmp_path).moved_by_migration("m1")


def test_two_migrations_of_one_vm_never_share_a_record(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    first = stones.prepare("vm1", WEST, "m1")
    second = stones.prepare("vm1", EAST, "m2")  # a second move asked meanwhile
    assert first != second
    stones.decide(first, "vm1", WEST, "m1")
    second.unlink()  # the second one never ran: its record goes
    again = restarted(tmp_path)
    assert again.get("vm1") == WEST and again.moved_by_migration("m1")
    assert not again.moved_by_migration("m2")


def test_a_failed_decision_leaves_no_record_behind(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")

    def failing(_: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        stones.decide(prepared, "vm1", WEST, "m1")
    monkeypatch.undo()
    # The byte may have reached the page cache; the record is gone instead, so a
    # restart cannot read the refused migration as decided.
    assert not prepared.exists() and "vm1" not in stones
    assert "vm1" not in restarted(tmp_path)


def test_a_return_removes_the_tombstone_and_its_records_but_not_a_new_moves(
        tmp_path: Path) -> None:
    """The VM came back: its tombstone and the records of the migrations that moved it
    away go, by name. A record prepared since is a new move's (out again, under way)
    and stays: removing it by pattern made that move's decision fail."""
    stones = Tombstones(tmp_path)
    stones.write("vm1", WEST, None)
    prepared = stones.prepare("vm1", WEST, "m2")
    stones.decide(prepared, "vm1", WEST, "m2")
    stones.prepare("vm10", EAST, "m4")  # another VM whose id starts the same
    assert stones.pop("vm1") == WEST  # it came back
    old = stones.migrations_of("vm1")
    assert old == ["m2"]
    new_move = stones.prepare("vm1", EAST, "m3")  # and is on its way out again
    stones.remove_files("vm1", old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"vm1{SUFFIX}.m3{PREPARED}", f"vm10{SUFFIX}.m4{PREPARED}"]
    stones.decide(new_move, "vm1", EAST, "m3")  # its commit point still works
    assert restarted(tmp_path).get("vm1") == EAST


def test_a_return_forgets_the_old_migrations_as_a_restart_would(tmp_path: Path) -> None:
    """Every move out adds a migration to the map `committed` answers from; a return
    removes their records, and forgets them: the map does not grow with every move
    for the daemon's life, and says what a restart (reading the disk) would say."""
    stones = Tombstones(tmp_path)
    for k in range(50):  # out and back, 50 times
        moved = stones.prepare("vm1", WEST, f"m{k}")
        stones.decide(moved, "vm1", WEST, f"m{k}")
        assert stones.moved_by_migration(f"m{k}")
        stones.pop("vm1")
        old = stones.migrations_of("vm1")
        assert old == [f"m{k}"]
        stones.remove_files("vm1", old)
        stones.forget_migrations(old)
    assert stones.migrations_of("vm1") == [] and not stones.moved_by_migration("m49")
    assert not restarted(tmp_path).moved_by_migration("m49")
    moved = stones.prepare("vm1", EAST, "m50")  # and out once more: that one counts
    stones.decide(moved, "vm1", EAST, "m50")
    assert stones.migrations_of("vm1") == ["m50"]
    assert restarted(tmp_path).moved_by_migration("m50")


def test_a_return_keeps_the_tombstone_of_a_move_out_again(tmp_path: Path) -> None:
    """If the VM has left again by the time its old tombstone's files go, `ID.moved` is
    the new move's: only the old records go."""
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    stones.decide(prepared, "vm1", WEST, "m1")
    stones.pop("vm1")
    old = stones.migrations_of("vm1")
    stones.write("vm1", EAST, None)  # out again, by a handover
    stones.remove_files("vm1", old, tombstone=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vm1{SUFFIX}"]
    assert restarted(tmp_path).get("vm1") == EAST


def test_a_final_round_written_over_its_zero_filled_file(workload: dict[str, Image],
                                                         tmp_path: Path) -> None:
    path = tmp_path / FINAL_ROUND
    zero_fill(path, 1 << 20)
    assert read_final(path) is None  # made ahead: the final round never came
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 2)
    vm.call("hog_fill", 0, 40, 7)
    snap = vm.snapshot()
    write_over(path, snap.to_segments("none"))
    assert path.stat().st_size == 1 << 20  # overwritten, not grown
    back = read_final(path)
    assert back is not None and back.to_bytes() == snap.to_bytes()
    # Larger than the file made for it: the file grows, and reads back the same.
    zero_fill(path, 4096)
    write_over(path, snap.to_segments("none"))
    back = read_final(path)
    assert back is not None and back.to_bytes() == snap.to_bytes()
    # An empty file (made by an older daemon) is a final round that never came.
    path.write_bytes(b"")
    assert read_final(path) is None
    # A write cut short (a crash before its flush): no whole round, so none.
    whole = snap.to_bytes("none")
    path.write_bytes(whole[: len(whole) - 100] + bytes(100))
    assert read_final(path) is None
    path.unlink()
    assert read_final(path) is None  # and none at all


def final_round_of(workload: dict[str, Image]) -> tuple[Snapshot, Snapshot]:
    """A VM's last pre-copy round and the final round after it (with its annex)."""
    vm = VM.create(workload["memhog"], vm_id="vm1")
    vm.call("hog_grow", 2)
    vm.call("hog_fill", 0, 40, 7)
    last = vm.snapshot()
    vm.call("hog_fill", 3, 2, 9)
    final = vm.snapshot(delta=True)
    return last, Snapshot(**{**final.__dict__, "annex": {"replies": [1, 2]}})


def test_the_decision_keeps_the_final_round_and_only_its_destination_releases_it(
        workload: dict[str, Image], tmp_path: Path) -> None:
    _, final = final_round_of(workload)
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1", keep_bytes=1 << 20)
    size = prepared.stat().st_size
    assert size == KEPT_AT + (1 << 20) and stones.kept_final("m1", "west") is None
    stones.decide(prepared, "vm1", WEST, "m1", final.to_segments("none"))
    assert prepared.stat().st_size == size  # written over blocks it had: no metadata
    assert stones.kept_final("m1", "west") == final.to_bytes("none")
    with pytest.raises(PermissionError):
        stones.kept_final("m1", "east")  # only for the cloudlet the VM moved to

    again = restarted(tmp_path)  # a kill -9 after the decision: it stays the record
    assert again.get("vm1") == WEST and again.kept_final("m1", "west") is not None
    assert prepared.exists() and not again.path("vm1").exists()

    assert not again.release_kept("m1", "east")  # another cloudlet's word is nothing
    assert again.kept_final("m1", "west") is not None
    assert again.release_kept("m1", "west")
    assert again.kept_final("m1", "west") is None and not again.release_kept("m1", "west")
    assert prepared.stat().st_size < KEPT_AT
    after = restarted(tmp_path)  # a plain decided record now: renamed to the tombstone
    assert after.get("vm1") == WEST and after.moved_by_migration("m1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vm1{SUFFIX}"]


def test_a_final_round_written_ahead_is_kept_by_the_decisions_flush(
        workload: dict[str, Image], tmp_path: Path) -> None:
    """`keep` writes the round while the destination takes it in; the decision then
    flips its byte and flushes both. Written ahead and never decided, it is dropped."""
    _, final = final_round_of(workload)
    stones = Tombstones(tmp_path)
    undecided = stones.prepare("vm2", WEST, "m0", keep_bytes=1 << 20)
    stones.keep(undecided, final.to_segments("none"))
    assert "vm2" not in restarted(tmp_path) and not undecided.exists()  # no decision
    prepared = stones.prepare("vm1", WEST, "m1", keep_bytes=1 << 20)
    stones.keep(prepared, final.to_segments("none"))
    assert stones.kept_final("m1", "west") is None  # not decided yet
    stones.decide(prepared, "vm1", WEST, "m1")
    assert stones.kept_final("m1", "west") == final.to_bytes("none")
    assert restarted(tmp_path).kept_final("m1", "west") is not None


def test_a_decision_whose_kept_round_is_torn_never_happened(
        workload: dict[str, Image], tmp_path: Path) -> None:
    """The decision's byte reached the disk, its kept round did not (one flush for
    both, cut short): the flush never returned, so nobody was told it committed."""
    _, final = final_round_of(workload)
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1", keep_bytes=1 << 20)
    whole = final.to_bytes("none")
    fd = os.open(prepared, os.O_WRONLY)
    try:
        os.pwrite(fd, whole[: len(whole) // 2], KEPT_AT)
        os.pwrite(fd, DECIDED, 0)
    finally:
        os.close(fd)
    again = restarted(tmp_path)
    assert "vm1" not in again and not again.moved_by_migration("m1")
    assert not prepared.exists()


def test_a_release_never_brings_back_a_record_the_vms_return_removed(
        workload: dict[str, Image], tmp_path: Path) -> None:
    _, final = final_round_of(workload)
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1", keep_bytes=1 << 20)
    stones.decide(prepared, "vm1", WEST, "m1", final.to_segments("none"))
    stones.pop("vm1")  # it came back: its records go
    stones.remove_files("vm1", ["m1"])
    assert not stones.release_kept("m1", "west") and not prepared.exists()
    assert stones.kept_final("m1", "west") is None


def test_a_kept_round_is_taken_only_onto_the_round_it_follows(
        workload: dict[str, Image]) -> None:
    last, final = final_round_of(workload)
    rebased = kept_round_onto(last, final)
    assert rebased.base_id == last.snapshot_id and rebased.seq == final.seq
    vm = VM.restore(workload["memhog"], last, rebased)  # the chain restores
    assert vm.seq == final.seq
    for wrong, why in [
        (Snapshot(**{**final.__dict__, "annex": {}}), "not a final round"),
        (Snapshot(**{**final.__dict__, "vm_id": "vm2"}), "of VM vm2"),
        (Snapshot(**{**final.__dict__, "seq": last.seq - 1}), "does not follow"),
        (Snapshot(**{**last.__dict__, "annex": {"a": 1}}), "not a final round"),  # overlay
    ]:
        with pytest.raises(MigrationProtocolError, match=why):
            kept_round_onto(last, wrong)


async def kvstore_vm_moving(host: VMHost) -> tuple[HostedVM, Snapshot]:
    """A kvstore VM of alice's on `host`, and the snapshot a move of it carries."""
    image = await host.add_image(ALICE, (WORKLOADS / "kvstore.wasm").read_bytes(), None)
    hosted = await host.create(ALICE, image.digest, None)
    return hosted, host.snapshot_with_annex(hosted, moving=True)


def test_a_vm_that_comes_back_leaves_no_old_migration_in_the_hosts_map(
        tmp_path: Path) -> None:
    """On a real VMHost, the steps a live arrival takes (edge_agent/live_migration.py
    `_activate`): moved away live, then back, the VM's old migration is forgotten in
    memory as its files go (`forget_tombstone`)."""

    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            hosted, snap = await kvstore_vm_moving(host)
            stones = host.tombstones
            stones.decide(stones.prepare(hosted.id, WEST, "m1"), hosted.id, WEST, "m1")
            await host.free_moved(hosted, host.let_go(hosted, WEST))
            assert stones.moved_by_migration("m1")
            back = VM.restore(host.images.get(snap.image_digest), snap)
            assert stones.pop(hosted.id) == WEST
            old_migrations = stones.migrations_of(hosted.id)
            returned = host.activate(back, None)
            await host.forget_tombstone(returned, old_migrations)
            assert not stones.moved_by_migration("m1")
            assert stones.migrations_of(hosted.id) == [] and hosted.id not in stones
            assert not any(".moved" in p.name for p in host.vm_dir.iterdir())

    asyncio.run(run())


def test_an_arrival_prepared_while_its_source_decides_is_hosted_only_at_activation(
        tmp_path: Path) -> None:
    """`prepare_activation` builds what serves the VM (its reply log parsed) without
    hosting it: nobody finds it until `activate`, which then serves that very object.
    One prepared for another VM object is not used."""

    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            hosted, snap = await kvstore_vm_moving(host)
            await host.free_moved(hosted, host.let_go(hosted, WEST))
            arrived = VM.restore(host.images.get(snap.image_digest), snap)
            replies = snap.annex.get(ANNEX_KEY)
            prepared = host.prepare_activation(arrived, replies, generation=3)
            assert arrived.id not in host.vms and prepared.generation == 3
            assert host.activate(arrived, replies, 3, prepared=prepared) is prepared
            assert host.vms[arrived.id] is prepared

            other = VM.restore(host.images.get(snap.image_digest), snap, vm_id="other")
            stale = host.prepare_activation(arrived, replies)
            fresh = host.activate(other, None, prepared=stale)
            assert fresh is not stale and fresh.vm is other and host.vms["other"] is fresh

    asyncio.run(run())


def test_the_annex_names_the_exports_the_vm_was_called_through(tmp_path: Path) -> None:
    """A source's annex carries what its VM was called through (`CALLED_KEY`), which
    the destination binds while the source decides."""

    async def run() -> None:
        async with VMHost(NodeConfig(state_dir=str(tmp_path))) as host:
            hosted, _ = await kvstore_vm_moving(host)
            hosted.vm.call("kv_put", 1, 2)
            annex = Outgoing(host, hosted, WEST, "m1").annex()
            assert annex[CALLED_KEY] == ["kv_put"]

    asyncio.run(run())
