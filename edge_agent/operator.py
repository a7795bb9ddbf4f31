"""What the operator's command line does on the cluster: look (status), move a VM.

It runs where the cluster's files are (`--state-dir`, the metro's by default):
it logs in to the broker as `operator` with the password derived from the
cluster secret, believes only presences and locations signed by cloudlets of
the cluster (anything else is counted and left out), and, to move a VM, asks
the VM's cloudlet with a short-lived operator identity certified on the spot
by the cluster authority, after that cloudlet proved which one it is.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack

from cloudlet.errors import ConfigError, TrustError, VMNotFound, error_from_wire
from cloudlet.protocol import ALL_LOCATIONS, ALL_PRESENCE, Kind, Location
from cloudlet.trust import acl
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.cluster import AUTHORITY_PUBLIC_FILE, load_authority, operator_identity
from cloudlet.trust.gate import ControlGate
from cloudlet.trust.keys import read_public_key
from edge_agent.auth import SECRET_FILE, load_secret
from edge_agent.control import broker_address
from edge_agent.peer_client import PeerClient

OPERATION_TIMEOUT_S = 600.0  # a move of a large VM over a slow link takes minutes


@dataclass
class ClusterView:
    """What the broker's retained state says, as far as it could be believed."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # by reason


def _require(state: Path, name: str) -> Path:
    path = state / name
    if not path.exists():
        raise ConfigError(f"no cluster at {state} ({name} is missing): pass --state-dir, "
                          "the directory `cloudlet up` uses")
    return path


def verifier_of(state: Path) -> CertificateVerifier:
    return CertificateVerifier(read_public_key(_require(state, AUTHORITY_PUBLIC_FILE)))


async def collect(broker: str, state: Path, wait_s: float) -> ClusterView:
    """Retained presences and locations, gathered for `wait_s` seconds, believed only
    when signed by the cloudlet they are about."""
    secret = load_secret(_require(state, SECRET_FILE))
    gate = ControlGate(verifier_of(state))
    host, port, tls = broker_address(broker)
    # mqtts://: the broker's certificate is checked against the system's store
    # (or $SSL_CERT_FILE, e.g. the cluster's tls-ca.pem: docs/deploy.md).
    tls_context = ssl.create_default_context() if tls else None
    view = ClusterView()
    try:
        async with aiomqtt.Client(host, port, identifier=f"cloudlet-operator-{time.time_ns()}",
                                  tls_context=tls_context,
                                  username=acl.OPERATOR_USER,
                                  password=acl.derived_password(secret, acl.OPERATOR_USER)) as c:
            await c.subscribe(ALL_PRESENCE)
            await c.subscribe(ALL_LOCATIONS)
            try:
                async with asyncio.timeout(wait_s):
                    async for message in c.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            continue
                        try:
                            believed = gate.admit(str(message.topic), payload)
                        except TrustError as exc:
                            reason = str(exc.details.get("reason", "untrusted"))
                            view.dropped[reason] = view.dropped.get(reason, 0) + 1
                            continue
                        if believed is None:
                            continue
                        target = view.nodes if believed.kind is Kind.PRESENCE else view.vms
                        target[believed.name] = believed.body
            except TimeoutError:
                pass
    except aiomqtt.MqttError as exc:
        raise ConfigError(f"cannot reach the broker at {broker}: {exc}") from None
    return view


async def migrate(broker: str, state: Path, vm_id: str, to: str, mode: str) -> dict[str, Any]:
    """Ask the VM's cloudlet to move it to `to`, as the cluster's operator."""
    view = await collect(broker, state, 1.0)
    where = Location.from_wire(view.vms.get(vm_id))
    if where is None:
        raise VMNotFound(f"the broker at {broker} knows no VM {vm_id!r} (from a signed "
                         "location)")
    if view.nodes.get(to, {}).get("status") != "online":
        raise ConfigError(f"no cloudlet {to!r} is online (known: {', '.join(sorted(view.nodes))})")
    verifier = verifier_of(state)
    identity = operator_identity(load_authority(state), "cli")
    async with PeerClient(identity, verifier, OPERATION_TIMEOUT_S) as peers:
        where = await peers.prove(where, where.node)
        async with peers.http.post(f"{where.endpoint}/v1/vms/{vm_id}/migrate",
                                   data=msgpack.packb({"to": to, "mode": mode}),
                                   headers=peers.headers(where.node),
                                   allow_redirects=False) as resp:
            raw = await resp.read()
            status = resp.status
    try:
        body = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException):
        body = {"code": "malformed_answer", "message": raw[:200].decode(errors="replace")}
    if status != 200 or not isinstance(body, dict):
        raise error_from_wire(body)
    return body


__all__ = ["ClusterView", "collect", "migrate"]
