"""The client SDK against real daemons on loopback: sessions, exactly-once under
killed connections, following a moved VM, discovery, offload, auth errors."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from cloudlet.errors import (
    BadCall,
    CallTimeout,
    Forbidden,
    NoCloudletAvailable,
    PeerUnverified,
    Unauthorized,
    VMTrapped,
)
from cloudlet.vm import VM, ImageStore, VMLimits
from mobile_client import CloudletClient
from mobile_client.sync import BlockingClient
from tests.chaos_proxy import ChaosProxy
from tests.conftest import ROOT, WORKLOADS
from tests.daemons import Daemon, make_daemon
from tests.mqtt_brokers import address
from tests.waiting import live_threads

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KVSTORE = WORKLOADS / "kvstore.wasm"
MEMHOG = WORKLOADS / "memhog.wasm"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path, "sdk1").start()
    yield d
    d.stop()


@pytest.fixture
def two_daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a = make_daemon(tmp_path, "east").start()
    b = make_daemon(tmp_path, "west").start()
    yield a, b
    a.stop()
    b.stop()


def twin_checksum(calls: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """kv_checksum and kv_count of a local VM that applied `calls` once each, in order."""
    store = ImageStore(None)
    vm = VM.create(store.add_file(KVSTORE), VMLimits(memory_bytes=64 << 20))
    for fn, args in calls:
        vm.call(fn, *args)
    return vm.call("kv_checksum"), vm.call("kv_count")


def kv_op(i: int, rng: random.Random) -> tuple[str, tuple[int, ...]]:
    """Non-idempotent as a sequence: applying an old put or delete twice, after newer
    ones to the same key, changes the final state."""
    key = rng.randrange(17)
    return ("kv_del", (key,)) if rng.random() < 0.15 else ("kv_put", (key, i * 7919 + key))


# --- sessions ---------------------------------------------------------------------------


def test_session_calls_bytes_errors_and_cleanup(daemon: Daemon) -> None:
    token = daemon.token("alice")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[daemon.endpoint]) as client:
            async with client.session(KVSTORE, budget_ms=50) as s:
                assert await s.call("kv_put", 1, 65) == 1
                assert await s.call("kv_get", 1) == 65
                assert await s.call("kv_set", b"greeting=hello") == b""
                assert await s.call("kv_lookup", b"greeting") == b"hello"
                with pytest.raises(BadCall):  # the daemon's own class, by its code
                    await s.call("no_such_function")
                assert await s.call("kv_get", 1) == 65  # an error uses up its number only
                assert s.seq == 6
                stats = s.stats()
                assert stats.calls == 5 and 0 < stats.p50_ms <= stats.p99_ms
                assert stats.within_budget == 1.0
                vm_id = s.vm_id
            status, _ = daemon.request("GET", f"/v1/vms/{vm_id}", token=token)
            assert status == 404  # the session's VM is destroyed with it

    asyncio.run(run())


def test_trapping_guest_surfaces_as_typed_error(daemon: Daemon) -> None:
    async def run() -> None:
        async with CloudletClient(daemon.token("bob"), endpoints=[daemon.endpoint]) as client, \
                client.session(MEMHOG) as s:
                with pytest.raises(VMTrapped):
                    await s.call("hog_trap", 1)
                assert await s.call("hog_trap", 0) == 7  # the VM stays usable

    asyncio.run(run())


def test_exactly_once_under_connections_killed_mid_call(daemon: Daemon) -> None:
    """Hundreds of pipelined calls while connections die at random points, on the
    daemon's side and on the client's: every call applies exactly once, in order."""
    token = daemon.token("carol")
    rng = random.Random(20261127)
    calls: list[tuple[str, tuple[int, ...]]] = []
    least_calls, kills_wanted, most_calls = 400, 30, 20_000

    async def run() -> None:
        async with ChaosProxy(daemon.port) as proxy, \
                CloudletClient(token, endpoints=[proxy.endpoint]) as client, \
                client.session(KVSTORE, call_deadline_ms=20_000) as s:

            def more() -> bool:
                wanted = len(calls) < least_calls or proxy.kills < kills_wanted
                return wanted and len(calls) < most_calls

            async def caller() -> None:
                while more():
                    op = kv_op(len(calls), rng)
                    calls.append(op)  # no await before the call takes its number
                    await s.call(op[0], *op[1])

            async def killer() -> None:
                while more():
                    await asyncio.sleep(rng.uniform(0.001, 0.006))
                    proxy.kill_after(rng.randint(1, 4), rng.choice(("server", "client")))

            await asyncio.gather(*(caller() for _ in range(4)), killer())
            total = len(calls)
            assert s.seq == total
            assert s.stats().reconnects >= kills_wanted // 2, "streams should have been cut"
            checksum = await s.call("kv_checksum")
            count = await s.call("kv_count")
            status, info = daemon.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 200 and info["seq"] == total + 2  # nothing applied twice
            assert (checksum, count) == twin_checksum(calls)
            assert proxy.kills >= kills_wanted

    asyncio.run(run())


def test_session_replays_calls_a_sigkilled_cloudlet_lost(tmp_path: Path) -> None:
    """kill -9 loses what the daemon applied since its last checkpoint; the session
    still holds those calls (until the daemon reports them durable) and replays
    them, so the VM ends as if nothing had happened."""
    d = make_daemon(tmp_path, "fragile", checkpoint_interval_s=0.3).start()
    token = d.token("kim")
    rng = random.Random(3)
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def some_calls(s: Any, n: int) -> None:
        for _ in range(n):
            op = kv_op(len(calls), rng)
            calls.append(op)
            await s.call(op[0], *op[1])

    async def run() -> None:
        async with CloudletClient(token, endpoints=[d.endpoint]) as client, \
                client.session(KVSTORE, call_deadline_ms=30_000) as s:
            await some_calls(s, 50)
            await asyncio.sleep(1.0)  # checkpointed; the next answer says so (durable)
            await some_calls(s, 1)
            await some_calls(s, 300)  # most of these are not checkpointed yet ...
            d.kill()  # ... when the cloudlet dies
            d.start()
            await some_calls(s, 50)
            status, info = d.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 200 and info["seq"] == len(calls)
            assert s.stats().replayed > 0  # the journal filled the hole the kill left
            assert (await s.call("kv_checksum"), await s.call("kv_count")) == twin_checksum(calls)

    try:
        asyncio.run(run())
    finally:
        d.stop()


def test_session_follows_a_moved_vm_without_errors(two_daemons: tuple[Daemon, Daemon]) -> None:
    """The VM moves east -> west -> east while the application keeps calling; it
    sees no error, and the final state is that of a run with no move."""
    east, west = two_daemons
    token = east.token("dave")
    rng = random.Random(7)
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def run() -> None:
        # The client knows only `east`: following must come from the daemons.
        async with CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(KVSTORE, budget_ms=30) as s:
            done = asyncio.Event()

            async def caller() -> None:
                while not done.is_set():
                    op = kv_op(len(calls), rng)
                    calls.append(op)
                    await s.call(op[0], *op[1])
                    await asyncio.sleep(0.001)

            async def mover() -> None:
                moves = []
                for src, dst in ((east, west), (west, east)):
                    await asyncio.sleep(0.15)
                    status, body = await asyncio.to_thread(
                        src.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                        {"endpoint": dst.endpoint}, token=src.operator_token())
                    assert status == 200, body
                    moves.append(body)
                await asyncio.sleep(0.15)
                done.set()
                assert [m["to"] for m in moves] == ["west", "east"]
                assert all(m["downtime_ms"] < 1000 for m in moves)

            await asyncio.gather(caller(), caller(), mover())
            assert s.stats().moves_followed >= 2
            assert s.location.endpoint == east.endpoint
            assert (await s.call("kv_checksum"), await s.call("kv_count")) == twin_checksum(calls)
            status, info = east.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 200 and info["seq"] == len(calls) + 2
            status, body = west.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 410 and body["code"] == "vm_moved"
            assert body["details"]["endpoint"] == east.endpoint

    asyncio.run(run())


def test_attach_follows_a_vm_that_moved_before_the_session_started(
        two_daemons: tuple[Daemon, Daemon]) -> None:
    east, west = two_daemons
    token = east.token("erin")

    async def run() -> None:
        async with CloudletClient(token, endpoints=[east.endpoint]) as client:
            async with client.session(KVSTORE, keep=True) as s:
                await s.call("kv_put", 3, 33)
                vm_id = s.vm_id
            status, _ = east.request("POST", f"/v1/vms/{vm_id}/migrate",
                                     {"endpoint": west.endpoint}, token=east.operator_token())
            assert status == 200
            async with client.attach(vm_id, east.endpoint) as s2:
                # The old cloudlet answers 410 with the new address; the session goes there.
                assert await s2.call("kv_get", 3) == 33
                assert s2.location.endpoint == west.endpoint

    asyncio.run(run())


# --- errors -----------------------------------------------------------------------------


def test_auth_failures_are_typed(two_daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    east, _ = two_daemons
    stranger = make_daemon(tmp_path / "other-cluster", "stranger")  # another secret

    async def run() -> None:
        with pytest.raises(Unauthorized):
            CloudletClient("not-a-token", endpoints=[east.endpoint])
        # A token of another cluster trusts that cluster's cloudlets only: east cannot
        # prove it is one, so the token is never sent to it.
        async with CloudletClient(stranger.token("mallory"),
                                  endpoints=[east.endpoint]) as client:
            with pytest.raises(PeerUnverified):
                async with client.session(KVSTORE):
                    pass
        async with CloudletClient(east.token("alice"), endpoints=[east.endpoint]) as alice, \
                alice.session(KVSTORE, keep=True) as s:
            vm_id = s.vm_id
        async with CloudletClient(east.token("bob"), endpoints=[east.endpoint]) as bob:
            with pytest.raises(Forbidden):
                async with bob.attach(vm_id, east.endpoint):
                    pass

    asyncio.run(run())


def test_no_reachable_cloudlet_and_call_deadline(daemon: Daemon) -> None:
    token = daemon.token("frank")

    async def run() -> None:
        async with CloudletClient(token, endpoints=["http://127.0.0.1:9"]) as nowhere:
            with pytest.raises(NoCloudletAvailable):
                async with nowhere.session(KVSTORE):
                    pass
        proxy = ChaosProxy(daemon.port)
        await proxy.__aenter__()
        # The client knows the cloudlet only through the proxy, so when the proxy goes
        # the VM is out of reach (with another path, the session would find it).
        async with CloudletClient(token, endpoints=[proxy.endpoint]) as client, \
                client.session(KVSTORE) as s:
            assert await s.call("kv_put", 1, 1) == 1
            await proxy.__aexit__()
            with pytest.raises(CallTimeout):
                await s.call("kv_put", 2, 2, deadline_ms=300)

    asyncio.run(run())


# --- discovery --------------------------------------------------------------------------


def test_discovery_tracks_presence_and_a_sigkilled_daemon(mosquitto: str,
                                                          tmp_path: Path) -> None:
    a = make_daemon(tmp_path, "north", broker_url=mosquitto, mqtt_keepalive_s=2).start()
    b = make_daemon(tmp_path, "south", broker_url=mosquitto, mqtt_keepalive_s=2).start()
    host, port = address(mosquitto)
    try:
        async def run() -> None:
            async with CloudletClient(a.token("gina"), broker=mosquitto) as client, \
                    aiomqtt.Client(host, port, identifier="rtt-watcher") as watcher:
                await watcher.subscribe("cloudlet/v1/clients/gina/rtt", qos=1)
                names = {"north", "south"}
                assert await client.discovery.wait_for(
                    lambda d: names <= {c.node for c in d.online()}, 15)
                rtts = await client.prober.rtts()
                assert set(rtts) >= names and all(0 < v < 1000 for v in rtts.values())
                async with asyncio.timeout(10):
                    async for m in watcher.messages:  # what the placer reads
                        payload = msgpack.unpackb(m.payload)  # type: ignore[arg-type]
                        assert payload["client"] == "gina" and set(payload["rtt_ms"]) >= names
                        break
                # Rate-limited: asking again at once sends no probe.
                probed_at = dict(client.prober.last)
                await client.prober.rtts()
                assert client.prober.last == probed_at
                b.kill()  # SIGKILL: only the Last Will can tell
                assert await client.discovery.wait_for(
                    lambda d: "south" not in {c.node for c in d.online()}, 15)
                assert "north" in {c.node for c in client.discovery.online()}

        asyncio.run(run())
    finally:
        a.stop()
        b.kill()


# --- offload and local execution ------------------------------------------------------


def test_offload_remote_local_and_auto(daemon: Daemon, tmp_path: Path) -> None:
    async def run() -> None:
        async with CloudletClient(daemon.token("hana"), endpoints=[daemon.endpoint],
                                  policy="auto", local_store_dir=str(tmp_path / "local")) as c:
            remote = await c.offload(KVSTORE, "kv_put", [4, 44], policy="remote")
            local = await c.offload(KVSTORE, "kv_put", [4, 44], policy="local")
            assert remote.value == local.value == 1
            assert remote.where == "sdk1" and local.where == "local"
            seen = []
            for _ in range(8):
                out = await c.offload(KVSTORE, "kv_count", deadline_ms=5000)
                assert out.value >= 0 and out.decision.reason
                seen.append(out)
            # Unknowns are measured first, then the measured cheaper side wins.
            assert {o.where for o in seen[:2]} == {"sdk1", "local"}
            for o in seen[2:]:
                d = o.decision
                assert d.local_ms is not None and d.remote_ms is not None
                cheaper = "local" if d.local_ms < d.remote_ms else "sdk1"
                assert o.where == cheaper or "re-measuring" in d.reason
            bytes_out = await c.offload(KVSTORE, "kv_set", b"k=v", policy="remote")
            assert bytes_out.value == b""

    asyncio.run(run())


# --- light, clean, blocking -----------------------------------------------------------


def test_importing_the_sdk_pulls_in_neither_numpy_nor_wasmtime() -> None:
    code = ("import sys, mobile_client, mobile_client.sync, mobile_client.cli; "
            "heavy = [m for m in ('numpy', 'wasmtime', 'aiomqtt', 'edge_agent', 'cloudlet.vm') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_closing_leaves_no_task_socket_or_thread(daemon: Daemon) -> None:
    threads_before = live_threads()

    async def run() -> None:
        async with CloudletClient(daemon.token("ivy"), endpoints=[daemon.endpoint]) as client:
            async with client.session(KVSTORE) as s:
                await s.call("kv_put", 1, 2)
            await client.offload(KVSTORE, "kv_count")
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []

    asyncio.run(run())
    with BlockingClient(daemon.token("ivy"), endpoints=[daemon.endpoint]) as client:
        with client.session(KVSTORE) as s:
            assert s.call("kv_put", 5, 6) == 1
            assert s.call("kv_get", 5) == 6
        assert client.offload(KVSTORE, "kv_count").value == 0
    assert live_threads() == threads_before
    status, body = daemon.request("GET", "/v1/vms", token=daemon.token("ivy"))
    assert status == 200 and body["vms"] == []  # the offload VM was destroyed on close


# --- command line -----------------------------------------------------------------------


def test_cli_offload_and_session(daemon: Daemon) -> None:
    env = {**os.environ, "CLOUDLET_TOKEN": daemon.token("cli-user")}
    cli = [sys.executable, "-m", "cloudlet.cli"]
    out = subprocess.run([*cli, "offload", "--endpoint", daemon.endpoint, str(KVSTORE),
                          "kv_put", "7", "70"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1\n" and "latency" in out.stderr and "ms on sdk1" in out.stderr
    lines = "kv_put 1 10\nkv_get 1\nkv_set s:a=b\nkv_lookup s:a\nnope\n"
    out = subprocess.run([*cli, "session", "--endpoint", daemon.endpoint, str(KVSTORE)],
                         input=lines, capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.splitlines()[:4] == ["1", "10", "x:", "x:62"]
    assert out.stdout.splitlines()[4].startswith("error [bad_call]")
    assert out.returncode == 1 and "p50" in out.stderr
    out = subprocess.run([*cli, "offload", "--endpoint", daemon.endpoint, "--token", "junk",
                          str(KVSTORE), "kv_count"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "error [unauthorized]" in out.stderr
    assert "Traceback" not in out.stderr


def test_vdi_demo_runs(daemon: Daemon) -> None:
    env = {**os.environ, "CLOUDLET_TOKEN": daemon.token("demo")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "vdi_demo.py"),
                          "--endpoint", daemon.endpoint, "--interactions", "60"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "p50" in out.stdout and "p99" in out.stdout and "within" in out.stdout

