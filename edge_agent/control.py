"""The MQTT control plane of one daemon: presence, telemetry, commands, events, VM locations.

Topics (all under `cloudlet/v1/`, payloads msgpack with a schema version `v`):

| topic | retained | what |
| --- | --- | --- |
| `nodes/{node}/presence` | yes | online: endpoint, position, zone, capacity; the Will: offline |
| `nodes/{node}/telemetry` | no | load, VM count, memory, per-VM call and dirty rates |
| `nodes/{node}/commands` | no | orders to this node (QoS 1) |
| `nodes/{node}/events` | no | outcomes of commands |
| `vms/{vm}/location` | yes | where a VM lives now (cleared when it is destroyed) |

The broker is not on the data plane's path: losing it never stops calls. The
client reconnects with exponential backoff and, once back, re-publishes
presence and every VM's location, since a broker restart may have lost them.
Malformed control messages are logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import msgpack

from cloudlet.errors import CloudletError, ConfigError
from edge_agent.config import NodeConfig
from edge_agent.metrics import Metrics
from edge_agent.vm_host import HostedVM, VMHost

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PREFIX = "cloudlet/v1"
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
MAX_QUEUED_EVENTS = 1000

CommandHandler = Callable[[dict[str, Any]], Awaitable[Any]]


def presence_topic(node: str) -> str:
    return f"{PREFIX}/nodes/{node}/presence"


def location_topic(vm_id: str) -> str:
    return f"{PREFIX}/vms/{vm_id}/location"


def encode(payload: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb({"v": SCHEMA_VERSION, **payload})
    return packed


def decode(raw: bytes | bytearray) -> dict[str, Any] | None:
    """A control message, or None (logged) if it is not one we understand."""
    try:
        msg = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException):
        log.warning("dropped a control message that is not msgpack")
        return None
    if not isinstance(msg, dict) or msg.get("v") != SCHEMA_VERSION:
        log.warning("dropped a control message with an unknown schema: %r", msg)
        return None
    return msg


def broker_address(url: str) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://...")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


class ControlPlane:
    def __init__(self, config: NodeConfig, host: VMHost, metrics: Metrics,
                 commands: dict[str, CommandHandler],
                 peers: dict[str, str] | None = None) -> None:
        self.config = config
        # Online cloudlets (node -> endpoint) from their retained presence, so a
        # move can be ordered by node name. Shared with the mover, updated in place.
        self.peers: dict[str, str] = peers if peers is not None else {}
        self.host = host
        self.metrics = metrics
        self.commands = commands
        self.topic = f"{PREFIX}/nodes/{config.name}"
        self._client: aiomqtt.Client | None = None
        self._dirty_locations: set[str] = set()
        self._events: list[dict[str, Any]] = []  # outcomes to publish (e.g. migrations)
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self._last_calls: dict[str, int] = {}
        self._last_tick = time.monotonic()
        host.on_change = self._vm_changed

    # --- payloads -----------------------------------------------------------------------

    def _presence(self) -> dict[str, Any]:
        c = self.config
        return {"node": c.name, "status": "online", "endpoint": c.endpoint,
                "position": [c.position_x_m, c.position_y_m], "zone": c.zone,
                "capacity": {"max_vms": c.max_vms, "max_memory_bytes": c.max_memory_mib << 20},
                "vms": len(self.host.vms), "pid": os.getpid(), "ts": time.time()}

    def _offline(self) -> bytes:
        return encode({"node": self.config.name, "status": "offline", "ts": time.time()})

    def _vm_changed(self, vm_id: str, hosted: HostedVM | None) -> None:
        self._dirty_locations.add(vm_id)
        self._wake.set()

    # --- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled, reconnecting with backoff."""
        host_name, port, tls = broker_address(self.config.broker_url)
        backoff = BACKOFF_START_S
        while True:
            # Errors arrive wrapped in ExceptionGroups from the session's TaskGroup.
            # None may end the daemon: the data plane must outlive the broker.
            try:
                await self._session(host_name, port, tls or self.config.broker_tls)
            except* (aiomqtt.MqttError, OSError) as group:
                log.warning("broker %s lost or unreachable (%s); retrying in %.1f s",
                            self.config.broker_url, group.exceptions[0], backoff)
            except* Exception:
                log.exception("control plane failed; retrying in %.1f s", backoff)
            finally:
                if self.connected.is_set():  # it was up: start backing off afresh
                    backoff = BACKOFF_START_S
                self.connected.clear()
                self.metrics.mqtt_connected.set(0)
                self._client = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self, host_name: str, port: int, tls: bool) -> None:
        c = self.config
        will = aiomqtt.Will(presence_topic(c.name), self._offline(), qos=1, retain=True)
        tls_context = None
        if tls:
            tls_context = ssl.create_default_context(cafile=c.broker_ca_file or None)
        async with aiomqtt.Client(
            host_name, port, identifier=f"cloudlet-{c.name}", keepalive=c.mqtt_keepalive_s,
            will=will, username=c.broker_username or None, password=c.broker_password or None,
            tls_context=tls_context, clean_session=True,
        ) as client:
            self._client = client
            await client.subscribe(f"{self.topic}/commands", qos=1)
            await client.subscribe(f"{PREFIX}/nodes/+/presence", qos=1)
            await client.publish(presence_topic(c.name), encode(self._presence()), qos=1,
                                 retain=True)
            self._dirty_locations.update(self.host.vms)  # a broker restart may have lost them
            self.connected.set()
            self.metrics.mqtt_connected.set(1)
            log.info("control plane connected to %s", c.broker_url)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._publish_loop(client))

    def publish_event(self, event: dict[str, Any]) -> None:
        """Queue an outcome for `nodes/{node}/events` (sent when connected; events
        past MAX_QUEUED_EVENTS while the broker is away are dropped, oldest first)."""
        self._events.append({"node": self.config.name, "ts": time.time(), **event})
        del self._events[:-MAX_QUEUED_EVENTS]
        self._wake.set()

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        interval = self.config.telemetry_interval_s
        next_telemetry = time.monotonic()
        while True:
            while self._events:
                await client.publish(f"{self.topic}/events", encode(self._events[0]), qos=1)
                self._events.pop(0)  # only once published: a drop retries it
            await self._flush_locations(client)
            now = time.monotonic()
            if now >= next_telemetry:
                await client.publish(f"{self.topic}/telemetry", encode(await self._telemetry()))
                next_telemetry = now + interval
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, next_telemetry - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _flush_locations(self, client: aiomqtt.Client) -> None:
        for vm_id in list(self._dirty_locations):
            moved_to = self.host.tombstones.get(vm_id)
            if vm_id in self.host.vms:
                payload = encode({"vm": vm_id, "node": self.config.name,
                                  "endpoint": self.config.endpoint, "ts": time.time()})
            elif moved_to is not None:
                # The destination says the same; saying it here too means a source
                # that publishes last cannot clear what the destination published.
                payload = encode({"vm": vm_id, "node": moved_to.node,
                                  "endpoint": moved_to.endpoint, "ts": time.time()})
            else:
                payload = b""  # an empty retained message clears the topic
            await client.publish(location_topic(vm_id), payload, qos=1, retain=True)
            self._dirty_locations.discard(vm_id)  # only once published: a drop retries it

    async def _telemetry(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        per_vm: dict[str, dict[str, float]] = {}
        total_calls = 0.0
        for vm_id, hosted in list(self.host.vms.items()):
            calls = (hosted.calls - self._last_calls.get(vm_id, hosted.calls)) / elapsed
            self._last_calls[vm_id] = hosted.calls
            dirty = await self.host.dirty_rate(hosted)
            per_vm[vm_id] = {"calls_per_s": calls, "dirty_chunks_per_s": dirty}
            total_calls += calls
        for gone in set(self._last_calls) - set(self.host.vms):
            del self._last_calls[gone]
        load1, _, _ = os.getloadavg()
        return {"node": self.config.name, "ts": time.time(), "vms": len(self.host.vms),
                "memory_bytes": sum(h.vm.memory_bytes for h in self.host.vms.values()),
                "calls_per_s": total_calls, "load": load1, "per_vm": per_vm}

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                log.warning("dropped a control message with a non-binary payload")
                continue
            if message.topic.matches(f"{PREFIX}/nodes/+/presence"):
                self._note_presence(str(message.topic), payload)
                continue
            command = decode(payload)
            if command is None:
                continue
            await client.publish(f"{self.topic}/events", encode(await self._execute(command)),
                                 qos=1)

    async def _execute(self, command: dict[str, Any]) -> dict[str, Any]:
        op, cid = command.get("op"), command.get("id")
        event: dict[str, Any] = {"node": self.config.name, "id": cid, "op": op,
                                 "ts": time.time()}
        handler = self.commands.get(op) if isinstance(op, str) else None
        if handler is None:
            return {**event, "ok": False, "error": {
                "code": "unknown_command",
                "message": f"unknown op {op!r}; this node takes {sorted(self.commands)}"}}
        try:
            return {**event, "ok": True, "result": await handler(command)}
        except CloudletError as exc:
            return {**event, "ok": False, "error": exc.to_wire()}
        except Exception as exc:
            log.exception("command %r failed", op)
            return {**event, "ok": False, "error": {"code": "internal_error",
                                                    "message": repr(exc)}}

    def _note_presence(self, topic: str, payload: bytes | bytearray) -> None:
        node = topic.split("/")[-2]
        if not payload:
            self.peers.pop(node, None)
            return
        presence = decode(payload)
        if presence is None:
            return
        endpoint = presence.get("endpoint")
        if presence.get("status") == "online" and isinstance(endpoint, str):
            self.peers[node] = endpoint
        else:
            self.peers.pop(node, None)

    async def say_goodbye(self) -> None:
        """On a clean shutdown: mark this node offline now rather than by its Will."""
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await client.publish(presence_topic(self.config.name), self._offline(), qos=1,
                                     retain=True)
        except (aiomqtt.MqttError, TimeoutError):
            log.warning("could not publish offline presence; the Will will say it")
