"""X.509 for TLS: a cluster's own TLS authority and the server certificates it issues.

The control plane's trust (`certs`) is Ed25519 certificates of our own format;
TLS cannot use them, since browsers, OpenSSL, Mosquitto and aiohttp speak
X.509. So a cluster spread over several machines has a second, separate
authority just for TLS: `tls-ca.key` and `tls-ca.pem`, kept by the operator
beside `ca.key`. It issues one certificate per server (a cloudlet's HTTPS, the
broker's MQTT over TLS) naming the addresses it is reached at, and every
machine is given `tls-ca.pem` to check its peers' and the broker's certificates.

Two authorities rather than one because they answer different questions: TLS
says "this socket is the host I dialled" (so nobody on the path reads a
token or a VM's memory), the Ed25519 certificate says "this key is cloudlet
harbor of this cluster". A cloudlet is checked for both (docs/security.md).

ECDSA P-256: small, fast, and accepted by every TLS stack the cluster meets.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write

TLS_AUTHORITY_KEY_FILE = "tls-ca.key"
TLS_AUTHORITY_CERT_FILE = "tls-ca.pem"
# The authority outlives the servers it vouches for: replacing it means handing
# every machine a new tls-ca.pem.
TLS_AUTHORITY_TTL_DAYS = 10 * 365
# A server's certificate, like a cloudlet's own, bounds how long a stolen key is useful.
DEFAULT_SERVER_TTL_DAYS = 365
# Clocks differ a little; a certificate must not be refused for starting "in a moment".
BACKDATE = datetime.timedelta(minutes=5)
MAX_HOSTS = 32


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_tls_authority(directory: str | os.PathLike[str]
                         ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The cluster's TLS authority in `directory` (created on first use, then kept)."""
    d = Path(directory)
    key_path, cert_path = d / TLS_AUTHORITY_KEY_FILE, d / TLS_AUTHORITY_CERT_FILE
    if key_path.exists() and cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise ConfigError(f"{key_path} or {cert_path} is not a PEM key or "
                              "certificate") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an ECDSA key")
        if cert.public_key() != key.public_key():
            raise ConfigError(f"{cert_path} is not the certificate of {key_path}")
        return key, cert
    if key_path.exists() or cert_path.exists():
        # Half an authority: a new one would orphan every certificate the old one
        # issued (and a key is never overwritten). The operator restores the pair.
        (there, missing) = ((key_path, cert_path) if key_path.exists()
                            else (cert_path, key_path))
        raise ConfigError(f"{there} exists but {missing} does not: restore the TLS "
                          "authority's pair from a backup (nothing was replaced)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cloudlet cluster TLS authority")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=TLS_AUTHORITY_TTL_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, _pem_key(key))  # 0600 from the first byte
    atomic_write(cert_path, _pem_cert(cert))
    return key, cert


def subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """`hosts` as a certificate's subject alternative names; ConfigError for one
    that is neither an IP address nor a DNS name (checked before anything is made)."""
    if not hosts or len(hosts) > MAX_HOSTS:
        raise ConfigError(f"a TLS certificate names 1-{MAX_HOSTS} hosts (addresses or DNS names)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _dns_name(host):
                raise ConfigError(f"{host!r} is neither an IP address nor a DNS name (ASCII "
                                  "labels of 1-63 letters, digits or inner '-', at most 253 "
                                  "characters; an internationalised name in its xn-- "
                                  "form)") from None
            names.append(x509.DNSName(host))
    return names


def _dns_name(host: str) -> bool:
    """A DNS name X.509 takes: ASCII (IDNA's A-labels), RFC 1035's lengths."""
    labels = host.split(".")
    return (0 < len(host) <= 253 and host.isascii()
            and all(0 < len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
                    and not label.startswith("-") and not label.endswith("-")
                    for label in labels))


def issue_server_cert(directory: str | os.PathLike[str], hosts: Sequence[str],
                      out: str | os.PathLike[str], *,
                      ttl_days: int = DEFAULT_SERVER_TTL_DAYS) -> tuple[Path, Path, Path]:
    """A fresh key and a server certificate for `hosts`, issued by the TLS authority
    in `directory`, written to `out` as `tls.key`, `tls.pem` and (the authority's,
    for checking peers) `tls-ca.pem`. Returns those three paths."""
    if not 1 <= ttl_days <= TLS_AUTHORITY_TTL_DAYS:
        raise ConfigError(f"a TLS certificate lives 1-{TLS_AUTHORITY_TTL_DAYS} days")
    names = subject_names(hosts)
    authority_key, authority = ensure_tls_authority(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            # The names are in the SAN; the CN (at most 64 characters) only labels it.
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
            .issuer_name(authority.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=ttl_days),
                                 authority.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                authority_key.public_key()), critical=False)
            .sign(authority_key, hashes.SHA256()))
    o = Path(out)
    paths = (o / "tls.key", o / "tls.pem", o / TLS_AUTHORITY_CERT_FILE)
    atomic_write(paths[0], _pem_key(key))
    atomic_write(paths[1], _pem_cert(cert))
    atomic_write(paths[2], _pem_cert(authority))
    return paths
