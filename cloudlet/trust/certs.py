"""Certificates: the cluster authority vouches that a public key is a named cloudlet.

A certificate is small and self-describing (msgpack, ~150 bytes with its
signature), so every signed message can carry its signer's certificate and a
receiver needs nothing but the authority's public key: no directory to look
keys up in, no ordering between "learn the key" and "check the message".

    wire = msgpack([tbs, signature])
    tbs  = msgpack([1, subject, roles, public_key, not_before, not_after, authority_id])
    signature = Ed25519(authority, CERT_DOMAIN + tbs)

Roles say what a subject may sign (see `gate`): `cloudlet` (its own presence,
telemetry, events, the locations of VMs it hosts, peer tokens), `orchestrator`
(commands and leadership leases), `operator` (commands and operator requests,
for the command line). Verification is cached by the certificate's bytes, so a
stream of messages from one signer costs one signature check each, not two.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from cloudlet.errors import ConfigError, TrustError
from cloudlet.trust.keys import PUBLIC_KEY_BYTES, SigningKey, verify_signature

CERT_VERSION = 1
CERT_DOMAIN = b"cloudlet/v1 certificate\x00"
ROLE_CLOUDLET = "cloudlet"
ROLE_ORCHESTRATOR = "orchestrator"
ROLE_OPERATOR = "operator"
ROLES = frozenset({ROLE_CLOUDLET, ROLE_ORCHESTRATOR, ROLE_OPERATOR})
MAX_CERT_BYTES = 1024  # a certificate is ~150 bytes; anything larger is not one
MAX_SUBJECT_CHARS = 128
# A node's certificate is re-issued by `cloudlet up` at every start; a year
# bounds how long a stolen key stays useful when nobody rotates it.
DEFAULT_CERT_TTL_S = 365 * 24 * 3600
# Clocks of cloudlets differ a little; a certificate valid "from now" must not be
# refused by a peer whose clock is a few seconds behind.
CLOCK_SKEW_S = 60.0
VERIFIED_CACHE_SIZE = 256

Clock = Callable[[], float]


def untrusted(reason: str, message: str) -> TrustError:
    """A `TrustError` whose `details["reason"]` is a stable word for metrics."""
    return TrustError(message, reason=reason)


def authority_id(public_key: bytes) -> bytes:
    """A short name for an authority's key, carried in its certificates."""
    return hashlib.sha256(public_key).digest()[:8]


@dataclass(frozen=True)
class Certificate:
    subject: str
    roles: frozenset[str]
    public_key: bytes
    not_before: int
    not_after: int
    wire: bytes  # the exact bytes it arrived as (what a message carries onward)

    def has_role(self, *roles: str) -> bool:
        return any(role in self.roles for role in roles)


class CertificateAuthority:
    """The cluster's authority: its private key issues certificates."""

    def __init__(self, key: SigningKey, clock: Clock = time.time) -> None:
        self.key = key
        self.public_key = key.public_bytes
        self._clock = clock

    def issue(self, subject: str, roles: Iterable[str], public_key: bytes, *,
              ttl_s: int = DEFAULT_CERT_TTL_S) -> bytes:
        roles = sorted(set(roles))
        if not subject or len(subject) > MAX_SUBJECT_CHARS:
            raise ConfigError(f"a certificate subject is 1-{MAX_SUBJECT_CHARS} characters")
        if not roles or set(roles) - ROLES:
            raise ConfigError(f"roles must be some of {', '.join(sorted(ROLES))}")
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ConfigError("a certificate names a 32-byte Ed25519 public key")
        if ttl_s <= 0:
            raise ConfigError("a certificate's lifetime must be positive")
        now = int(self._clock())
        tbs: bytes = msgpack.packb([CERT_VERSION, subject, roles, public_key, now,
                                    now + ttl_s, authority_id(self.public_key)])
        packed: bytes = msgpack.packb([tbs, self.key.sign(CERT_DOMAIN + tbs)])
        return packed


class CertificateVerifier:
    """Checks certificates against one authority's public key (pure, clock injected)."""

    def __init__(self, authority_public_key: bytes, clock: Clock = time.time) -> None:
        if len(authority_public_key) != PUBLIC_KEY_BYTES:
            raise ConfigError("the cluster authority's key is a 32-byte Ed25519 public key")
        self.authority_public_key = bytes(authority_public_key)
        self._authority_id = authority_id(self.authority_public_key)
        self.clock = clock
        self._verified: OrderedDict[bytes, Certificate] = OrderedDict()

    def verify(self, wire: Any) -> Certificate:
        """The certificate `wire` stands for, or `TrustError` (never another error)."""
        if not isinstance(wire, bytes) or len(wire) > MAX_CERT_BYTES:
            raise untrusted("bad_certificate", "no certificate, or not one")
        cert = self._verified.get(wire)
        if cert is None:
            cert = self._check(wire)
            self._verified[wire] = cert
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        else:
            self._verified.move_to_end(wire)
        now = self.clock()
        if not cert.not_before - CLOCK_SKEW_S <= now <= cert.not_after:
            raise untrusted("expired_certificate",
                            f"the certificate of {cert.subject!r} is not valid now")
        return cert

    def _check(self, wire: bytes) -> Certificate:
        try:
            tbs, signature = msgpack.unpackb(wire)
            version, subject, roles, public_key, not_before, not_after, issuer = (
                msgpack.unpackb(tbs))
        except (ValueError, TypeError, msgpack.UnpackException):
            raise untrusted("bad_certificate", "a malformed certificate") from None
        if (not isinstance(tbs, bytes) or not isinstance(signature, bytes)
                or version != CERT_VERSION or not isinstance(subject, str)
                or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)
                or not isinstance(public_key, bytes) or type(not_before) is not int
                or type(not_after) is not int or not isinstance(issuer, bytes)):
            raise untrusted("bad_certificate", "a malformed certificate")
        if issuer != self._authority_id:
            raise untrusted("foreign_certificate",
                            f"the certificate of {subject!r:.60} is from another cluster")
        if not verify_signature(self.authority_public_key, signature, CERT_DOMAIN + tbs):
            raise untrusted("bad_certificate",
                            f"the certificate of {subject!r:.60} is not the authority's")
        return Certificate(subject, frozenset(roles), public_key, not_before, not_after, wire)
