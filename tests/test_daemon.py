"""The cloudlet daemon's data plane, tested against real daemon processes on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import pytest

from cloudlet.trust.client_tokens import ClientTokens
from cloudlet.trust.cluster import cluster_tokens
from cloudlet.vm import VM, ImageStore, Snapshot
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, make_daemon
from tests.waiting import wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

KV = (WORKLOADS / "kvstore.wasm").read_bytes()
HOG = (WORKLOADS / "memhog.wasm").read_bytes()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = make_daemon(tmp_path, request_deadline_s=2.0, max_vms=3, max_image_mib=1,
                    max_request_kib=64).start()
    yield d
    d.kill()


def upload(d: Daemon, token: str, wasm: bytes = KV) -> str:
    status, body = d.request("POST", "/v1/images", raw=wasm, token=token)
    assert status == 201, body
    digest: str = body["digest"]
    return digest


def create(d: Daemon, token: str, digest: str, **extra: object) -> str:
    status, body = d.request("POST", "/v1/vms", {"image": digest, **extra}, token=token)
    assert status == 201, body
    vm: str = body["vm"]
    return vm


def call(d: Daemon, token: str, vm: str, fn: str, *args: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    return d.request("POST", f"/v1/vms/{vm}/call", {"fn": fn, "args": list(args)}, token=token)


def checkpoint_seq(d: Daemon, vm: str) -> int | None:
    """The seq of the VM's checkpoint on disk (written whole, then renamed into
    place), None before the first."""
    try:
        return Snapshot.read(d.state_dir / "vms" / f"{vm}.snap").seq
    except FileNotFoundError:
        return None


def healthy(d: Daemon) -> bool:
    status, body = d.request("GET", "/health")
    return status == 200 and body["status"] == "ok"


def test_nothing_answers_without_credentials_but_health(daemon: Daemon) -> None:
    assert healthy(daemon)
    for method, path in (("GET", "/metrics"), ("GET", "/v1/images"), ("POST", "/v1/images"),
                         ("GET", "/v1/vms"), ("POST", "/v1/vms"), ("GET", "/v1/vms/x"),
                         ("POST", "/v1/vms/x/call"), ("GET", "/v1/vms/x/snapshot"),
                         ("DELETE", "/v1/vms/x"), ("GET", "/v1/peer/vms")):
        status, body = daemon.request(method, path)
        assert (status, body["code"]) == (401, "unauthorized"), (method, path)


def test_bad_credentials(daemon: Daemon) -> None:
    ours = cluster_tokens(daemon.cluster_dir)
    other_cluster = ClientTokens(b"x" * 32, ours.authority_public_key).issue("alice", 3600)
    expired = ours.issue("alice", 10, now=time.time() - 3600)
    for token in (other_cluster, expired, "garbage", daemon.token("alice") + "x"):
        status, body = daemon.request("GET", "/v1/vms", token=token)
        assert (status, body["code"]) == (401, "unauthorized"), token
    status, body = daemon.request("GET", "/v1/vms", headers={"Authorization": "Basic abc"})
    assert status == 401


def test_a_vm_answers_only_its_owner(daemon: Daemon) -> None:
    alice, bob = daemon.token("alice"), daemon.token("bob")
    vm = create(daemon, alice, upload(daemon, alice))
    for method, path, body in (("POST", f"/v1/vms/{vm}/call", {"fn": "kv_count"}),
                               ("GET", f"/v1/vms/{vm}", None),
                               ("GET", f"/v1/vms/{vm}/snapshot", None),
                               ("DELETE", f"/v1/vms/{vm}", None)):
        status, answer = daemon.request(method, path, body, token=bob)
        assert (status, answer["code"]) == (403, "forbidden"), path
    assert daemon.request("GET", "/v1/vms", token=bob)[1]["vms"] == []
    assert call(daemon, alice, vm, "kv_count") == (200, {"result": 0, "seq": 1})
    # peers see every VM; clients cannot use peer routes
    assert daemon.request("GET", "/v1/peer/vms", token=alice)[0] == 403
    status, body = daemon.request("GET", "/v1/peer/vms", token=daemon.peer_token())
    assert status == 200 and [v["vm"] for v in body["vms"]] == [vm]


def test_vm_lifecycle_over_http(daemon: Daemon, tmp_path: Path) -> None:
    alice = daemon.token("alice")
    digest = upload(daemon, alice)
    assert daemon.request("GET", "/v1/images", token=alice)[1]["images"] == [digest]
    vm = create(daemon, alice, digest, limits={"memory_bytes": 8 << 20})
    assert call(daemon, alice, vm, "kv_put", 7, 70) == (200, {"result": 1, "seq": 1})
    status, body = daemon.request("POST", f"/v1/vms/{vm}/call",
                                  {"fn": "kv_set", "data": b"k=v"}, token=alice)
    assert (status, body) == (200, {"data": b"", "seq": 2})
    status, info = daemon.request("GET", f"/v1/vms/{vm}", token=alice,
                                  headers={"Accept": "application/json"})
    assert status == 200 and info["seq"] == 2 and info["limits"]["memory_bytes"] == 8 << 20
    # The snapshot is the real thing: it restores here, in this process.
    status, raw = daemon.request("GET", f"/v1/vms/{vm}/snapshot", token=alice)
    assert status == 200
    copy = VM.restore(ImageStore(tmp_path / "store").add(KV), Snapshot.from_bytes(raw))
    assert copy.seq == 2 and copy.call("kv_get", 7) == 70
    assert daemon.request("DELETE", f"/v1/images/{digest}", token=alice)[0] == 409
    assert daemon.request("DELETE", f"/v1/vms/{vm}", token=alice)[0] == 204
    assert call(daemon, alice, vm, "kv_count")[0] == 404
    assert daemon.request("DELETE", f"/v1/images/{digest}", token=alice)[0] == 204


def test_websocket_stream(daemon: Daemon) -> None:
    alice = daemon.token("alice")
    vm = create(daemon, alice, upload(daemon, alice))

    async def session() -> list[dict]:  # type: ignore[type-arg]
        headers = {"Authorization": f"Bearer {alice}"}
        async with aiohttp.ClientSession(headers=headers) as s, \
                s.ws_connect(f"{daemon.endpoint}/v1/vms/{vm}/stream") as ws:
            replies = []
            for msg in ({"id": 1, "fn": "kv_put", "args": [1, 5]},
                        {"id": 2, "fn": "kv_get", "args": [1]},
                        {"id": 3, "fn": "kv_set", "data": b"a=b"},
                        {"id": 4, "fn": "nope"},
                        {"id": 5, "fn": "kv_put", "args": ["x", 1]}):
                await ws.send_bytes(msgpack.packb(msg))
                replies.append(msgpack.unpackb(await ws.receive_bytes()))
            await ws.send_bytes(b"\xc1")
            replies.append(msgpack.unpackb(await ws.receive_bytes()))
            await ws.send_str("hello")
            replies.append(msgpack.unpackb(await ws.receive_bytes()))
            return replies

    r = asyncio.run(session())
    assert r[0] == {"id": 1, "result": 1, "seq": 1}
    assert r[1] == {"id": 2, "result": 5, "seq": 2}
    assert r[2] == {"id": 3, "data": b"", "seq": 3}
    assert r[3]["error"]["code"] == "bad_call" and r[3]["id"] == 4
    assert r[4]["error"]["code"] == "malformed_request"
    assert r[5]["error"]["code"] == "malformed_request"
    assert r[6]["error"]["code"] == "malformed_request"
    assert call(daemon, alice, vm, "kv_get", 1) == (200, {"result": 5, "seq": 4})


def test_websocket_routes_refuse_plain_requests_with_a_typed_error(daemon: Daemon) -> None:
    """Found by the OpenAPI fuzz (tests/test_openapi_fuzz.py): a GET without the
    WebSocket handshake got aiohttp's bare text/plain 400, not an `Error`."""
    alice = daemon.token("alice")
    vm = create(daemon, alice, upload(daemon, alice))
    for path, token in ((f"/v1/vms/{vm}/stream", alice),
                        ("/v1/peer/migrate?endpoint=http://127.0.0.1:1", daemon.peer_token())):
        status, body = daemon.request("GET", path, token=token)  # decoded only if msgpack
        assert (status, body["code"]) == (400, "malformed_request"), (path, body)
    assert call(daemon, alice, vm, "kv_put", 1, 1) == (200, {"result": 1, "seq": 1})


