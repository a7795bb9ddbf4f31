"""The MQTT control plane of real daemons, against the embedded broker and a real Mosquitto."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from cloudlet.protocol import command_message
from cloudlet.trust.sealed import seal
from edge_agent.config import NodeConfig
from edge_agent.control import ControlPlane
from edge_agent.metrics import Metrics
from tests.conftest import WORKLOADS
from tests.daemons import (
    free_port,
    make_daemon,
    operator_broker_auth,
    operator_of,
    sealed_body,
)
from tests.metro import free_port_run
from tests.mqtt_brokers import Mosquitto, address, require_binary
from tests.waiting import wait_until

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

P = "cloudlet/v1"
Message = tuple[str, Any, bool]  # topic, decoded payload (None if empty), retained


def listening(port: int) -> bool:
    """Something accepts TCP connections on the port (a TLS listener, too)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def collect(url: str, topics: list[str], until: Callable[[list[Message]], bool],
            timeout_s: float = 15.0, publish: list[tuple[str, bytes]] | None = None,
            auth: tuple[str, str] | None = None) -> list[Message]:
    """Subscribe, optionally publish, and gather messages until `until` holds."""
    host, port = address(url)

    async def run() -> list[Message]:
        got: list[Message] = []
        async with aiomqtt.Client(host, port, identifier=f"test-{time.time_ns()}",
                                  username=auth[0] if auth else None,
                                  password=auth[1] if auth else None) as c:
            for t in topics:
                await c.subscribe(t, qos=1)
            for topic, payload in publish or []:
                await c.publish(topic, payload, qos=1)
            try:
                async with asyncio.timeout(timeout_s):
                    async for m in c.messages:
                        raw = m.payload if isinstance(m.payload, bytes | bytearray) else b""
                        got.append((str(m.topic), sealed_body(raw), m.retain))
                        if until(got):
                            return got
            except TimeoutError:
                pass
        return got

    return asyncio.run(run())


def test_presence_telemetry_commands_locations(any_broker: str, tmp_path: Path) -> None:
    d = make_daemon(tmp_path, "cp1", broker_url=any_broker, mqtt_keepalive_s=2,
                    telemetry_interval_s=0.3, position_x_m=12.5, zone="z1").start()
    try:
        got = collect(any_broker, [f"{P}/nodes/cp1/presence"],
                      lambda g: any(p and p["status"] == "online" for _, p, _ in g))
        online = next(p for _, p, _ in got if p and p["status"] == "online")
        assert online["endpoint"] == d.endpoint and online["position"] == [12.5, 0.0]
        assert online["zone"] == "z1" and online["capacity"]["max_vms"] == 1000
        assert online["v"] == 2 and online["refresh_s"] == 30.0

        alice = d.token("alice")
        digest = d.request("POST", "/v1/images", raw=(WORKLOADS / "kvstore.wasm").read_bytes(),
                           token=alice)[1]["digest"]
        vm = d.request("POST", "/v1/vms", {"image": digest}, token=alice)[1]["vm"]
        d.request("POST", f"/v1/vms/{vm}/call", {"fn": "kv_put", "args": [1, 1]}, token=alice)
        got = collect(any_broker, [f"{P}/vms/{vm}/location", f"{P}/nodes/cp1/telemetry"],
                      lambda g: {t.rsplit("/", 1)[1] for t, _, _ in g} >= {"location",
                                                                           "telemetry"})
        location = next(p for t, p, _ in got if t.endswith("location"))
        assert location["node"] == "cp1" and location["endpoint"] == d.endpoint
        telemetry = next(p for t, p, _ in got if t.endswith("telemetry"))
        assert telemetry["vms"] == 1 and vm in telemetry["per_vm"]
        assert {"calls_per_s", "dirty_chunks_per_s"} <= set(telemetry["per_vm"][vm])

        commands = f"{P}/nodes/cp1/commands"
        operator = operator_of(d.cluster_dir)

        def order(op: str, cid: str) -> bytes:
            return seal(operator, commands, command_message(op, command_id=cid, epoch=1))

        got = collect(any_broker, [f"{P}/nodes/cp1/events"],
                      lambda g: {p["id"] for _, p, _ in g} >= {"c1", "c3"},
                      publish=[(commands, order("ping", "c1")),
                               (commands, b"\xc1 not msgpack"),
                               (commands, msgpack.packb({"v": 2, "id": "c2", "op": "ping",
                                                         "epoch": 1})),
                               (commands, order("dance", "c3"))])
        events = {p["id"]: p for _, p, _ in got}
        assert events["c1"]["ok"] and events["c1"]["result"] == {"vms": 1}
        assert events["c1"]["by"] == operator.subject
        assert not events["c3"]["ok"] and events["c3"]["error"]["code"] == "unknown_command"
        assert "c2" not in events  # unsigned: counted, logged once and dropped
        metrics = d.request("GET", "/metrics", token=alice)[1].decode()
        assert 'cloudlet_control_dropped_total{reason="unsigned"} 1.0' in metrics
        assert 'cloudlet_control_dropped_total{reason="malformed"} 1.0' in metrics
        assert d.request("GET", "/health")[0] == 200  # malformed control input: still healthy

        d.request("DELETE", f"/v1/vms/{vm}", token=alice)
        got = collect(any_broker, [f"{P}/vms/{vm}/location"], lambda g: False, timeout_s=1.0)
        # Cleared: a late subscriber may still see the old location, then the clear.
        assert not got or got[-1][1] is None, got

        assert d.stop() == 0
        got = collect(any_broker, [f"{P}/nodes/cp1/presence"], lambda g: bool(g))
        assert got[0][1]["status"] == "offline" and got[0][2]  # retained
    finally:
        d.kill()


