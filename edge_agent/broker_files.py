"""Files for an external Mosquitto that admits only the cluster, under its topic rules.

`cloudlet broker-config --out DIR` writes, from the cluster's files:

- `passwd`: one `$7$` (PBKDF2-SHA512) line per cloudlet (`node.NAME`), the
  operator, and each named client; passwords derived from the cluster secret
  (`cloudlet.trust.acl.derived_password`), so cloudlets started by
  `cloudlet up --broker ...` already know theirs;
- `acl`: the topic rules of `cloudlet.trust.acl`;
- `mosquitto.conf`: a listener (with TLS when given a certificate and key),
  `allow_anonymous false`, and the two files, named where they will be on the
  broker's machine (`installed_in`; default: where they are written).

Mosquitto checks client passwords from the file, so a client's broker password
is its derived one (printed), not its bearer token as with the embedded broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cloudlet.errors import ConfigError
from cloudlet.fsutil import atomic_write
from cloudlet.trust import acl
from cloudlet.trust.client_tokens import check_client_name
from cloudlet.trust.sealed import MAX_SEALED_BYTES
from edge_agent.auth import SECRET_FILE, load_secret
from edge_agent.config import load_metro_config, node_config_from_dict
from edge_agent.metro import DEFAULT_METRO

MAX_PACKET_BYTES = MAX_SEALED_BYTES + (16 << 10)  # a sealed message and MQTT's framing


def _plain(text: str) -> bool:
    """No control characters (line breaks above all)."""
    return all(c.isprintable() for c in text)


def write_mosquitto_files(state: Path, out: Path, *, nodes: Sequence[str] | None,
                          clients: Sequence[str], listener: str,
                          installed_in: Path | None = None, tls_cert: str = "",
                          tls_key: str = "") -> dict[str, str]:
    """Write the three files; returns each client's broker password. `installed_in`
    is the directory mosquitto.conf names the others in (written on the operator's
    machine, read on the broker's); `tls_cert` and `tls_key` (paths on the broker's
    machine) make the listener MQTT over TLS."""
    secret_path = state / SECRET_FILE
    if not secret_path.exists():
        raise ConfigError(f"no cluster secret at {secret_path}: pass --state-dir (the "
                          "directory `cloudlet up` uses), or run `cloudlet up` once")
    secret = load_secret(secret_path)
    host, _, port = listener.rpartition(":")
    if (not host or not port.isdigit() or not 0 < int(port) < 65536
            or not _plain(host) or any(c.isspace() for c in host)):
        raise ConfigError(f"--listener {listener!r} must be HOST:PORT")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    # Each of these becomes a line's value in mosquitto.conf: a line break in one
    # would add directives of its own (`allow_anonymous true`).
    for option, value in (("--installed-in", str(installed_in or "/")),
                          ("--tls-cert", tls_cert or "/"), ("--tls-key", tls_key or "/")):
        if not _plain(value) or value != value.strip() or not value.startswith("/"):
            raise ConfigError(f"{option} {value!r} must be an absolute path on the broker's "
                              "machine, without control characters or surrounding spaces")
    names = list(nodes) if nodes else [n.name for n in load_metro_config(DEFAULT_METRO).nodes]
    for name in names:  # the ACL's and passwd's lines are built from the names
        node_config_from_dict({"name": name}, "--node")
    for client in clients:
        check_client_name(client)
    users = ([acl.node_user(n) for n in names] + [acl.orchestrator_user(n) for n in names]
             + [acl.OPERATOR_USER, *clients])
    passwd = "\n".join(acl.mosquitto_password_line(u, acl.derived_password(secret, u))
                       for u in users) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "passwd", passwd.encode())
    atomic_write(out / "acl", acl.mosquitto_acl(names).encode())
    where = installed_in if installed_in is not None else out.resolve()
    tls = [f"certfile {tls_cert}", f"keyfile {tls_key}"] if tls_cert else []
    conf = "\n".join([
        "# Written by `cloudlet broker-config`: only the cluster gets in.",
        f"listener {port} {host}",
        *tls,
        "allow_anonymous false",
        # A client id is its username here: no user can take over (and knock off)
        # another's session by naming its client id. One connection per user.
        "use_username_as_clientid true",
        # The largest control message is well under this (sealed messages are
        # capped at 256 KiB); a client cannot park more than this per message.
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"password_file {where / 'passwd'}",
        f"acl_file {where / 'acl'}",
        "persistence false",
        ""])
    atomic_write(out / "mosquitto.conf", conf.encode())
    return {c: acl.derived_password(secret, c) for c in clients}
