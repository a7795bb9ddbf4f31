"""`cloudlet node-files` and `cloudlet tls-cert`: a cloudlet's files for another machine.

`cloudlet up` makes a cluster's secrets and every cloudlet's identity on one
machine. Cloudlets on several machines need the same things made where the
authority's private key is (the operator's machine, which never hands that
key out) and copied to each cloudlet:

- `cluster.key` (checks client tokens, derives broker passwords) and `ca.pub`
  (the authority every signature chains to);
- `node.key` and `node.cert`: the cloudlet's own key (made once and kept, so
  running the command again renews the certificate, not the identity) and its
  certificate with the roles `cloudlet` and `orchestrator`;
- with `--tls-host`: `tls.key`, `tls.pem` (its HTTPS certificate for those
  addresses) and `tls-ca.pem` (to check its peers and the broker);
- `node.toml`: a `[node]` table naming all of these by relative path, and its
  broker login (`node.NAME` and the password derived from the cluster secret),
  for the machine's own settings to be added to.

`cloudlet tls-cert` issues a TLS certificate alone, for the broker.
Every file is written 0600 (`atomic_write`); docs/deploy.md says who on the
target machine may read which.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write
from cloudlet.trust import acl
from cloudlet.trust.certs import MAX_SUBJECT_CHARS
from cloudlet.trust.cluster import (
    AUTHORITY_PUBLIC_FILE,
    SECRET_FILE,
    ensure_authority,
    ensure_secret,
    issue_node,
)
from cloudlet.trust.tls import (
    DEFAULT_SERVER_TTL_DAYS,
    TLS_AUTHORITY_CERT_FILE,
    issue_server_cert,
    subject_names,
)
from edge_agent.config import default_state_dir, load_node_config, node_config_from_dict
from edge_agent.identity import NODE_ROLES
from edge_agent.metro import toml_value

NODE_CONFIG_FILE = "node.toml"
SECONDS_PER_DAY = 24 * 3600


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    files = sub.add_parser(
        "node-files", help="write a cloudlet's key, certificate and logins for another machine",
        description="Write, into --out, what cloudlet NODE needs on its own machine: the "
                    "cluster's cluster.key and ca.pub, its node.key and a certificate from the "
                    "authority (roles cloudlet and orchestrator), with --tls-host its HTTPS key "
                    "and certificate, and node.toml naming them with its broker login. Run it "
                    "where the cluster's files are (the authority's key never leaves); again "
                    "to renew the certificates (the key is kept).")
    files.add_argument("--node", required=True, metavar="NAME")
    files.add_argument("--out", required=True, metavar="DIR")
    files.add_argument("--state-dir", metavar="DIR",
                       help="the cluster's files, made on first use (default: as for 'up')")
    files.add_argument("--tls-host", action="append", default=[], metavar="HOST",
                       help="an address or DNS name the cloudlet is reached at: issue its "
                            "HTTPS certificate for these (repeatable)")
    files.add_argument("--ttl-days", type=int, default=DEFAULT_SERVER_TTL_DAYS,
                       help=f"certificate lifetime in days (default {DEFAULT_SERVER_TTL_DAYS})")
    files.set_defaults(handler=cmd_node_files)

    tls = sub.add_parser(
        "tls-cert", help="issue a TLS certificate from the cluster's TLS authority",
        description="Write tls.key, tls.pem (a server certificate for the given hosts) and "
                    "tls-ca.pem (the authority, for clients to check it) into --out; the "
                    "cluster's TLS authority is made on first use and kept beside its other "
                    "files. For the broker; `node-files --tls-host` does the same for a "
                    "cloudlet.")
    tls.add_argument("--host", action="append", required=True, metavar="HOST",
                     help="an address or DNS name the server is reached at (repeatable)")
    tls.add_argument("--out", required=True, metavar="DIR")
    tls.add_argument("--state-dir", metavar="DIR",
                     help="the cluster's files (default: as for 'up')")
    tls.add_argument("--ttl-days", type=int, default=DEFAULT_SERVER_TTL_DAYS,
                     help=f"lifetime in days (default {DEFAULT_SERVER_TTL_DAYS})")
    tls.set_defaults(handler=cmd_tls_cert)


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def write_node_files(state: Path, node: str, out: Path, *, tls_hosts: list[str],
                     ttl_days: int) -> Path:
    """Everything cloudlet `node` needs on its machine, into `out`; returns its node.toml."""
    # Every check before any file: a refusal leaves nothing behind.
    node_config_from_dict({"name": node}, "--node")
    if len(node) > MAX_SUBJECT_CHARS:
        raise ConfigError(f"--node: a cloudlet's name is at most {MAX_SUBJECT_CHARS} "
                          "characters (it is its certificate's subject)")
    if not 1 <= ttl_days <= 10 * 365:
        raise ConfigError("--ttl-days must be 1 to 3650")
    if tls_hosts:
        subject_names(tls_hosts)
    _check_out_is_for(out / NODE_CONFIG_FILE, node)
    secret = ensure_secret(state / SECRET_FILE)
    authority = ensure_authority(state)
    if out.resolve() == state.resolve():
        raise ConfigError("--out must not be the cluster's own directory (it holds ca.key)")
    out.mkdir(parents=True, exist_ok=True)
    issue_node(authority, node, NODE_ROLES, out, ttl_s=ttl_days * SECONDS_PER_DAY)
    atomic_write(out / SECRET_FILE, (state / SECRET_FILE).read_bytes())
    atomic_write(out / AUTHORITY_PUBLIC_FILE, (state / AUTHORITY_PUBLIC_FILE).read_bytes())
    username = acl.node_user(node)
    table: dict[str, str] = {
        "name": node, "secret_file": SECRET_FILE, "ca_file": AUTHORITY_PUBLIC_FILE,
        "node_key_file": "node.key", "node_cert_file": "node.cert",
        "broker_username": username, "broker_password": acl.derived_password(secret, username)}
    if tls_hosts:
        issue_server_cert(state, tls_hosts, out, ttl_days=ttl_days)
        table |= {"tls_cert_file": "tls.pem", "tls_key_file": "tls.key",
                  "tls_ca_file": TLS_AUTHORITY_CERT_FILE,
                  "broker_ca_file": TLS_AUTHORITY_CERT_FILE}
    lines = ["# Written by `cloudlet node-files`: this cloudlet's identity and logins, by",
             "# paths relative to this file. Add its own settings (host, port,",
             "# advertise_endpoint, broker_url, state_dir, ...) at the end: docs/deploy.md.",
             "[node]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path = out / NODE_CONFIG_FILE
    atomic_write(path, ("\n".join(lines) + "\n").encode())  # it holds a password: 0600
    load_node_config(path)  # refuse here what the cloudlet would refuse at start
    return path


def _check_out_is_for(config: Path, node: str) -> None:
    """A directory already holding another cloudlet's files is not reused: its key
    would be certified under this name."""
    if not config.exists():
        return
    try:
        existing = tomllib.loads(config.read_text()).get("node", {}).get("name")
    except (OSError, ValueError, AttributeError):
        existing = None
    if existing != node:
        raise ConfigError(f"{config.parent} holds the files of {existing or 'another cloudlet'!r}"
                          f", not of {node!r}: give each cloudlet its own --out")


def cmd_node_files(args: argparse.Namespace) -> int:
    out = Path(args.out)
    config = write_node_files(_state(args), args.node, out, tls_hosts=args.tls_host,
                              ttl_days=args.ttl_days)
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {', '.join(written)} in {out} for cloudlet {args.node}")
    print(f"its settings go at the end of {config}; keep {out} private (it holds the "
          "cluster secret)")
    return 0


def cmd_tls_cert(args: argparse.Namespace) -> int:
    key, cert, authority = issue_server_cert(_state(args), args.host, Path(args.out),
                                             ttl_days=args.ttl_days)
    print(f"wrote {key}, {cert} (for {', '.join(args.host)}) and {authority}")
    return 0
