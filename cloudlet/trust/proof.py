"""An endpoint proving which cloudlet it is, before anything secret is sent to it.

The asker sends a fresh random challenge (`GET /health?challenge=HEX`); the
cloudlet answers with its certificate and its signature over the challenge.
The asker checks the certificate against the cluster's authority and, when it
expects a particular cloudlet, that the certificate names it. Only then does it
send a credential (a peer token for that cloudlet, a client's bearer token) or
a VM's state. A server that merely sits at an address a cloudlet once had,
or that a forged message named, cannot answer: it has no certificate of the
cluster.

A proof binds an identity, not an address: a server that relays to a real
cloudlet passes, as a relay would through any challenge. Addresses therefore
come only from signed presence, signed locations, the operator's own list, or
a cluster member's answer; TLS (with the cloudlet's certificate checked) closes
the rest where a network path may be hostile.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from cloudlet.trust.certs import ROLE_CLOUDLET, Certificate, CertificateVerifier, untrusted
from cloudlet.trust.keys import verify_signature
from cloudlet.trust.sealed import Identity

PROOF_DOMAIN = b"cloudlet/v1 identity proof\x00"
CHALLENGE_BYTES = 16
MAX_CHALLENGE_BYTES = 64


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str) or len(text) > 4096:
        raise ValueError("not base64 text")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_challenge(text: str) -> bytes:
    """The challenge from a query parameter (hex); `TrustError` if it is not one."""
    try:
        challenge = bytes.fromhex(text)
    except ValueError:
        raise untrusted("bad_challenge", "a challenge is hex") from None
    if not CHALLENGE_BYTES <= len(challenge) <= MAX_CHALLENGE_BYTES:
        raise untrusted("bad_challenge",
                        f"a challenge is {CHALLENGE_BYTES}-{MAX_CHALLENGE_BYTES} bytes")
    return challenge


def prove(identity: Identity, challenge: bytes) -> dict[str, str]:
    """The answer to `challenge`: JSON-friendly (it rides in `/health`'s answer)."""
    return {"cert": _b64(identity.cert.wire),
            "sig": _b64(identity.sign(PROOF_DOMAIN, challenge))}


def check(verifier: CertificateVerifier, challenge: bytes, answer: Any,
          expected: str | None = None) -> Certificate:
    """The prover's certificate if `answer` proves a cloudlet of this cluster (and,
    with `expected`, that very one); `TrustError` otherwise."""
    if not isinstance(answer, dict):
        raise untrusted("no_proof", "the endpoint gave no proof of identity")
    try:
        cert_wire, signature = _unb64(answer.get("cert")), _unb64(answer.get("sig"))
    except ValueError:
        raise untrusted("no_proof", "a malformed proof of identity") from None
    cert = verifier.verify(cert_wire)
    if not cert.has_role(ROLE_CLOUDLET):
        raise untrusted("wrong_signer", f"{cert.subject!r} is not a cloudlet")
    if expected is not None and cert.subject != expected:
        raise untrusted("wrong_peer", f"the endpoint is cloudlet {cert.subject!r}, "
                                      f"not {expected!r}")
    if not verify_signature(cert.public_key, signature, PROOF_DOMAIN + challenge):
        raise untrusted("bad_signature", f"a proof claiming {cert.subject!r} is forged")
    return cert
