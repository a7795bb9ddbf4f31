"""The MQTT broker `cloudlet up` embeds, so one machine needs no separate broker.

It is amqtt (pure Python, runs in our event loop), wrapped so that starting and
stopping it is an `async with`, it listens only where we say (amqtt's default
listener is 0.0.0.0:1883), and it admits only the cluster when given its
secret (`ClusterAccess`, what `cloudlet up` runs): cloudlets and the operator
with passwords derived from the cluster secret, clients with their bearer
token (or a derived password), nobody anonymous; and it enforces the topic
rules of `cloudlet.trust.acl` on every publish, subscribe and delivery,
retained messages and Wills included.

amqtt 0.12.1 has two bugs our control plane trips over; `PatchedBroker` fixes
both, narrowly, and this module warns if another amqtt version is installed,
since the fixes override amqtt internals (see the notes on each override):

(a) Retained messages leak across clients. On every CONNECT, amqtt
    (broker.py, `Broker._handle_client_session`) replays the retained messages
    of *every* topic filter in the broker's global subscription table, that is,
    filters other clients hold, to the newcomer. MQTT 3.1.1 sends retained
    messages only when a SUBSCRIBE establishes a subscription, and only those
    matching it [MQTT-3.3.1-6]. A daemon subscribed to its own commands would otherwise
    receive every retained presence and VM location.
(b) Keepalive is never enforced. amqtt's reader loop (mqtt/protocol/handler.py,
    `ProtocolHandler._reader_loop`) times out reading a fixed header after one
    keepalive period and calls `handle_read_timeout`, which the broker's handler
    (mqtt/protocol/broker_handler.py, `BrokerProtocolHandler`) defines as
    `pass`; the loop then simply reads again, forever. A client that hangs
    without closing its socket is never disconnected, so its Will (our nodes'
    "offline" presence) never fires. MQTT 3.1.1 requires the server to
    disconnect a client silent for 1.5 times its keepalive, as if the network
    had failed, which publishes the Will [MQTT-3.1.2-24].
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from cloudlet.errors import ConfigError, Unauthorized
from cloudlet.protocol import MAX_REPORT_BYTES
from cloudlet.trust import acl
from cloudlet.trust.client_tokens import ClientTokens

log = logging.getLogger(__name__)

# The amqtt release whose internals the overrides below were written against.
AMQTT_VERSION = "0.12.1"

# A client publishes RTT and position reports of a few KiB (cloudlet.protocol).
MAX_CLIENT_MESSAGE_BYTES = MAX_REPORT_BYTES
# [MQTT-3.1.2-24]: disconnect after one and a half keepalive periods of silence.
KEEPALIVE_GRACE = 1.5
# Bounds on shutdown: amqtt's own shutdown can block on a stuck client's socket.
SHUTDOWN_TIMEOUT_S = 10.0
CONNECTION_DRAIN_TIMEOUT_S = 2.0


@functools.cache
def check_amqtt_version() -> bool:
    """Warn (once) if the installed amqtt is not the release the workarounds target."""
    try:
        installed = importlib.metadata.version("amqtt")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown"
    if installed == AMQTT_VERSION:
        return True
    log.warning("amqtt %s is installed but edge_agent/broker.py patches amqtt %s: check that "
                "its two workarounds (retained delivery, keepalive) still apply and still "
                "override the right methods (tests/test_broker.py proves both)",
                installed, AMQTT_VERSION)
    return False


class _CredentialsAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Accept a client only if it presents the one configured username and password.

    amqtt loads plugins by dotted path and builds `Config` from the dict we give.
    """

    @dataclass
    class Config:
        username: str = ""
        password: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        config: _CredentialsAuth.Config = self.config
        # compare_digest: the time taken must not tell how much of a guess was right.
        user_ok = hmac.compare_digest((session.username or "").encode(), config.username.encode())
        password_ok = hmac.compare_digest((session.password or "").encode(),
                                          config.password.encode())
        return user_ok and password_ok


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@dataclass(frozen=True)
class ClusterAccess:
    """What the embedded broker needs to admit exactly the cluster."""

    cluster_secret: bytes
    authority_public_key: bytes


