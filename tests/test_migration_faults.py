"""Live migration between real daemons, broken at each phase, with a client calling.

Each case runs two `cloudlet agent` processes, east (the source) and west (the
destination, reached through `MigrationProxy`), and a session that calls the VM
throughout. When the armed migration message goes by, the proxy SIGKILLs a
daemon, resets the connection, or stalls it until the deadlines expire; killed
daemons are restarted. Then: the VM lives on exactly one cloudlet (never both,
never neither), the one the commit point says, and its state equals that of a
twin that applied every call the application made exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from cloudlet.vm import VM, ImageStore, Snapshot, VMLimits
from mobile_client import CloudletClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, daemon_pair, make_daemon, sealed_body, stop_all
from tests.migration_proxy import MigrationProxy, Trigger
from tests.mqtt_brokers import address
from tests.waiting import async_wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KVSTORE = WORKLOADS / "kvstore.wasm"
SETTINGS: dict[str, Any] = {"migration_deadline_s": 1.5, "checkpoint_interval_s": 0.3}
SETTLE_S = 20.0  # a restarted destination asks the source once a second

# (message, before/after forwarding it, what breaks, where the VM must end up). The
# source decides as it sends `final`, while the destination takes the round in:
# from then on the VM is the destination's, which restores it from its rounds and
# the source's kept copy if the final round never arrived. "decided": where the
# source's record says when it died (its decision races the proxy's kill).
CASES = [
    ("offer", "before", "kill-destination", "east"),
    ("chunks", "after", "kill-destination", "east"),
    ("final", "before", "kill-destination", "west"),  # decided; the round never arrived
    ("ready", "before", "kill-destination", "west"),  # decided; Ready never came back
    ("ready", "after", "kill-destination", "west"),
    ("chunks", "after", "kill-source", "east"),
    ("final", "before", "kill-source", "decided"),  # killed while it decides, or before
    ("ready", "before", "kill-source", "decided"),
    ("commit", "before", "kill-source", "west"),  # the tombstone was written
    ("commit", "after", "kill-source", "west"),
    ("chunks", "after", "drop", "east"),
    ("round_end", "after", "drop", "east"),  # in doubt with a round on disk: asks, "no"
    ("ready", "before", "drop", "west"),  # decided: the destination asks, and lands it
    ("commit", "before", "drop", "west"),
    ("chunks", "after", "stall", "east"),
    ("final", "before", "stall", "west"),  # decided; the destination restores from disk
    # The source's decision cannot be made durable (its record is gone, as a full disk
    # would fail it): not committed; the destination is told to drop what it holds.
    ("round_end", "on-the-way", "lose-record", "east"),
]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    yield from daemon_pair(tmp_path, **SETTINGS)


class Twin:
    """The same calls on a local VM, once each, in order."""

    def __init__(self) -> None:
        self.vm = VM.create(ImageStore(None).add_file(KVSTORE), VMLimits(memory_bytes=64 << 20))

    def state(self, calls: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
        for fn, args in calls:
            self.vm.call(fn, *args)
        return self.vm.call("kv_checksum"), self.vm.call("kv_count")


def homes(daemons: dict[str, Daemon], token: str, vm_id: str) -> list[str]:
    """The cloudlets that serve the VM (200 to GET /v1/vms/ID)."""
    found = []
    for name, d in daemons.items():
        try:
            status, _ = d.request("GET", f"/v1/vms/{vm_id}", token=token, timeout_s=2)
        except OSError:
            continue
        if status == 200:
            found.append(name)
    return found


@pytest.mark.parametrize(("message", "when", "fault", "home"), CASES,
                         ids=[f"{f}-{w}-{m}" for m, w, f, _ in CASES])
def test_fault_at_each_phase(pair: tuple[Daemon, Daemon], message: str, when: str,
                             fault: str, home: str) -> None:
    east, west = pair
    daemons = {"east": east, "west": west}
    token = east.token("pat")
    rng = random.Random(f"{message}{when}{fault}")
    calls: list[tuple[str, tuple[int, ...]]] = []
    status, created = east.request("POST", "/v1/vms", {"image": upload(east, token)},
                                   token=token)
    assert status == 201, created
    vm_id = created["vm"]

    def kill(d: Daemon) -> None:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGKILL)

    def lose_record() -> None:
        # Written ahead in a worker thread as the migration starts: waited for here,
        # with the message held (this runs on the proxy's loop).
        deadline = time.monotonic() + 5
        while not (records := list((east.state_dir / "vms").glob(
                f"{vm_id}.moved.*.prepared"))) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert records, "no record written ahead of the decision"
        for record in records:
            record.unlink()

    action = {"kill-destination": lambda: kill(west), "kill-source": lambda: kill(east),
              "lose-record": lose_record}
    kind = fault if fault in ("drop", "stall") else "call"

    async def run() -> None:
        async with MigrationProxy(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint, west.endpoint]) as client, \
                client.attach(vm_id, east.endpoint, call_deadline_ms=60_000) as s:
            proxy.trigger = Trigger(message, when, action.get(fault, lambda: None), kind)
            done = asyncio.Event()

            async def caller() -> None:
                while not done.is_set():
                    key = rng.randrange(11)
                    op = (("kv_del", (key,)) if rng.random() < 0.2
                          else ("kv_put", (key, len(calls) * 31 + key)))
                    calls.append(op)
                    await s.call(op[0], *op[1])
                    await asyncio.sleep(0.002)

            async def break_a_migration() -> None:
                nonlocal home
                await async_wait_until(lambda: len(calls) >= 20)  # calls under way
                with contextlib.suppress(OSError):  # the source may die mid-request
                    await asyncio.to_thread(
                        east.request, "POST", f"/v1/vms/{vm_id}/migrate",
                        {"endpoint": proxy.endpoint}, token=east.operator_token(), timeout_s=30)
                with contextlib.suppress(TimeoutError):  # "after" acts a moment after forwarding
                    await async_wait_until(lambda: proxy.fired, 10)
                assert proxy.fired, f"{message} never went by: {proxy.seen}"
                victim = {"kill-destination": west, "kill-source": east}.get(fault)
                if victim is not None:  # wait until it is dead, then bring it back
                    assert victim.proc is not None
                    assert victim.proc.wait(10) == -signal.SIGKILL
                    if home == "decided":
                        home = "west" if source_decided(east, vm_id) else "east"
                    victim.kill()
                    victim.start()
                with contextlib.suppress(TimeoutError):
                    await async_wait_until(lambda: homes(daemons, token, vm_id) == [home],
                                           SETTLE_S, poll_s=0.1)
                assert homes(daemons, token, vm_id) == [home], (
                    f"the VM serves on {homes(daemons, token, vm_id)}, not [{home}]; "
                    f"messages: {proxy.seen}\neast: {east.log()}\nwest: {west.log()}")
                settled = len(calls)  # the session keeps calling where it lives now
                await async_wait_until(lambda: len(calls) >= settled + 20)
                done.set()

            try:
                await asyncio.gather(caller(), break_a_migration())
            except BaseException:
                print(f"east log:\n{east.log()}\nwest log:\n{west.log()}")  # for the report
                raise
            checksum, count = await s.call("kv_checksum"), await s.call("kv_count")
            assert homes(daemons, token, vm_id) == [home]  # never both, never neither
            assert (checksum, count) == Twin().state(calls)  # each call applied once
            status, info = daemons[home].request("GET", f"/v1/vms/{vm_id}", token=token)
            assert status == 200 and info["seq"] == len(calls) + 2

    asyncio.run(run())


def source_decided(source: Daemon, vm_id: str) -> bool:
    """Whether the (dead) source's record of the move says decided: its first byte,
    written after the kept round and before the flush (a killed process loses
    neither; a restart reads it the same way)."""
    for record in (source.state_dir / "vms").glob(f"{vm_id}.moved.*"):
        with record.open("rb") as f:
            if f.read(1) == b"!":
                return True
    return False


def upload(d: Daemon, token: str) -> str:
    status, body = d.request("POST", "/v1/images", raw=KVSTORE.read_bytes(), token=token)
    assert status == 201, body
    digest: str = body["digest"]
    return digest


def test_cloudlet_migrate_command_and_its_event(mosquitto: str, tmp_path: Path) -> None:
    """`cloudlet migrate VM --to NODE` finds the VM and the node through the broker;
    the outcome, with its measurements, goes to the source's events topic, and the
    VM's retained location follows it."""
    east = make_daemon(tmp_path, "east", broker_url=mosquitto).start()
    west = make_daemon(tmp_path, "west", broker_url=mosquitto).start()
    host, port = address(mosquitto)
    try:
        token = east.token("quinn")
        status, created = east.request("POST", "/v1/vms", {"image": upload(east, token)},
                                       token=token)
        assert status == 201
        vm_id = created["vm"]
        assert east.request("POST", f"/v1/vms/{vm_id}/call",
                            {"fn": "kv_put", "args": [1, 7]}, token=token)[0] == 200

        async def run() -> tuple[dict[str, Any], dict[str, Any]]:
            async with aiomqtt.Client(host, port, identifier="migrate-watcher") as watch:
                await watch.subscribe("cloudlet/v1/nodes/east/events", qos=1)
                await asyncio.sleep(1.0)  # both daemons' presence is retained by now
                out = await asyncio.to_thread(subprocess.run, [
                    sys.executable, "-m", "cloudlet.cli", "migrate", vm_id, "--to", "west",
                    "--broker", mosquitto, "--state-dir", str(tmp_path), "--json"],
                    capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stderr
                async with asyncio.timeout(10):
                    async for m in watch.messages:
                        event = sealed_body(m.payload)  # type: ignore[arg-type]
                        if event.get("op") == "migrated":
                            return json.loads(out.stdout), event
            raise AssertionError("no migrated event")

        stats, event = asyncio.run(run())
        assert stats["to"] == "west" and stats["mode"] == "live" and stats["rounds"] >= 2
        assert event["ok"] and event["vm"] == vm_id and event["bytes_sent"] == stats["bytes_sent"]
        assert west.request("POST", f"/v1/vms/{vm_id}/call", {"fn": "kv_get", "args": [1]},
                            token=token)[1]["result"] == 7
        status, body = east.request("GET", f"/v1/vms/{vm_id}", token=token)
        assert status == 410 and body["details"]["node"] == "west"
        out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "migrate", "no-such-vm",
                              "--to", "west", "--broker", mosquitto, "--state-dir",
                              str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "error [vm_not_found]" in out.stderr
    finally:
        east.stop()
        west.stop()


def test_auto_converge_spaces_a_hot_vms_calls_between_real_daemons(
        pair: tuple[Daemon, Daemon]) -> None:
    """A VM dirtying memory faster than a 64 Mbit/s link drains it, migrated live
    between two daemons with a session calling throughout: the source must space its
    calls (the daemon's pacer, not just the state machine's event), keep the bytes
    within the issue's 1.1x, lift the spacing with the move, and lose no call."""
    from cloudlet.linkproxy import shaped_link

    east, west = pair
    token = east.token("pat")
    memhog = WORKLOADS / "memhog.wasm"
    limits = {"memory_bytes": 17 << 20, "deadline_ms": 100}

    async def run() -> None:
        async with shaped_link("127.0.0.1", west.port, 64) as link, \
                CloudletClient(token, endpoints=[east.endpoint]) as client, \
                client.session(memhog, limits=limits, call_deadline_ms=60_000) as s:
            assert await s.call("hog_grow", 16) >= 16
            pages = await s.call("hog_pages")
            for seed in range(40):  # dense enough that zstd cannot hide the dirtying
                await s.call("hog_dirty", pages, seed)
            done = asyncio.Event()
            gaps: list[float] = []

            async def dirtier() -> None:
                seed, last = 1000, time.monotonic()
                while not done.is_set():
                    await s.call("hog_dirty", 8, seed)  # 32 KiB a call, ~1,000 calls/s
                    now = time.monotonic()
                    gaps.append(now - last)
                    seed, last = seed + 1, now

            task = asyncio.create_task(dirtier())
            await async_wait_until(lambda: len(gaps) >= 100)  # the VM is busy
            status, answer = await asyncio.to_thread(
                east.request, "POST", f"/v1/vms/{s.vm_id}/migrate",
                {"endpoint": f"http://127.0.0.1:{link.port}"}, token=east.operator_token(),
                timeout_s=60)
            assert status == 200, answer
            moved = len(gaps)
            await async_wait_until(lambda: len(gaps) >= moved + 100)  # and busy after
            done.set()
            await task
            print("auto-converge:", {k: answer[k] for k in (
                "max_call_interval_s", "stop_reason", "rounds", "bytes_sent")})
            assert answer["max_call_interval_s"] >= 0.005, answer
            assert answer["stop_reason"] is not None
            assert answer["bytes_sent"] <= 1.1 * answer["overlay_plus_dirty_bytes"], answer
            assert max(gaps) >= answer["max_call_interval_s"] * 0.9  # the pacer acted
            assert s.moves_followed == 1
            status, info = west.request("GET", f"/v1/vms/{s.vm_id}", token=token)
            assert status == 200 and info["seq"] == s.seq  # no call lost or doubled
            after = []
            for i in range(21):  # the spacing went with the migration
                t0 = time.monotonic()
                await s.call("hog_dirty", 1, i)
                after.append(time.monotonic() - t0)
            assert sorted(after)[10] < answer["max_call_interval_s"], after

    asyncio.run(run())


# Loaded by the destination's interpreter at start-up (`sitecustomize` on its
# PYTHONPATH): the copy of the final round into the VM, the only step after `Ready`,
# fails once as a host out of memory would fail it. Nothing else is changed.
FAIL_THE_FINAL_COPY = '''
from cloudlet.vm import machine

_prepare, _apply, _armed = machine.VM.prepare_delta, machine.VM.apply_delta, set()


def prepare_delta(self, delta):
    _prepare(self, delta)
    _armed.add(id(self))  # the destination's final round: copied after `Ready`


def apply_delta(self, delta):
    if id(self) in _armed:
        _armed.discard(id(self))
        self.failed = "injected: the host ran out of memory copying the final round"
        raise MemoryError("injected")
    _apply(self, delta)


machine.VM.prepare_delta, machine.VM.apply_delta = prepare_delta, apply_delta
'''


def test_a_final_round_that_fails_to_copy_after_ready_is_restored_by_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source committed on `Ready`; then the destination failed to write the
    final round into the VM. The VM is failed there (its calls say so), exists at
    no other cloudlet, and its arrival's rounds outlive the first checkpoint (which
    writes nothing of a failed VM): a restart of the destination restores it from
    them, with every call the source applied, each once. Calls go on through the
    migration, so the final round carries some of them: a restore that missed it
    would miss those calls."""
    east = make_daemon(tmp_path, "east", **SETTINGS).start()
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_THE_FINAL_COPY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(inject), os.environ.get("PYTHONPATH")) if p))
    west = make_daemon(tmp_path, "west", **SETTINGS).start()
    monkeypatch.undo()  # the restart below runs without it
    daemons = {"east": east, "west": west}
    try:
        token = east.token("pat")
        status, created = east.request("POST", "/v1/vms", {"image": upload(east, token)},
                                       token=token)
        assert status == 201, created
        vm_id = created["vm"]
        applied: list[tuple[str, tuple[int, ...]]] = []
        refused: list[tuple[int, Any]] = []

        def call_until_moved() -> None:
            """Calls at the source until one is not applied there (it moved)."""
            for i in range(100_000):
                op = ("kv_del", (i % 11,)) if i % 5 == 4 else ("kv_put", (i % 11, i * 31))
                status, body = east.request("POST", f"/v1/vms/{vm_id}/call",
                                            {"fn": op[0], "args": list(op[1])}, token=token)
                if status != 200:
                    refused.append((status, body))
                    return
                applied.append(op)

        async def migrate_while_calling() -> dict[str, Any]:
            caller = asyncio.create_task(asyncio.to_thread(call_until_moved))
            await async_wait_until(lambda: len(applied) >= 30)
            status, answer = await asyncio.to_thread(
                east.request, "POST", f"/v1/vms/{vm_id}/migrate",
                {"endpoint": west.endpoint}, token=east.operator_token(), timeout_s=60)
            assert status == 200 and answer["mode"] == "live", answer
            await asyncio.wait_for(caller, 30)
            assert refused and refused[0][0] == 410, refused  # moved, not failed
            moved: dict[str, Any] = answer
            return moved

        answer = asyncio.run(migrate_while_calling())
        final = answer["round_stats"][-1]
        assert final["final"] and final["data_chunks"] > 0, answer["round_stats"]
        status, body = west.request("POST", f"/v1/vms/{vm_id}/call",
                                    {"fn": "kv_count", "args": []}, token=token)
        assert body.get("code") == "vm_failed", (status, body, west.log())
        assert east.request("GET", f"/v1/vms/{vm_id}", token=token)[0] == 410

        # Past the first checkpoint's time (0.3 s after the landing): the rounds stay.
        def full_log() -> str:
            return west.log_path.read_text(errors="replace")

        asyncio.run(async_wait_until(lambda: "its incoming rounds are kept" in full_log(), 10))
        incoming = west.state_dir / "incoming"
        assert [p.name for p in incoming.iterdir()] == [answer["migration_id"]], full_log()
        assert not (west.state_dir / "vms" / f"{vm_id}.snap").exists()

        assert west.stop() == 0  # as an operator would, seeing the failed VM
        west.start()  # without the injection
        with contextlib.suppress(TimeoutError):
            asyncio.run(async_wait_until(lambda: homes(daemons, token, vm_id) == ["west"],
                                         SETTLE_S, poll_s=0.1))
        assert homes(daemons, token, vm_id) == ["west"], west.log()
        status, info = west.request("GET", f"/v1/vms/{vm_id}", token=token)
        assert status == 200 and info["seq"] == len(applied), (info, len(applied))
        state = [west.request("POST", f"/v1/vms/{vm_id}/call", {"fn": fn, "args": []},
                              token=token)[1]["result"] for fn in ("kv_checksum", "kv_count")]
        assert tuple(state) == Twin().state(applied)
        # Its own checkpoint replaces the rounds once it runs healthy here.
        asyncio.run(async_wait_until(lambda: not any(incoming.iterdir()), 10))
    finally:
        stop_all([east, west])


def test_a_destination_that_dies_before_writing_the_final_round_fetches_the_sources_copy(
        pair: tuple[Daemon, Daemon]) -> None:
    """The destination writes its copy of the final round only after the landing (the
    source keeps one with its decision, in the same flush). Killed after `Ready`, as
    the `Commit` comes: its restart finds no final round on disk, asks the source,
    which committed, fetches the kept copy, restores the VM with every call applied
    once, and then lets the source drop its copy. Only that destination may read
    or release it: it is the VM's memory."""
    east, west = pair
    daemons = {"east": east, "west": west}
    token = east.token("pat")
    status, created = east.request("POST", "/v1/vms", {"image": upload(east, token)},
                                   token=token)
    assert status == 201, created
    vm_id = created["vm"]
    calls: list[tuple[str, tuple[int, ...]]] = []
    rng = random.Random("kept-round")

    def kept(as_node: str, method: str = "GET") -> tuple[int, Any]:
        return east.request(method, f"/v1/peer/migrations/{migration_id}/final",
                            token=east.peer_token(as_node))

    async def run() -> None:
        nonlocal migration_id
        async with MigrationProxy(west.port) as proxy, \
                CloudletClient(token, endpoints=[east.endpoint, west.endpoint]) as client, \
                client.attach(vm_id, east.endpoint, call_deadline_ms=60_000) as s:
            assert west.proc is not None
            # Killed as the `Commit` comes, which it never receives: `Ready` was sent.
            proxy.trigger = Trigger("commit", "before",
                                    lambda: os.kill(west.proc.pid, signal.SIGKILL), "call")
            done = asyncio.Event()

            async def caller() -> None:
                while not done.is_set():
                    key = rng.randrange(11)
                    op = ("kv_put", (key, len(calls) * 31 + key))
                    calls.append(op)
                    await s.call(op[0], *op[1])
                    await asyncio.sleep(0.002)

            async def kill_then_restart() -> None:
                nonlocal migration_id
                await async_wait_until(lambda: len(calls) >= 20)
                status, answer = await asyncio.to_thread(
                    east.request, "POST", f"/v1/vms/{vm_id}/migrate",
                    {"endpoint": proxy.endpoint}, token=east.operator_token(), timeout_s=30)
                assert status == 200 and answer["outcome"] == "committed", answer
                migration_id = answer["migration_id"]
                assert west.proc is not None and west.proc.wait(10) == -signal.SIGKILL
                west.kill()
                round_dir = west.state_dir / "incoming" / migration_id
                assert (round_dir / "final.snap").read_bytes()[:64] == bytes(64)  # never came

                # Only the destination reads the kept copy, and only it releases it.
                status, data = await asyncio.to_thread(kept, "west")
                assert status == 200, data
                snap = Snapshot.from_bytes(data)
                assert snap.vm_id == vm_id and snap.kind == "delta" and snap.annex
                for outsider in ("north",):
                    status, body = await asyncio.to_thread(kept, outsider)
                    assert status == 403 and body["code"] == "forbidden", body
                    status, body = await asyncio.to_thread(kept, outsider, "DELETE")
                    assert status == 404 and body["code"] == "kept_round_not_found", body
                for other in (token, east.operator_token()):  # the owner; an operator
                    status, body = await asyncio.to_thread(
                        east.request, "GET", f"/v1/peer/migrations/{migration_id}/final",
                        token=other)
                    assert status == 403 and body["code"] == "forbidden", body
                assert (await asyncio.to_thread(kept, "west"))[0] == 200  # still kept

                west.start()
                with contextlib.suppress(TimeoutError):
                    await async_wait_until(lambda: homes(daemons, token, vm_id) == ["west"],
                                           SETTLE_S, poll_s=0.1)
                assert homes(daemons, token, vm_id) == ["west"], west.log()
                assert "fetched the final round" in west.log()
                # Flushed at the destination now: the source's copy went.
                await async_wait_until(lambda: kept("west")[0] == 404, 10)
                settled = len(calls)
                await async_wait_until(lambda: len(calls) >= settled + 20)
                done.set()

            await asyncio.gather(caller(), kill_then_restart())
            checksum, count = await s.call("kv_checksum"), await s.call("kv_count")
            assert (checksum, count) == Twin().state(calls)  # each call applied once
            status, info = west.request("GET", f"/v1/vms/{vm_id}", token=token)
            assert status == 200 and info["seq"] == len(calls) + 2

    migration_id = ""
    asyncio.run(run())
    records = list((east.state_dir / "vms").glob(f"{vm_id}.moved*"))
    assert records and all(b"kept_at" not in p.read_bytes()[:4096] for p in records)
