"""A cloudlet daemon's configuration: TOML, validated completely before anything starts.

Every setting has a default (the table in docs/daemon.md is generated from the
same `FIELDS` below), so a config file only says what differs. Unknown keys,
wrong types, out-of-range values and missing files are `ConfigError`s that
name the file and the key: a typo must not silently become a default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cloudlet.errors import ConfigError, InvalidArgument
from cloudlet.trust.cluster import default_metro_dir
from cloudlet.vm.machine import VMLimits
from edge_agent.orchestrator.config import OrchestratorConfig, orchestrator_config_from_dict
from edge_agent.tables import typed_values

MiB = 1 << 20


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one cloudlet daemon. Units are in the names."""

    name: str = "cloudlet-1"
    host: str = "127.0.0.1"  # loopback unless told otherwise: never expose by accident
    port: int = 8600
    # The URL other cloudlets and clients are told (presence, moved notices, VM
    # locations); empty: http(s)://host:port. Set it when the daemon is reached
    # through something in front of it (a proxy, a shaped link, a NAT).
    advertise_endpoint: str = ""
    # Where the daemon keeps images, VM checkpoints and its secrets.
    state_dir: str = "~/.cache/cloudlet/node"
    # The cluster secret (32+ random bytes, hex or raw): signs client tokens (and
    # derives broker passwords). `cloudlet up` generates one.
    secret_file: str = ""
    # The cluster authority's public key (`ca.pub`): every signed message, peer
    # token and identity proof is checked against it. Empty: `ca.pub` beside
    # `secret_file`, or, with neither set, a one-cloudlet cluster of its own in
    # the state directory (created on first start).
    ca_file: str = ""
    # This cloudlet's private key and its certificate from the authority. Empty:
    # `STATE/node.key` and `STATE/node.cert`; a missing or expired certificate is
    # issued at start when the authority's private key (`ca.key`) is beside `ca_file`.
    node_key_file: str = ""
    node_cert_file: str = ""
    # MQTT control plane; empty = run without one (data plane only).
    broker_url: str = ""
    broker_username: str = ""
    broker_password: str = ""
    broker_tls: bool = False
    broker_ca_file: str = ""
    mqtt_keepalive_s: int = 10  # a killed daemon shows offline within ~1.5x this
    telemetry_interval_s: float = 5.0
    # Presence is re-published (signed, fresh) this often: readers treat one older
    # than 3x this as from a cloudlet that may be gone, and never move a VM there.
    presence_refresh_s: float = 30.0
    # Orders and events older (or newer) than this by the receiver's clock are
    # refused; within it, each is believed once. Clocks must agree within it (NTP).
    control_window_s: float = 30.0
    # Where this cloudlet is, for the placer.
    position_x_m: float = 0.0
    position_y_m: float = 0.0
    zone: str = ""
    # Capacity.
    max_vms: int = 1000
    max_memory_mib: int = 8192  # sum of all VMs' memory caps
    # Defaults for VMs created without explicit limits.
    vm_memory_mib: int = 64
    vm_fuel_per_call: int = 10_000_000_000
    vm_deadline_ms: int = 50  # interactive calls; longer ones run off the event loop
    # Calls of VMs whose deadline is at most this run on the event loop (lowest
    # latency); longer ones go to a thread pool so they cannot stall other clients.
    inline_deadline_ms: int = 100
    call_threads: int = 2
    # One client's long calls hold at most this many of the call threads; waiting
    # calls get free threads client by client, in turn (edge_agent/workers.py).
    call_threads_per_client: int = 1
    # What a VM's boot (`_initialize`) may cost, like a call: fuel, and a wall-clock
    # deadline (at most 90% of request_deadline_s is used). Images that need more
    # are refused at upload.
    boot_fuel: int = 10_000_000_000
    boot_deadline_ms: int = 1000
    # Boots, restores, image compiles and snapshot downloads run on these threads,
    # shared fairly by clients (one each at a time); never on the event loop, never
    # on the call threads.
    boot_threads: int = 2
    # Checkpoints are captured and written on threads of their own, so neither a
    # spinning call nor a stream of boots can hold back durability.
    checkpoint_threads: int = 1
    # Per-client quotas (a client is a token's name): VMs, memory (the VMs' caps plus
    # their reply logs) and images uploaded. Over one: `429 quota_exceeded`.
    client_max_vms: int = 100
    client_max_memory_mib: int = 2048
    client_max_images: int = 32
    # Request limits.
    max_image_mib: int = 16
    max_request_kib: int = 1024  # call bodies and WebSocket messages
    request_deadline_s: float = 10.0
    # A connection must send a whole request head within this (from its opening, or
    # from the first byte of its next request); silent or trickling ones are closed.
    header_timeout_s: float = 5.0
    # An idle keep-alive connection (between requests) is closed after this.
    # WebSocket streams are never idle by this measure: they live until closed.
    idle_timeout_s: float = 60.0
    # Largest VM snapshot a peer may hand over (a whole wasm32 memory is 4 GiB).
    max_snapshot_mib: int = 4160
    # A move (handing a VM to another cloudlet) must finish within this.
    move_deadline_s: float = 60.0
    # Live migration: a peer silent this long is gone (the VM resumes at the source).
    migration_deadline_s: float = 10.0
    # Auto-converge: when a VM dirties memory faster than pre-copy can send it,
    # space its calls apart (down to 4 a second) until it can, instead of stopping
    # it for a long final round. Off: such a VM is paused for that round instead.
    migration_auto_converge: bool = True
    # From a move's pause to its landing (a few ms), ask Linux for CPUs that wake at
    # once (/dev/cpu_dma_latency = 0): idle CPUs poll instead of halting, which on a
    # VM host saved ~0.5 ms of the client-seen downtime. Needs write access to the
    # device; without it the daemon says so once and moves as before.
    migration_low_wake_latency: bool = True
    # Persistence: every VM that changed is checkpointed this often; a kill -9
    # loses at most the calls applied since the last checkpoint.
    checkpoint_interval_s: float = 2.0
    # HTTPS when both are set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA bundle that other cloudlets' HTTPS certificates must chain to (peers are
    # checked by name as well as by their signed proof); empty: the system's store.
    tls_ca_file: str = ""
    # The `[orchestrator]` table (edge_agent/orchestrator/config.py): the placer's
    # live loop, when this cloudlet runs it.
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("name", bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name)),
            ("port", 0 <= self.port <= 65535),
            ("advertise_endpoint", not self.advertise_endpoint
             or self.advertise_endpoint.startswith(("http://", "https://"))),
            ("mqtt_keepalive_s", 1 <= self.mqtt_keepalive_s <= 3600),
            ("telemetry_interval_s", 0.1 <= self.telemetry_interval_s <= 3600),
            ("presence_refresh_s", 0.5 <= self.presence_refresh_s <= 86400),
            ("control_window_s", 1 <= self.control_window_s <= 3600),
            ("max_vms", self.max_vms >= 1),
            ("max_memory_mib", self.max_memory_mib >= 1),
            ("vm_memory_mib", 1 <= self.vm_memory_mib <= 4096),
            ("vm_fuel_per_call", self.vm_fuel_per_call >= 1),
            ("vm_deadline_ms", 1 <= self.vm_deadline_ms <= 86_400_000),
            ("inline_deadline_ms", self.inline_deadline_ms >= 0),
            ("call_threads", 1 <= self.call_threads <= 64),
            ("call_threads_per_client", 1 <= self.call_threads_per_client <= self.call_threads),
            ("boot_fuel", self.boot_fuel >= 1),
            ("boot_deadline_ms", 1 <= self.boot_deadline_ms <= 86_400_000),
            ("boot_threads", 1 <= self.boot_threads <= 64),
            ("checkpoint_threads", 1 <= self.checkpoint_threads <= 64),
            ("client_max_vms", self.client_max_vms >= 1),
            ("client_max_memory_mib", self.client_max_memory_mib >= 1),
            ("client_max_images", self.client_max_images >= 1),
            ("max_image_mib", 1 <= self.max_image_mib <= 1024),
            ("max_request_kib", 1 <= self.max_request_kib <= 1 << 20),
            ("request_deadline_s", 0.1 <= self.request_deadline_s <= 3600),
            ("header_timeout_s", 0.1 <= self.header_timeout_s <= 3600),
            ("idle_timeout_s", 0.1 <= self.idle_timeout_s <= 86400),
            ("max_snapshot_mib", 1 <= self.max_snapshot_mib <= 8192),
            ("move_deadline_s", 0.1 <= self.move_deadline_s <= 3600),
            ("migration_deadline_s", 0.1 <= self.migration_deadline_s <= 3600),
            ("checkpoint_interval_s", 0.1 <= self.checkpoint_interval_s <= 86400),
            ("tls_cert_file", bool(self.tls_cert_file) == bool(self.tls_key_file)),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is out of range")

    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir))

    @property
    def endpoint(self) -> str:
        """What this cloudlet tells others to dial (`advertise_endpoint`, else host:port)."""
        if self.advertise_endpoint:
            return self.advertise_endpoint.rstrip("/")
        scheme = "https" if self.tls_cert_file else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def longest_call_ms(self) -> int:
        """A call (or a boot) must answer within its request's deadline; otherwise
        the client would get a timeout for something that was done."""
        return int(self.request_deadline_s * 1000 * 0.9)

    @property
    def effective_boot_deadline_ms(self) -> int:
        return max(1, min(self.boot_deadline_ms, self.longest_call_ms))

    @property
    def default_limits(self) -> VMLimits:
        return VMLimits(memory_bytes=self.vm_memory_mib * MiB,
                        fuel_per_call=self.vm_fuel_per_call, deadline_ms=self.vm_deadline_ms)


