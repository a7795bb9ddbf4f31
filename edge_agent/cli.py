"""The daemon's commands for the `cloudlet` command line: agent, up, orchestrator, token,
status, migrate, broker-config, and emulate (edge_agent.emulation).

`cloudlet.cli` discovers this module when edge_agent is installed, so the core
library never imports the daemon (dependencies flow one way).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from cloudlet.errors import ConfigError
from cloudlet.protocol import BROKER_ENV, DEFAULT_BROKER, default_broker


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="run one cloudlet daemon",
                           description="Run one cloudlet daemon from a TOML config "
                                       "(see configs/node.toml and docs/daemon.md).")
    agent.add_argument("--config", required=True, metavar="FILE")
    agent.set_defaults(handler=cmd_agent)

    from edge_agent.emulation.command import register as register_emulate

    register_emulate(sub)

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
    up.add_argument("--policy", default="predictive", metavar="NAME",
                    help="placement policy of the orchestrator every cloudlet runs (one leads "
                         "at a time): never (no moves), nearest, threshold, predictive "
                         "(default)")
    up.set_defaults(handler=cmd_up)

    orchestrator = sub.add_parser(
        "orchestrator", help="run the live placer alone, from a node config",
        description="Run the orchestrator role of a node config's cloudlet on its own: "
                    "read presence, telemetry and client reports from the broker, run the "
                    "[orchestrator] table's policy every interval_s, and send signed migrate "
                    "orders while it holds its region's lease (docs/orchestrator.md).")
    orchestrator.add_argument("--config", required=True, metavar="FILE")
    orchestrator.set_defaults(handler=cmd_orchestrator)

    token = sub.add_parser("token", help="print a bearer token for a client")
    token.add_argument("--client", required=True, metavar="NAME")
    token.add_argument("--state-dir", metavar="DIR",
                       help="where the cluster secret is (default: as for 'up')")
    token.add_argument("--ttl-s", type=int, default=7 * 24 * 3600,
                       help="lifetime in seconds, 1 s to a year (default one week)")
    token.set_defaults(handler=cmd_token)

    migrate = sub.add_parser("migrate", help="move a VM to another cloudlet (live migration)",
                             description="Live-migrate VM to cloudlet NODE: pre-copy while it "
                                         "serves, a short stop-and-copy, an atomic commit. The "
                                         "VM and the nodes are found through the broker.")
    migrate.add_argument("vm", metavar="VM")
    migrate.add_argument("--to", required=True, metavar="NODE")
    migrate.add_argument("--mode", choices=("live", "stop_and_copy"), default="live")
    migrate.add_argument("--broker", default=default_broker(), metavar="mqtt://HOST:PORT",
                         help=f"the cluster's broker (default ${BROKER_ENV}, "
                              f"else {DEFAULT_BROKER})")
    migrate.add_argument("--state-dir", metavar="DIR",
                         help="where the cluster secret is (default: as for 'up')")
    migrate.add_argument("--json", action="store_true", help="print the measurements as JSON")
    migrate.set_defaults(handler=cmd_migrate)

    status = sub.add_parser("status", help="list the cloudlets the broker knows, with their VMs",
                            description="Log in to the broker as the cluster's operator and "
                                        "list the cloudlets and VMs it knows, believing only "
                                        "signed presences and locations.")
    status.add_argument("--broker", default=default_broker(), metavar="mqtt://HOST:PORT",
                        help=f"the cluster's broker (default ${BROKER_ENV}, "
                              f"else {DEFAULT_BROKER})")
    status.add_argument("--state-dir", metavar="DIR",
                        help="the cluster's files (default: as for 'up')")
    status.add_argument("--wait-s", type=float, default=1.0,
                        help="how long to collect retained messages (default 1 s)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    files = sub.add_parser(
        "broker-config", help="write Mosquitto's password, ACL and config files for the cluster",
        description="Write passwd (PBKDF2-SHA512, as mosquitto_passwd does), acl and "
                    "mosquitto.conf for an external Mosquitto: only the cluster's cloudlets, "
                    "its operator and the named clients get in, under the same topic rules as "
                    "the embedded broker.")
    files.add_argument("--out", required=True, metavar="DIR")
    files.add_argument("--state-dir", metavar="DIR",
                       help="the cluster's files (default: as for 'up')")
    files.add_argument("--node", action="append", metavar="NAME",
                       help="a cloudlet (repeatable; default: the nodes of "
                            "configs/local-metro.toml)")
    files.add_argument("--client", action="append", default=[], metavar="NAME",
                       help="a client that may use the broker (repeatable)")
    files.add_argument("--listener", default="127.0.0.1:1883", metavar="HOST:PORT",
                       help="where Mosquitto listens (default 127.0.0.1:1883)")
    files.add_argument("--installed-in", metavar="DIR",
                       help="the directory the files will be in on the broker's machine, "
                            "as mosquitto.conf names them (default: --out)")
    files.add_argument("--tls-cert", default="", metavar="FILE",
                       help="TLS on the listener: its certificate, as a path on the broker's "
                            "machine (with --tls-key; `cloudlet tls-cert` issues them)")
    files.add_argument("--tls-key", default="", metavar="FILE",
                       help="the certificate's private key, as a path on the broker's machine")
    files.set_defaults(handler=cmd_broker_config)

    from edge_agent.node_files import register as register_node_files

    register_node_files(sub)


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
    from cloudlet.placement import POLICIES

    if args.policy not in POLICIES:
        raise ConfigError(f"--policy {args.policy!r} is not a policy "
                          f"(known: {', '.join(POLICIES)})")
    coro = up(Path(args.config) if args.config else DEFAULT_METRO, state, args.nodes,
              args.base_port, args.broker, args.broker_port, policy=args.policy)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from edge_agent.config import load_node_config
    from edge_agent.orchestrator.standalone import run

    run(load_node_config(args.config))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from cloudlet.trust.cluster import ensure_authority
    from edge_agent.auth import SECRET_FILE, cluster_tokens, ensure_secret
    from edge_agent.config import default_state_dir

    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    ensure_secret(state / SECRET_FILE)  # the same files `cloudlet up` would create
    ensure_authority(state)
    print(cluster_tokens(state).issue(args.client, args.ttl_s))
    return 0


def _state(args: argparse.Namespace) -> Path:
    from edge_agent.config import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from edge_agent.operator import collect

    view = asyncio.run(collect(args.broker, _state(args), args.wait_s))
    if args.json:
        print(json.dumps({"nodes": view.nodes, "vms": view.vms, "dropped": view.dropped},
                         indent=2, default=repr))
        return 0
    if not view.nodes:
        print(f"no cloudlets known to {args.broker}")
    for name in sorted(view.nodes):
        node = view.nodes[name]
        hosted = sorted(vm for vm, loc in view.vms.items() if loc.get("node") == name)
        print(f"{name:<14} {node.get('status', '?'):<8} {node.get('endpoint', '-'):<28} "
              f"{len(hosted)} VMs")
        for vm in hosted:
            print(f"  {vm}")
    if view.dropped:
        print("not believed (unsigned, forged or replayed): " + ", ".join(
            f"{n} {reason}" for reason, n in sorted(view.dropped.items())))
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from edge_agent.broker_files import write_mosquitto_files

    out = Path(args.out)
    clients = write_mosquitto_files(_state(args), out, nodes=args.node, clients=args.client,
                                    listener=args.listener,
                                    installed_in=Path(args.installed_in) if args.installed_in
                                    else None, tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(f"wrote {out / 'mosquitto.conf'}, {out / 'passwd'} and {out / 'acl'}")
    print(f"run: mosquitto -c {Path(args.installed_in or out) / 'mosquitto.conf'}")
    for name, password in clients.items():
        scheme = "mqtts" if args.tls_cert else "mqtt"
        print(f"client {name}: broker password {password} "
              f"({scheme}://{name}:{password}@HOST:PORT)")
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
    from edge_agent.operator import migrate

    return await migrate(args.broker, _state(args), args.vm, args.to, args.mode)
