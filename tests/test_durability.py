"""Durability against what an attacker (or bad luck) does to the state directory:
a second daemon or metro on it, and a kill -9. Real daemon processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudlet.errors import StateDirLocked
from cloudlet.vm import Snapshot
from edge_agent.statelock import LOCK_FILE, StateLock
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, free_port, make_daemon

KV = (WORKLOADS / "kvstore.wasm").read_bytes()
WAIT_S = 20.0  # generous bound for "within a few checkpoint rounds" on a loaded machine


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


def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.1)


def on_disk_seq(d: Daemon, vm: str) -> int:
    return Snapshot.read(d.state_dir / "vms" / f"{vm}.snap").seq


def checkpointed(d: Daemon, vm: str, seq: int) -> None:
    """Wait until the VM's checkpoint on disk is at `seq`, and for the round that
    wrote it to finish (the daemon says `durable` only after the write returned)."""
    wait_for(f"VM {vm} is checkpointed at seq {seq}", lambda: on_disk_seq(d, vm) == seq)
    time.sleep(0.3)  # not a measurement: the rename is seen a moment before it returns


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


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime (the daemon's log aside)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "daemon.log"}


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
        before = tree(state)

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
        assert tree(state) == before  # nothing written, not even its own lock's words
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
