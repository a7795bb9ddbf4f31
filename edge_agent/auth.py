"""Who is asking a cloudlet: clients with bearer tokens, peers with audience-bound tokens.

A client token (`cloudlet.trust.client_tokens`) is checked with the cluster
secret's HMAC key, constant-time, without a database: sessions move between
cloudlets, and any of them can check it. A peer (another cloudlet, or the
operator's command line) presents a peer token (`cloudlet.trust.peer_tokens`)
signed with its own key, for this cloudlet only, valid for a minute: a
credential that reaches the wrong place opens nothing else. The two cannot be
confused: a peer token is a signature by a certificate of the cluster, which
no client holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloudlet.errors import TrustError
from cloudlet.errors import Unauthorized as AuthError
from cloudlet.trust import peer_tokens
from cloudlet.trust.certs import ROLE_OPERATOR, CertificateVerifier
from cloudlet.trust.client_tokens import ClientTokens
from cloudlet.trust.cluster import SECRET_FILE, cluster_tokens, ensure_secret, load_secret

PEER_PREFIX = "peer:"
__all__ = ["SECRET_FILE", "Authority", "Principal", "cluster_tokens", "ensure_secret",
           "load_secret"]


@dataclass(frozen=True)
class Principal:
    name: str
    is_peer: bool  # another cloudlet, or an operator: may reach every VM
    is_operator: bool = False


class Authority:
    """Checks the credentials a cloudlet is presented (and issues client tokens)."""

    def __init__(self, cluster_secret: bytes, authority_public_key: bytes, *,
                 node: str | None = None, verifier: CertificateVerifier | None = None) -> None:
        self.tokens = ClientTokens(cluster_secret, authority_public_key)
        self.node = node  # peer tokens are taken only when they are for this node
        self.verifier = verifier or CertificateVerifier(authority_public_key)

    def issue(self, client: str, ttl_s: int, *, now: float | None = None) -> str:
        return self.tokens.issue(client, ttl_s, now=now)

    def check(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization: Bearer ...` header, or AuthError."""
        if not authorization:
            raise AuthError("no credentials: send 'Authorization: Bearer <token>' "
                            "(get one with 'cloudlet token --client NAME')")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("credentials must be 'Bearer <token>'")
        if not peer_tokens.is_peer_token(token):
            return Principal(self.tokens.check(token), is_peer=False)
        if self.node is None:
            raise AuthError("this process takes no peer credentials")
        try:
            cert = peer_tokens.check(self.verifier, token, self.node)
        except TrustError as exc:
            raise AuthError(f"peer credentials refused: {exc.message}",
                            reason=exc.details.get("reason")) from None
        if cert.has_role(ROLE_OPERATOR):
            return Principal(cert.subject, is_peer=True, is_operator=True)
        return Principal(PEER_PREFIX + cert.subject, is_peer=True)
