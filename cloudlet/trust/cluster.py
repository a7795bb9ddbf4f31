"""The cluster's trust files on disk, and the identities made from them.

A cluster directory (a metro's state directory, or a lone cloudlet's) holds:

- `cluster.key`: the secret that signs client tokens (HMAC); every cloudlet,
  the broker and `cloudlet token` hold it.
- `ca.key`: the authority's private key, which issues certificates; only the
  operator holds it (`cloudlet up`, the command line).
- `ca.pub`: the authority's public key, which verifies everything; everyone
  has it, clients included (it rides in their tokens).

and each cloudlet has `node.key` (its private key, never leaves it) and
`node.cert` (its certificate, base64 of the msgpack bytes). Keys are created on
first use and kept, so identities survive restarts; certificates are cheap and
re-issued whenever `cloudlet up` starts a node.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write
from cloudlet.trust.certs import (
    DEFAULT_CERT_TTL_S,
    ROLE_OPERATOR,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.client_tokens import SECRET_BYTES, ClientTokens
from cloudlet.trust.keys import (
    SigningKey,
    read_public_key,
    read_signing_key,
    write_public_key,
    write_signing_key,
)
from cloudlet.trust.sealed import Identity

SECRET_FILE = "cluster.key"
AUTHORITY_KEY_FILE = "ca.key"
AUTHORITY_PUBLIC_FILE = "ca.pub"
NODE_KEY_FILE = "node.key"
NODE_CERT_FILE = "node.cert"
OPERATOR_CERT_TTL_S = 600  # a command-line operator identity lives for one command


def ensure_authority(directory: str | os.PathLike[str]) -> CertificateAuthority:
    """The cluster's authority in `directory`, created on first use."""
    d = Path(directory)
    key_path, public_path = d / AUTHORITY_KEY_FILE, d / AUTHORITY_PUBLIC_FILE
    if not key_path.exists():
        d.mkdir(parents=True, exist_ok=True)
        write_signing_key(key_path, SigningKey.generate())
    authority = CertificateAuthority(read_signing_key(key_path))
    if not public_path.exists() or read_public_key(public_path) != authority.public_key:
        write_public_key(public_path, authority.public_key)
    return authority


def load_authority(directory: str | os.PathLike[str]) -> CertificateAuthority:
    key_path = Path(directory) / AUTHORITY_KEY_FILE
    if not key_path.exists():
        raise ConfigError(f"no cluster authority key at {key_path} (the operator's; "
                          "`cloudlet up` creates it)")
    return CertificateAuthority(read_signing_key(key_path))


def write_cert(path: str | os.PathLike[str], wire: bytes) -> None:
    atomic_write(path, base64.b64encode(wire) + b"\n")


def read_cert(path: str | os.PathLike[str]) -> bytes:
    try:
        return base64.b64decode(Path(path).read_text().strip(), validate=True)
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path}: not a base64 certificate") from None


def issue_node(authority: CertificateAuthority, node: str, roles: Iterable[str],
               directory: str | os.PathLike[str], *, key_path: Path | None = None,
               cert_path: Path | None = None,
               ttl_s: int = DEFAULT_CERT_TTL_S) -> tuple[Path, Path]:
    """Give cloudlet `node` a certificate (`node.cert` in `directory`, unless named);
    its key (`node.key`) is made once and kept. Returns (key path, certificate path)."""
    key_path = key_path or Path(directory) / NODE_KEY_FILE
    cert_path = cert_path or Path(directory) / NODE_CERT_FILE
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True)
        write_signing_key(key_path, SigningKey.generate())
    key = read_signing_key(key_path)
    write_cert(cert_path, authority.issue(node, roles, key.public_bytes, ttl_s=ttl_s))
    return key_path, cert_path


def load_identity(key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str],
                  verifier: CertificateVerifier) -> Identity:
    return Identity.load(read_signing_key(key_path), read_cert(cert_path), verifier)


def operator_identity(authority: CertificateAuthority, name: str = "operator", *,
                      ttl_s: int = OPERATOR_CERT_TTL_S) -> Identity:
    """A short-lived identity for one command-line operation (a fresh key, certified
    now by the authority; nothing written)."""
    key = SigningKey.generate()
    verifier = CertificateVerifier(authority.public_key, clock=time.time)
    cert = authority.issue(f"operator:{name}", [ROLE_OPERATOR], key.public_bytes, ttl_s=ttl_s)
    return Identity.load(key, cert, verifier)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The cluster secret (hex, or raw bytes), at least `SECRET_BYTES` long."""
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret {path}: {exc.strerror}") from None
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
        atomic_write(p, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
    return load_secret(p)


def cluster_tokens(directory: str | os.PathLike[str]) -> ClientTokens:
    """Client tokens of the cluster whose files are in `directory` (cluster.key and
    ca.pub, as `cloudlet up` writes them): what `cloudlet token` uses."""
    d = Path(directory)
    secret_path, public_path = d / SECRET_FILE, d / AUTHORITY_PUBLIC_FILE
    for path in (secret_path, public_path):
        if not path.exists():
            raise ConfigError(f"no cluster at {d} ({path.name} is missing; `cloudlet up` "
                              "creates it)")
    return ClientTokens(load_secret(secret_path), read_public_key(public_path))


def default_metro_dir() -> Path:
    """Where `cloudlet up` keeps the local metro's state and its cluster files
    (`$CLOUDLET_HOME/metro`, default `~/.cache/cloudlet/metro`)."""
    home = os.environ.get("CLOUDLET_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "cloudlet") / "metro"