def test_bad_input_gets_typed_errors_and_leaves_the_daemon_healthy(daemon: Daemon) -> None:
    alice = daemon.token("alice")
    digest = upload(daemon, alice)
    vm = create(daemon, alice, digest)
    cases = [
        (("POST", "/v1/images"), {"raw": b"not wasm"}, 400, "image_rejected"),
        (("POST", "/v1/images"), {"raw": KV, "headers": {"X-Image-Digest": "0" * 64}}, 400,
         "image_rejected"),
        (("POST", "/v1/images"), {"raw": b"\0" * (2 << 20)}, 413, "image_too_large"),
        (("POST", "/v1/vms"), {"raw": b"\xc1"}, 400, "malformed_request"),
        (("POST", "/v1/vms"), {"body": [1, 2]}, 400, "malformed_request"),
        (("POST", "/v1/vms"), {"body": {"image": "f" * 64}}, 404, "image_not_found"),
        (("POST", "/v1/vms"), {"body": {"image": digest, "limits": {"memory_bytes": 5}}}, 400,
         "invalid_argument"),
        (("POST", "/v1/vms"), {"body": {"image": digest, "limits": {"x": 1}}}, 400, "bad_call"),
        (("POST", f"/v1/vms/{vm}/call"), {"raw": b"\x93garbage"}, 400, "malformed_request"),
        (("POST", f"/v1/vms/{vm}/call"), {"body": {"args": [1]}}, 400, "malformed_request"),
        (("POST", f"/v1/vms/{vm}/call"), {"body": {"fn": "kv_put", "args": [1]}}, 400,
         "bad_call"),
        (("POST", f"/v1/vms/{vm}/call"), {"body": {"fn": "kv_put", "args": [1, True]}}, 400,
         "malformed_request"),
        (("POST", f"/v1/vms/{vm}/call"), {"body": {"fn": "kv_set", "data": b"x" * 70000}}, 413,
         "request_too_large"),
        (("POST", "/v1/vms/nope/call"), {"body": {"fn": "kv_count"}}, 404, "vm_not_found"),
        (("DELETE", "/v1/images/" + "a" * 64), {}, 404, "image_not_found"),
    ]
    for (method, path), kwargs, status, code in cases:
        got_status, body = daemon.request(method, path, token=alice, **kwargs)  # type: ignore[arg-type]
        assert (got_status, body["code"]) == (status, code), (path, kwargs, body)
    assert healthy(daemon)
    assert call(daemon, alice, vm, "kv_put", 1, 1) == (200, {"result": 1, "seq": 1})


