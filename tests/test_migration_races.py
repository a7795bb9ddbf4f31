"""Live migration against moves that race it, between real daemons killed with -9.

Two cases the pause's fast commit must not break: a VM that comes back to its
source while the source is still cleaning up after it left (its new checkpoint
must survive the cleanup), and two moves of one VM asked at once (the tombstone
on disk must name the migration that committed, or a restart answers a
destination in doubt "not committed" and the VM is on neither daemon).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WORKLOADS
from tests.daemons import Daemon, daemon_pair, http_request, make_daemon
from tests.test_migration_faults import KVSTORE, homes
from tests.waiting import wait_until

pytestmark = pytest.mark.slow  # starts daemons


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    yield from daemon_pair(tmp_path, checkpoint_interval_s=30.0, migration_deadline_s=10.0)


def kill_and_restart(d: Daemon) -> None:
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    d.kill()
    d.start()


def new_vm(d: Daemon, token: str, wasm: Path = KVSTORE,
           limits: dict[str, Any] | None = None) -> str:
    """A VM of `wasm` on `d`, its image uploaded first; its id."""
    status, body = d.request("POST", "/v1/images", raw=wasm.read_bytes(), token=token)
    assert status == 201, body
    asked: dict[str, Any] = {"image": body["digest"]}
    if limits is not None:
        asked["limits"] = limits
    status, created = d.request("POST", "/v1/vms", asked, token=token)
    assert status == 201, created
    vm_id: str = created["vm"]
    return vm_id


def vm_with_values(d: Daemon, token: str) -> str:
    """A kvstore VM on `d` holding k -> 7k for k in 0..4; its id."""
    vm_id = new_vm(d, token)
    for k in range(5):
        status, _ = d.request("POST", f"/v1/vms/{vm_id}/call",
                              {"fn": "kv_put", "args": [k, k * 7]}, token=token)
        assert status == 200
    return vm_id


def move_live(source: Daemon, to: Daemon, vm_id: str) -> str:
    """Move `vm_id` live from `source` to `to`; the migration's id."""
    status, answer = source.request("POST", f"/v1/vms/{vm_id}/migrate",
                                    {"endpoint": to.endpoint},
                                    token=source.operator_token(), timeout_s=30)
    assert status == 200, answer
    migration_id: str = answer["migration_id"]
    return migration_id


def test_a_vm_handed_back_at_once_keeps_its_new_checkpoint(
        pair: tuple[Daemon, Daemon]) -> None:
    """Moved live east -> west, then at once handed back west -> east (stop-and-copy,
    ~10 ms): east's cleanup of the first move, 50 ms after its commit, must not
    delete the checkpoint the returned VM wrote; a kill -9 of east then loses
    nothing."""
    east, west = pair
    token = east.token("pat")
    vm_id = vm_with_values(east, token)
    first: dict[str, Any] = {}

    def move_away() -> None:
        first["answer"] = east.request("POST", f"/v1/vms/{vm_id}/migrate",
                                       {"endpoint": west.endpoint},
                                       token=east.operator_token(), timeout_s=30)

    mover = threading.Thread(target=move_away)
    mover.start()
    deadline = time.monotonic() + 20
    while west.request("GET", f"/v1/vms/{vm_id}", token=token, timeout_s=5)[0] != 200:
        assert time.monotonic() < deadline, "the VM never landed on west"
        time.sleep(0.001)
    back = west.request("POST", f"/v1/vms/{vm_id}/migrate",
                        {"endpoint": east.endpoint, "mode": "stop_and_copy"},
                        token=west.operator_token(), timeout_s=30)
    mover.join()
    assert first["answer"][0] == 200, first
    assert back[0] == 200, back
    time.sleep(0.3)  # well past the first move's cleanup
    assert (east.state_dir / "vms" / f"{vm_id}.snap").exists()
    kill_and_restart(east)
    assert homes({"east": east, "west": west}, token, vm_id) == ["east"]
    status, answer = east.request("POST", f"/v1/vms/{vm_id}/call",
                                  {"fn": "kv_get", "args": [4]}, token=token)
    assert status == 200 and answer["result"] == 28, answer


