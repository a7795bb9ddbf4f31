"""Durability against what an attacker (or bad luck) does to the state directory:
a second daemon or metro on it, a kill -9, and a full disk.

Real daemon processes, and a real small file system (an 8 MiB tmpfs) filled
with a real file: no mocked errno. Mounting needs root; elsewhere these tests
skip (and fail under CI, which must run them).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlet.errors import NoCloudletAvailable, StateDirLocked, StorageFull
from cloudlet.fsutil import atomic_write, atomic_write_all
from cloudlet.vm import Snapshot
from edge_agent.fencing import EPOCH_FILE
from edge_agent.statelock import LOCK_FILE, StateLock
from mobile_client import CloudletClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, free_port, make_daemon
from tests.mqtt_brokers import in_ci
from tests.waiting import wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KV = (WORKLOADS / "kvstore.wasm").read_bytes()
HOG = (WORKLOADS / "memhog.wasm").read_bytes()
DISK_SIZE = "8m"  # room for a daemon's images and a few small VMs; filled in a blink
WAIT_S = 20.0  # generous bound for "within a few checkpoint rounds" on a loaded machine


# --- a small real disk ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of DISK_SIZE, unmounted afterwards (which fails if a daemon
    still holds a file on it: each test stops its daemons first)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs",
                          str(mount_point)], capture_output=True, text=True)
    if out.returncode != 0:
        why = f"mounting a tmpfs needs root: {out.stderr.strip()}"
        if in_ci():
            pytest.fail(f"{why}; CI must run the full-disk tests", pytrace=False)
        pytest.skip(why)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Grow a filler file until the disk refuses another byte; remove it to free the disk."""
    filler = disk / "filler"
    block = b"\xa5" * (256 << 10)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def daemon_on(disk: Path, tmp_path: Path, name: str = "d1", **settings: Any) -> Daemon:
    """A daemon whose state directory is on `disk`; its log is not (a log that
    cannot be written would hide what the test needs to see)."""
    d = make_daemon(disk, name, secret_path=tmp_path / "cluster.key", **settings)
    d.log_path = tmp_path / f"{name}.log"
    return d


# --- a tiny client --------------------------------------------------------------------


def upload(d: Daemon, token: str, wasm: bytes = KV) -> str:
    status, body = d.request("POST", "/v1/images", raw=wasm, token=token)
    assert status == 201, body
    digest: str = body["digest"]
    return digest


def create(d: Daemon, token: str, digest: str) -> str:
    status, body = d.request("POST", "/v1/vms", {"image": digest}, token=token)
    assert status == 201, body
    vm: str = body["vm"]
    return vm


def health(d: Daemon) -> dict[str, Any]:
    status, body = d.request("GET", "/health")
    assert status == 200, body  # degraded included: probes must keep seeing the cloudlet
    result: dict[str, Any] = body
    return result


def metric(d: Daemon, token: str, line_start: str) -> float:
    status, text = d.request("GET", "/metrics", token=token)
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    wait_until(predicate, WAIT_S, what=what)


def on_disk_seq(d: Daemon, vm: str) -> int:
    return Snapshot.read(d.state_dir / "vms" / f"{vm}.snap").seq


def checkpointed(d: Daemon, vm: str, seq: int) -> None:
    """Wait until the VM's checkpoint on disk is at `seq`, and for the round that
    wrote it to finish (the daemon says `durable` only after the write returned)."""
    wait_for(f"VM {vm} is checkpointed at seq {seq}", lambda: on_disk_seq(d, vm) == seq)
    time.sleep(0.3)  # not a measurement: the rename is seen a moment before it returns


def leftovers(d: Daemon) -> list[str]:
    """Temporary halves and set-aside checkpoints: none may ever be there."""
    vms = d.state_dir / "vms"
    return sorted(p.name for p in vms.iterdir()
                  if p.name.endswith((".tmp", ".unreadable")))


