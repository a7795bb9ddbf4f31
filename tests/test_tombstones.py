"""Tombstones on disk: a live migration's record written ahead, decided in place,
settled under its own name, and what a restart makes of each stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudlet.protocol import Location
from cloudlet.vm import VM, Image
from edge_agent.live_migration import FINAL_ROUND, _write_over, _zero_fill, read_final
from edge_agent.tombstones import DECIDED, SUFFIX, UNDECIDED, Tombstones

WEST = Location("west", "http://127.0.0.1:1")


def restarted(vm_dir: Path) -> Tombstones:
    fresh = Tombstones(vm_dir)
    fresh.load()
    return fresh


def test_an_undecided_record_is_no_tombstone_and_a_restart_drops_it(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    assert prepared.read_bytes()[:1] == UNDECIDED
    assert "vm1" not in stones
    again = restarted(tmp_path)
    assert "vm1" not in again and not again.moved_by_migration("m1")
    assert not prepared.exists()


def test_a_decided_record_is_the_tombstone_before_and_after_it_settles(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    size = prepared.stat().st_size
    stones.decide(prepared, "vm1", WEST, "m1")
    assert prepared.read_bytes()[:1] == DECIDED and prepared.stat().st_size == size
    assert stones.get("vm1") == WEST and stones.moved_by_migration("m1")
    # A crash before it settles: the restart reads the decided record as a tombstone,
    # and settles it itself.
    again = restarted(tmp_path)
    assert again.get("vm1") == WEST and again.moved_by_migration("m1")
    assert again.path("vm1").exists() and not prepared.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vm1{SUFFIX}"]


def test_settling_renames_and_a_return_removes_both_names(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    stones.decide(prepared, "vm1", WEST, "m1")
    stones.settle(prepared, "vm1")
    assert not prepared.exists()
    assert restarted(tmp_path).get("vm1") == WEST
    with pytest.raises(FileNotFoundError):  # settled once: nothing left to settle
        stones.settle(prepared, "vm1")
    # The VM leaves again (decided, not settled yet), then comes back: no name is left.
    prepared = stones.prepare("vm1", WEST, "m2")
    stones.decide(prepared, "vm1", WEST, "m2")
    stones.remove_files("vm1")
    assert list(tmp_path.iterdir()) == []
    assert "vm1" not in restarted(tmp_path)


def test_settling_refuses_an_undecided_record(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path)
    prepared = stones.prepare("vm1", WEST, "m1")
    with pytest.raises(ValueError, match="not decided"):
        stones.settle(prepared, "vm1")
    assert not stones.path("vm1").exists()


def test_a_final_round_written_over_its_zero_filled_file(workload: dict[str, Image],
                                                         tmp_path: Path) -> None:
    path = tmp_path / FINAL_ROUND
    _zero_fill(path, 1 << 20)
    assert read_final(path) is None  # made ahead: the final round never came
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 2)
    vm.call("hog_fill", 0, 40, 7)
    snap = vm.snapshot()
    _write_over(path, snap.to_segments("none"))
    assert path.stat().st_size == 1 << 20  # overwritten, not grown
    back = read_final(path)
    assert back is not None and back.to_bytes() == snap.to_bytes()
    # Larger than the file made for it: the file grows, and reads back the same.
    _zero_fill(path, 4096)
    _write_over(path, snap.to_segments("none"))
    back = read_final(path)
    assert back is not None and back.to_bytes() == snap.to_bytes()
    # An empty file (made by an older daemon) is a final round that never came.
    path.write_bytes(b"")
    assert read_final(path) is None
