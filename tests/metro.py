"""A real metro for attack tests: `cloudlet up` (the embedded broker, three cloudlets),
the small clients the attacks use (HTTP, MQTT, the daemon's drop counter), and
HTTP servers outside the cluster that record what reaches them.

Shared by tests/test_security.py and tests/test_attacks_review.py, each of which
starts one metro for its module (`running_metro`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from cloudlet.trust import acl
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.cluster import cluster_tokens, load_authority, load_identity, load_secret
from cloudlet.trust.sealed import Identity
from tests.conftest import WORKLOADS
from tests.daemons import http_request
from tests.waiting import wait_until

KVSTORE = WORKLOADS / "kvstore.wasm"
NODES = ("downtown", "harbor", "campus")
READY_TIMEOUT_S = 60.0


def free_port_run(count: int) -> int:
    """A port P such that P .. P+count-1 are free now (`cloudlet up` takes a run)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first: int = s.getsockname()[1]
        if first + count > 65535:
            continue
        taken = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
        return first
    raise RuntimeError(f"no run of {count} free ports")


@dataclass
class Metro:
    state: Path
    broker_url: str
    broker_port: int
    endpoints: dict[str, str]
    proc: subprocess.Popen[str]

    def token(self, client: str) -> str:
        return cluster_tokens(self.state).issue(client, 3600)

    def node_identity(self, node: str) -> Identity:
        """A cloudlet's real identity, as an attacker who took over that cloudlet has it."""
        d = self.state / "nodes" / node
        return load_identity(d / "node.key", d / "node.cert", self.verifier())

    def verifier(self) -> CertificateVerifier:
        return CertificateVerifier(load_authority(self.state).public_key)

    def broker_login(self, user: str) -> tuple[str, str]:
        """A broker login of the cluster (an attacker who read a node's config has it)."""
        return user, acl.derived_password(load_secret(self.state / "cluster.key"), user)

    def request(self, node: str, method: str, path: str, body: Any = None, *,
                token: str | None = None, timeout_s: float = 30.0) -> tuple[int, Any]:
        return http_request(self.endpoints[node], method, path, body, token=token,
                            timeout_s=timeout_s)


@contextlib.contextmanager
def running_metro(state: Path) -> Iterator[Metro]:
    """`cloudlet up --nodes 3` with its state in `state`, until the block ends."""
    broker_port, base_port = free_port_run(1), free_port_run(len(NODES))
    log = (state / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudlet.cli", "up", "--nodes", str(len(NODES)), "--base-port",
         str(base_port), "--broker-port", str(broker_port), "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    try:
        assert proc.stdout is not None
        endpoints: dict[str, str] = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(endpoints) < len(NODES) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "cloudlet up exited early: " + (state / "up.log").read_text()[-2000:]
            m = re.match(r"cloudlet (\S+)\s+(\S+)\s+\(pid \d+\)", line)
            if m:
                endpoints[m.group(1)] = m.group(2)
        assert set(endpoints) == set(NODES)
        yield Metro(state, f"mqtt://127.0.0.1:{broker_port}", broker_port, endpoints, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            proc.kill()


def new_vm(metro: Metro, node: str, token: str) -> str:
    status, body = http_request(metro.endpoints[node], "POST", "/v1/images", token=token,
                                raw=KVSTORE.read_bytes())
    assert status == 201, body
    status, body = metro.request(node, "POST", "/v1/vms", {"image": body["digest"]},
                                 token=token)
    assert status == 201, body
    vm: str = body["vm"]
    status, body = metro.request(node, "POST", f"/v1/vms/{vm}/call",
                                 {"fn": "kv_put", "args": [1, 42]}, token=token)
    assert status == 200, body
    return vm


def where_is(metro: Metro, vm: str, token: str) -> str:
    """The node that serves `vm` (asking each cloudlet, not trusting any message)."""
    found = [n for n in NODES
             if metro.request(n, "GET", f"/v1/vms/{vm}", token=token)[0] == 200]
    assert len(found) == 1, found
    return found[0]


def dropped(metro: Metro, node: str, token: str) -> dict[str, float]:
    status, text = metro.request(node, "GET", "/metrics", token=token)
    assert status == 200
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'cloudlet_control_dropped_total\{reason="([a-z_]+)"\} ([0-9.e+]+)', text.decode())}


