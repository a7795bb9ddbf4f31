"""One policy's cluster: an embedded broker, the cluster's secrets, and one
`cloudlet agent` process per scenario cloudlet, each behind its ingress link.

Everything is made as `cloudlet up` makes it (edge_agent.metro: the cluster
secret and authority, node configs with their identities and broker users), in a
fresh state directory, so each policy starts from nothing. Each daemon is
reached through an ingress `LinkProxy` shaped to the scenario's backhaul
bandwidth, shared by every connection through it (concurrent migrations into a
cloudlet split its rate, as on a real link), and advertises that proxy
(`advertise_endpoint`): another cloudlet migrating a VM to it sends through the
shaped link, and clients are told that URL and map it to their own delayed link
(`connect_via`).

The context manager owns every process and socket it starts: leaving it, by an
error, a cancellation or Ctrl-C, stops the daemons (SIGTERM, then SIGKILL after
a grace period) and closes the broker and the proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.linkproxy import LinkProxy, LinkShape
from cloudlet.trust import acl
from cloudlet.trust.cluster import cluster_tokens, ensure_authority, ensure_secret
from edge_agent.auth import SECRET_FILE
from edge_agent.broker import ClusterAccess, EmbeddedBroker
from edge_agent.config import MetroNode
from edge_agent.metro import stop_all, toml_value, wait_ready, write_node_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class NodeSpec:
    """A scenario cloudlet as a daemon: where it is, what it holds."""

    name: str
    x_m: float
    y_m: float
    max_vms: int


@dataclass
class Node:
    name: str
    port: int  # the daemon's own
    ingress: LinkProxy
    config: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def advertised(self) -> str:
        return f"http://127.0.0.1:{self.ingress.port}"


@dataclass
class Cluster:
    state: Path
    nodes: list[Node] = field(default_factory=list)
    broker_url: str = ""
    secret: bytes = b""

    def token(self, client: str, ttl_s: int = 24 * 3600) -> str:
        """A client token, as `cloudlet token` mints it."""
        return cluster_tokens(self.state).issue(client, ttl_s)

    def operator_login(self) -> tuple[str, str]:
        return acl.OPERATOR_USER, acl.derived_password(self.secret, acl.OPERATOR_USER)

    @property
    def by_advertised(self) -> dict[str, Node]:
        return {n.advertised: n for n in self.nodes}


@contextlib.asynccontextmanager
async def running_cluster(state: Path, specs: list[NodeSpec], *, backhaul_mbit_s: float,
                          node_settings: dict[str, Any],
                          orchestrator: dict[str, Any] | None = None
                          ) -> AsyncIterator[Cluster]:
    """Start the broker, the ingress links and the daemons; `orchestrator` (a TOML
    table) goes into the first node's config."""
    state.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(state)
    cluster.secret = ensure_secret(state / SECRET_FILE)
    authority = ensure_authority(state)
    children: list[tuple[str, str, asyncio.subprocess.Process]] = []
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(EmbeddedBroker(
            "127.0.0.1", free_port(),
            cluster=ClusterAccess(cluster.secret, authority.public_key)))
        cluster.broker_url = broker.url
        shape = LinkShape(backhaul_mbit_s)
        for spec in specs:
            port = free_port()
            # One link into each cloudlet: migrations arriving at once share it.
            ingress = LinkProxy("127.0.0.1", port, up=shape, down=shape, shared=True)
            await stack.enter_async_context(ingress)
            node = Node(spec.name, port, ingress, Path(), state / "nodes" / spec.name / "log")
            settings = {**node_settings, "advertise_endpoint": node.advertised,
                        "max_vms": spec.max_vms}
            node.config = write_node_config(
                state, MetroNode(spec.name, spec.x_m, spec.y_m, ""), port, broker.url,
                settings, secret=cluster.secret, authority=authority)
            if orchestrator is not None and not cluster.nodes:
                _append_tables(node.config, {"orchestrator": orchestrator})
            cluster.nodes.append(node)
        try:
            for node in cluster.nodes:
                log = node.log.open("ab")
                try:
                    node.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "cloudlet.cli", "agent", "--config",
                        str(node.config), stdout=asyncio.subprocess.PIPE,
                        stdin=asyncio.subprocess.DEVNULL, stderr=log)
                finally:
                    log.close()
                children.append((node.name, node.advertised, node.proc))
            await asyncio.gather(*(wait_ready(n.proc, n.config) for n in cluster.nodes
                                   if n.proc is not None))
            yield cluster
        finally:
            # Shielded: a Ctrl-C that cancelled the run must not cut the stop short.
            await asyncio.shield(stop_all(children))


def _append_tables(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for name, table in tables.items():
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items() if k not in subs)
        for sub, values in subs.items():
            lines.append(f"\n[{name}.{sub}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