def test_data_plane_survives_losing_the_broker(tmp_path: Path) -> None:
    binary = require_binary("mosquitto", "mosquitto")
    port = free_port()
    with Mosquitto(binary, tmp_path, port) as url:
        d = make_daemon(tmp_path, "cp2", broker_url=url, mqtt_keepalive_s=2).start()
        collect(url, [f"{P}/nodes/cp2/presence"], lambda g: bool(g))
    try:
        alice = d.token("alice")  # broker gone: the data plane goes on
        status, body = d.request("POST", "/v1/images",
                                 raw=(WORKLOADS / "kvstore.wasm").read_bytes(), token=alice)
        assert status == 201
        vm = d.request("POST", "/v1/vms", {"image": body["digest"]}, token=alice)[1]["vm"]
        with Mosquitto(binary, tmp_path, port) as url:  # back, empty (no persistence)
            got = collect(url, [f"{P}/nodes/cp2/presence", f"{P}/vms/{vm}/location"],
                          lambda g: len({t for t, _, _ in g}) == 2, timeout_s=25)
            topics = {t: p for t, p, _ in got}
            assert topics[f"{P}/nodes/cp2/presence"]["status"] == "online"
            assert topics[f"{P}/vms/{vm}/location"]["node"] == "cp2"
    finally:
        d.kill()


def test_a_daemon_whose_broker_hangs_still_stops_on_sigterm(tmp_path: Path) -> None:
    """Promise: SIGTERM stops a daemon whose broker hangs (its socket open, nothing
    answered): its offline presence times out (the Will says it later) and it exits."""
    binary = require_binary("mosquitto", "mosquitto")
    broker = Mosquitto(binary, tmp_path)
    with broker as url:
        # A long keepalive: the hung broker is not noticed before the SIGTERM.
        d = make_daemon(tmp_path, "cp3", broker_url=url, mqtt_keepalive_s=60).start()
        try:
            collect(url, [f"{P}/nodes/cp3/presence"], lambda g: bool(g))
            broker.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                code = d.stop(timeout_s=45)
                took_s = time.monotonic() - started
            finally:
                broker.signal(signal.SIGCONT)
        finally:
            d.kill()
    assert code == 0, d.log_path.read_text(errors="replace")[-2000:]
    assert took_s < 30, f"stopping took {took_s:.1f} s"