async def mqtt(url: str, *, login: tuple[str, str] | None = None,
               publish: list[tuple[str, bytes, bool]] = (),  # type: ignore[assignment]
               subscribe: list[str] = (),  # type: ignore[assignment]
               listen_s: float = 0.0, subscribed: asyncio.Event | None = None
               ) -> tuple[list[int], list[tuple[str, bytes]]]:
    """Connect (with `login`), subscribe, publish (topic, payload, retain), then gather
    what arrives for `listen_s`. Returns (granted QoS codes, messages). `subscribed` is
    set once the broker has acknowledged every subscription: from then on, what is
    published to them reaches this client."""
    host, port = url.removeprefix("mqtt://").split(":")
    granted: list[int] = []
    got: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(host, int(port), identifier=f"attacker-{time.time_ns()}",
                              username=login[0] if login else None,
                              password=login[1] if login else None) as c:
        for topic in subscribe:
            result = await c.subscribe(topic, qos=1)
            granted.extend(int(getattr(r, "value", r)) for r in result)
        if subscribed is not None:
            subscribed.set()
        for topic, payload, retain in publish:
            await c.publish(topic, payload, qos=1, retain=retain)
        if listen_s:
            try:
                async with asyncio.timeout(listen_s):
                    async for m in c.messages:
                        raw = m.payload if isinstance(m.payload, bytes | bytearray) else b""
                        got.append((str(m.topic), bytes(raw)))
            except TimeoutError:
                pass
    return granted, got


@dataclass
class Recorder:
    """An HTTP server outside the cluster: records every request; `respond` decides the
    answer (default: 200 with a health-like JSON body, as a naive impostor would)."""

    respond: Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]] | None = None
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def credentials_seen(self) -> list[str]:
        return [h["Authorization"] for _, _, h in self.requests if "Authorization" in h]


def serve(record: Recorder, port: int = 0) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            record.requests.append((self.command, self.path, dict(self.headers)))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if record.respond is not None:
                status, headers, body = record.respond(self.command, self.path,
                                                       dict(self.headers))
            else:
                status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(
                    {"status": "ok", "node": "impostor"}).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        allow_reuse_address = True

    server = Server(("127.0.0.1", port), Handler)
    record.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class GeneratedMosquitto:
    url: str
    port: int
    client_passwords: dict[str, str]


@contextlib.contextmanager
def generated_mosquitto(metro: Metro, work: Path, *, nodes: tuple[str, ...] = ("downtown",),
                        clients: tuple[str, ...] = ("dana",)) -> Iterator[GeneratedMosquitto]:
    """A real Mosquitto configured by `cloudlet broker-config` for `metro`'s cluster,
    started and ready (the operator can log in), until the block ends."""
    from tests.mqtt_brokers import free_port, require_binary

    binary = require_binary("mosquitto", "mosquitto")
    port = free_port()
    out = work / "mosq"
    made = subprocess.run(
        [sys.executable, "-m", "cloudlet.cli", "broker-config", "--out", str(out), "--state-dir",
         str(metro.state), *(a for n in nodes for a in ("--node", n)),
         *(a for c in clients for a in ("--client", c)), "--listener", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    passwords = dict(re.findall(r"client (\S+): broker password (\S+)", made.stdout))
    assert set(passwords) == set(clients), made.stdout
    conf = out / "mosquitto.conf"
    conf.write_text(conf.read_text() + "user root\n")  # as tests/mqtt_brokers.py does
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"mqtt://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: accepts(url, metro.broker_login("operator")), 10)
        yield GeneratedMosquitto(url, port, passwords)
    finally:
        proc.terminate()
        proc.wait(10)


def accepts(url: str, login: tuple[str, str]) -> bool:
    try:
        asyncio.run(mqtt(url, login=login))
    except aiomqtt.MqttError:
        return False
    return True