def test_a_moved_vms_checkpoint_is_deleted_after_the_move(pair: tuple[Daemon, Daemon]) -> None:
    """The cleanup after a commit runs in the background: the move's answer does not
    wait for it, and it leaves no checkpoint of the VM behind, under either name."""
    east, west = pair
    token = east.token("pat")
    vm_id = new_vm(east, token)
    vms = east.state_dir / "vms"
    assert (vms / f"{vm_id}.snap").exists()
    status, answer = east.request("POST", f"/v1/vms/{vm_id}/migrate",
                                  {"endpoint": west.endpoint}, token=east.operator_token(),
                                  timeout_s=30)
    assert status == 200, answer
    wait_until(lambda: not any(p.name.startswith(f"{vm_id}.snap") for p in vms.iterdir()), 5,
               what="the moved VM's checkpoint deleted")
    assert homes({"east": east, "west": west}, token, vm_id) == ["west"]


def test_two_moves_asked_at_once_leave_the_committed_ones_tombstone(
        pair: tuple[Daemon, Daemon]) -> None:
    """Two moves of one VM asked 5 ms apart: the second waits for the first (or is
    refused); the tombstone on disk names the migration that committed, before
    and after a kill -9 of the source."""
    east, west = pair
    token = east.token("pat")
    # Much memory written: the first move's starting checkpoint takes a while. Its
    # first write faults in 96 MiB, which can pass the default 50 ms per call on a
    # loaded machine: this VM's calls get 2 s.
    vm_id = new_vm(east, token, WORKLOADS / "memhog.wasm",
                   {"memory_bytes": 256 << 20, "deadline_ms": 2000})
    for fn, args in (("hog_grow", [96]), ("hog_dirty", [96 * 256, 3])):
        status, out = east.request("POST", f"/v1/vms/{vm_id}/call", {"fn": fn, "args": args},
                                   token=token)
        assert status == 200, out
    answers: list[tuple[int, Any]] = []
    operator = east.operator_token()

    def move() -> None:
        answers.append(east.request("POST", f"/v1/vms/{vm_id}/migrate",
                                    {"endpoint": west.endpoint}, token=operator, timeout_s=60))

    movers = [threading.Thread(target=move) for _ in range(2)]
    for t in movers:
        t.start()
        time.sleep(0.005)
    for t in movers:
        t.join()
    committed = [body for status, body in answers if status == 200]
    assert len(committed) == 1, answers
    migration_id = committed[0]["migration_id"]
    vms = east.state_dir / "vms"
    peer = east.peer_token("west")

    def tombstone_migration() -> str | None:
        for path in vms.iterdir():
            if path.name.startswith(vm_id) and ".moved" in path.name:
                body = path.read_bytes()
                # A record: its first byte, then its JSON line (then a kept round).
                line = body[1:].split(b"\n", 1)[0] if body[:1] in (b"!", b"?") else body
                record = json.loads(line)
                if body[:1] != b"?":
                    return str(record["migration"])
        return None

    assert tombstone_migration() == migration_id
    assert http_request(east.endpoint, "GET", f"/v1/peer/migrations/{migration_id}",
                        token=peer) == (200, {"committed": True})
    kill_and_restart(east)
    assert tombstone_migration() == migration_id
    assert http_request(east.endpoint, "GET", f"/v1/peer/migrations/{migration_id}",
                        token=peer) == (200, {"committed": True})
    assert homes({"east": east, "west": west}, token, vm_id) == ["west"]