class Session:
    """Sequenced calls to one VM, as the SDK makes them: each answer says what is
    durable, and the test remembers the most any answer ever claimed."""

    def __init__(self, d: Daemon, token: str, vm: str, seq: int = 0) -> None:
        self.d, self.token, self.vm, self.seq = d, token, vm, seq
        self.max_durable = -1

    def call(self, fn: str, *args: int) -> dict[str, Any]:
        self.seq += 1
        status, reply = self.d.request("POST", f"/v1/vms/{self.vm}/call",
                                       {"fn": fn, "args": list(args), "seq": self.seq},
                                       token=self.token)
        assert status == 200 and reply["seq"] == self.seq, reply
        self.max_durable = max(self.max_durable, reply["durable"])
        result: dict[str, Any] = reply
        return result


# --- the state directory's lock --------------------------------------------------------


def tree(root: Path, *, skip_fence: bool = False) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime (the daemon's log aside).

    `skip_fence` also leaves out the epoch fence (and its temporary file while it
    is being replaced): a running metro's own daemon writes it whenever it sees
    its orchestrator's lease, at a moment no test controls.
    """
    def kept(p: Path) -> bool:
        if not p.is_file() or p.name == "daemon.log":
            return False
        return not (skip_fence and p.name.lstrip(".").startswith(EPOCH_FILE))
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if kept(p)}


def test_a_second_daemon_on_the_same_state_dir_exits_at_once_touching_nothing(
        tmp_path: Path) -> None:
    first = make_daemon(tmp_path, "first").start()
    try:
        alice = first.token("alice")
        vm = create(first, alice, upload(first, alice))
        s = Session(first, alice, vm)
        s.call("kv_put", 1, 11)
        checkpointed(first, vm, 1)
        before = tree(first.state_dir)
        second_port = free_port()
        second = tmp_path / "second.toml"
        second.write_text(first.config_path.read_text()
                          .replace(f"port = {first.port}", f"port = {second_port}")
                          .replace('name = "first"', 'name = "second"'))
        out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "agent", "--config",
                              str(second)], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and out.stdout == ""  # never said "ready"
        assert first.proc is not None
        assert re.fullmatch(
            rf"cloudlet: error \[state_dir_locked\]: {re.escape(str(first.state_dir))} is in "
            rf"use by pid {first.proc.pid} \(cloudlet agent first, since [^)]+\); .*\n",
            out.stderr), out.stderr
        assert tree(first.state_dir) == before  # nothing restored and rewritten, nothing new
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second_port), timeout=5).close()
        # The first serves its VM as before, its numbering untouched.
        assert s.call("kv_get", 1)["result"] == 11
        assert first.stop() == 0
    finally:
        first.kill()


def test_a_killed_daemons_lock_does_not_block_its_restart(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, "phoenix").start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        assert d.proc is not None
        killed_pid = d.proc.pid
        lock = d.state_dir / LOCK_FILE
        assert json.loads(lock.read_text())["pid"] == killed_pid
        d.proc.send_signal(signal.SIGKILL)
        d.kill()
        assert json.loads(lock.read_text())["pid"] == killed_pid  # stale words, no lock
        d.start()
        assert d.proc.pid != killed_pid
        assert json.loads(lock.read_text())["pid"] == d.proc.pid
        status, info = d.request("GET", f"/v1/vms/{vm}", token=alice)
        assert status == 200 and info["seq"] == 0
        assert d.stop() == 0
    finally:
        d.kill()


def test_a_second_cloudlet_up_on_the_same_state_dir_exits_at_once(tmp_path: Path) -> None:
    state = tmp_path / "metro"

    def up_args(base_port: int, broker_port: int) -> list[str]:
        return [sys.executable, "-m", "cloudlet.cli", "up", "--nodes", "1", "--base-port",
                str(base_port), "--broker-port", str(broker_port), "--state-dir", str(state)]

    first = subprocess.Popen(up_args(free_port(), free_port()), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None
        node = endpoint = None
        deadline = time.monotonic() + 60
        while node is None and time.monotonic() < deadline:
            line = first.stdout.readline()
            assert line, "cloudlet up exited early"
            if m := re.match(r"cloudlet (\S+)\s+(\S+)\s+\(pid (\d+)\)", line):
                node, endpoint, node_pid = m.group(1), m.group(2), int(m.group(3))
        assert node is not None and endpoint is not None
        # The daemon locks its orchestrator role's directory once its control plane
        # is up: after that it writes nothing but its fence, whose moment no test
        # controls.
        assert wait_until(lambda: (state / "nodes" / node / "orchestrator" / LOCK_FILE).exists(),
                          timeout_s=30)
        before = tree(state, skip_fence=True)

        other_broker = free_port()
        out = subprocess.run(up_args(free_port(), other_broker), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0
        assert out.stdout == ""  # it never said "broker ...": no broker was started
        assert re.fullmatch(rf"cloudlet: error \[state_dir_locked\]: {re.escape(str(state))} "
                            rf"is in use by pid {first.pid} \(cloudlet up, since [^)]+\); .*\n",
                            out.stderr), out.stderr
        # The node's own directory is locked by its daemon, against a stray `agent`
        # on the same config (same port: refused by the lock, before any bind).
        out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "agent", "--config",
                              str(state / "nodes" / node / "node.toml")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "[state_dir_locked]" in out.stderr
        assert f"pid {node_pid} (cloudlet agent {node}," in out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert tree(state, skip_fence=True) == before  # nothing written, not its lock's words
        with urllib.request.urlopen(f"{endpoint}/health", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        first.send_signal(signal.SIGINT)
        try:
            assert first.wait(60) == 0
        finally:
            first.kill()


def test_the_lock_names_its_holder_and_frees_on_release(tmp_path: Path) -> None:
    with StateLock(tmp_path, "cloudlet up"):
        written = (tmp_path / LOCK_FILE).read_bytes()
        with pytest.raises(StateDirLocked) as refused:
            StateLock(tmp_path, "cloudlet agent x").acquire()
        assert refused.value.code == "state_dir_locked"
        assert f"in use by pid {os.getpid()} (cloudlet up, since " in refused.value.message
        assert (tmp_path / LOCK_FILE).read_bytes() == written  # the refused one wrote nothing
    with StateLock(tmp_path, "cloudlet agent x"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "cloudlet agent x"


# --- a full disk ------------------------------------------------------------------------


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_nothing(
        small_disk: Path) -> None:
    target = small_disk / "state.bin"
    atomic_write(target, b"old and good")
    filler = fill(small_disk)
    with pytest.raises(StorageFull) as refused:
        atomic_write(target, [b"new", os.urandom(1 << 20)])
    assert isinstance(refused.value, OSError) and refused.value.errno == errno.ENOSPC
    # The file is named, its directory is not (the message may reach a client).
    assert refused.value.code == "storage_full" and "state.bin" in refused.value.message
    assert str(target.parent) not in refused.value.message
    assert target.read_bytes() == b"old and good"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "state.bin"]
    filler.unlink()
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_atomic_write_all_writes_what_fits_and_keeps_the_old_rest(small_disk: Path) -> None:
    """Files written together: the one the disk cannot take keeps its old version, the
    others land, and no temporary file is left."""
    names = ("a.snap", "big.snap", "c.snap")
    for name in names:
        atomic_write(small_disk / name, b"old " + name.encode())
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size - (256 << 10))  # room for small files only
    errors = atomic_write_all([(small_disk / "a.snap", b"new a"),
                               (small_disk / "big.snap", [b"new", os.urandom(1 << 20)]),
                               (small_disk / "c.snap", [b"new ", memoryview(b"c")])])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], StorageFull) and errors[1].errno == errno.ENOSPC
    assert "big.snap" in errors[1].message and str(small_disk) not in errors[1].message
    assert [(small_disk / n).read_bytes() for n in names] == [b"new a", b"old big.snap",
                                                              b"new c"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["a.snap", "big.snap", "c.snap",
                                                            "filler"]


def test_a_full_disk_refuses_new_vms_degrades_health_and_recovers(
        small_disk: Path, tmp_path: Path) -> None:
    d = daemon_on(small_disk, tmp_path).start()
    try:
        alice = d.token("alice")
        kv = upload(d, alice)
        vm = create(d, alice, kv)
        s = Session(d, alice, vm)
        s.call("kv_put", 1, 10)
        checkpointed(d, vm, 1)
        assert health(d)["status"] == "ok" and metric(d, alice, "cloudlet_storage_ok") == 1

        # Full: a new VM is refused with the typed answer, and none is left behind.
        filler = fill(small_disk)
        status, body = d.request("POST", "/v1/vms", {"image": kv}, token=alice)
        assert (status, body["code"]) == (507, "storage_full"), body
        assert "/" not in body["message"]  # no server path goes to the client
        assert [v["vm"] for v in d.request("GET", "/v1/vms", token=alice)[1]["vms"]] == [vm]
        assert sorted(p.name for p in (d.state_dir / "vms").iterdir()) == [f"{vm}.snap"]
        status, body = d.request("POST", "/v1/images", raw=HOG, token=alice)
        assert (status, body["code"]) == (507, "storage_full"), body
        assert d.request("GET", "/v1/images", token=alice)[1]["images"] == [kv]
        got = health(d)
        assert got["status"] == "degraded", got
        assert any(r.startswith("storage_full: ") and "No space left on device" in r
                   for r in got["reasons"]), got
        assert metric(d, alice, "cloudlet_storage_ok") == 0
        assert metric(d, alice, 'cloudlet_storage_failures_total{what="request"}') >= 2

        # Freed, with no VM to checkpoint: the probe sees it within a round or two.
        filler.unlink()
        wait_for("health is ok again", lambda: health(d)["status"] == "ok")
        assert health(d)["reasons"] == []

        # Full again, while a VM applies calls: they are applied (in memory), and no
        # answer calls them durable.
        filler = fill(small_disk)
        for k in range(2, 7):
            assert s.call("kv_put", k, k * 10)["durable"] == 1
        wait_for("the failed checkpoints degrade health",
                 lambda: health(d)["status"] == "degraded")
        assert s.call("kv_get", 6)["result"] == 60
        assert s.call("kv_count")["durable"] == 1
        assert on_disk_seq(d, vm) == 1 and leftovers(d) == []
        assert metric(d, alice, 'cloudlet_storage_failures_total{what="checkpoint"}') >= 1
        assert d.proc is not None and d.proc.poll() is None  # up, serving

        # Freed: the pending checkpoint lands, health is ok, and new VMs are welcome.
        filler.unlink()
        wait_for("the pending checkpoint is written", lambda: on_disk_seq(d, vm) == s.seq)
        wait_for("health is ok again", lambda: health(d)["status"] == "ok")
        assert s.call("kv_count")["durable"] == s.seq - 1
        assert metric(d, alice, "cloudlet_storage_ok") == 1
        create(d, alice, kv)
        log = d.log_path.read_text()
        assert "the cloudlet is degraded: storage_full" in log
        assert "state writes succeed again" in log
        assert d.stop() == 0
    finally:
        d.kill()


def test_disk_full_loses_no_applied_call_across_a_clean_restart(
        small_disk: Path, tmp_path: Path) -> None:
    d = daemon_on(small_disk, tmp_path).start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        s = Session(d, alice, vm)
        for k in range(1, 6):
            s.call("kv_put", k, k * 10)
        checkpointed(d, vm, 5)

        # 1. Calls applied while the disk is full, then the disk freed before SIGTERM:
        # a clean restart has every one of them.
        filler = fill(small_disk)
        for k in range(6, 11):
            assert s.call("kv_put", k, k * 10)["durable"] == 5
        wait_for("a checkpoint round fails", lambda: health(d)["status"] == "degraded")
        assert s.call("kv_count")["durable"] == 5
        filler.unlink()
        assert d.stop() == 0
        assert "checkpointed 1 VMs, 0 failed" in d.log_path.read_text()
        d.start()
        status, info = d.request("GET", f"/v1/vms/{vm}", token=alice)
        assert status == 200 and info["seq"] == 11
        for k in range(1, 11):
            assert s.call("kv_get", k)["result"] == k * 10
        checkpointed(d, vm, s.seq)
        last_good = s.seq

        # 2. SIGTERM while the disk is still full: the daemon says which VM it could
        # not save and exits non-zero; the file on disk is the last good checkpoint.
        filler = fill(small_disk)
        for k in range(11, 16):
            assert s.call("kv_put", k, k * 10)["durable"] == last_good
        wait_for("a checkpoint round fails", lambda: health(d)["status"] == "degraded")
        assert d.stop() != 0
        log = d.log_path.read_text()
        assert re.search(rf"ERROR edge_agent\.vm_host: VM {vm} was not saved: it applied "
                         rf"calls up to seq {s.seq}, its last good checkpoint \(seq "
                         rf"{last_good}\)", log), log
        assert "checkpointed 0 VMs, 1 failed; not saved: " + vm in log
        assert "cloudlet: error [storage_full]: 1 VMs could not be saved at shutdown" in log
        assert on_disk_seq(d, vm) == last_good and leftovers(d) == []

        # The restart (on the still full disk) comes back at the last good checkpoint:
        # never seq 0, never a file set aside; every call any answer called durable.
        d.start()
        status, info = d.request("GET", f"/v1/vms/{vm}", token=alice)
        assert status == 200 and info["seq"] == last_good > 0
        assert info["seq"] >= s.max_durable
        s.seq = last_good
        for k in range(1, 11):
            assert s.call("kv_get", k)["result"] == k * 10
        assert s.call("kv_get", 11)["result"] == -1  # never durable, and said so
        filler.unlink()
        assert d.stop() == 0
        assert leftovers(d) == []
    finally:
        d.kill()


def test_cloudlet_up_reports_a_cloudlet_that_could_not_save_its_vms(
        small_disk: Path, tmp_path: Path) -> None:
    state = small_disk / "metro"
    errors_path = tmp_path / "up.stderr"
    with errors_path.open("wb") as errors_out:
        up = subprocess.Popen(
            [sys.executable, "-m", "cloudlet.cli", "up", "--nodes", "1", "--base-port",
             str(free_port()), "--broker-port", str(free_port()), "--state-dir", str(state)],
            stdout=subprocess.PIPE, stderr=errors_out, text=True)
    try:
        assert up.stdout is not None
        found = None
        while found is None:
            line = up.stdout.readline()
            assert line, f"cloudlet up exited early: {errors_path.read_text()}"
            found = re.match(r"cloudlet (\S+)\s+http://127\.0\.0\.1:(\d+)", line)
        name, port = found.group(1), int(found.group(2))
        node = Daemon(name, state / "nodes" / name / "node.toml", state / "nodes" / name,
                      state / "cluster.key", port, tmp_path / "unused.log")
        alice = node.token("alice")
        vm = create(node, alice, upload(node, alice))
        s = Session(node, alice, vm)
        s.call("kv_put", 1, 1)
        checkpointed(node, vm, 1)
        filler = fill(small_disk)
        s.call("kv_put", 2, 2)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) != 0
        said = errors_path.read_text()
        assert f"cloudlet {name} stopped with status 1" in said, said
        assert f"not saved: {vm}" in said
        assert on_disk_seq(node, vm) == 1
        filler.unlink()
    finally:
        if up.poll() is None:  # a failed assertion: stop it cleanly, or its cloudlets
            up.send_signal(signal.SIGINT)  # outlive it and keep the disk busy
            try:
                up.wait(60)
            finally:
                up.kill()


def test_a_session_goes_to_another_cloudlet_when_one_disk_is_full(
        small_disk: Path, tmp_path: Path) -> None:
    full = daemon_on(small_disk, tmp_path, "full").start()
    roomy = make_daemon(tmp_path, "roomy").start()
    try:
        token = full.token("alice")
        assert full.request("POST", "/v1/images", raw=KV, token=token)[0] == 201
        filler = fill(small_disk)

        async def run() -> tuple[str, dict[str, float]]:
            # Alone, the full cloudlet refuses the VM as a full one does, not with an
            # error the application would have to know about ...
            async with CloudletClient(token, endpoints=[full.endpoint]) as c:
                with pytest.raises(NoCloudletAvailable, match="refused the VM"):
                    async with c.session(WORKLOADS / "kvstore.wasm"):
                        pass
            # ... so with another one, the session simply starts there.
            async with CloudletClient(token, endpoints=[full.endpoint, roomy.endpoint]) as c:
                rtts = await c.prober.rtts(force=True)
                async with c.session(WORKLOADS / "kvstore.wasm") as s:
                    assert await s.call("kv_put", 1, 5) == 1
                    return s.location.node, rtts

        node, rtts = asyncio.run(run())
        assert node == "roomy"
        assert set(rtts) == {"full", "roomy"}  # degraded is still reachable for probes
        filler.unlink()
        assert full.stop() == 0
    finally:
        full.kill()
        roomy.kill()


@pytest.mark.parametrize("mode", ["live", "stop_and_copy"])
def test_a_move_whose_tombstone_cannot_be_written_leaves_the_vm_here_only(
        small_disk: Path, tmp_path: Path, mode: str) -> None:
    source = daemon_on(small_disk, tmp_path, "source").start()
    destination = make_daemon(tmp_path, "destination").start()
    try:
        alice = source.token("alice")
        vm = create(source, alice, upload(source, alice))
        s = Session(source, alice, vm)
        s.call("kv_put", 1, 7)
        checkpointed(source, vm, 1)  # clean: the move's own first write is the tombstone
        filler = fill(small_disk)
        status, body = source.request("POST", f"/v1/vms/{vm}/migrate",
                                      {"endpoint": destination.endpoint, "mode": mode},
                                      token=source.operator_token(), timeout_s=60)
        assert (status, body["code"], body["details"]["cause"]) == (
            400, "migration_aborted", "storage_full"), body
        assert s.call("kv_get", 1)["result"] == 7  # serving here
        status, peers = destination.request("GET", "/v1/peer/vms",
                                            token=destination.peer_token())
        assert status == 200 and peers["vms"] == [], peers  # and only here
        filler.unlink()
        assert source.stop() == 0
    finally:
        source.kill()
        destination.kill()


def test_a_full_disk_refuses_uploaded_snapshots_with_storage_full(
        small_disk: Path, tmp_path: Path) -> None:
    """VM synthesis and a peer's hand-over spool their body to the state directory
    before anything else: a disk that cannot take it is `507 storage_full`, as for
    every other write (docs/openapi.yaml), not a `500`."""
    from cloudlet.vm import VM, ImageStore, VMLimits

    d = daemon_on(small_disk, tmp_path).start()
    try:
        alice = d.token("alice")
        upload(d, alice)
        local = VM.create(ImageStore(tmp_path / "store").add(KV), VMLimits(memory_bytes=1 << 24))
        local.call("kv_put", 3, 33)
        overlay, whole = local.snapshot(), local.snapshot()
        filler = fill(small_disk)
        for path, token in (("/v1/vms/synthesize", alice), ("/v1/peer/vms", d.peer_token())):
            status, body = d.request("POST", path, raw=overlay.to_bytes(), token=token)
            assert (status, body["code"]) == (507, "storage_full"), (path, body)
            assert "/" not in body["message"]  # no server path goes to the client
        assert list((d.state_dir / "uploads").iterdir()) == []
        assert health(d)["status"] == "degraded"
        filler.unlink()
        status, body = d.request("POST", "/v1/vms/synthesize", raw=whole.to_bytes(), token=alice)
        assert status == 201, body
        assert d.stop() == 0
    finally:
        d.kill()


def test_a_stop_and_copy_cut_short_keeps_the_vm_aside_never_in_two_places(
        tmp_path: Path) -> None:
    """A source stopped in the middle of a stop-and-copy handover (its tombstone, the
    decision, written; the destination's answer never heard) restarts without serving
    the VM, which may live on at the destination, and without deleting it, which may
    not: its checkpoint is kept as `ID.handed-over` and the log says so."""
    d = make_daemon(tmp_path, "source").start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        assert d.request("POST", f"/v1/vms/{vm}/call", {"fn": "kv_put", "args": [1, 7]},
                         token=alice)[0] == 200
        assert d.stop() == 0
        # The state a stop between the tombstone and the handover's answer leaves.
        atomic_write(d.state_dir / "vms" / f"{vm}.moved", json.dumps(
            {"node": "west", "endpoint": "http://127.0.0.1:9", "migration": None}).encode())
        d.start()
        status, body = d.request("GET", f"/v1/vms/{vm}", token=alice)
        assert (status, body["code"], body["details"]["node"]) == (410, "vm_moved", "west")
        aside = d.state_dir / "vms" / f"{vm}.handed-over"
        assert aside.exists() and not (d.state_dir / "vms" / f"{vm}.snap").exists()
        assert Snapshot.read(aside).seq == 1  # the VM, whole, for an operator to check
        assert "handed-over" in d.log()
    finally:
        d.kill()
