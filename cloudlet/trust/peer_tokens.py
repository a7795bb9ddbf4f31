"""Credentials one cloudlet (or an operator) presents to another: bound to that one.

A peer token is a bearer token, `cp1.` + base64url(msgpack([cert, body, sig])),
with body = msgpack({"iss", "aud", "iat", "exp", "nonce"}) signed by the
issuer's key. The receiving cloudlet believes it only if the certificate is
the cluster's, the signature is the issuer's, the audience is itself, and it
is within its short life. So a token meant for one cloudlet opens no other, a
leaked one is useless within a minute, and only the issuer's key can mint one:
no cloudlet holds a key that opens every other (as a shared peer secret would).

A token is minted per destination when it is needed, and sent only to an
endpoint that proved it is that destination (`cloudlet.trust.proof`).
"""

from __future__ import annotations

import base64
import os
import reprlib
import time
from typing import Any

import msgpack

from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_OPERATOR,
    Certificate,
    CertificateVerifier,
    Clock,
    untrusted,
)
from cloudlet.trust.keys import verify_signature
from cloudlet.trust.sealed import Identity

PREFIX = "cp1."
TOKEN_DOMAIN = b"cloudlet/v1 peer token\x00"
# A move or an in-doubt question takes seconds; a WebSocket authenticated with the
# token lives on after it expires. One minute keeps a leaked token nearly useless.
DEFAULT_TTL_S = 60
MAX_TTL_S = 300  # tokens claiming a longer life are refused, whoever signed them
CLOCK_SKEW_S = 30.0
MAX_TOKEN_CHARS = 4096


def is_peer_token(token: str) -> bool:
    return token.startswith(PREFIX)


def mint(identity: Identity, audience: str, *, ttl_s: int = DEFAULT_TTL_S,
         clock: Clock = time.time) -> str:
    """A token for `audience` (a node name) only, signed by `identity`."""
    now = int(clock())
    body: bytes = msgpack.packb({"iss": identity.subject, "aud": audience, "iat": now,
                                 "exp": now + min(ttl_s, MAX_TTL_S),
                                 "nonce": os.urandom(8)})
    wire: bytes = msgpack.packb([identity.cert.wire, body,
                                 identity.sign(TOKEN_DOMAIN, body)])
    return PREFIX + base64.urlsafe_b64encode(wire).rstrip(b"=").decode()


def check(verifier: CertificateVerifier, token: str, audience: str) -> Certificate:
    """The issuer's certificate if `token` is a valid peer token for `audience`;
    `TrustError` otherwise."""
    if not is_peer_token(token) or len(token) > MAX_TOKEN_CHARS:
        raise untrusted("bad_token", "not a peer token")
    text = token[len(PREFIX):]
    try:
        wire = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cert_wire, body, signature = msgpack.unpackb(wire)
        claims: Any = msgpack.unpackb(body)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise untrusted("bad_token", "a malformed peer token") from None
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or not isinstance(
            claims, dict):
        raise untrusted("bad_token", "a malformed peer token")
    cert = verifier.verify(cert_wire)
    if not cert.has_role(ROLE_CLOUDLET, ROLE_OPERATOR):
        raise untrusted("wrong_signer", f"{cert.subject!r} may not act as a peer")
    if not verify_signature(cert.public_key, signature, TOKEN_DOMAIN + body):
        raise untrusted("bad_signature", f"a peer token claiming {cert.subject!r} is forged")
    iss, aud, iat, exp = (claims.get(k) for k in ("iss", "aud", "iat", "exp"))
    if iss != cert.subject or type(iat) is not int or type(exp) is not int:
        raise untrusted("bad_token", "a peer token with malformed claims")
    if aud != audience:
        # Not str(aud): a signer's claim nested 1,000 deep would raise RecursionError.
        shown = aud[:60] if isinstance(aud, str) else reprlib.repr(aud)
        raise untrusted("wrong_audience", f"a peer token of {cert.subject!r} for "
                                          f"{shown!r}, not for {audience!r}")
    now = verifier.clock()
    if exp - iat > MAX_TTL_S or not iat - CLOCK_SKEW_S <= now < exp:
        raise untrusted("expired", f"a peer token of {cert.subject!r} outside its lifetime")
    return cert
