"""`cloudlet up`: a local metro of cloudlets on this machine, each its own process.

It starts an embedded MQTT broker (unless given one), writes a node config per
cloudlet under the state directory, starts one `cloudlet agent` process per
node, waits until each says it is ready, prints the endpoints, and runs until
Ctrl-C or SIGTERM, when every daemon shuts down cleanly (checkpointing its VMs).
Secrets are generated on first run and kept in the state directory, so a
restart keeps tokens valid and VMs restored: the cluster secret (client
tokens, broker passwords), the cluster authority's key pair, and each node's
key; each node's certificate is issued afresh at every start. The embedded
broker admits only the cluster (`ClusterAccess`); each node's config carries
its own broker user (`node.NAME`) and derived password.

One metro per state directory (edge_agent.statelock): a second `cloudlet up`
on it exits at once, naming the first, before it starts a broker, writes a
config or starts a cloudlet. Its exit status is the stop's: non-zero when a
cloudlet it asked to stop did not stop cleanly (e.g. could not save its VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write
from cloudlet.trust import acl
from cloudlet.trust.certs import CertificateAuthority
from cloudlet.trust.cluster import AUTHORITY_PUBLIC_FILE, ensure_authority, issue_node
from edge_agent.auth import SECRET_FILE, ensure_secret
from edge_agent.broker import ClusterAccess, EmbeddedBroker
from edge_agent.config import MetroConfig, MetroNode, load_metro_config, node_config_from_dict
from edge_agent.identity import NODE_ROLES
from edge_agent.orchestrator.config import orchestrator_config_from_dict
from edge_agent.statelock import StateLock

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
DEFAULT_METRO = Path(__file__).resolve().parent.parent / "configs" / "local-metro.toml"


def plan_nodes(metro: MetroConfig, count: int | None) -> list[MetroNode]:
    """The metro's nodes, cut or extended (on a 1 km grid) to `count`."""
    nodes = list(metro.nodes)
    n = count if count is not None else len(nodes)
    if n < 1:
        raise ConfigError("--nodes must be at least 1")
    while len(nodes) < n:
        i = len(nodes)
        nodes.append(MetroNode(f"cloudlet-{i + 1}", 1000.0 * (i % 4), 1000.0 * (i // 4), ""))
    return nodes[:n]


def write_node_config(state: Path, node: MetroNode, port: int, broker_url: str,
                      defaults: dict[str, Any], *, secret: bytes,
                      authority: CertificateAuthority,
                      orchestrator: dict[str, Any] | None = None) -> Path:
    """The node's config, with its identity: its key (kept), a fresh certificate,
    and its broker user and password; and its `[orchestrator]` table, if given."""
    node_dir = state / "nodes" / node.name
    key_path, cert_path = issue_node(authority, node.name, NODE_ROLES, node_dir)
    username = acl.node_user(node.name)
    table = {**defaults, "name": node.name, "host": "127.0.0.1", "port": port,
             "state_dir": str(node_dir),
             "secret_file": str(state / SECRET_FILE),
             "ca_file": str(state / AUTHORITY_PUBLIC_FILE),
             "node_key_file": str(key_path), "node_cert_file": str(cert_path),
             "broker_url": broker_url, "broker_username": username,
             "broker_password": acl.derived_password(secret, username),
             "position_x_m": node.position_x_m, "position_y_m": node.position_y_m,
             "zone": node.zone}
    node_config_from_dict(table, f"generated config of {node.name}")  # fail here, not in a child
    path = state / "nodes" / node.name / "node.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by `cloudlet up`; edit configs/local-metro.toml instead.", "[node]"]
    for key, value in table.items():
        lines.append(f"{key} = {toml_value(value)}")
    if orchestrator:
        orchestrator_config_from_dict(orchestrator, f"generated config of {node.name}")
        lines.append("\n[orchestrator]")
        for key, value in orchestrator.items():
            lines.append(f"{key} = {toml_value(value)}")
    # It holds the node's broker password: 0600 from the first byte (atomic_write).
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def toml_value(value: Any) -> str:
    """A scalar as TOML (the generated configs hold only these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


async def up(metro_file: Path, state: Path, nodes: int | None, base_port: int,
             broker_url: str | None, broker_port: int, policy: str = "predictive") -> int:
    metro = load_metro_config(metro_file)
    planned = plan_nodes(metro, nodes)
    with StateLock(state, "cloudlet up"):
        return await _run(metro, planned, state, base_port, broker_url, broker_port, policy)


async def _run(metro: MetroConfig, planned: list[MetroNode], state: Path, base_port: int,
               broker_url: str | None, broker_port: int, policy: str) -> int:
    secret = ensure_secret(state / SECRET_FILE)
    authority = ensure_authority(state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if broker_url is None:
            broker = await stack.enter_async_context(EmbeddedBroker(
                "127.0.0.1", broker_port,
                cluster=ClusterAccess(secret, authority.public_key)))
            broker_url = broker.url
            print(f"broker   {broker_url} (embedded amqtt; cluster members and clients with "
                  "tokens only)", flush=True)
        else:
            print(f"broker   {broker_url}", flush=True)
        # Every cloudlet runs the orchestrator role; one leads at a time, and another
        # takes over within the lease if its cloudlet dies.
        role = {"enabled": True, "policy": policy}
        configs = [write_node_config(state, node, base_port + i, broker_url,
                                     metro.node_defaults, secret=secret, authority=authority,
                                     orchestrator=role)
                   for i, node in enumerate(planned)]
        children = await _start_all(configs)
        try:
            for (name, endpoint, proc) in children:
                print(f"cloudlet {name:<12} {endpoint}  (pid {proc.pid})", flush=True)
            print(f"placer   {policy} (every cloudlet runs the orchestrator; one leads at a "
                  "time)", flush=True)
            print(f"\nstate in {state}\nget a client token with:\n"
                  f"  cloudlet token --client NAME --state-dir {state}\n"
                  "Ctrl-C stops the metro (VMs are checkpointed and come back on the next up).",
                  flush=True)
            await _wait(stop, children)
        finally:
            unclean = await stop_all(children)
    for name, status in unclean.items():
        print(f"cloudlet {name} stopped with status {status}; its log above says why "
              "(e.g. VMs it could not save)", file=sys.stderr, flush=True)
    return 1 if unclean else 0


async def _start_all(configs: list[Path]) -> list[tuple[str, str, asyncio.subprocess.Process]]:
    children: list[tuple[str, str, asyncio.subprocess.Process]] = []
    try:
        for config in configs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cloudlet.cli", "agent", "--config", str(config),
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
            name, endpoint = await wait_ready(proc, config)
            children.append((name, endpoint, proc))
    except BaseException:
        await stop_all(children)
        raise
    return children


async def wait_ready(proc: asyncio.subprocess.Process, config: Path) -> tuple[str, str]:
    """The (name, endpoint) a starting `cloudlet agent` prints once it serves
    (`cloudlet up` and `cloudlet emulate` wait for it)."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode().strip()
                if not line:
                    raise ConfigError(f"the cloudlet of {config} exited before it was ready "
                                      f"(status {await proc.wait()}); see its log above")
                if line.startswith("ready "):
                    _, name, endpoint = line.split()
                    return name, endpoint
    except TimeoutError:
        proc.kill()
        raise ConfigError(
            f"the cloudlet of {config} was not ready in {READY_TIMEOUT_S} s") from None


async def _wait(stop: asyncio.Event, children: list[tuple[str, str, Any]]) -> None:
    async def watch(name: str, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        if not stop.is_set():
            print(f"cloudlet {name} exited with status {status}; the others keep running",
                  file=sys.stderr, flush=True)

    async with asyncio.TaskGroup() as tg:
        watchers = [tg.create_task(watch(name, proc)) for name, _, proc in children]
        await stop.wait()
        for task in watchers:
            task.cancel()


async def stop_all(children: list[tuple[str, str, asyncio.subprocess.Process]]
                   ) -> dict[str, int]:
    """Stop every cloudlet (SIGTERM: each checkpoints its VMs). Returns the exit
    status of those asked to stop that did not stop cleanly; one that died before
    was reported when it did."""
    asked = []
    for name, _, proc in children:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                asked.append(name)
    for name, _, proc in children:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            print(f"cloudlet {name} did not stop in {STOP_TIMEOUT_S} s; killing it",
                  file=sys.stderr)
            proc.kill()
            await proc.wait()
    return {name: proc.returncode for name, _, proc in children
            if name in asked and proc.returncode}