def test_slow_client_is_cut_off(daemon: Daemon) -> None:
    """A client that sends headers and then trickles (or stalls) its body gets a timeout
    answer after the request deadline, and other clients are served meanwhile."""
    alice = daemon.token("alice")
    with socket.create_connection(("127.0.0.1", daemon.port)) as slow:
        slow.sendall(b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     b"Authorization: Bearer " + alice.encode() + b"\r\n\r\nabc")
        assert healthy(daemon)  # not blocked by the slow one
        slow.settimeout(10)
        answer = slow.recv(4096)
    assert b" 408 " in answer.split(b"\r\n")[0] and b"request_timeout" in answer
    assert healthy(daemon)


def test_runaway_guest_is_stopped_and_others_continue(daemon: Daemon) -> None:
    alice = daemon.token("alice")
    hog = create(daemon, alice, upload(daemon, alice, HOG), limits={"deadline_ms": 40})
    kv = create(daemon, alice, upload(daemon, alice))
    status, body = call(daemon, alice, hog, "hog_spin")
    assert (status, body["code"]) == (422, "vm_deadline_exceeded")
    status, body = call(daemon, alice, hog, "hog_trap", 1)
    assert (status, body["code"]) == (422, "vm_trapped")
    assert call(daemon, alice, kv, "kv_count") == (200, {"result": 0, "seq": 1})
    assert call(daemon, alice, hog, "add", 1, 2) == (200, {"result": 3, "seq": 3})
    # a long-deadline VM runs off the event loop: its spin does not block others
    slow = create(daemon, alice, upload(daemon, alice, HOG),
                  limits={"deadline_ms": 1500, "fuel_per_call": 10**12})

    async def both() -> tuple[bool, tuple[int, dict]]:  # type: ignore[type-arg]
        loop = asyncio.get_running_loop()
        spin = loop.run_in_executor(None, call, daemon, alice, slow, "hog_spin")
        await asyncio.sleep(0.2)  # the quick call comes while the spin runs
        quick = await loop.run_in_executor(None, call, daemon, alice, kv, "kv_count")
        spin_ran_on = not spin.done()
        await spin
        return spin_ran_on, quick

    # The quick call was answered while the spin still ran (until its 1.5 s deadline).
    spin_ran_on, quick = asyncio.run(both())
    assert quick[0] == 200 and spin_ran_on


