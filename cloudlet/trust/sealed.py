"""A signed control-plane message, bound to the topic it is published on.

    wire = msgpack({"v": 2, "cert": CERT, "body": BODY, "sig": SIG})
    BODY = msgpack({"ts": unix_s, "nonce": 12 random bytes, ...the message...})
    SIG  = Ed25519(signer, MESSAGE_DOMAIN + topic + b"\\0" + BODY)

The topic is inside what is signed, so a message cannot be moved to another
topic (a command for one cloudlet replayed on another's, a presence reused as
a location). `ts` and `nonce` let receivers refuse what is stale or replayed
(`replay`); who may sign what is the `gate`'s business, not this module's.
The body stays bytes inside the wire map, so the signature covers exactly the
bytes that were signed: no re-encoding on the receiving side.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from cloudlet.errors import ConfigError
from cloudlet.trust.certs import Certificate, CertificateVerifier, Clock, untrusted
from cloudlet.trust.keys import SigningKey, verify_signature

ENVELOPE_VERSION = 2
MESSAGE_DOMAIN = b"cloudlet/v1 message\x00"
NONCE_BYTES = 12
# The largest control-plane message (telemetry of ~1,000 VMs) is well under
# this; a larger one is refused before it is parsed further.
MAX_SEALED_BYTES = 256 << 10


@dataclass(frozen=True)
class Identity:
    """Who this process is on the control plane: its key and its certificate."""

    key: SigningKey
    cert: Certificate

    @property
    def subject(self) -> str:
        return self.cert.subject

    def sign(self, domain: bytes, data: bytes) -> bytes:
        return self.key.sign(domain + data)

    @classmethod
    def load(cls, key: SigningKey, cert_wire: bytes,
             verifier: CertificateVerifier) -> Identity:
        """An identity whose certificate is checked now: a key and a certificate that
        do not match, or a certificate of another cluster, fail at start-up, not at
        the first message a peer refuses."""
        cert = verifier.verify(cert_wire)
        if cert.public_key != key.public_bytes:
            raise ConfigError(f"the certificate of {cert.subject!r} is for another key")
        return cls(key, cert)


@dataclass(frozen=True)
class Sealed:
    """A message that passed its signature check (not yet the gate's rules)."""

    signer: Certificate
    body: dict[str, Any]
    ts: float
    nonce: bytes


def seal(identity: Identity, topic: str, message: dict[str, Any], *,
         clock: Clock = time.time) -> bytes:
    """The wire bytes of `message`, signed by `identity` for `topic`."""
    body_map = {"ts": clock(), "nonce": os.urandom(NONCE_BYTES), **message}
    body: bytes = msgpack.packb(body_map)
    signature = identity.sign(MESSAGE_DOMAIN, topic.encode() + b"\x00" + body)
    wire: bytes = msgpack.packb({"v": ENVELOPE_VERSION, "cert": identity.cert.wire,
                                 "body": body, "sig": signature})
    return wire


def open_sealed(verifier: CertificateVerifier, topic: str, raw: bytes | bytearray) -> Sealed:
    """Check a message's certificate and signature for `topic`; `TrustError` with a
    stable `details["reason"]` for anything that is not a well-signed message."""
    if len(raw) > MAX_SEALED_BYTES:
        raise untrusted("too_large", f"a control message of {len(raw)} bytes")
    try:
        envelope = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise untrusted("malformed", "a control message that is not msgpack") from None
    if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
        raise untrusted("unsigned", "a control message that is not a signed envelope")
    body, signature = envelope.get("body"), envelope.get("sig")
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise untrusted("unsigned", "a control message without a body and signature")
    cert = verifier.verify(envelope.get("cert"))
    if not verify_signature(cert.public_key, signature,
                            MESSAGE_DOMAIN + topic.encode() + b"\x00" + body):
        raise untrusted("bad_signature",
                        f"a message on {topic} claiming {cert.subject!r} is not signed by it")
    try:
        decoded = msgpack.unpackb(body)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise untrusted("malformed", "a signed body that is not msgpack") from None
    if not isinstance(decoded, dict):
        raise untrusted("malformed", "a signed body that is not a map")
    ts, nonce = decoded.get("ts"), decoded.get("nonce")
    if (not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts)
            or not isinstance(nonce, bytes) or not nonce or len(nonce) > 64):
        raise untrusted("malformed", "a signed body without a timestamp and nonce")
    return Sealed(cert, decoded, float(ts), nonce)
