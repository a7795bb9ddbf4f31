"""The one wire contract of the control plane: topics, schema, message shapes, `Location`.

The daemon, the SDK, the orchestrator and the command line all speak through
this module, so a topic or a field is named once. Every MQTT payload is msgpack
and carries the schema version `v`; messages that cause an action or that
others believe are sealed (`cloudlet.trust.sealed`: signed, timestamped, with a
nonce) and checked by `cloudlet.trust.gate` before anyone acts on them.

Topics under `cloudlet/v1/` (R: retained; signed by whom):

- `nodes/{node}/presence` (R, that cloudlet): online with endpoint, position,
  zone, capacity; or offline (its Will).
- `nodes/{node}/telemetry` (that cloudlet): load, VM count, memory, per-VM rates.
- `nodes/{node}/commands` (an orchestrator or operator): orders, with a fencing epoch.
- `nodes/{node}/events` (that cloudlet): outcomes of its commands and moves.
- `vms/{vm}/location` (R, the cloudlet it names): where a VM lives now.
- `orchestrator/{region}/lease` (R, an orchestrator): who leads, until when, epoch.
- `clients/{client}/rtt` and `.../position` (unsigned; the broker lets only that
  client write them): what the client measured, where it is.

Client reports are not signed (a phone holds no cluster key); the broker lets a
client write only under its own `clients/{client}/`, so a report is as good as
the broker's word on who sent it.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from typing import Any

import msgpack

log = logging.getLogger(__name__)

PREFIX = "cloudlet/v1"
# 2: control messages are sealed (signed envelopes). Receivers drop other versions.
SCHEMA_VERSION = 2
MSGPACK = "application/msgpack"
JSON = "application/json"
# Largest unsigned client report taken from the broker (an RTT map of ~100 cloudlets
# is ~4 KiB).
MAX_REPORT_BYTES = 64 << 10


class Kind(enum.StrEnum):
    PRESENCE = "presence"
    TELEMETRY = "telemetry"
    COMMANDS = "commands"
    EVENTS = "events"
    LOCATION = "location"
    LEASE = "lease"
    RTT = "rtt"
    POSITION = "position"


# What others act on or believe: sealed and checked by the gate.
SIGNED_KINDS = frozenset({Kind.PRESENCE, Kind.TELEMETRY, Kind.COMMANDS, Kind.EVENTS,
                          Kind.LOCATION, Kind.LEASE})
# Published with the retain flag: state that a newcomer must see.
RETAINED_KINDS = frozenset({Kind.PRESENCE, Kind.LOCATION, Kind.LEASE})

_NODE_KINDS = {Kind.PRESENCE, Kind.TELEMETRY, Kind.COMMANDS, Kind.EVENTS}
_CLIENT_KINDS = {Kind.RTT, Kind.POSITION}


def node_topic(node: str, kind: Kind) -> str:
    if kind not in _NODE_KINDS:
        raise ValueError(f"{kind} is not a per-node topic")
    return f"{PREFIX}/nodes/{node}/{kind}"


def presence_topic(node: str) -> str:
    return node_topic(node, Kind.PRESENCE)


def telemetry_topic(node: str) -> str:
    return node_topic(node, Kind.TELEMETRY)


def commands_topic(node: str) -> str:
    return node_topic(node, Kind.COMMANDS)


def events_topic(node: str) -> str:
    return node_topic(node, Kind.EVENTS)


def location_topic(vm_id: str) -> str:
    return f"{PREFIX}/vms/{vm_id}/location"


def lease_topic(region: str) -> str:
    return f"{PREFIX}/orchestrator/{region}/lease"


def client_topic(client: str, kind: Kind) -> str:
    if kind not in _CLIENT_KINDS:
        raise ValueError(f"{kind} is not a per-client topic")
    return f"{PREFIX}/clients/{client}/{kind}"


def rtt_topic(client: str) -> str:
    return client_topic(client, Kind.RTT)


def position_topic(client: str) -> str:
    return client_topic(client, Kind.POSITION)


# Subscription filters.
ALL = f"{PREFIX}/#"
ALL_PRESENCE = f"{PREFIX}/nodes/+/presence"
ALL_TELEMETRY = f"{PREFIX}/nodes/+/telemetry"
ALL_EVENTS = f"{PREFIX}/nodes/+/events"
ALL_LOCATIONS = f"{PREFIX}/vms/+/location"
ALL_LEASES = f"{PREFIX}/orchestrator/+/lease"
ALL_RTT = f"{PREFIX}/clients/+/rtt"
ALL_POSITIONS = f"{PREFIX}/clients/+/position"


_GROUP_KINDS = {"nodes": _NODE_KINDS, "vms": {Kind.LOCATION}, "orchestrator": {Kind.LEASE},
                "clients": _CLIENT_KINDS}


@dataclass(frozen=True)
class TopicRef:
    """What a topic is about: its kind and the node, VM, client or region it names."""

    kind: Kind
    name: str


def parse_topic(topic: str) -> TopicRef | None:
    """The kind and subject of a `cloudlet/v1/...` topic; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or not parts[3]:
        return None
    group, name, leaf = parts[2], parts[3], parts[4]
    if "+" in name or "#" in name:
        return None
    try:
        kind = Kind(leaf)
    except ValueError:
        return None
    expected = _GROUP_KINDS.get(group)
    if expected is None or kind not in expected:
        return None
    return TopicRef(kind, name)