class _ClusterAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """Admit cloudlets and the operator by derived password, clients by token.

    A connection whose Will names a topic its user may not publish is refused
    too: a Will is a publish the broker makes later on the user's behalf."""

    @dataclass
    class Config:
        secret_hex: str = ""
        authority_hex: str = ""

    def _tokens(self) -> ClientTokens:
        config: _ClusterAuth.Config = self.config
        return ClientTokens(bytes.fromhex(config.secret_hex), bytes.fromhex(config.authority_hex))

    async def authenticate(self, *, session: Session) -> bool:
        config: _ClusterAuth.Config = self.config
        username, password = session.username, session.password
        if not username or not isinstance(password, str) or not password:
            return False
        secret = bytes.fromhex(config.secret_hex)
        derived = acl.derived_password(secret, username)
        ok = hmac.compare_digest(password.encode(), derived.encode())
        if not ok and acl.broker_user(username).kind == "client":
            try:
                ok = self._tokens().check(password) == username
            except Unauthorized:
                ok = False
        if ok and session.will_flag and not acl.may_publish(username, session.will_topic or ""):
            log.warning("refused MQTT user %r: its Will names %r, which it may not publish",
                        username, session.will_topic)
            return False
        if not ok:
            log.info("refused an MQTT connection for user %r (wrong credentials)", username[:64])
        return ok


