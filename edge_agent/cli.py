"""The daemon's commands for the `cloudlet` command line: agent, up, token, status.

`cloudlet.cli` discovers this module when edge_agent is installed, so the core
library never imports the daemon (dependencies flow one way).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from cloudlet.errors import ConfigError

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="run one cloudlet daemon",
                           description="Run one cloudlet daemon from a TOML config "
                                       "(see configs/node.toml and docs/daemon.md).")
    agent.add_argument("--config", required=True, metavar="FILE")
    agent.set_defaults(handler=cmd_agent)

    up = sub.add_parser("up", help="run a local metro: a broker and several cloudlets",
                        description="Start an embedded MQTT broker and a local metro of "
                                    "cloudlets (one process each) from configs/local-metro.toml; "
                                    "run until Ctrl-C.")
    up.add_argument("--config", metavar="FILE", help="metro config (default: "
                                                     "configs/local-metro.toml)")
    up.add_argument("--nodes", type=int, help="how many cloudlets (default: the config's)")
    up.add_argument("--base-port", type=int, default=8601,
                    help="HTTP port of the first cloudlet; the rest follow (default 8601)")
    up.add_argument("--broker", metavar="mqtt://HOST:PORT",
                    help="use this MQTT broker instead of starting one")
    up.add_argument("--broker-port", type=int, default=1883,
                    help="port of the embedded broker (default 1883)")
    up.add_argument("--state-dir", metavar="DIR",
                    help="images, checkpoints, secrets (default $CLOUDLET_HOME/metro or "
                         "~/.cache/cloudlet/metro)")
    up.set_defaults(handler=cmd_up)

    token = sub.add_parser("token", help="print a bearer token for a client")
    token.add_argument("--client", required=True, metavar="NAME")
    token.add_argument("--state-dir", metavar="DIR",
                       help="where the cluster secret is (default: as for 'up')")
    token.add_argument("--ttl-s", type=int, default=7 * 24 * 3600,
                       help="lifetime in seconds (default one week)")
    token.set_defaults(handler=cmd_token)

    migrate = sub.add_parser("migrate", help="move a VM to another cloudlet (live migration)",
                             description="Live-migrate VM to cloudlet NODE: pre-copy while it "
                                         "serves, a short stop-and-copy, an atomic commit. The "
                                         "VM and the nodes are found through the broker.")
    migrate.add_argument("vm", metavar="VM")
    migrate.add_argument("--to", required=True, metavar="NODE")
    migrate.add_argument("--mode", choices=("live", "stop_and_copy"), default="live")
    migrate.add_argument("--broker", default=DEFAULT_BROKER, metavar="mqtt://HOST:PORT")
    migrate.add_argument("--state-dir", metavar="DIR",
                         help="where the cluster secret is (default: as for 'up')")
    migrate.add_argument("--json", action="store_true", help="print the measurements as JSON")
    migrate.set_defaults(handler=cmd_migrate)

    status = sub.add_parser("status", help="list the cloudlets the broker knows, with their VMs")
    status.add_argument("--broker", default=DEFAULT_BROKER, metavar="mqtt://HOST:PORT")
    status.add_argument("--wait-s", type=float, default=1.0,
                        help="how long to collect retained messages (default 1 s)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)


def cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent.config import load_node_config
    from edge_agent.daemon import run

    run(load_node_config(args.config))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from edge_agent.config import default_state_dir
    from edge_agent.metro import DEFAULT_METRO, up

    for name in ("base_port", "broker_port"):
        if not 0 < getattr(args, name) < 65536:
            raise ConfigError(f"--{name.replace('_', '-')} must be a TCP port")
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    coro = up(Path(args.config) if args.config else DEFAULT_METRO, state, args.nodes,
              args.base_port, args.broker, args.broker_port)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_token(args: argparse.Namespace) -> int:
    from edge_agent.auth import Authority, ensure_secret
    from edge_agent.config import default_state_dir
    from edge_agent.daemon import SECRET_FILE

    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    authority = Authority(ensure_secret(state / SECRET_FILE))
    print(authority.issue(args.client, args.ttl_s))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    nodes, vms = asyncio.run(collect_status(args.broker, args.wait_s))
    if args.json:
        print(json.dumps({"nodes": nodes, "vms": vms}, indent=2))
        return 0
    if not nodes:
        print(f"no cloudlets known to {args.broker}")
    for name in sorted(nodes):
        node = nodes[name]
        hosted = sorted(vm for vm, loc in vms.items() if loc.get("node") == name)
        print(f"{name:<14} {node.get('status', '?'):<8} {node.get('endpoint', '-'):<28} "
              f"{len(hosted)} VMs")
        for vm in hosted:
            print(f"  {vm}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import json

    stats = asyncio.run(migrate_vm(args))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    rounds = stats.get("bytes_per_round") or [stats.get("bytes_sent", 0)]
    print(f"moved VM {stats['vm']} to {stats['to']} ({stats['mode']}): "
          f"{stats['rounds']} rounds, {_mib(stats['bytes_sent'])} sent "
          f"(memory {_mib(stats.get('memory_bytes', 0))}), "
          f"paused {stats['downtime_ms']:.1f} ms, total {stats['total_s'] * 1000:.0f} ms")
    print("bytes per round: " + ", ".join(_mib(b) for b in rounds))
    return 0


def _mib(n: Any) -> str:
    size = float(n)
    return f"{size / (1 << 20):.2f} MiB" if size >= 1 << 20 else f"{size / 1024:.1f} KiB"


async def migrate_vm(args: argparse.Namespace) -> dict[str, Any]:
    """Find the VM and the destination through the broker, then ask the VM's cloudlet
    to migrate it (as a peer: this command runs where the cluster secret is)."""
    import aiohttp
    import msgpack

    from cloudlet.errors import VMNotFound, error_from_wire
    from edge_agent.auth import Authority, load_secret
    from edge_agent.config import default_state_dir
    from edge_agent.daemon import SECRET_FILE

    nodes, vms = await collect_status(args.broker, 1.0)
    where = vms.get(args.vm)
    if where is None:
        raise VMNotFound(f"the broker at {args.broker} knows no VM {args.vm!r}")
    if args.to not in nodes or nodes[args.to].get("status") != "online":
        raise ConfigError(f"no cloudlet {args.to!r} is online (known: {', '.join(sorted(nodes))})")
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    token = Authority(load_secret(state / SECRET_FILE)).issue_peer("cli", 300)
    async with aiohttp.ClientSession() as http, http.post(
            f"{where['endpoint']}/v1/vms/{args.vm}/migrate",
            data=msgpack.packb({"to": args.to, "mode": args.mode}),
            headers={"Authorization": f"Bearer {token}"}) as resp:
        body = msgpack.unpackb(await resp.read())
    if resp.status != 200:
        raise error_from_wire(body)
    result: dict[str, Any] = body
    return result


async def collect_status(broker: str, wait_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Retained presence and location messages, gathered for `wait_s` seconds."""
    import aiomqtt

    from edge_agent.control import PREFIX, broker_address, decode

    host, port, _ = broker_address(broker)
    nodes: dict[str, Any] = {}
    vms: dict[str, Any] = {}
    try:
        async with aiomqtt.Client(host, port, identifier=f"cloudlet-status-{time.time_ns()}") as c:
            await c.subscribe(f"{PREFIX}/nodes/+/presence")
            await c.subscribe(f"{PREFIX}/vms/+/location")
            try:
                async with asyncio.timeout(wait_s):
                    async for message in c.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray) or not payload:
                            continue
                        msg = decode(payload)
                        if msg is None:
                            continue
                        if message.topic.matches(f"{PREFIX}/nodes/+/presence"):
                            nodes[str(msg.get("node"))] = msg
                        else:
                            vms[str(msg.get("vm"))] = msg
            except TimeoutError:
                pass
    except aiomqtt.MqttError as exc:
        raise ConfigError(f"cannot reach the broker at {broker}: {exc}") from None
    return nodes, vms