# The keys of [node] (the orchestrator's settings are a table of their own).
FIELDS = {f.name: f for f in fields(NodeConfig) if f.name != "orchestrator"}


def node_config_from_dict(data: dict[str, Any], source: str = "<config>") -> NodeConfig:
    """Validate a [node] table: names, types, ranges; errors name `source` and the key."""
    values = typed_values(data, FIELDS, "node", source)
    try:
        config = NodeConfig(**values)
    except (ConfigError, InvalidArgument) as exc:
        raise ConfigError(f"{source}: [node] {exc.message}") from None
    for key in ("secret_file", "ca_file", "broker_ca_file", "tls_cert_file", "tls_key_file",
                "tls_ca_file"):
        path = getattr(config, key)
        if path and not Path(os.path.expanduser(path)).is_file():
            raise ConfigError(f"{source}: [node] {key} = {path!r}: no such file")
    return config


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None


def load_node_config(path: str | os.PathLike[str]) -> NodeConfig:
    """A node config file: a [node] table and, optionally, an [orchestrator] one.
    Relative paths are relative to the file."""
    data = load_toml(path)
    extra = sorted(set(data) - {"node", "orchestrator"})
    if extra:
        raise ConfigError(f"{path}: unknown table or key {extra[0]!r} "
                          "(expected [node] and [orchestrator])")
    node = data.get("node", {})
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: [node] must be a table")
    base = Path(path).resolve().parent
    for key in ("state_dir", "secret_file", "ca_file", "node_key_file", "node_cert_file",
                "broker_ca_file", "tls_cert_file", "tls_key_file", "tls_ca_file"):
        value = node.get(key)
        if isinstance(value, str) and value and not value.startswith(("~", "/")):
            node = {**node, key: str(base / value)}
    config = node_config_from_dict(node, str(path))
    table = data.get("orchestrator", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [orchestrator] must be a table")
    if table:
        config = replace(config, orchestrator=orchestrator_config_from_dict(
            table, str(path), base))
    return config


def default_state_dir() -> Path:
    """Where `cloudlet up` and `cloudlet token` keep the metro's state and secret."""
    return default_metro_dir()


@dataclass(frozen=True)
class MetroNode:
    name: str
    position_x_m: float
    position_y_m: float
    zone: str


@dataclass(frozen=True)
class MetroConfig:
    """A local metro: several cloudlets on this machine, for `cloudlet up`."""

    nodes: tuple[MetroNode, ...]
    node_defaults: dict[str, Any] = field(default_factory=dict)


def load_metro_config(path: str | os.PathLike[str]) -> MetroConfig:
    data = load_toml(path)
    extra = sorted(set(data) - {"metro", "node_defaults"})
    if extra:
        raise ConfigError(f"{path}: unknown table or key {extra[0]!r}")
    defaults = data.get("node_defaults", {})
    node_config_from_dict(defaults, f"{path} [node_defaults]")  # validate early
    nodes = []
    for i, n in enumerate(data.get("metro", {}).get("nodes", [])):
        unknown = sorted(set(n) - {"name", "position_x_m", "position_y_m", "zone"})
        if unknown:
            raise ConfigError(f"{path}: metro.nodes[{i}] has unknown key {unknown[0]!r}")
        try:
            nodes.append(MetroNode(str(n["name"]), float(n.get("position_x_m", 0.0)),
                                   float(n.get("position_y_m", 0.0)), str(n.get("zone", ""))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: metro.nodes[{i}] is invalid: {exc}") from None
    if not nodes:
        raise ConfigError(f"{path}: [[metro.nodes]] lists no cloudlet")
    return MetroConfig(tuple(nodes), dict(defaults))
