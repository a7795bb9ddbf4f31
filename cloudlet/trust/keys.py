"""Ed25519 key pairs, and the files that hold them.

Keys are stored as one line of hex (64 characters: the 32-byte private seed,
or the 32-byte public key), so an operator can read, copy and compare them.
Private key files are written atomically and are mode 0600 from the first byte
(`atomic_write` creates them that way), so no reader ever sees half a key or
a readable one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKey:
    """An Ed25519 private key: signs; its public half verifies."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        if len(seed) != PRIVATE_KEY_BYTES:
            raise ConfigError(f"an Ed25519 private key is {PRIVATE_KEY_BYTES} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._private.private_bytes(serialization.Encoding.Raw,
                                           serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if `signature` is `public_key`'s over `data`; False for anything else
    (a malformed key or signature included): never raises on outside bytes."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(bytes(public_key)).verify(bytes(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def write_signing_key(path: str | os.PathLike[str], key: SigningKey) -> None:
    atomic_write(path, key.seed().hex().encode() + b"\n")


def read_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    return SigningKey.from_seed(_read_hex(path, PRIVATE_KEY_BYTES, "private key"))


def write_public_key(path: str | os.PathLike[str], public_key: bytes) -> None:
    atomic_write(path, public_key.hex().encode() + b"\n")


def read_public_key(path: str | os.PathLike[str]) -> bytes:
    return _read_hex(path, PUBLIC_KEY_BYTES, "public key")


def _read_hex(path: str | os.PathLike[str], size: int, what: str) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: not a hex-encoded {what}") from None
    if len(raw) != size:
        raise ConfigError(f"{path}: an Ed25519 {what} is {size} bytes, this is {len(raw)}")
    return raw
