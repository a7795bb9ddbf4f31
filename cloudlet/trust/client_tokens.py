"""Client bearer tokens: who a client is, until when, and which cluster to trust.

    token   = base64url(payload) "." base64url(HMAC-SHA256(client_key, payload))
    payload = "2|" expiry "|" client "|" authority_public_key_hex

Any cloudlet of the cluster checks a token without a database (the MAC key is
derived from the cluster secret every cloudlet holds), which matters because
sessions move between cloudlets. The payload is readable, not secret: it names
the cluster authority's public key, so the token a client is given is also
its trust anchor. With it the SDK verifies the signed presences and locations
it follows and the identity proofs of cloudlets before it sends them the
token; nothing else has to be configured on a phone.

Client names are letters, digits and `._@-` (they become MQTT usernames and
topic levels, where `/`, `+` and `#` mean something), at most 128, and not
the broker's reserved users (`node.*`, `operator`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from cloudlet.errors import ConfigError, InvalidArgument, Unauthorized
from cloudlet.trust.acl import is_reserved_client_name
from cloudlet.trust.keys import PUBLIC_KEY_BYTES

TOKEN_VERSION = "2"
SECRET_BYTES = 32
CLIENT_NAME = re.compile(r"[A-Za-z0-9._@-]{1,128}")
MAX_TTL_S = 366 * 24 * 3600  # a year: longer-lived tokens are refused at issue
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class ClientClaims:
    """What a token says, readable without the secret (not proof of anything)."""

    client: str
    expiry_unix: int
    authority_public_key: bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_client_name(name: str) -> None:
    if not CLIENT_NAME.fullmatch(name) or is_reserved_client_name(name):
        raise InvalidArgument("a client name is 1-128 letters, digits or '._@-', and not "
                              "'operator', 'node.*' or 'orchestrator.*' (the broker's own users)")


def read_claims(token: str) -> ClientClaims:
    """The claims of a client token (unverified); `Unauthorized` if it is not one."""
    try:
        payload_b64, _mac = token.strip().split(".")
        version, expiry, client, authority = _unb64(payload_b64).decode().split("|")
        claims = ClientClaims(client, int(expiry), bytes.fromhex(authority))
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("malformed token (get a new one with "
                           "'cloudlet token --client NAME')") from None
    if version != TOKEN_VERSION:
        raise Unauthorized(f"a token of format {version!r:.10}: this cluster takes format "
                           f"{TOKEN_VERSION} (get a new one with 'cloudlet token')")
    if len(claims.authority_public_key) != PUBLIC_KEY_BYTES:
        raise Unauthorized("malformed token (no cluster key)")
    return claims


class ClientTokens:
    """Issues and checks client tokens for one cluster."""

    def __init__(self, cluster_secret: bytes, authority_public_key: bytes) -> None:
        if len(cluster_secret) < SECRET_BYTES:
            raise ConfigError(f"the cluster secret must be at least {SECRET_BYTES} bytes")
        if len(authority_public_key) != PUBLIC_KEY_BYTES:
            raise ConfigError("the cluster authority's key is a 32-byte Ed25519 public key")
        self._key = hmac.new(cluster_secret, b"cloudlet client tokens", "sha256").digest()
        self.authority_public_key = authority_public_key

    def issue(self, client: str, ttl_s: int, *, now: float | None = None) -> str:
        check_client_name(client)
        if not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidArgument(f"a token's lifetime is 1 s to {MAX_TTL_S} s, not {ttl_s}")
        expiry = int((time.time() if now is None else now) + ttl_s)
        payload = (f"{TOKEN_VERSION}|{expiry}|{client}|"
                   f"{self.authority_public_key.hex()}").encode()
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(mac)}"

    def check(self, token: str, *, now: float | None = None) -> str:
        """The client `token` names, if it is this cluster's and unexpired."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("malformed token (too long)")
        claims = read_claims(token)
        payload_b64, mac_b64 = token.strip().split(".")
        try:
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        except ValueError:
            raise Unauthorized("malformed token") from None
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise Unauthorized("invalid token (wrong signature: another cluster's, or forged)")
        if claims.authority_public_key != self.authority_public_key:
            raise Unauthorized("a token of another cluster")
        if claims.expiry_unix < (time.time() if now is None else now):
            raise Unauthorized("token expired")
        return claims.client
