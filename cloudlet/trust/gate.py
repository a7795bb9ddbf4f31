"""The control plane's checkpoint: which signed messages a receiver may believe.

Every receiver (a cloudlet, the orchestrator, the SDK, `cloudlet status`) runs
its MQTT payloads through a `ControlGate` before acting on them. It is pure:
bytes and a topic in, a `Believed` message or a `TrustError` out, its clock
injected, so each rule below is a unit test.

- presence: signed by that cloudlet (role `cloudlet`, subject = the topic's
  node), saying so; newer than the last believed, except the Will of the very
  connection whose presence is believed.
- telemetry: signed by that cloudlet; within the window and newer than the last.
- events: signed by that cloudlet; within the window, nonce unseen.
- commands: signed by an `orchestrator` or `operator`, with an integer
  `epoch` >= 0; within the window, nonce unseen.
- location: signed by the cloudlet the body names (role `cloudlet`), for the
  topic's VM; newer than the last believed.
- lease: signed by an `orchestrator`; newer than the last believed.

What is not believed is dropped and counted by reason (`drops`); `DropLog`
says when to log, once per sender and reason, so a flood of forgeries cannot
flood the log too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from cloudlet.errors import TrustError
from cloudlet.protocol import SCHEMA_VERSION, SIGNED_KINDS, Kind, parse_topic
from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_OPERATOR,
    ROLE_ORCHESTRATOR,
    Certificate,
    CertificateVerifier,
    Clock,
    untrusted,
)
from cloudlet.trust.replay import DEFAULT_WINDOW_S, NewestFirst, ReplayWindow
from cloudlet.trust.sealed import open_sealed

MAX_LOGGED_SENDERS = 1024  # distinct (sender, reason) pairs logged before going quiet


@dataclass(frozen=True)
class Believed:
    """A message that passed every rule for its topic."""

    kind: Kind
    name: str  # the node, VM or region the topic names
    signer: Certificate
    body: dict[str, Any]
    ts: float


class ControlGate:
    """Checks control-plane messages for one receiver (it remembers what it believed)."""

    def __init__(self, verifier: CertificateVerifier, *, window_s: float = DEFAULT_WINDOW_S,
                 clock: Clock | None = None) -> None:
        self.verifier = verifier
        self.clock: Clock = clock if clock is not None else verifier.clock
        self.window_s = window_s
        self.orders = ReplayWindow(window_s, clock=self.clock)
        self.state = NewestFirst()
        self._sessions: dict[str, str] = {}  # presence topic -> believed online session
        self.drops: Counter[str] = Counter()  # by reason

    def admit(self, topic: str, raw: bytes | bytearray) -> Believed | None:
        """The message, if it may be believed; None for what is not news (an empty
        retained payload, or a message already believed); `TrustError` otherwise
        (also counted in `drops`)."""
        try:
            return self._admit(topic, raw)
        except TrustError as exc:
            self.drops[str(exc.details.get("reason", "untrusted"))] += 1
            raise

    def _admit(self, topic: str, raw: bytes | bytearray) -> Believed | None:
        ref = parse_topic(topic)
        if ref is None or ref.kind not in SIGNED_KINDS:
            raise untrusted("unknown_topic", f"not a signed control topic: {topic[:120]!r}")
        if not raw:
            return None  # a cleared retained topic: no news (the broker's ACL guards it)
        sealed = open_sealed(self.verifier, topic, raw)
        body, signer = sealed.body, sealed.signer
        version = body.get("v")
        if version != SCHEMA_VERSION:
            # Named by type unless a plain number: the repr of a deep value would not return.
            shown = version if type(version) is int else type(version).__name__
            raise untrusted("schema", f"schema {shown} from {signer.subject!r}")
        self._authorize(ref.kind, ref.name, signer, body)
        kind = ref.kind
        if sealed.ts > self.clock() + self.window_s:
            # Dated ahead: believed, it would outrank every genuine message to come.
            raise untrusted("future", f"a message from {signer.subject!r} dated "
                                      f"{sealed.ts - self.clock():.0f} s ahead")
        if kind in (Kind.COMMANDS, Kind.EVENTS):
            self.orders.check(signer.subject, sealed.ts, sealed.nonce)
        elif kind is Kind.TELEMETRY:
            if abs(self.clock() - sealed.ts) > self.window_s:
                raise untrusted("stale", f"telemetry of {ref.name!r} is old")
            self.state.check(topic, signer.subject, (sealed.ts,), sealed.nonce)
            self.state.accept(topic, (sealed.ts,), sealed.nonce)
        else:  # retained state
            if self.state.is_duplicate(topic, sealed.nonce):
                return None
            order = self._order(kind, body, sealed.ts)
            if not self._ends_believed_session(kind, topic, body):
                self.state.check(topic, signer.subject, order, sealed.nonce)
            self.state.accept(topic, order, sealed.nonce)
            if kind is Kind.PRESENCE:
                self._note_session(topic, body)
        return Believed(kind, ref.name, signer, body, sealed.ts)

    def _authorize(self, kind: Kind, name: str, signer: Certificate,
                   body: dict[str, Any]) -> None:
        if kind in (Kind.PRESENCE, Kind.TELEMETRY, Kind.EVENTS):
            if not signer.has_role(ROLE_CLOUDLET) or signer.subject != name:
                raise untrusted("wrong_signer",
                                f"{signer.subject!r} may not speak for cloudlet {name!r}")
            if kind is Kind.PRESENCE and (body.get("node") != name or body.get("status")
                                          not in ("online", "offline")):
                raise untrusted("malformed", f"a presence of {name!r} that does not say so")
        elif kind is Kind.COMMANDS:
            if not signer.has_role(ROLE_ORCHESTRATOR, ROLE_OPERATOR):
                raise untrusted("wrong_signer", f"{signer.subject!r} may not give orders")
            epoch = body.get("epoch")
            if type(epoch) is not int or epoch < 0:
                raise untrusted("malformed", "a command without a fencing epoch")
        elif kind is Kind.LOCATION:
            if not signer.has_role(ROLE_CLOUDLET) or body.get("node") != signer.subject:
                raise untrusted("wrong_signer", f"{signer.subject!r} may only say where VMs "
                                                "it hosts are (a location names its signer)")
            if body.get("vm") != name:
                raise untrusted("malformed", f"a location for VM {name!r} about another VM")
        elif kind is Kind.LEASE and not signer.has_role(ROLE_ORCHESTRATOR):
            raise untrusted("wrong_signer", f"{signer.subject!r} may not hold a lease")

    @staticmethod
    def _order(kind: Kind, body: dict[str, Any], ts: float) -> tuple[float, ...]:
        """A VM's locations go by its moves first, then time; all else by time."""
        if kind is Kind.LOCATION:
            generation = body.get("generation", 0)
            if type(generation) is not int or generation < 0:
                raise untrusted("malformed", "a location with a malformed generation")
            return (float(generation), ts)
        return (ts,)

    def _ends_believed_session(self, kind: Kind, topic: str, body: dict[str, Any]) -> bool:
        """A Will is signed when its connection starts, so it is older than the
        presences refreshed since; it is believed if it ends the very connection
        whose presence is believed (a Will of an older connection is not)."""
        return (kind is Kind.PRESENCE and body.get("status") == "offline"
                and isinstance(body.get("session"), str)
                and self._sessions.get(topic) == body["session"])

    def _note_session(self, topic: str, body: dict[str, Any]) -> None:
        session = body.get("session")
        if body.get("status") == "online" and isinstance(session, str):
            self._sessions[topic] = session
        else:
            self._sessions.pop(topic, None)


class DropLog:
    """Says whether to log a dropped message: once per (sender, reason)."""

    def __init__(self, limit: int = MAX_LOGGED_SENDERS) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._limit = limit

    def first(self, sender: str, reason: str) -> bool:
        key = (sender[:128], reason)
        if key in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add(key)
        return True


def claimed_sender(topic: str) -> str:
    """Who a message on `topic` claims to be from, for logs (before it is verified)."""
    ref = parse_topic(topic)
    return f"{ref.kind}:{ref.name}" if ref is not None else topic[:120]
