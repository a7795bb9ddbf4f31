"""Finding cloudlets: from the broker's retained presence, or from a static list.

With a broker, every cloudlet's retained `nodes/{node}/presence` says where it
is and whether it is online; its Last Will flips it offline when it dies, so a
killed cloudlet drops out of `online()` within the broker's keepalive window.
Sessions also watch their VM's retained `vms/{vm}/location` here, so a move is
followed even when no `moved` notice reached the client.

Nothing from the broker is believed because it arrived: presences and
locations pass the same `ControlGate` the cloudlets use (signed by the
cloudlet they are about, with a certificate of the token's cluster, and newer
than what was believed), so a forged retained message redirects no one; what
is dropped is counted in `dropped` and logged once per sender. The client logs
in to the broker as itself: username its client name, password its token
(unless the broker URL carries other credentials, as an external Mosquitto's).

Without a broker (`endpoints=[...]`), the list is fixed and a cloudlet's
liveness is what probing finds (`mark_reachable`). aiomqtt is imported only
when a broker is used: a phone that talks to fixed endpoints does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

from cloudlet.errors import ConfigError, TrustError
from cloudlet.protocol import (
    ALL_PRESENCE,
    Kind,
    Location,
    location_topic,
    position_topic,
    report_message,
    rtt_topic,
)
from cloudlet.tasks import own
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.gate import ControlGate, DropLog, claimed_sender

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 5.0

LocationListener = Callable[[str, Location], None]


@dataclass(frozen=True)
class CloudletInfo:
    """One cloudlet as discovery knows it."""

    node: str
    endpoint: str
    online: bool = True
    position_m: tuple[float, float] | None = None
    zone: str = ""
    seen_at: float = 0.0  # time.monotonic() of the last news

    @property
    def location(self) -> Location:
        return Location(self.node, self.endpoint)


class Discovery:
    """The cloudlets a client can use. `async with` starts and stops its MQTT task."""

    def __init__(self, endpoints: Sequence[str] = (), broker: str | None = None,
                 client_id: str = "client", *, verifier: CertificateVerifier | None = None,
                 password: str | None = None) -> None:
        if not endpoints and not broker:
            raise ConfigError("give cloudlet endpoints or a broker URL to find cloudlets")
        self._cloudlets: dict[str, CloudletInfo] = {}
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"endpoint {url!r} must be an http(s) URL")
            url = url.rstrip("/")
            self._cloudlets[url] = CloudletInfo(url, url, seen_at=time.monotonic())
        self.broker = broker
        self.client_id = client_id
        if broker and verifier is None:
            raise ConfigError("discovery through a broker needs the cluster's key to verify "
                              "what it reads (it comes with the client's token)")
        self._gate = ControlGate(verifier) if verifier is not None else None
        self._drop_log = DropLog()
        self._password = password
        self.changed = asyncio.Event()  # set on every change; waiters clear it
        self._locations: dict[str, Location] = {}
        self._listeners: dict[str, list[LocationListener]] = {}
        self._mqtt: Any = None  # aiomqtt.Client while connected
        self._task: asyncio.Task[None] | None = None
        self._subscribing: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self._closing = False

    async def __aenter__(self) -> Discovery:
        self._closing = False
        if self.broker:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="cloudlet-discovery")
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [t for t in (self._task, *self._subscribing) if t is not None]
        self._task = None
        # The loop must end, not reconnect, even if the cancellation arrives as an
        # MqttError (aiomqtt's disconnect, cut short, raises one in its place).
        self._closing = True
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- what is known ----------------------------------------------------------------

    def online(self) -> list[CloudletInfo]:
        return sorted((c for c in self._cloudlets.values() if c.online), key=lambda c: c.node)

    def candidates(self) -> list[CloudletInfo]:
        """What to probe: the online cloudlets, or with a static list all of them (a
        probe is the only way to see one come back)."""
        if self.broker:
            return self.online()
        return sorted(self._cloudlets.values(), key=lambda c: c.node)

    def get(self, node: str) -> CloudletInfo | None:
        return self._cloudlets.get(node)

    def location_of(self, vm_id: str) -> Location | None:
        return self._locations.get(vm_id)

    async def wait_for(self, predicate: Callable[[Discovery], bool], timeout_s: float) -> bool:
        """Wait until `predicate(self)` holds (e.g. two cloudlets online)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate(self):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True

    def mark_reachable(self, endpoint: str, node: str | None, reachable: bool) -> None:
        """What probing found. With a static list, probing is the only liveness news;
        it also learns each endpoint's node name from its health answer."""
        for key, info in list(self._cloudlets.items()):
            if info.endpoint != endpoint:
                continue
            if self.broker:
                return  # presence and the Will say who is online
            new = replace(info, online=reachable, node=node or info.node,
                          seen_at=time.monotonic())
            if new != info:
                self._cloudlets[key] = new
                self.changed.set()
            return

    # --- VM locations ----------------------------------------------------------------

    def watch(self, vm_id: str, listener: LocationListener) -> Callable[[], None]:
        """Call `listener(vm_id, location)` when the VM's retained location changes.
        Returns the function that stops watching."""
        self._listeners.setdefault(vm_id, []).append(listener)
        if self._mqtt is not None:
            self._subscribe_later(vm_id)

        def stop() -> None:
            listeners = self._listeners.get(vm_id, [])
            with contextlib.suppress(ValueError):
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(vm_id, None)
                self._locations.pop(vm_id, None)
        return stop

    def _subscribe_later(self, vm_id: str) -> None:
        client = self._mqtt
        if client is None:
            return
        # Owned: cancelled on exit. A subscribe lost with the connection is redone on
        # reconnect (see `_run`); a failure is logged when the task ends.
        own(self._subscribing, client.subscribe(location_topic(vm_id), qos=1),
            f"subscribing to VM {vm_id}'s location", log)

    async def publish_rtt(self, rtt_ms: dict[str, float]) -> None:
        """Tell the placer what this client measured (`clients/{client}/rtt`)."""
        await self._report(rtt_topic(self.client_id), rtt_ms=rtt_ms)

    async def publish_position(self, x_m: float, y_m: float, **velocity_m_s: float) -> bool:
        """Tell the placer where this client is (`clients/{client}/position`), with
        `vx_m_s`/`vy_m_s` if known. True if the broker took it; False when the broker
        is not connected now (a position is soon stale: it is not kept to send later)."""
        return await self._report(position_topic(self.client_id), x_m=x_m, y_m=y_m,
                                  **velocity_m_s)

    async def _report(self, topic: str, **fields: Any) -> bool:
        """One client report at QoS 0: telemetry, never worth failing a call over."""
        client = self._mqtt
        if client is None:
            return False
        payload = report_message(self.client_id, **fields, ts=time.time())
        try:
            await client.publish(topic, payload, qos=0)
        except Exception:  # the connection broke (aiomqtt is not imported here); `_run` reconnects
            return False
        return True

    # --- the broker ------------------------------------------------------------------

    async def _run(self) -> None:
        import aiomqtt  # only with a broker: keeps remote-only clients light

        assert self.broker is not None
        url = urlparse(self.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ConfigError(f"broker URL {self.broker!r} must be mqtt://host:port")
        tls = url.scheme == "mqtts"
        if self._password and not url.password and token_in_clear(self.broker):
            # The broker login is the client's bearer token: over plain MQTT anyone on
            # the path reads it, and it opens every cloudlet as this client.
            log.warning("sending this client's token as its broker password in clear to %s: "
                        "use mqtts:// for a broker beyond this machine", self.broker)
        backoff = 0.2
        while True:
            try:
                async with aiomqtt.Client(
                        url.hostname, url.port or (8883 if tls else 1883),
                        identifier=f"cloudlet-client-{self.client_id}-{secrets.token_hex(3)}",
                        username=url.username or self.client_id,
                        password=url.password or self._password,
                        tls_params=aiomqtt.TLSParameters() if tls else None,
                        keepalive=10) as client:
                    await client.subscribe(ALL_PRESENCE, qos=1)
                    for vm_id in self._listeners:
                        await client.subscribe(location_topic(vm_id), qos=1)
                    self._mqtt = client
                    self.connected.set()
                    backoff = 0.2
                    async for message in client.messages:
                        self._handle(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                log.info("discovery: broker %s lost (%s); retrying in %.1f s", self.broker,
                         exc, backoff)
            finally:
                self._mqtt = None
                self.connected.clear()
            if self._closing:  # the session's end may be an error in place of the cancel
                raise asyncio.CancelledError
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    @property
    def dropped(self) -> dict[str, int]:
        """Messages from the broker not believed, by reason."""
        return dict(self._gate.drops) if self._gate is not None else {}

    def _handle(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray) or self._gate is None:
            return
        try:
            believed = self._gate.admit(topic, payload)
        except TrustError as exc:
            reason = str(exc.details.get("reason", "untrusted"))
            if self._drop_log.first(claimed_sender(topic), reason):
                log.warning("discovery: not believed, on %s (%s): %s", topic[:120], reason,
                            exc.message)
            return
        if believed is None:
            return
        if believed.kind is Kind.PRESENCE:
            self._presence(believed.name, believed.body)
        elif believed.kind is Kind.LOCATION:
            self._location(believed.name, believed.body)

    def _presence(self, node: str, msg: dict[str, Any] | None) -> None:
        if msg is None:
            self._cloudlets.pop(node, None)
        else:
            endpoint = msg.get("endpoint")
            old = self._cloudlets.get(node)
            if not isinstance(endpoint, str):
                endpoint = old.endpoint if old else ""
            position = msg.get("position")
            pos = (float(position[0]), float(position[1])) if (
                isinstance(position, list) and len(position) == 2
                and all(isinstance(v, int | float) for v in position)) else None
            self._cloudlets[node] = CloudletInfo(
                node, endpoint, online=msg.get("status") == "online" and bool(endpoint),
                position_m=pos, zone=str(msg.get("zone", "")), seen_at=time.monotonic())
        self.changed.set()

    def _location(self, vm_id: str, msg: dict[str, Any]) -> None:
        where = Location.from_wire(msg)
        if where is None or self._locations.get(vm_id) == where:
            return
        self._locations[vm_id] = where
        for listener in list(self._listeners.get(vm_id, ())):
            listener(vm_id, where)


def token_in_clear(broker: str) -> bool:
    """Whether a client's login to `broker` crosses a network unencrypted: plain
    MQTT to anything but this machine."""
    url = urlparse(broker)
    if url.scheme != "mqtt" or not url.hostname:
        return False
    try:
        return not ipaddress.ip_address(url.hostname).is_loopback
    except ValueError:
        return url.hostname != "localhost"
