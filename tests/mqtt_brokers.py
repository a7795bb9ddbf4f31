"""MQTT brokers for tests: a real mosquitto and our embedded amqtt, one URL each.

Control-plane tests take `any_broker` and so run against both: mosquitto is the
spec-conforming reference, the embedded broker is what `cloudlet up` runs. Both
listen on a free loopback port and are stopped after the session.

Also here: a raw MQTT 3.1.1 client (a few hand-built packets over a plain TCP
connection), for what real client libraries will not do on purpose, such as
hanging without closing the socket or dying without a DISCONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import pytest

from edge_agent.broker import ClusterAccess, EmbeddedBroker

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# A free port is found by binding port 0 and closing; another process may take it
# before mosquitto binds it, so starting is retried this many times.
START_ATTEMPTS = 3

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


# --- finding tools -------------------------------------------------------------------


def in_ci() -> bool:
    """CI must run every broker test: a missing binary there is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or fail (in CI) or skip (elsewhere) saying how to install it."""
    path = shutil.which(name)
    if path is not None:
        return path
    how = f"install it with `apt-get install -y {package}` (Debian/Ubuntu) or your package manager"
    if in_ci():
        pytest.fail(f"`{name}` is not installed but CI is set, so broker tests must run: {how}",
                    pytrace=False)
    pytest.skip(f"`{name}` is not installed; {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def address(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt://HOST:PORT URL."""
    parts = urlsplit(url)
    assert parts.scheme == "mqtt" and parts.hostname and parts.port, url
    return parts.hostname, parts.port


# --- a raw MQTT 3.1.1 client ---------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, *, keepalive_s: int = 60,
                   will: tuple[str, bytes] | None = None, will_retain: bool = False,
                   username: str | None = None, password: str | None = None) -> bytes:
    """A CONNECT (clean session, Will at QoS 0 if given)."""
    flags = 0x02
    payload = _field(client_id.encode())
    if will is not None:
        flags |= 0x04 | (0x20 if will_retain else 0)
        payload += _field(will[0].encode()) + _field(will[1])
    if username is not None:
        flags |= 0x80
        payload += _field(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _field(password.encode())
    body = _field(b"MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


@contextlib.asynccontextmanager
async def raw_client(url: str, client_id: str, *, keepalive_s: int = 60,
                     will: tuple[str, bytes] | None = None,
                     timeout_s: float = 5.0
                     ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection that has sent CONNECT and got CONNACK; it sends nothing by itself."""
    host, port = address(url)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(connect_packet(client_id, keepalive_s=keepalive_s, will=will))
        async with asyncio.timeout(timeout_s):
            connack = await reader.readexactly(4)
        assert connack == CONNACK_ACCEPTED, connack
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """True if the other side closes (or resets) the connection within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _accepts_mqtt(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(connect_packet(f"probe-{os.getpid()}"))
            reply = s.recv(4)
            s.sendall(DISCONNECT)
            return reply == CONNACK_ACCEPTED
    except OSError:
        return False


# --- mosquitto -----------------------------------------------------------------------


class Mosquitto:
    """The real `mosquitto` on a free loopback port: `with Mosquitto(binary, dir) as url:`."""

    def __init__(self, binary: str, work_dir: Path, port: int | None = None) -> None:
        self._port = port  # None: a free one
        self._binary = binary
        self._dir = work_dir
        self.log_path = work_dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self, port: int) -> str:
        return "\n".join([
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            # Debian's default (1000) silently drops QoS 1 messages to slow subscribers.
            "max_queued_messages 100000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # Started as root, mosquitto switches to user `mosquitto`, who cannot
            # write our log in pytest's private tmp; naming ourselves keeps us.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "",
        ])

    def __enter__(self) -> str:
        for _ in range(START_ATTEMPTS):
            port = self._port or free_port()
            config = self._dir / "mosquitto.conf"
            config.write_text(self._config(port))
            self._proc = subprocess.Popen([self._binary, "-c", str(config)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            if self._wait_ready(port):
                return f"mqtt://127.0.0.1:{port}"
            self._stop()
        raise RuntimeError(f"mosquitto did not start in {START_ATTEMPTS} attempts; "
                           f"its log ({self.log_path}):\n{self._log_tail()}")

    def _wait_ready(self, port: int) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            if _accepts_mqtt("127.0.0.1", port):
                return True
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        """Send `sig` to the broker: SIGSTOP hangs it (the kernel still accepts its TCP
        connections, nothing answers), SIGCONT lets it go on."""
        assert self._proc is not None, "not started"
        self._proc.send_signal(sig)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError as exc:
            return f"(unreadable: {exc})"

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()


# --- the embedded broker, for synchronous tests -------------------------------------


class BrokerThread:
    """An EmbeddedBroker on its own event loop in a background thread: `with ... as url:`.

    Sync tests (and tests that run their own `asyncio.run`) cannot share the loop
    a broker needs, so it gets a thread. Leaving stops the broker cleanly.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None,
                 cluster: ClusterAccess | None = None) -> None:
        self._username = username
        self._password = password
        self._cluster = cluster
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._url: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt-broker", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread by __enter__/__exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with EmbeddedBroker("127.0.0.1", 0, username=self._username,
                                  password=self._password, cluster=self._cluster) as broker:
            self._url = broker.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"the embedded broker did not start in {READY_TIMEOUT_S} s")
        if self._url is None:
            raise RuntimeError("the embedded broker failed to start") from self._error
        return self._url

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_TIMEOUT_S + 15.0)  # EmbeddedBroker bounds its own shutdown
        if self._thread.is_alive():
            raise RuntimeError("the embedded broker's thread did not stop")
        if self._error is not None:
            raise RuntimeError("the embedded broker failed") from self._error


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real mosquitto (skipped if not installed, failed if so in CI)."""
    binary = require_binary("mosquitto", "mosquitto")
    with Mosquitto(binary, tmp_path_factory.mktemp("mosquitto")) as url:
        yield url


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[str]:
    """URL of our EmbeddedBroker (anonymous), running for the whole session."""
    with BrokerThread() as url:
        yield url


@pytest.fixture(params=["mosquitto", "embedded_broker"], ids=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> str:
    """URL of each broker in turn: the test runs once against each."""
    url: str = request.getfixturevalue(request.param)
    return url