class _ClusterTopics(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """The topic rules of `cloudlet.trust.acl`, per user, for every action."""

    @dataclass
    class Config:
        enabled: bool = True

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        username = session.username if session is not None else None
        if not username or not topic:
            return False
        if action == Action.PUBLISH:
            return acl.may_publish(username, topic)
        if action == Action.SUBSCRIBE:
            return acl.may_subscribe(username, topic)
        return acl.may_receive(username, topic)


class _KeepaliveReader(StreamReaderAdapter):  # type: ignore[misc]
    """The socket reader of one connection, reporting EOF once the client falls silent.

    Workaround (b). Every byte amqtt reads from a client goes through this
    adapter, so it is the one place that sees all traffic without copying any of
    amqtt's reader loop. Once `enforce` knows the keepalive (from the CONNECT),
    each read must complete within 1.5 keepalives of the previous one; if not,
    the read fails as the end of the stream would (`IncompleteReadError`, which
    amqtt turns into `NoDataError`), and keeps failing. amqtt then takes the
    very path it takes for a client that vanished: its reader loop ends, the
    broker publishes the Will and closes the socket. amqtt's own wait_for (one
    keepalive) still fires and restarts reads in between; the deadline is kept
    from the last byte received, so that does not move it.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._limit_s: float | None = None
        self._last_rx = 0.0
        self._expired = False

    def enforce(self, keepalive_s: float) -> None:
        """Start the deadline (from now, just after the CONNECT); 0 means no keepalive."""
        if keepalive_s > 0:
            self._limit_s = KEEPALIVE_GRACE * keepalive_s
            self._last_rx = asyncio.get_running_loop().time()

    async def read(self, n: int = -1) -> bytes:
        if self._expired:
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None)
        if self._limit_s is None:
            data: bytes = await super().read(n)
            return data
        try:
            async with asyncio.timeout_at(self._last_rx + self._limit_s):
                data = await super().read(n)
        except TimeoutError:
            self._expired = True
            log.info("MQTT client silent for %.1f s (1.5 x keepalive): disconnecting it",
                     self._limit_s)
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None) from None
        self._last_rx = asyncio.get_running_loop().time()
        return data


# Set while the broker handles a SUBSCRIBE, in that connection's task (workaround (a)).
_handling_subscribe: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cloudlet_broker_handling_subscribe", default=False)


class PatchedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's Broker with the two workarounds, and connections it can wait for.

    Admitting only the cluster (`cluster=True`) adds three rules amqtt lacks:

    (c) Nothing happens before authentication. amqtt deletes the existing session
        of a CONNECT's client id (its subscriptions with it), or takes over a live
        one, before it checks the credentials: one refused, anonymous CONNECT with
        `cloudlet-downtown` made that cloudlet deaf to every order, silently. Here
        a connection is authenticated first and refused at once otherwise; and an
        admitted one's session is kept under `USERNAME/CLIENT_ID`, so no user can
        reach another user's session by naming its client id.
    (d) A client's messages are not retained (the SDK retains none), and are at
        most `MAX_CLIENT_MESSAGE_BYTES`: a client could otherwise park unbounded
        memory in the broker for good.
    (e) Persistent sessions are not offered (every Cloudlet client uses a clean
        one): a stored session outliving its credentials is not worth its risks.
    """

    def __init__(self, config: dict[str, Any], *, cluster: bool = False) -> None:
        super().__init__(config)
        self._cluster = cluster
        self._refused_retain: set[str] = set()  # users told once that retain is refused
        # asyncio.Server.wait_closed (3.11) does not wait for connection handlers,
        # and amqtt's shutdown does not either: we track them to end them all.
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        # amqtt's version is this one line without the tracking and with a plain
        # StreamReaderAdapter; ours gives the connection the keepalive deadline.
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            await self._client_connected(listener_name, _KeepaliveReader(reader),
                                         StreamWriterAdapter(writer))
        finally:
            del self._connections[task]

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Session]:
        # Workaround (b): once the CONNECT is parsed the session knows the
        # client's keepalive; hand it to the connection's reader.
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port)
        if isinstance(reader, _KeepaliveReader):
            reader.enforce(session.keep_alive)
        if self._cluster:
            await self._admit(handler, session, reader, writer)
        return handler, session

    async def _admit(self, handler: Any, session: Session, reader: Any, writer: Any) -> None:
        """Rule (c): authenticate now, before amqtt touches any session; refuse at once
        otherwise. (amqtt's own deletion above used the raw client id, which names no
        admitted session: those live under `USERNAME/CLIENT_ID`.)"""
        if not session.clean_session or not await self._authenticate(session, None):
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError(f"refused a CONNECT for user {str(session.username)[:64]!r}")
        session.client_id = f"{session.username}/{session.client_id}"
        await self._delete_session(session.client_id)  # its own previous connection

    def _from_client(self, session: Session | None) -> bool:
        return (self._cluster and session is not None and session.username is not None
                and acl.broker_user(session.username).kind == "client")

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        if self._from_client(source_session):  # rule (d)
            assert source_session is not None
            if source_session.username not in self._refused_retain:
                self._refused_retain.add(source_session.username)
                log.info("not retaining messages of client %r (clients retain nothing)",
                         source_session.username[:64])
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        if self._from_client(session) and data is not None and (
                len(data) > MAX_CLIENT_MESSAGE_BYTES):  # rule (d)
            log.info("dropped a %d-byte message of a client on %s", len(data), topic)
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _handle_subscription(self, client_session: Session, handler: Any,
                                   subscribe_waiter: asyncio.Future[Any]) -> None:
        token = _handling_subscribe.set(True)
        try:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
        finally:
            _handling_subscribe.reset(token)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        # Workaround (a). amqtt calls this from two places: `_handle_subscription`
        # with the filter the client just subscribed to (right), and
        # `_handle_client_session` on CONNECT, once for every filter in
        # `self._subscriptions`, which holds *all* clients' filters (wrong; see the
        # module docstring). The context variable tells the two apart: only the
        # first sends. A resumed persistent session thus gets no retained replay
        # on reconnect, as in MQTT 3.1.1 and mosquitto; what it missed while
        # away is queued separately (`_publish_session_retained_messages`).
        if not _handling_subscribe.get():
            return
        if not self.plugins_manager.is_topic_filtering_enabled():
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        # amqtt sends retained messages on SUBSCRIBE without asking the topic plugins
        # whether the subscriber may receive each one; with an ACL, ask per topic.
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [handler.mqtt_publish(retained.topic, retained.data,
                                      min(qos, retained.qos or qos), retain=True)
                 for topic, retained in list(self._retained_messages.items())
                 if self._matches(topic, topic_filter)
                 and await self._topic_filtering(session, topic, Action.RECEIVE)]
        if sends:
            await asyncio.gather(*sends)

    def bound_port(self) -> int:
        """The port the listener got (the real one if 0 was asked for)."""
        sockets = self._servers["default"].instance.sockets
        port: int = sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """amqtt's shutdown, bounded, then every connection handler ended, listener closed."""
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await self.shutdown()
        except TimeoutError:
            log.warning("embedded MQTT broker did not shut down within %.0f s; "
                        "closing its connections", SHUTDOWN_TIMEOUT_S)
        finally:
            # All idempotent; they matter when shutdown timed out partway.
            for server in self._servers.values():
                await server.close_instance()
            await self._end_background_tasks()
            await self._end_connections()

    async def _end_background_tasks(self) -> None:
        # The broadcast loop and session monitor amqtt starts in `start` and
        # ends near the end of `shutdown`. The loop is ended amqtt's way
        # (bounded inside): cancelling it would orphan the broadcast it runs.
        if self._broadcast_task is not None and not self._broadcast_task.done():
            await self._shutdown_broadcast_loop()
        monitor = self._session_monitor_task
        if monitor is not None and not monitor.done():
            monitor.cancel()
            await asyncio.wait([monitor], timeout=CONNECTION_DRAIN_TIMEOUT_S)

    async def _end_connections(self) -> None:
        # Handlers still running after shutdown are finishing their bookkeeping,
        # or are stuck reading from a client that never sent CONNECT (not a
        # session, so shutdown did not close it). Abort the sockets so every read
        # ends, give the handlers a moment, then cancel what is left.
        if not self._connections:
            return
        for writer in self._connections.values():
            writer.transport.abort()
        tasks = set(self._connections)
        _, pending = await asyncio.wait(tasks, timeout=CONNECTION_DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CONNECTION_DRAIN_TIMEOUT_S)


