"""Who may say what: the cluster's keys, certificates and signed messages.

Nothing on the control plane is believed because it arrived. A cluster has one
certificate authority (an Ed25519 key kept by its operator); every cloudlet has
its own Ed25519 key and a certificate from that authority naming it and its
roles. A cloudlet signs what it publishes (presence, telemetry, events, the
locations of the VMs it hosts) and what it sends its peers (short-lived,
audience-bound peer tokens; proofs of identity); anyone holding the
authority's public key (daemons, the orchestrator, the SDK, `cloudlet status`)
verifies them, and a cloudlet can speak only as itself.

Why per-node keys certified by a cluster key, and not HMAC under the cluster
secret: an HMAC key must be held by every verifier, so every verifier could
forge, and the SDK (which must verify the locations it follows) would hold the
key that signs orders. With signatures, a client verifies and cannot forge; a
compromised cloudlet can sign only as itself; the broker's operator can drop
messages but not forge them. Ed25519 (via `cryptography`, OpenSSL underneath):
~25 us to sign and ~85 us to verify here, 64-byte signatures, no parameters to
get wrong.

Modules, one job each: `keys` (key pairs and files), `certs` (certificates and
their verification), `sealed` (a signed control-plane message bound to its
topic), `replay` (freshness and replay windows), `gate` (the rules per topic:
who may sign it, how fresh it must be), `peer_tokens` (credentials one cloudlet
presents to another, bound to that one), `proof` (an endpoint proving which
cloudlet it is), `acl` (the broker's topic rules and derived passwords) and
`cluster` (the files on disk).
"""

from __future__ import annotations

from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_OPERATOR,
    ROLE_ORCHESTRATOR,
    Certificate,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.keys import SigningKey, verify_signature
from cloudlet.trust.sealed import Identity, Sealed, open_sealed, seal

__all__ = [
    "ROLE_CLOUDLET",
    "ROLE_OPERATOR",
    "ROLE_ORCHESTRATOR",
    "Certificate",
    "CertificateAuthority",
    "CertificateVerifier",
    "Identity",
    "Sealed",
    "SigningKey",
    "open_sealed",
    "seal",
    "verify_signature",
]
