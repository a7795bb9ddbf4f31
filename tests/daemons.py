"""Real cloudlet daemons for tests: each its own `cloudlet agent` process on a free port."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from cloudlet.trust import peer_tokens
from cloudlet.trust.certs import ROLE_CLOUDLET, CertificateVerifier
from cloudlet.trust.cluster import (
    cluster_tokens,
    ensure_authority,
    load_authority,
    operator_identity,
)
from cloudlet.trust.keys import SigningKey
from cloudlet.trust.sealed import Identity

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    name: str
    config_path: Path
    state_dir: Path
    secret_path: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop_asked: bool = False  # `ask_to_stop` signalled this process: `stop` only waits

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cluster_dir(self) -> Path:
        """Where the cluster's files are (cluster.key, ca.key, ca.pub)."""
        return self.secret_path.parent

    def token(self, client: str, ttl_s: int = 3600) -> str:
        return cluster_tokens(self.cluster_dir).issue(client, ttl_s)

    def operator_token(self) -> str:
        """What `cloudlet migrate` presents: an operator's peer token for this node."""
        return peer_tokens.mint(operator_identity(load_authority(self.cluster_dir)), self.name)

    def peer_token(self, node: str = "peer-node") -> str:
        """A peer token of another cloudlet `node` of the cluster, for this node."""
        return peer_tokens.mint(cloudlet_identity(self.cluster_dir, node), self.name)

    def start(self) -> Daemon:
        self.stop_asked = False
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudlet.cli", "agent", "--config", str(self.config_path)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.startswith(b"ready "):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(remaining, 0))
            if not ready:
                self.kill()
                raise AssertionError(f"daemon {self.name} not ready: {self.log()}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"daemon {self.name} exited: {self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None and not self.stop_asked:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        if self.proc.stdout:
            self.proc.stdout.close()
        return code

    def ask_to_stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` without waiting: several daemons then shut down side by side
        (`stop` afterwards waits, and sends nothing more)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.stop_asked = True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()

    # --- a tiny synchronous client -------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None,
                timeout_s: float = 30.0) -> tuple[int, Any]:
        """(status, decoded body). `body` is msgpack-encoded; `raw` is sent as is."""
        return http_request(self.endpoint, method, path, body, token=token, raw=raw,
                            headers=headers, timeout_s=timeout_s)


def http_request(endpoint: str, method: str, path: str, body: Any = None, *,
                 token: str | None = None, raw: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 timeout_s: float = 30.0) -> tuple[int, Any]:
    """A tiny synchronous client: (status, decoded body) of one request to an
    `http://HOST:PORT` endpoint. `body` is msgpack-encoded; `raw` is sent as is."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (msgpack.packb(body) if body is not None else None)
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        ctype = resp.getheader("Content-Type", "")
        if "msgpack" in ctype and payload:
            return resp.status, msgpack.unpackb(payload)
        if "json" in ctype:
            return resp.status, json.loads(payload)
        return resp.status, payload
    finally:
        conn.close()


def make_daemon(tmp: Path, name: str = "t1", *, secret_path: Path | None = None,
                **settings: Any) -> Daemon:
    """Write a config for a daemon (not started). `settings` are [node] keys."""
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    secret = secret_path or tmp / "cluster.key"
    if not secret.exists():
        secret.write_text(os.urandom(32).hex())
    ensure_authority(secret.parent)  # ca.key and ca.pub beside it: nodes issue their own
    port = free_port()
    table = {"name": name, "port": port, "state_dir": str(state), "secret_file": str(secret),
             "checkpoint_interval_s": 0.5, "telemetry_interval_s": 0.5, **settings}
    lines = ["[node]"]
    for key, value in table.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f'{key} = "{value}"')
    config = state / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    return Daemon(name, config, state, secret, port, state / "daemon.log")


def cloudlet_identity(cluster_dir: Path, node: str) -> Identity:
    """An identity of cloudlet `node`, certified by the cluster's authority (for tests
    that act as a peer without running one)."""
    authority = load_authority(cluster_dir)
    key = SigningKey.generate()
    cert = authority.issue(node, [ROLE_CLOUDLET], key.public_bytes)
    return Identity.load(key, cert, CertificateVerifier(authority.public_key))


def sealed_body(raw: bytes | bytearray) -> Any:
    """The body of a sealed control message, unverified (None for an empty payload):
    for tests that look at what was published, not at who may believe it."""
    if not raw:
        return None
    envelope = msgpack.unpackb(raw)
    return msgpack.unpackb(envelope["body"]) if isinstance(envelope, dict) else envelope


def operator_of(cluster_dir: Path) -> Identity:
    """The cluster operator, as `cloudlet migrate` is: may sign commands."""
    return operator_identity(load_authority(cluster_dir))


def operator_broker_auth(cluster_dir: Path) -> tuple[str, str]:
    """(username, password) of the operator on a broker that admits only the cluster."""
    from cloudlet.trust import acl
    from cloudlet.trust.cluster import load_secret

    secret = load_secret(cluster_dir / "cluster.key")
    return acl.OPERATOR_USER, acl.derived_password(secret, acl.OPERATOR_USER)


def daemon_pair(tmp: Path, **settings: Any) -> Iterator[tuple[Daemon, Daemon]]:
    """Two started daemons, "east" and "west", of one cluster, for a fixture to yield
    from: afterwards each is stopped, or killed if a test already killed it."""
    east = make_daemon(tmp, "east", **settings).start()
    west = make_daemon(tmp, "west", **settings).start()
    yield east, west
    stop_all([east, west])


def stop_all(daemons: Sequence[Daemon]) -> None:
    """Stop every daemon, side by side, each waiting out its own grace period; one
    a test already killed (or never started) is only reaped."""
    for d in daemons:
        d.ask_to_stop()
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        else:
            d.kill()