@pytest.mark.parametrize("after_s", [0.0, 0.05, 0.1, 0.15, 0.25])
def test_a_daemon_whose_broker_stops_during_its_shutdown_still_exits(
        tmp_path: Path, after_s: float) -> None:
    """Promise: a daemon and its broker stopped side by side (a host going down, a test's
    teardown) both end. The broker going away mid-shutdown ended the control plane's
    session with an error in place of the cancellation, and the daemon then retried
    the broker for ever (about half of such stops hung, before the fix)."""
    binary = require_binary("mosquitto", "mosquitto")
    broker = Mosquitto(binary, tmp_path)
    with broker as url:
        d = make_daemon(tmp_path, "cp4", broker_url=url, mqtt_keepalive_s=5).start()
        try:
            time.sleep(0.5)  # connected, or about to be: both are cases to stop from
            d.ask_to_stop()
            time.sleep(after_s)
            broker.signal(signal.SIGTERM)
            code = d.stop(timeout_s=20)
        finally:
            d.kill()
    assert code == 0, d.log_path.read_text(errors="replace")[-2000:]


def test_a_stopped_control_plane_ends_even_if_its_session_ends_in_an_error() -> None:
    """Promise: stopping `ControlPlane.run` (`stop()`, then cancel: the daemon's shutdown)
    ends it, even when the MQTT session it was in ends with an MqttError instead of
    the cancellation (on Python 3.11 a TaskGroup whose child fails while being
    cancelled raises that error, and aiomqtt's disconnect can fail the same way).
    The loop took it for a lost broker and retried for ever: a daemon stuck after
    its shutdown's last step was found in a suite run, its control plane
    'cancelling' in the retry sleep.

    The session is the one stand-in here: that race cannot be provoked on demand."""

    class EndsInAnError(ControlPlane):
        sessions = 0

        async def _session(self, host_name: str, port: int, tls: bool,
                           running: asyncio.TaskGroup) -> None:
            type(self).sessions += 1
            self.connected.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise aiomqtt.MqttError("Operation timed out") from None

    # Only what `run` itself reads: the rest of a control plane is not involved.
    plane = EndsInAnError.__new__(EndsInAnError)
    plane.config = NodeConfig(broker_url="mqtt://127.0.0.1:1")
    plane.metrics = Metrics()
    plane.connected = asyncio.Event()
    plane._client = None  # noqa: SLF001
    plane._stopping = False  # noqa: SLF001

    async def main() -> str:
        task = asyncio.create_task(plane.run())
        await asyncio.wait_for(plane.connected.wait(), 5)
        plane.stop()  # as the daemon does, before it cancels its background tasks
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:  # before the fix: it slept, reconnected, and never ended
            return f"still running after the cancel, {EndsInAnError.sessions} sessions"
        return "ended" if task.cancelled() or task.exception() is None \
            else f"ended with {task.exception()!r}"

    # A loop of its own, closed without waiting for what is left: a task that ignores
    # cancellation would make asyncio.run's clean-up wait for ever.
    loop = asyncio.new_event_loop()
    try:
        outcome = loop.run_until_complete(main())
    finally:
        loop.close()
    assert outcome == "ended"
    assert EndsInAnError.sessions == 1