@pytest.mark.parametrize("mode", ["live", "stop_and_copy"])
def test_a_vm_that_moved_on_is_not_brought_back_from_its_arrivals_rounds(
        pair: tuple[Daemon, Daemon], mode: str) -> None:
    """Moved live east -> west, then at once west -> east, and west killed -9
    before its first checkpoint of the arrived VM (30 s here) replaced the arrival's
    rounds on disk. Those rounds belong to a committed migration, but the VM moved on
    since (west's decided record of the second move): the move sets them aside, so
    the restart does not bring the VM back to life beside east's copy."""
    east, west = pair
    token = east.token("pat")
    vm_id = vm_with_values(east, token)
    arrival = move_live(east, west, vm_id)
    status, _ = west.request("POST", f"/v1/vms/{vm_id}/call",
                             {"fn": "kv_put", "args": [5, 35]}, token=token)
    assert status == 200
    back = west.request("POST", f"/v1/vms/{vm_id}/migrate",
                        {"endpoint": east.endpoint, "mode": mode},
                        token=west.operator_token(), timeout_s=30)
    assert back[0] == 200, back
    incoming = west.state_dir / "incoming"
    # Checkpointed, and the rounds set aside as the VM left again (deleted later),
    # not 30 s after it landed.
    assert not (incoming / arrival).exists()
    set_aside = incoming / f"{arrival}.set-aside"
    assert set_aside.exists()
    kill_and_restart(west)
    # A restart that still found them would ask east whether the first move committed
    # (yes) and restore the VM from them within a second or two. Set aside, they go.
    wait_until(lambda: not set_aside.exists(), 10, what="the set-aside rounds deleted")
    time.sleep(2)
    assert homes({"east": east, "west": west}, token, vm_id) == ["east"]
    status, answer = west.request("GET", f"/v1/vms/{vm_id}", token=token)
    assert status == 410, (status, answer)  # vm_moved: its tombstone, east
    status, answer = east.request("POST", f"/v1/vms/{vm_id}/call",
                                  {"fn": "kv_get", "args": [5]}, token=token)
    assert status == 200 and answer["result"] == 35, answer


def test_rounds_found_beside_the_vms_own_checkpoint_are_set_aside_at_the_restart(
        pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """West stops cleanly moments after the VM arrived (its shutdown checkpoint is
    written, the arrival's rounds are still there) and restarts while the VM's
    source, east, is down, so it cannot ask east about those rounds. The VM, served
    from its checkpoint, moves on to north; when east is back, west must not
    restore it from the rounds (the VM would live on west and north)."""
    east, west = pair
    north = make_daemon(tmp_path, "north", checkpoint_interval_s=30.0,
                        migration_deadline_s=10.0).start()
    try:
        token = east.token("pat")
        vm_id = new_vm(east, token)
        status, _ = east.request("POST", f"/v1/vms/{vm_id}/call",
                                 {"fn": "kv_put", "args": [1, 11]}, token=token)
        assert status == 200
        arrival = move_live(east, west, vm_id)
        rounds = west.state_dir / "incoming" / arrival
        assert rounds.exists()
        assert west.stop() == 0 and east.stop() == 0
        assert rounds.exists()  # kept by the clean stop: the interval had not passed
        west.start()
        assert homes({"west": west}, token, vm_id) == ["west"]  # from its checkpoint
        wait_until(lambda: not rounds.exists(), 10, what="the stale rounds set aside")
        move_live(west, north, vm_id)
        east.start()
        time.sleep(3)  # west would have asked east (once a second) and restored it
        assert homes({"east": east, "west": west, "north": north}, token, vm_id) == ["north"]
        status, answer = north.request("POST", f"/v1/vms/{vm_id}/call",
                                       {"fn": "kv_get", "args": [1]}, token=token)
        assert status == 200 and answer["result"] == 11, answer
    finally:
        north.stop()


def test_a_vm_deleted_moments_after_it_arrived_stays_deleted_after_a_kill(
        pair: tuple[Daemon, Daemon]) -> None:
    """Deleted at west before its first checkpoint there replaced the arrival's
    rounds, then west killed -9: the restart must not bring it back from them."""
    east, west = pair
    token = east.token("pat")
    vm_id = new_vm(east, token)
    arrival = move_live(east, west, vm_id)
    assert (west.state_dir / "incoming" / arrival).exists()  # its first checkpoint: 30 s
    status, _ = west.request("DELETE", f"/v1/vms/{vm_id}", token=token)
    assert status == 204
    kill_and_restart(west)
    time.sleep(3)  # a restart that found the rounds would restore it within a second
    assert homes({"east": east, "west": west}, token, vm_id) == []
    assert not any((west.state_dir / "incoming").iterdir())
