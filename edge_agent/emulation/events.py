"""Migration records, from the cloudlets' events topics.

Every cloudlet publishes the outcome of each move it makes on
`cloudlet/v1/nodes/{node}/events` (`{"op": "migrated", "ok": true, ...}` with
the migration's measurements). The emulation listens there as the cluster's
operator, for the whole run, and turns each completed live migration into one
record (keys: docs/sim.md, "Emulation"), with what the pre-copy model predicted
for it from the scenario's (scaled) workload and the path's bandwidth.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgpack

from cloudlet.protocol import parse_topic

log = logging.getLogger(__name__)

EVENTS = "cloudlet/v1/nodes/+/events"


@dataclass
class MigrationLog:
    """Records as they arrive; `t_s` of each is emulated time at arrival."""

    clock: Callable[[], float]
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def note(self, node: str, event: dict[str, Any]) -> None:
        if event.get("op") != "migrated":
            return
        if not event.get("ok"):
            self.failed.append({"source": node, "target": event.get("to"),
                                "vm": event.get("vm"), "error": event.get("error"),
                                "t_s": self.clock()})
            return
        duration = _num(event.get("total_s"))
        downtime_ms = _num(event.get("downtime_ms", event.get("paused_ms")))
        rate = _num(event.get("link_rate_bytes_s"))
        self.records.append({
            "vm": event.get("vm"), "source": node, "target": event.get("to"),
            "mode": event.get("mode", "live"),
            "memory_bytes": int(_num(event.get("memory_bytes")) or 0),
            "overlay_bytes": int(_num(event.get("overlay_bytes")) or 0),
            "dirty_rate_bytes_s": _num(event.get("dirty_rate_bytes_s")) or 0.0,
            "measured_link_mbit_s": None if rate is None else rate * 8 / 1e6,
            "duration_s": duration,
            "downtime_s": None if downtime_ms is None else downtime_ms / 1000,
            "wire_bytes": int(_num(event.get("bytes_sent")) or 0),
            "rounds": int(_num(event.get("rounds")) or 0),
            "t_s": self.clock(),
        })


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _body(raw: bytes | bytearray) -> dict[str, Any] | None:
    """The body of a sealed event. Not verified: the operator reads its own cluster's
    events through a broker that admits only the cluster."""
    try:
        envelope = msgpack.unpackb(raw)
        body = msgpack.unpackb(envelope["body"]) if isinstance(envelope, dict) else envelope
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        return None
    return body if isinstance(body, dict) else None


async def listen(broker_url: str, login: tuple[str, str], into: MigrationLog,
                 subscribed: asyncio.Event) -> None:
    """Collect migration events until cancelled."""
    host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
    async with aiomqtt.Client(host, int(port), identifier=f"emulate-{time.time_ns()}",
                              username=login[0], password=login[1]) as client:
        await client.subscribe(EVENTS, qos=1)
        subscribed.set()
        async for message in client.messages:
            payload = message.payload
            ref = parse_topic(str(message.topic))
            if ref is None or not isinstance(payload, bytes | bytearray):
                continue
            body = _body(payload)
            if body is not None:
                try:
                    into.note(ref.name, body)
                except Exception as exc:  # one odd event must not end the listener
                    log.warning("an event of %s could not be recorded: %r", ref.name, exc)