def _broker_config(host: str, port: int, username: str | None,
                   password: str | None, cluster: ClusterAccess | None) -> dict[str, Any]:
    auth: dict[str, Any]
    if cluster is not None:
        auth = {f"{__name__}._ClusterAuth": {
                    "secret_hex": cluster.cluster_secret.hex(),
                    "authority_hex": cluster.authority_public_key.hex()},
                f"{__name__}._ClusterTopics": {"enabled": True}}
    elif username is not None and password is not None:
        auth = {f"{__name__}._CredentialsAuth": {"username": username, "password": password}}
    else:
        auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {
        # IPv6 without brackets: amqtt splits on the last colon, and keeps
        # brackets in the address it binds (which then fails to resolve).
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # `plugins` replaces amqtt's defaults (packet logging, $SYS every 20 s,
        # anonymous auth); with no auth plugin at all amqtt refuses everyone.
        "plugins": auth,
        # Added to every keepalive by amqtt; 0 keeps the 1.5 x rule exact.
        "timeout_disconnect_delay": 0,
    }


class EmbeddedBroker:
    """async with EmbeddedBroker(host="127.0.0.1", port=1883) as broker: ... broker.url

    With `cluster`, only the cluster gets in, under its topic rules (`cloudlet up`).
    With a username and password, clients presenting anything else (or nothing)
    are refused. With neither, anyone may connect (tests of the broker itself).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *,
                 username: str | None = None, password: str | None = None,
                 cluster: ClusterAccess | None = None) -> None:
        if (username is None) != (password is None):
            raise ConfigError("the embedded broker needs both a username and a password, "
                              "or neither")
        if cluster is not None and username is not None:
            raise ConfigError("the embedded broker takes the cluster's access or one "
                              "username, not both")
        self._cluster = cluster
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._broker: PatchedBroker | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        if self._broker is not None:
            raise RuntimeError("EmbeddedBroker is already running")
        check_amqtt_version()
        # amqtt binds its loop at construction: it must happen inside the running loop.
        broker = PatchedBroker(_broker_config(self._host, self._port, self._username,
                                               self._password, self._cluster),
                                cluster=self._cluster is not None)
        # amqtt logs a failed start with a traceback before raising; the caller's one
        # line (below) says all of it, so that record is kept out of the user's way.
        quiet = _DropRecords("Broker startup failed")
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(quiet)
        try:
            await broker.start()
        except BrokerError as exc:
            await broker.plugins_manager.close()
            raise ConfigError(f"cannot start the embedded MQTT broker on "
                              f"{self._host}:{self._port}: {exc.__cause__ or exc}") from exc
        finally:
            amqtt_log.removeFilter(quiet)
        self._port = broker.bound_port()
        self._broker = broker
        return self

    async def __aexit__(self, *exc: object) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.stop()

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self._port}"
