"""The MQTT control plane of one daemon: presence, telemetry, commands, events, VM locations.

Topics and message shapes are `cloudlet.protocol`'s. Everything this cloudlet
publishes is sealed with its own key (`cloudlet.trust.sealed`); everything it
receives goes through its `ControlGate` first, and what is not believed is
dropped, counted (`cloudlet_control_dropped_total{reason}`) and logged once
per sender and reason. So an outsider who reaches the broker, or a message
replayed from yesterday, moves nothing:

- commands must be signed by an orchestrator or operator, fresh, unseen, and of
  a fencing epoch no older than the newest this cloudlet has seen
  (`EpochFence`); a deposed leader's command is refused with an event;
- presences of other cloudlets fill the `PeerDirectory` (where a VM may go) only
  when signed by that cloudlet;
- this cloudlet publishes the location only of VMs it hosts (a location names
  its signer), and clears it when one is destroyed.

Presence is refreshed every `presence_refresh_s`, so readers can tell a live
cloudlet from one whose Will was lost. The Will is sealed when the connection
starts, with that connection's session id, so it ends that presence and no
later one.

The broker is not on the data plane's path: losing it never stops calls, nor a
command already running (commands run in tasks owned by `run`, not by one
connection). The client reconnects with exponential backoff and, once back,
re-publishes presence and every VM's location.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import aiomqtt

from cloudlet.errors import CloudletError, ConfigError, TrustError
from cloudlet.protocol import (
    ALL_LEASES,
    ALL_PRESENCE,
    Kind,
    Location,
    commands_topic,
    event_message,
    events_topic,
    location_message,
    location_topic,
    offline_message,
    presence_message,
    presence_topic,
    telemetry_message,
    telemetry_topic,
)
from cloudlet.trust.gate import ControlGate, DropLog, claimed_sender
from cloudlet.trust.sealed import Identity, seal
from edge_agent.config import NodeConfig
from edge_agent.fencing import EPOCH_FILE, EpochFence
from edge_agent.metrics import Metrics
from edge_agent.peers import PeerDirectory
from edge_agent.vm_host import HostedVM, VMHost

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
MAX_QUEUED_EVENTS = 1000

CommandHandler = Callable[[dict[str, Any]], Awaitable[Any]]


def broker_address(url: str) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://...")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


class ControlPlane:
    def __init__(self, config: NodeConfig, host: VMHost, metrics: Metrics,
                 commands: dict[str, CommandHandler], *, identity: Identity,
                 gate: ControlGate, peers: PeerDirectory) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.commands = commands
        self.identity = identity
        self.gate = gate
        self.peers = peers
        self.fence = EpochFence(config.state_path / EPOCH_FILE)
        self._drop_log = DropLog()
        self._client: aiomqtt.Client | None = None
        self._session_id = ""
        self._dirty_locations: set[str] = set()
        self._events: list[dict[str, Any]] = []  # outcomes to publish (e.g. migrations)
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self._stopping = False  # `stop()`: `run` ends rather than reconnect
        self._last_calls: dict[str, int] = {}
        self._last_tick = time.monotonic()
        # Orders signed before this process started are refused: the nonces that
        # made them believable once were remembered by the process that is gone, so
        # a replay after a restart would otherwise run a second time. A genuine
        # order sent during a restart was lost with the connection anyway (clean
        # sessions): its sender retries with a fresh one.
        self.started_unix = time.time()
        host.on_change = self._vm_changed

    def _seal(self, topic: str, message: dict[str, Any]) -> bytes:
        return seal(self.identity, topic, message)

    # --- payloads -----------------------------------------------------------------------

    def _presence(self) -> bytes:
        c = self.config
        return self._seal(presence_topic(c.name), presence_message(
            c.name, c.endpoint, session=self._session_id,
            position_m=(c.position_x_m, c.position_y_m), zone=c.zone,
            capacity={"max_vms": c.max_vms, "max_memory_bytes": c.max_memory_mib << 20},
            vms=len(self.host.vms), refresh_s=c.presence_refresh_s))

    def _offline(self) -> bytes:
        return self._seal(presence_topic(self.config.name),
                          offline_message(self.config.name, session=self._session_id))

    def _vm_changed(self, vm_id: str, hosted: HostedVM | None) -> None:
        self._dirty_locations.add(vm_id)
        self._wake.set()

    # --- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled, reconnecting with backoff. Commands being
        carried out belong to this call, not to one connection: a broker that goes
        away does not cancel a migration half-way."""
        host_name, port, tls = broker_address(self.config.broker_url)
        backoff = BACKOFF_START_S
        self._stopping = False
        async with asyncio.TaskGroup() as running:
            while True:
                # Errors arrive wrapped in ExceptionGroups from the session's TaskGroup.
                # None may end the daemon: the data plane must outlive the broker.
                try:
                    await self._session(host_name, port, tls or self.config.broker_tls,
                                        running)
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
                if self._stopping:  # the session's end may be an error in place of the cancel
                    raise asyncio.CancelledError  # ... and commands under way are cancelled
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """The daemon is stopping: `run`, cancelled next, must end, not reconnect.

        Why a flag and not the cancellation alone: on Python 3.11 a cancellation can
        arrive as an error instead (a TaskGroup whose child fails while being
        cancelled raises that error; aiomqtt's disconnect, cut short, raises
        MqttError), which `run` takes for a lost broker; and a TaskGroup can leave
        the task counted as cancelling after a mere broker loss, so
        `Task.cancelling()` cannot tell either."""
        self._stopping = True

    async def _session(self, host_name: str, port: int, tls: bool,
                       running: asyncio.TaskGroup) -> None:
        c = self.config
        self._session_id = secrets.token_hex(8)
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
            await client.subscribe(commands_topic(c.name), qos=1)
            await client.subscribe(ALL_PRESENCE, qos=1)
            await client.subscribe(ALL_LEASES, qos=1)
            await client.publish(presence_topic(c.name), self._presence(), qos=1, retain=True)
            self._dirty_locations.update(self.host.vms)  # a broker restart may have lost them
            self.connected.set()
            self.metrics.mqtt_connected.set(1)
            log.info("control plane connected to %s", c.broker_url)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client, running))
                tg.create_task(self._publish_loop(client))

    def publish_event(self, event: dict[str, Any]) -> None:
        """Queue an outcome for `nodes/{node}/events` (sent when connected; events
        past MAX_QUEUED_EVENTS while the broker is away are dropped, oldest first)."""
        self._events.append(event_message(self.config.name, **event))
        del self._events[:-MAX_QUEUED_EVENTS]
        self._wake.set()

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        c = self.config
        next_telemetry = time.monotonic()
        next_presence = next_telemetry + c.presence_refresh_s  # the first went out at connect
        while True:
            while self._events:
                await client.publish(events_topic(c.name),
                                     self._seal(events_topic(c.name), self._events[0]), qos=1)
                self._events.pop(0)  # only once published: a drop retries it
            await self._flush_locations(client)
            now = time.monotonic()
            if now >= next_presence:
                await client.publish(presence_topic(c.name), self._presence(), qos=1,
                                     retain=True)
                next_presence = now + c.presence_refresh_s
            if now >= next_telemetry:
                await client.publish(telemetry_topic(c.name), self._seal(
                    telemetry_topic(c.name), telemetry_message(c.name, **await self._telemetry())))
                next_telemetry = now + c.telemetry_interval_s
            self._wake.clear()
            try:
                async with asyncio.timeout(max(0.0, min(next_telemetry, next_presence)
                                               - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _flush_locations(self, client: aiomqtt.Client) -> None:
        """Publish the location of each VM that changed. The VM is taken off the dirty
        set *before* the publish is awaited: a change during the await (the VM
        destroyed while its location was going out) marks it again, so the clear that
        follows is never lost."""
        for vm_id in list(self._dirty_locations):
            self._dirty_locations.discard(vm_id)
            topic = location_topic(vm_id)
            hosted = self.host.vms.get(vm_id)
            if hosted is not None:
                payload = self._seal(topic, location_message(
                    vm_id, Location(self.config.name, self.config.endpoint),
                    generation=hosted.generation))
            elif vm_id in self.host.tombstones:
                # Moved away: its destination publishes where it is now (a location
                # is signed by the cloudlet it names); a stale one here still answers
                # `vm_moved` to whoever comes.
                continue
            else:
                payload = b""  # destroyed: an empty retained message clears the topic
            try:
                await client.publish(topic, payload, qos=1, retain=True)
            except BaseException:
                self._dirty_locations.add(vm_id)  # not published: the next round retries
                raise

    async def _telemetry(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        per_vm: dict[str, dict[str, Any]] = {}
        total_calls = 0.0
        for vm_id, hosted in list(self.host.vms.items()):
            calls = (hosted.calls - self._last_calls.get(vm_id, hosted.calls)) / elapsed
            self._last_calls[vm_id] = hosted.calls
            dirty = await self.host.dirty_rate(hosted)
            per_vm[vm_id] = {"calls_per_s": calls, "dirty_chunks_per_s": dirty,
                             "memory_bytes": hosted.vm.memory_bytes, "owner": hosted.owner,
                             "generation": hosted.generation}
            total_calls += calls
        for gone in set(self._last_calls) - set(self.host.vms):
            del self._last_calls[gone]
        load1, _, _ = os.getloadavg()
        return {"vms": len(self.host.vms), "interval_s": self.config.telemetry_interval_s,
                "epoch": self.fence.newest,
                "memory_bytes": sum(h.vm.memory_bytes for h in self.host.vms.values()),
                "calls_per_s": total_calls, "load": load1, "per_vm": per_vm}

    # --- receiving ----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client, running: asyncio.TaskGroup) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                self._dropped(topic, "malformed", "a control message with a non-binary payload")
                continue
            try:
                believed = self.gate.admit(topic, payload)
            except TrustError as exc:
                self._dropped(topic, str(exc.details.get("reason", "untrusted")), exc.message)
                continue
            if believed is None:
                continue
            if believed.kind is Kind.PRESENCE:
                self.peers.note_presence(believed.name, believed.body, believed.ts)
            elif believed.kind is Kind.LEASE:
                epoch = believed.body.get("epoch")
                if type(epoch) is int and epoch >= 0:
                    self.fence.observe(epoch)
            elif believed.kind is Kind.COMMANDS and believed.ts < self.started_unix:
                self._dropped(topic, "before_start", "an order signed before this cloudlet "
                                                     "started (a replay after a restart?)")
            elif believed.kind is Kind.COMMANDS and believed.name == self.config.name:
                # Owned by `run`'s task group: it outlives this connection.
                running.create_task(self._carry_out(believed.body, believed.signer.subject))

    def _dropped(self, topic: str, reason: str, why: str) -> None:
        self.metrics.control_dropped.labels(reason).inc()
        sender = claimed_sender(topic)
        if self._drop_log.first(sender, reason):
            log.warning("dropped a control message on %s (%s): %s (logged once per sender "
                        "and reason; cloudlet_control_dropped_total counts them all)",
                        topic[:120], reason, why)

    async def _carry_out(self, command: dict[str, Any], signer: str) -> None:
        """Run one believed command and queue its outcome as an event. Never raises:
        it runs in the task group that outlives connections."""
        try:
            event = await self._execute(command, signer)
        except Exception:
            log.exception("command %r failed", command.get("op"))
            event = {"id": command.get("id"), "op": command.get("op"), "ok": False,
                     "error": {"code": "internal_error", "message": "see the cloudlet's log"}}
        self.publish_event(event)

    async def _execute(self, command: dict[str, Any], signer: str) -> dict[str, Any]:
        op, cid, epoch = command.get("op"), command.get("id"), command["epoch"]
        event: dict[str, Any] = {"id": cid, "op": op, "epoch": epoch, "by": signer}
        try:
            self.fence.admit(epoch)
        except CloudletError as exc:
            log.warning("refused command %r from %s: %s", op, signer, exc.message)
            return {**event, "ok": False, "error": exc.to_wire()}
        handler = self.commands.get(op) if isinstance(op, str) else None
        if handler is None:
            return {**event, "ok": False, "error": {
                "code": "unknown_command",
                "message": f"unknown op {op!r}; this node takes {sorted(self.commands)}"}}
        try:
            return {**event, "ok": True, "result": await handler(command)}
        except CloudletError as exc:
            return {**event, "ok": False, "error": exc.to_wire()}

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