def test_cloudlet_up_presence_and_last_will_seen_by_mosquitto_sub(tmp_path: Path) -> None:
    sub = require_binary("mosquitto_sub", "mosquitto-clients")
    log_path = tmp_path / "up.log"  # its cloudlets' logs: shown if the metro stops unclean
    # Three cloudlets take base_port .. base_port+2: a run found free, not just its first.
    broker_port, base_port = free_port_run(1), free_port_run(3)
    up = subprocess.Popen(
        [sys.executable, "-m", "cloudlet.cli", "up", "--nodes", "3", "--base-port",
         str(base_port), "--broker-port", str(broker_port), "--state-dir", str(tmp_path / "m")],
        stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
    try:
        assert up.stdout is not None
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(pids) < 3 and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "cloudlet up exited early"
            m = re.match(r"cloudlet (\S+)\s+(\S+)\s+\(pid (\d+)\)", line)
            if m:
                pids[m.group(1)] = int(m.group(3))
        assert len(pids) == 3

        user, password = operator_broker_auth(tmp_path / "m")
        login = ["-u", user, "-P", password]

        def presence(count: int, wait_s: str) -> dict[str, str]:
            out = subprocess.run(
                [sub, "-h", "127.0.0.1", "-p", str(broker_port), *login,
                 "-t", f"{P}/nodes/+/presence", "-F", "%t %x", "-C", str(count), "-W", wait_s],
                capture_output=True, text=True, timeout=60)
            seen = {}
            for line in out.stdout.splitlines():
                topic, hexed = line.split(" ", 1)
                seen[topic.split("/")[3]] = sealed_body(bytes.fromhex(hexed))["status"]
            return seen

        assert presence(3, "10") == dict.fromkeys(pids, "online")
        victim = sorted(pids)[0]
        watcher = subprocess.Popen(
            [sub, "-h", "127.0.0.1", "-p", str(broker_port), *login,
             "-t", f"{P}/nodes/{victim}/presence", "-F", "%x", "-C", "2", "-W", "20"],
            stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the watcher has its retained "online"
        os.kill(pids[victim], signal.SIGKILL)
        out, _ = watcher.communicate(timeout=30)
        statuses = [sealed_body(bytes.fromhex(h))["status"] for h in (first + out).split()]
        assert statuses == ["online", "offline"]

        status = subprocess.run([sys.executable, "-m", "cloudlet.cli", "status", "--broker",
                                 f"mqtt://127.0.0.1:{broker_port}", "--state-dir",
                                 str(tmp_path / "m")],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0
        for name in pids:
            assert name in status.stdout
        assert "offline" in status.stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            assert up.wait(60) == 0, log_path.read_text()[-4000:]
        finally:
            up.kill()


def test_https_and_broker_credentials(tmp_path: Path) -> None:
    """TLS for HTTP and credentials for the broker, when configured."""
    import http.client

    from tests.mqtt_brokers import BrokerThread

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    with BrokerThread(username="edge", password="s3cret") as url:
        d = make_daemon(tmp_path, "tls1", broker_url=url, broker_username="edge",
                        broker_password="s3cret", tls_cert_file=str(cert),
                        tls_key_file=str(key)).start()
        try:
            got = collect(url, [f"{P}/nodes/tls1/presence"], lambda g: bool(g),
                          auth=("edge", "s3cret"))
            assert got and got[0][1]["endpoint"] == f"https://127.0.0.1:{d.port}"
            context = ssl.create_default_context(cafile=str(cert))
            conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=context, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            conn.close()
            plain = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            try:  # plain HTTP to a TLS port gets nowhere
                plain.request("GET", "/health")
                assert plain.getresponse().status != 200
            except (ConnectionError, http.client.HTTPException, OSError):
                pass
            finally:
                plain.close()
        finally:
            d.kill()


def test_control_plane_over_tls(tmp_path: Path) -> None:
    """mqtts:// with a CA file: presence reaches a TLS-only Mosquitto listener."""
    binary = require_binary("mosquitto", "mosquitto")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    key.chmod(0o644)  # mosquitto drops to our user, who must read it
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(f"listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
                    f"allow_anonymous true\npersistence false\n"
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    d = None
    try:
        assert wait_until(lambda: listening(port))
        d = make_daemon(tmp_path, "tls2", broker_url=f"mqtts://127.0.0.1:{port}",
                        broker_ca_file=str(cert)).start()

        async def presence() -> dict[str, Any]:
            context = ssl.create_default_context(cafile=str(cert))
            async with aiomqtt.Client("127.0.0.1", port, tls_context=context) as c:
                await c.subscribe(f"{P}/nodes/tls2/presence")
                async with asyncio.timeout(15):
                    async for m in c.messages:
                        assert isinstance(m.payload, bytes)
                        decoded: dict[str, Any] = sealed_body(m.payload)
                        return decoded
            raise AssertionError("no presence")

        assert asyncio.run(presence())["status"] == "online"
    finally:
        if d is not None:
            d.kill()
        broker.terminate()
        broker.wait(10)
