"""A cloudlet's trust at start-up: the cluster secret, the authority's key, its own identity.

Three ways a cloudlet is set up, tried in this order:

1. `ca_file` names the authority's public key (an operator's cluster).
2. `secret_file` is set and `ca.pub` lies beside it (`cloudlet up` and tests
   keep a cluster's files in one directory).
3. Neither: a one-cloudlet cluster of its own, created in the state directory
   on first start (cluster.key, ca.key, ca.pub), as `cloudlet agent` alone does.

The node's key is kept (`node.key`); its certificate is checked at start for
this cluster, this node's name, this key and its lifetime. One that is missing
or no longer valid is issued afresh when the authority's private key is at
hand (`ca.key` beside `ca.pub`); otherwise the start fails, saying so, rather
than running a cloudlet its peers will refuse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cloudlet.errors import ConfigError, TrustError
from cloudlet.trust.certs import ROLE_CLOUDLET, ROLE_ORCHESTRATOR, CertificateVerifier
from cloudlet.trust.cluster import (
    AUTHORITY_KEY_FILE,
    AUTHORITY_PUBLIC_FILE,
    NODE_CERT_FILE,
    NODE_KEY_FILE,
    ensure_authority,
    issue_node,
    load_authority,
    load_identity,
)
from cloudlet.trust.keys import read_public_key
from cloudlet.trust.sealed import Identity
from edge_agent.auth import SECRET_FILE, Authority, ensure_secret, load_secret
from edge_agent.config import NodeConfig

log = logging.getLogger(__name__)

# Any cloudlet may lead its region's orchestrator (a role the daemon runs).
NODE_ROLES = (ROLE_CLOUDLET, ROLE_ORCHESTRATOR)


@dataclass(frozen=True)
class NodeTrust:
    identity: Identity
    verifier: CertificateVerifier
    authority: Authority  # checks what clients and peers present


def _authority_public_path(config: NodeConfig) -> Path:
    if config.ca_file:
        return Path(config.ca_file).expanduser()
    if config.secret_file:
        beside = Path(config.secret_file).expanduser().parent / AUTHORITY_PUBLIC_FILE
        if not beside.exists():
            raise ConfigError(f"no cluster authority key: set ca_file, or put the cluster's "
                              f"{AUTHORITY_PUBLIC_FILE} beside {config.secret_file}")
        return beside
    ensure_authority(config.state_path)  # a one-cloudlet cluster of its own
    return config.state_path / AUTHORITY_PUBLIC_FILE


def load_node_trust(config: NodeConfig) -> NodeTrust:
    secret = (load_secret(config.secret_file) if config.secret_file
              else ensure_secret(config.state_path / SECRET_FILE))
    public_path = _authority_public_path(config)
    verifier = CertificateVerifier(read_public_key(public_path))
    key_path = Path(config.node_key_file).expanduser() if config.node_key_file else (
        config.state_path / NODE_KEY_FILE)
    cert_path = Path(config.node_cert_file).expanduser() if config.node_cert_file else (
        config.state_path / NODE_CERT_FILE)
    identity = _valid_identity(config.name, key_path, cert_path, verifier)
    if identity is None:
        authority_key = public_path.parent / AUTHORITY_KEY_FILE
        if not authority_key.exists():
            raise ConfigError(f"cloudlet {config.name} has no valid certificate at {cert_path} "
                              f"and the authority's key is not here to issue one (issue it "
                              f"where {AUTHORITY_KEY_FILE} is)")
        authority = load_authority(public_path.parent)
        if authority.public_key != verifier.authority_public_key:
            raise ConfigError(f"{authority_key} does not match {public_path}")
        issue_node(authority, config.name, NODE_ROLES, key_path.parent, key_path=key_path,
                   cert_path=cert_path)
        log.info("issued a certificate for cloudlet %s", config.name)
        identity = _valid_identity(config.name, key_path, cert_path, verifier)
        if identity is None:
            raise ConfigError(f"the certificate issued for {config.name} does not verify")
    return NodeTrust(identity, verifier,
                     Authority(secret, verifier.authority_public_key, node=config.name,
                               verifier=verifier))


def _valid_identity(name: str, key_path: Path, cert_path: Path,
                    verifier: CertificateVerifier) -> Identity | None:
    if not key_path.exists() or not cert_path.exists():
        return None
    try:
        identity = load_identity(key_path, cert_path, verifier)
    except (TrustError, ConfigError) as exc:
        log.warning("the certificate at %s is not usable (%s)", cert_path, exc.message)
        return None
    if identity.subject != name or not identity.cert.has_role(ROLE_CLOUDLET):
        log.warning("the certificate at %s is for %r, not cloudlet %r", cert_path,
                    identity.subject, name)
        return None
    return identity