def test_capacity_is_enforced(daemon: Daemon) -> None:
    alice = daemon.token("alice")
    digest = upload(daemon, alice)
    for _ in range(3):
        create(daemon, alice, digest)
    status, body = daemon.request("POST", "/v1/vms", {"image": digest}, token=alice)
    assert (status, body["code"]) == (503, "capacity_exceeded")


def test_restart_keeps_vms_and_their_sequence(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, checkpoint_interval_s=60.0).start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        for k in range(5):
            call(d, alice, vm, "kv_put", k, k * 10)
        assert d.stop() == 0  # SIGTERM: checkpoint everything, exit cleanly
        d.start()
        assert call(d, alice, vm, "kv_get", 4) == (200, {"result": 40, "seq": 6})
        assert call(d, alice, vm, "kv_count") == (200, {"result": 5, "seq": 7})
    finally:
        d.kill()


def test_kill_9_loses_at_most_one_checkpoint_interval(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, checkpoint_interval_s=0.3).start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        for k in range(20):
            call(d, alice, vm, "kv_put", k, k)
        assert wait_until(lambda: checkpoint_seq(d, vm) == 20)  # everything is checkpointed
        d.kill()  # SIGKILL: no chance to checkpoint at exit
        d.start()
        status, body = call(d, alice, vm, "kv_count")
        assert (status, body) == (200, {"result": 20, "seq": 21})
    finally:
        d.kill()


