"""Fuzz target: control-plane payloads, from the broker, through the gate to their readers.

Anyone the broker admits can publish, and the broker's operator can inject
anything: every cloudlet, the SDK and `cloudlet status` run each payload
through `ControlGate.admit` (certificate, signature over the topic, schema,
who may sign what, freshness, replay), and what it believes goes to readers
(`PeerDirectory.note_presence`, `Location.from_wire`, the command executor's
field checks). Client reports (`decode_report`) and identity proofs
(`proof.check`) are outside bytes too. Only `TrustError` may come out of the
gate; nothing may come out of the readers. Two views of each input:

- as raw payload bytes on each kind of topic: the fuzzer cannot forge a
  signature, so anything the gate believes must have been signed by one of the
  seeds' signers;
- as the body of a message that a real member of the cluster signed (a buggy or
  compromised one is still outside bytes): the gate's rules, then the readers,
  must take any shape of body without an untyped error.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack

from cloudlet.errors import CloudletError, TrustError
from cloudlet.protocol import (
    Kind,
    Location,
    command_message,
    commands_topic,
    decode_report,
    event_message,
    events_topic,
    lease_topic,
    location_message,
    location_topic,
    offline_message,
    presence_message,
    presence_topic,
    telemetry_message,
    telemetry_topic,
)
from cloudlet.trust import proof
from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_ORCHESTRATOR,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.gate import ControlGate
from cloudlet.trust.keys import SigningKey
from cloudlet.trust.sealed import ENVELOPE_VERSION, MESSAGE_DOMAIN, Identity, seal
from edge_agent.peers import PeerDirectory
from fuzz import structure

MAX_INPUT_BYTES = 8192
NOW = 1_800_000_000.0  # a fixed clock: the seeds stay fresh, time is not what is fuzzed
NODE, VM = "downtown", "0123456789abcdef"
TOPICS = [presence_topic(NODE), telemetry_topic(NODE), commands_topic(NODE),
          events_topic(NODE), location_topic(VM), lease_topic("metro")]
BODY_KEYS = ("v", "ts", "nonce", "node", "status", "endpoint", "session", "position", "zone",
             "capacity", "vms", "refresh_s", "op", "id", "epoch", "vm", "to", "generation",
             "rtt_ms", "client")
DICTIONARY = [msgpack.packb(k) for k in BODY_KEYS] + [
    msgpack.packb(t) for t in TOPICS] + [b"\x82\xa1v\x02", b"online", b"offline", b"http://"]
MUTATOR = structure.msgpack_mutator(BODY_KEYS)


def fixed_clock() -> float:
    return NOW


AUTHORITY = CertificateAuthority(SigningKey.from_seed(bytes(32)), clock=fixed_clock)
VERIFIER = CertificateVerifier(AUTHORITY.public_key, clock=fixed_clock)


def _identity(seed: int, subject: str, *roles: str) -> Identity:
    key = SigningKey.from_seed(bytes([seed]) * 32)
    return Identity.load(key, AUTHORITY.issue(subject, roles, key.public_bytes), VERIFIER)


CLOUDLET = _identity(1, NODE, ROLE_CLOUDLET, ROLE_ORCHESTRATOR)
SIGNERS = frozenset({NODE})


def sealed_body(signer: Identity, topic: str, body: bytes) -> bytes:
    """A message whose body bytes are `body`, signed by `signer` for `topic`."""
    signature = signer.sign(MESSAGE_DOMAIN, topic.encode() + b"\x00" + body)
    packed: bytes = msgpack.packb({"v": ENVELOPE_VERSION, "cert": signer.cert.wire,
                                   "body": body, "sig": signature})
    return packed


def read(gate: ControlGate, peers: PeerDirectory, topic: str, raw: bytes) -> None:
    """What a receiver does with a payload: the gate, then the readers of what it believes."""
    try:
        believed = gate.admit(topic, raw)
    except TrustError:
        return
    if believed is None:
        return
    assert believed.signer.subject in SIGNERS, f"believed a message of {believed.signer}"
    body = believed.body
    if believed.kind is Kind.PRESENCE:
        peers.note_presence(believed.name, body, believed.ts)
        with contextlib.suppress(CloudletError):
            peers.target(believed.name)
    elif believed.kind is Kind.LOCATION:
        Location.from_wire(body)
    elif believed.kind is Kind.COMMANDS:
        assert type(body["epoch"]) is int and body["epoch"] >= 0


def TestOneInput(data: bytes) -> None:
    peers = PeerDirectory("harbor", clock=fixed_clock)
    for topic in TOPICS:
        read(ControlGate(VERIFIER, clock=fixed_clock), peers, topic, data)
        read(ControlGate(VERIFIER, clock=fixed_clock), peers, topic,
             sealed_body(CLOUDLET, topic, data))
    report = decode_report(data)
    assert report is None or isinstance(report, dict)
    # An identity proof, as the SDK and peers read `/health`'s JSON answer.
    try:
        health: Any = json.loads(data)
    except (ValueError, RecursionError):
        return
    answer = health.get("identity") if isinstance(health, dict) else None
    with contextlib.suppress(CloudletError):
        proof.check(VERIFIER, bytes(16), answer)


def seeds() -> dict[str, bytes]:
    where = Location(NODE, "http://127.0.0.1:8601")
    bodies = {
        "presence": presence_message(NODE, where.endpoint, session="s1", position_m=(1.0, 2.0),
                                     zone="z", capacity={"max_vms": 10}, vms=1,
                                     refresh_s=30.0),
        "offline": offline_message(NODE, session="s1"),
        "telemetry": telemetry_message(NODE, vms=1, per_vm={VM: {"calls_per_s": 1.0}}),
        "command": command_message("migrate", command_id="c1", epoch=3, vm=VM, to="harbor"),
        "event": event_message(NODE, id="c1", op="ping", ok=True),
        "location": location_message(VM, where, generation=2),
    }
    out: dict[str, bytes] = {}
    for name, body in bodies.items():
        stamped = {"ts": NOW, "nonce": bytes(12), **body}
        out[f"{name}-body.msgpack"] = msgpack.packb(stamped)
    out["presence-sealed.msgpack"] = seal(CLOUDLET, presence_topic(NODE), bodies["presence"],
                                          clock=fixed_clock)
    out["command-sealed.msgpack"] = seal(CLOUDLET, commands_topic(NODE), bodies["command"],
                                         clock=fixed_clock)
    out["report.msgpack"] = msgpack.packb({"v": 2, "client": "alice", "rtt_ms": {NODE: 1.5}})
    out["proof.json"] = json.dumps({"status": "ok", "node": NODE,
                                    "identity": proof.prove(CLOUDLET, bytes(16))}).encode()
    return out
