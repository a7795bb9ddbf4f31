"""The live placer end to end: real daemons, a real broker that admits only the
cluster, standalone `cloudlet orchestrator` processes, real SDK sessions.

Cloudlets `west` (0, 0), `east` (2500, 0) and `north` (0, 2500), a backhaul of
25 ms per link for the orchestrator's model: a client next to `east` reaches
`east` in ~8 ms (radio) and `west` in ~34 ms (radio and backhaul), so with the
5 ms service time it breaks a 30 ms budget at `west`, and the placer moves its
VM to `east`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from cloudlet.protocol import (
    ALL_EVENTS,
    command_message,
    commands_topic,
    lease_topic,
    report_message,
)
from cloudlet.trust import acl
from cloudlet.trust.cluster import load_authority, load_identity, load_secret
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.sealed import seal
from edge_agent.broker import ClusterAccess
from mobile_client import CloudletClient
from tests.conftest import WORKLOADS
from tests.daemons import Daemon, http_request, make_daemon, sealed_body
from tests.metro import async_wait_until, wait_until
from tests.mqtt_brokers import BrokerThread, address

KVSTORE = WORKLOADS / "kvstore.wasm"
P = "cloudlet/v1"
POSITIONS = {"west": (0.0, 0.0), "east": (2500.0, 0.0), "north": (0.0, 2500.0)}
LEASE_S = 3.0


@dataclass
class Cluster:
    dir: Path
    broker: str
    daemons: dict[str, Daemon]

    def login(self, user: str) -> tuple[str, str]:
        return user, acl.derived_password(load_secret(self.dir / "cluster.key"), user)

    def where(self, vm: str, token: str) -> list[str]:
        return [n for n, d in self.daemons.items()
                if d.proc is not None and d.proc.poll() is None
                and d.request("GET", f"/v1/vms/{vm}", token=token)[0] == 200]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("orchestrated")
    secret = tmp / "cluster.key"
    # make_daemon writes the secret and the authority the broker needs first.
    first = make_daemon(tmp, "west", secret_path=secret)
    access = ClusterAccess(load_secret(secret), load_authority(tmp).public_key)
    with BrokerThread(cluster=access) as url:
        daemons = {"west": first}
        for name in ("east", "north"):
            daemons[name] = make_daemon(tmp, name, secret_path=secret)
        for name, d in daemons.items():
            x, y = POSITIONS[name]
            _rewrite(d, broker_url=url, broker_username=acl.node_user(name),
                     broker_password=acl.derived_password(load_secret(secret),
                                                          acl.node_user(name)),
                     position_x_m=x, position_y_m=y, presence_refresh_s=2.0,
                     mqtt_keepalive_s=2, migration_deadline_s=3.0, move_deadline_s=20.0)
            d.start()
        try:
            yield Cluster(tmp, url, daemons)
        finally:
            for d in daemons.values():
                with contextlib.suppress(Exception):
                    d.stop()


def _rewrite(d: Daemon, **settings: Any) -> None:
    text = d.config_path.read_text()
    for key, value in settings.items():
        text += f"{key} = {json.dumps(value)}\n"
    d.config_path.write_text(text)


@dataclass
class OrchestratorProcess:
    node: str
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(20)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_orchestrator(cluster: Cluster, node: str, **settings: Any) -> OrchestratorProcess:
    """`cloudlet orchestrator --config` on a copy of `node`'s config with an
    [orchestrator] table, and its own state directory."""
    d = cluster.daemons[node]
    table = {"enabled": True, "policy": "predictive", "interval_s": 0.5,
             "lease_s": LEASE_S, "backhaul_link_rtt_ms": 25.0, **settings}
    state = cluster.dir / f"orchestrator-{node}"
    state.mkdir(exist_ok=True)
    lines = [line for line in d.config_path.read_text().splitlines()
             if not line.startswith(("state_dir", "port "))]
    lines += [f'state_dir = "{state}"', f'node_key_file = "{d.state_dir / "node.key"}"',
              f'node_cert_file = "{d.state_dir / "node.cert"}"', "", "[orchestrator]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    config = state / "orchestrator.toml"
    config.write_text("\n".join(lines) + "\n")
    log = state / "orchestrator.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cloudlet.cli", "orchestrator",
                                 "--config", str(config)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    return OrchestratorProcess(node, config, proc, log)


@contextlib.contextmanager
def orchestrator(cluster: Cluster, node: str, **settings: Any) -> Iterator[OrchestratorProcess]:
    o = start_orchestrator(cluster, node, **settings)
    try:
        yield o
    finally:
        with contextlib.suppress(Exception):
            o.stop()


class Watch:
    """A broker subscriber (as the operator) that keeps every message it sees."""

    def __init__(self, cluster: Cluster, topics: list[str]) -> None:
        self.cluster = cluster
        self.topics = topics
        self.got: list[tuple[str, Any, float]] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        host, port = address(self.cluster.broker)
        user, password = self.cluster.login("operator")
        self._client = aiomqtt.Client(host, port, identifier=f"watch-{time.time_ns()}",
                                      username=user, password=password)
        await self._client.__aenter__()
        for t in self.topics:
            await self._client.subscribe(t, qos=1)
        self._task = asyncio.create_task(self._gather())
        return self

    async def _gather(self) -> None:
        assert self._client is not None
        async for m in self._client.messages:
            raw = m.payload if isinstance(m.payload, bytes | bytearray) else b""
            self.got.append((str(m.topic), sealed_body(raw), time.monotonic()))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [b for t, b, _ in self.got if t.endswith(suffix) and isinstance(b, dict)]


async def report_position(cluster: Cluster, client: str, token: str, x: float,
                          y: float) -> None:
    """What the SDK's position reports are on the wire, from the client's own login."""
    host, port = address(cluster.broker)
    async with aiomqtt.Client(host, port, identifier=f"{client}-pos-{time.time_ns()}",
                              username=client, password=token) as c:
        await c.publish(f"{P}/clients/{client}/position",
                        report_message(client, x_m=x, y_m=y, ts=time.time()), qos=0)


async def keep_reporting(cluster: Cluster, client: str, token: str, x: float, y: float,
                         stop: asyncio.Event) -> None:
    while not stop.is_set():
        await report_position(cluster, client, token, x, y)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()


def test_a_client_that_moves_gets_its_vm_moved_and_its_session_follows(
        cluster: Cluster) -> None:
    token = cluster.daemons["west"].token("walker")

    async def run() -> tuple[int, int, list[str], str]:
        stop = asyncio.Event()
        async with CloudletClient(token, endpoints=[cluster.daemons["west"].endpoint]) as c, \
                c.session(KVSTORE, budget_ms=30) as s, \
                Watch(cluster, [ALL_EVENTS, f"{P}/nodes/+/commands"]) as watch:
            vm = s.vm_id
            calls = 0
            reporter = asyncio.create_task(keep_reporting(cluster, "walker", token,
                                                          *POSITIONS["east"], stop))

            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                await s.call("kv_put", calls % 64, calls)
                calls += 1
                await asyncio.sleep(0.02)
                if calls % 25 == 0 and await asyncio.to_thread(
                        lambda: cluster.where(vm, token) == ["east"]):
                    break
            for _ in range(20):  # the session keeps working where the VM went
                await s.call("kv_put", calls % 64, calls)
                calls += 1
            stop.set()
            await reporter
            status, info = await asyncio.to_thread(
                cluster.daemons["east"].request, "GET", f"/v1/vms/{vm}", token=token)
            assert status == 200, info
            orders = [b for t, b, _ in watch.got if t.endswith("/commands")
                      and isinstance(b, dict) and b.get("vm") == vm]
            return calls, int(info["seq"]), [o["to"] for o in orders], s.location.node

    with orchestrator(cluster, "west") as o:
        calls, seq, orders, node = asyncio.run(run())
        log = o.text()
    assert orders == ["east"], log[-3000:]
    assert node == "east"
    assert seq == calls  # every call applied once, across the move
    assert "move VM" in log and "expected gain" in log and "moved VM" in log, log[-3000:]