@dataclass(frozen=True)
class Location:
    """Where a VM lives, or a cloudlet is: its node name and its endpoint URL."""

    node: str
    endpoint: str

    def to_wire(self) -> dict[str, str]:
        return {"node": self.node, "endpoint": self.endpoint}

    @classmethod
    def from_wire(cls, wire: Any) -> Location | None:
        if not isinstance(wire, dict):
            return None
        node, endpoint = wire.get("node"), wire.get("endpoint")
        if (not isinstance(node, str) or not node or not isinstance(endpoint, str)
                or not endpoint.startswith(("http://", "https://"))):
            return None
        return cls(node, endpoint)


# --- message shapes --------------------------------------------------------------------


def presence_message(node: str, endpoint: str, *, session: str, position_m: tuple[float, float],
                     zone: str, capacity: dict[str, int], vms: int,
                     refresh_s: float) -> dict[str, Any]:
    """An online presence. `session` names this connection to the broker, so the
    offline Will of this very connection (and no older one) can end it; `refresh_s`
    tells readers how often a fresh one comes (presence older than a few of these
    is from a cloudlet that may be gone)."""
    return {"v": SCHEMA_VERSION, "node": node, "status": "online", "endpoint": endpoint,
            "session": session, "position": list(position_m), "zone": zone,
            "capacity": capacity, "vms": vms, "refresh_s": refresh_s}


def offline_message(node: str, *, session: str) -> dict[str, Any]:
    """The Will of one connection: the broker publishes it when that connection dies."""
    return {"v": SCHEMA_VERSION, "node": node, "status": "offline", "session": session}


def location_message(vm_id: str, where: Location, *, generation: int = 0) -> dict[str, Any]:
    """Where a VM is. `generation` counts its moves between cloudlets: a VM's
    locations are ordered by it (then by time), not by the clocks of the cloudlets
    it moved between."""
    return {"v": SCHEMA_VERSION, "vm": vm_id, **where.to_wire(), "generation": generation}


def command_message(op: str, *, command_id: str, epoch: int, **fields: Any) -> dict[str, Any]:
    """An order to a cloudlet. `epoch` is the orchestrator's fencing epoch: a
    cloudlet refuses an epoch older than the newest it has seen."""
    return {"v": SCHEMA_VERSION, "op": op, "id": command_id, "epoch": epoch, **fields}


def event_message(node: str, **fields: Any) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "node": node, **fields}


def telemetry_message(node: str, **fields: Any) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "node": node, **fields}


def report_message(client: str, **fields: Any) -> bytes:
    """An unsigned client report, as msgpack bytes: on `rtt_topic`, `rtt_ms` (a map
    node -> ms) and `ts` (unix seconds); on `position_topic`, `x_m`, `y_m`, `ts`
    and optionally `vx_m_s`, `vy_m_s` (else the reader derives velocity from
    successive reports)."""
    packed: bytes = msgpack.packb({"v": SCHEMA_VERSION, "client": client, **fields})
    return packed


def decode_report(raw: bytes | bytearray) -> dict[str, Any] | None:
    """A client report, or None (logged) if it is not one."""
    if len(raw) > MAX_REPORT_BYTES:
        log.warning("dropped a client report of %d bytes", len(raw))
        return None
    try:
        msg = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        log.warning("dropped a client report that is not msgpack")
        return None
    if not isinstance(msg, dict) or msg.get("v") != SCHEMA_VERSION:
        log.warning("dropped a client report with an unknown schema")
        return None
    return msg


# The broker a command uses when it is given none: `cloudlet up`'s embedded one,
# unless $CLOUDLET_BROKER names another (a metro on another --broker-port, a broker
# elsewhere), once for a whole shell session. One rule for the daemon's commands
# (`status`, `migrate`) and the client's (`offload`, `session`, `vm ...`).
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
BROKER_ENV = "CLOUDLET_BROKER"


def default_broker() -> str:
    return os.environ.get(BROKER_ENV) or DEFAULT_BROKER
