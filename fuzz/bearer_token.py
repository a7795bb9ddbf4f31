"""Fuzz target: client and peer bearer tokens, `Authority.check` on any header.

Every request but `/health` carries an `Authorization` header that the daemon
parses before anything else, from anyone on the network: a client token (an
HMAC'd payload) or a peer token (`cp1.` + msgpack of a certificate, signed
claims and a signature). The header arrives as aiohttp decodes it (UTF-8,
undecodable bytes kept as surrogates), and only `Unauthorized` may come out of
a bad one. Two checks per input:

- the input as a header: whatever passes must be one of the principals the
  seeds were signed for (the fuzzer cannot forge an HMAC or a signature, so
  anything else passing would be a bypass);
- the input as the claims of a peer token that a real peer of the cluster
  signed: the parser after the signature check must refuse odd claims with a
  typed error too (a buggy or compromised peer is still outside bytes).
"""

from __future__ import annotations

import base64
import contextlib

import msgpack

from cloudlet.errors import CloudletError
from cloudlet.trust import peer_tokens
from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_OPERATOR,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.keys import SigningKey
from cloudlet.trust.sealed import Identity
from edge_agent.auth import Authority
from fuzz import structure

MAX_INPUT_BYTES = 4096
SECRET = bytes(range(32))  # any fixed cluster secret: the seeds' tokens are signed with it
# A fixed clock for certificates and peer tokens (which live a minute), so the seeds'
# tokens stay valid: expiry is part of what is fuzzed, not of the weather.
NOW = 1_800_000_000.0
NODE = "downtown"  # the cloudlet checking the tokens


def _clock() -> float:
    return NOW


def _identity(seed: int, subject: str, role: str) -> Identity:
    key = SigningKey.from_seed(bytes([seed]) * 32)
    return Identity.load(key, AUTHORITY_CA.issue(subject, [role], key.public_bytes), VERIFIER)


AUTHORITY_CA = CertificateAuthority(SigningKey.from_seed(bytes(32)), clock=_clock)
VERIFIER = CertificateVerifier(AUTHORITY_CA.public_key, clock=_clock)
AUTHORITY = Authority(SECRET, AUTHORITY_CA.public_key, node=NODE, verifier=VERIFIER)
PEER = _identity(1, "harbor", ROLE_CLOUDLET)
OPERATOR = _identity(2, "ops", ROLE_OPERATOR)
PASSING = frozenset({"alice", "peer:harbor", "ops"})
CLAIM_KEYS = ("iss", "aud", "iat", "exp", "nonce")
DICTIONARY = [b"Bearer ", b"bearer ", b"cp1.", b"2|", b"|", b".", b"=", b"\xed\xa0\x80",
              *(msgpack.packb(k) for k in (*CLAIM_KEYS, NODE, "harbor"))]
# Inputs that are msgpack (the claims seeds) get structure-aware mutations; headers,
# which are not, get libFuzzer's own.
MUTATOR = structure.msgpack_mutator(CLAIM_KEYS)


def TestOneInput(data: bytes) -> None:
    header = data.decode("utf-8", "surrogateescape")
    with contextlib.suppress(CloudletError):
        who = AUTHORITY.check(header)
        assert who.name in PASSING, f"a token this cluster never signed passed as {who.name!r}"
        assert who.is_peer == (who.name != "alice")
    with contextlib.suppress(CloudletError):
        AUTHORITY.check("Bearer " + signed_by_peer(data))


def signed_by_peer(claims: bytes, signer: Identity = PEER) -> str:
    """A peer token whose claims are `claims`, signed by a real peer of the cluster
    (as `peer_tokens.mint` builds one, with any bytes for the body)."""
    wire = msgpack.packb([signer.cert.wire, claims,
                          signer.sign(peer_tokens.TOKEN_DOMAIN, claims)])
    return peer_tokens.PREFIX + base64.urlsafe_b64encode(wire).rstrip(b"=").decode()


def _claims(issuer: str, audience: str = NODE, ttl_s: int = 60) -> dict[str, object]:
    """What `peer_tokens.mint` signs, with a fixed nonce so seeds rebuild the same."""
    return {"iss": issuer, "aud": audience, "iat": int(NOW), "exp": int(NOW) + ttl_s,
            "nonce": bytes(8)}


def seeds() -> dict[str, bytes]:
    client = AUTHORITY.issue("alice", 366 * 24 * 3600, now=NOW)
    out = {
        "client.txt": f"Bearer {client}".encode(),
        "peer.txt": f"Bearer {signed_by_peer(msgpack.packb(_claims('harbor')))}".encode(),
        "operator.txt": ("Bearer " + signed_by_peer(msgpack.packb(_claims("ops")),
                                                    OPERATOR)).encode(),
        "peer-other-audience.txt": ("Bearer " + signed_by_peer(
            msgpack.packb(_claims("harbor", "campus")))).encode(),
        "expired-client.txt": f"Bearer {AUTHORITY.issue('bob', 60, now=NOW - 10**9)}".encode(),
        "lowercase-scheme.txt": f"bearer {client}".encode(),
        "basic.txt": b"Basic YWxpY2U6cGFzcw==",
        "no-token.txt": b"Bearer ",
        "three-parts.txt": f"Bearer {client}.x".encode(),
        "forged.txt": f"Bearer {client[:-2]}AA".encode(),
        "latin1.txt": b"Bearer \xe9t\xe9.\xff",
    }
    out["claims.msgpack"] = msgpack.packb(_claims("harbor"))
    out["claims-long-life.msgpack"] = msgpack.packb(_claims("harbor", ttl_s=3600))
    out["claims-wrong-issuer.msgpack"] = msgpack.packb(_claims("campus"))
    return out