def test_unreadable_checkpoints_are_kept_aside(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    (d.state_dir / "vms").mkdir(parents=True)
    (d.state_dir / "vms" / "broken.snap").write_bytes(b"CLDSNAP\ngarbage")
    d.start()
    try:
        assert healthy(d)
        assert (d.state_dir / "vms" / "broken.unreadable").exists()
    finally:
        d.kill()


def test_metrics(daemon: Daemon) -> None:
    alice = daemon.token("alice")
    vm = create(daemon, alice, upload(daemon, alice))
    call(daemon, alice, vm, "kv_count")
    call(daemon, alice, vm, "nope")
    status, text = daemon.request("GET", "/metrics", token=alice)
    assert status == 200
    lines = text.decode().splitlines()
    assert "cloudlet_vms 1.0" in lines
    assert 'cloudlet_calls_total{outcome="ok",transport="http"} 1.0' in lines
    assert any(ln.startswith('cloudlet_errors_total{code="bad_call"}') for ln in lines)
    assert any(ln.startswith("cloudlet_call_latency_seconds_bucket") for ln in lines)
    assert any(ln.startswith("cloudlet_vm_memory_bytes") for ln in lines)


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    for text, needle in (('[node]\nnmae = "x"\n', "unknown key 'nmae'"),
                         ("[node]\nport = \"80\"\n", "port must be a int"),
                         ("[node]\nport = 99999\n", "port"),
                         ("[nodes]\n", "unknown table"),
                         ("[node\n", "not valid TOML"),
                         ('[node]\nsecret_file = "/nope"\n', "no such file")):
        bad.write_text(text)
        out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "agent", "--config", str(bad)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and needle in out.stderr and str(bad) in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "cloudlet.cli", "agent", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_docs_cover_every_setting_and_route() -> None:
    import re

    import yaml  # type: ignore[import-untyped]

    from edge_agent.config import FIELDS
    from tests.conftest import ROOT

    doc = (ROOT / "docs" / "daemon.md").read_text()
    for name in FIELDS:
        assert f"`{name}`" in doc, f"docs/daemon.md does not document {name}"
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    source = (ROOT / "edge_agent" / "app.py").read_text()
    routes = set(re.findall(r'add_(get|post|delete)\("([^"]+)"', source))
    for method, path in routes:
        assert method in spec["paths"][path], f"openapi.yaml lacks {method.upper()} {path}"


def test_docs_settings_table_shows_each_default() -> None:
    """The settings table's type and default columns are those of `NodeConfig`."""
    import re

    from edge_agent.config import FIELDS
    from tests.conftest import ROOT

    doc = (ROOT / "docs" / "daemon.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`) \| (\w+) \| `([^`]*)` \|", doc, flags=re.M)
    shown = {name: (typ, default) for names, typ, default in rows
             for name in re.findall(r"`(\w+)`", names)}
    assert set(shown) == set(FIELDS), set(shown) ^ set(FIELDS)
    for name, f in FIELDS.items():
        default = f.default
        want = (str(default).lower() if isinstance(default, bool)
                else '""' if default == "" else str(default))
        assert shown[name] == (str(f.type), want), (name, shown[name])


def test_timed_out_requests_never_let_two_threads_into_a_vm(tmp_path: Path) -> None:
    """Calls queued behind a long call time out while the guest may be running; the VM
    must stay consistent (a second thread in one wasmtime store corrupts it)."""
    d = make_daemon(tmp_path, request_deadline_s=1.0).start()
    try:
        alice = d.token("alice")
        digest = upload(d, alice, HOG)
        status, body = d.request("POST", "/v1/vms", {"image": digest,
                                 "limits": {"deadline_ms": 5000}}, token=alice)
        assert (status, body["code"]) == (400, "bad_call")  # over the request deadline
        vm = create(d, alice, digest, limits={"deadline_ms": 800, "fuel_per_call": 10**12})

        async def overlap() -> tuple[list[int], tuple[int, dict]]:  # type: ignore[type-arg]
            loop = asyncio.get_running_loop()
            # Two spins: the second starts at ~0.8 s and its request times out at 1 s
            # while its guest runs on until ~1.6 s. A call arriving at 1.15 s must wait
            # for that guest, not enter the same store beside it.
            spins = [loop.run_in_executor(None, call, d, alice, vm, "hog_spin")
                     for _ in range(2)]
            await asyncio.sleep(1.15)
            late = await loop.run_in_executor(None, call, d, alice, vm, "add", 2, 3)
            return [status for status, _ in await asyncio.gather(*spins)], late

        statuses, late = asyncio.run(overlap())
        assert set(statuses) <= {408, 422} and 408 in statuses
        assert late[0] == 200 and late[1]["result"] == 5, late
        assert call(d, alice, vm, "hog_trap", 0)[1]["result"] == 7
        assert healthy(d)
    finally:
        d.kill()


def test_destroyed_vms_stay_destroyed_across_checkpoints(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, checkpoint_interval_s=0.1, vm_memory_mib=64).start()
    try:
        alice = d.token("alice")
        digest = upload(d, alice, HOG)
        destroyed = []
        for i in range(8):
            vm = create(d, alice, digest)
            call(d, alice, vm, "hog_grow", 16)
            call(d, alice, vm, "hog_fill", 0, 4096, i + 1)  # big checkpoints: slow writes
            time.sleep(0.02 * i)
            assert d.request("DELETE", f"/v1/vms/{vm}", token=alice)[0] == 204
            destroyed.append(vm)
        assert d.stop() == 0
        d.start()
        assert d.request("GET", "/v1/vms", token=alice)[1]["vms"] == []
    finally:
        d.kill()


def test_a_failing_checkpoint_write_does_not_stop_the_daemon(tmp_path: Path) -> None:
    d = make_daemon(tmp_path, checkpoint_interval_s=0.2).start()
    try:
        alice = d.token("alice")
        vm = create(d, alice, upload(d, alice))
        snap = d.state_dir / "vms" / f"{vm}.snap"
        assert wait_until(snap.exists)  # its first checkpoint
        snap.unlink()
        snap.mkdir()  # the next write cannot replace a directory: an OSError
        for k in range(5):
            assert call(d, alice, vm, "kv_put", k, k)[0] == 200
        # Up, serving, and saying what is wrong once a round has failed.
        assert wait_until(lambda: d.request("GET", "/health")[1]["status"] == "degraded")
        assert d.proc is not None and d.proc.poll() is None
        status, body = d.request("GET", "/health")
        assert status == 200 and body["status"] == "degraded", body
        assert body["reasons"] == ["storage_full: cannot write checkpoints (Is a directory)"]
        snap.rmdir()
        assert wait_until(lambda: healthy(d), 20)  # the next round writes it: ok again
        assert Snapshot.read(snap).seq == 5
    finally:
        d.kill()
