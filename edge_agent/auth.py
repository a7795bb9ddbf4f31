"""Who is asking: client bearer tokens and peer credentials, both from one cluster secret.

A client token is `base64url(payload).base64url(mac)`: the payload names the
client and its expiry, the MAC is HMAC-SHA256 under a key derived from the
cluster secret. Any cloudlet of the cluster can check it without a database,
which matters because sessions move between cloudlets. Peers (cloudlets talking
to each other, e.g. for migration) present a token whose client name is
`peer:NODE`, signed under a separate derived key, so a client token can never
pass as a peer's. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cloudlet.errors import ConfigError
from cloudlet.errors import Unauthorized as AuthError
from cloudlet.fsutil import atomic_write

SECRET_BYTES = 32
TOKEN_VERSION = "1"
PEER_PREFIX = "peer:"


@dataclass(frozen=True)
class Principal:
    name: str
    is_peer: bool


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authority:
    """Issues and checks tokens for one cluster."""

    def __init__(self, cluster_secret: bytes) -> None:
        if len(cluster_secret) < SECRET_BYTES:
            raise ConfigError(f"the cluster secret must be at least {SECRET_BYTES} bytes")
        self._client_key = hmac.new(cluster_secret, b"cloudlet client tokens", "sha256").digest()
        self._peer_key = hmac.new(cluster_secret, b"cloudlet peer tokens", "sha256").digest()

    def issue(self, client: str, ttl_s: int, *, now: float | None = None) -> str:
        if not client or ":" in client or len(client) > 128:
            raise ConfigError("a client name is 1-128 characters without ':'")
        return self._sign(client, ttl_s, self._client_key, now)

    def issue_peer(self, node: str, ttl_s: int = 3600, *, now: float | None = None) -> str:
        return self._sign(PEER_PREFIX + node, ttl_s, self._peer_key, now)

    def _sign(self, name: str, ttl_s: int, key: bytes, now: float | None) -> str:
        expiry = int((time.time() if now is None else now) + ttl_s)
        payload = f"{TOKEN_VERSION}|{expiry}|{name}".encode()
        mac = hmac.new(key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(mac)}"

    def check(self, authorization: str | None, *, now: float | None = None) -> Principal:
        """The principal behind an `Authorization: Bearer ...` header, or AuthError."""
        if not authorization:
            raise AuthError("no credentials: send 'Authorization: Bearer <token>' "
                            "(get one with 'cloudlet token --client NAME')")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("credentials must be 'Bearer <token>'")
        try:
            payload_b64, mac_b64 = token.strip().split(".")
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
            version, expiry_s, name = payload.decode().split("|", 2)
            expiry = int(expiry_s)
        except (ValueError, UnicodeDecodeError):
            raise AuthError("malformed token") from None
        is_peer = name.startswith(PEER_PREFIX)
        key = self._peer_key if is_peer else self._client_key
        expected = hmac.new(key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected) or version != TOKEN_VERSION:
            raise AuthError("invalid token (wrong signature: another cluster's, or forged)")
        if expiry < (time.time() if now is None else now):
            raise AuthError("token expired")
        return Principal(name, is_peer)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    raw = Path(path).read_bytes().strip()
    try:
        secret = bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        secret = raw
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"{path}: the cluster secret must be at least {SECRET_BYTES} bytes")
    return secret


def ensure_secret(path: str | os.PathLike[str]) -> bytes:
    """Load the cluster secret, creating it (0600, atomically) on first run."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
        p.chmod(0o600)
    return load_secret(p)
