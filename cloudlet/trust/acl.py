"""Who may publish, subscribe to and receive which topics on the broker; their passwords.

The broker is the first wall (an outsider does not get in, a client cannot
write where only cloudlets write); signatures are the second (`gate`), since a
broker cannot know, for example, which VMs a cloudlet hosts. The same rules
drive the embedded broker (`edge_agent.broker`) and the password and ACL files
written for an external Mosquitto (`mosquitto_acl`, `mosquitto_password_line`).

- `node.NAME` (a cloudlet) publishes `nodes/NAME/#`, `nodes/+/commands`,
  `vms/+/location` and `orchestrator/#`; receives all of `cloudlet/v1/`.
- `orchestrator.NAME` (the orchestrator role of cloudlet NAME, on a connection
  of its own) publishes `nodes/+/commands`, `orchestrator/#` and
  `nodes/NAME/events` (what it abandoned); receives all of `cloudlet/v1/`.
- `operator` (the command line) publishes and receives all of `cloudlet/v1/`.
- any other name (a client) publishes `clients/NAME/#`; receives that,
  `nodes/+/presence` and `vms/+/location`.

A cloudlet may publish commands and leases because any cloudlet can run the
orchestrator role; the gate then believes only those signed by a certificate
with that role. Nothing outside `cloudlet/v1/` (`$SYS` included) is open to
anyone. Client names cannot start with `node.` or `orchestrator.` or be `operator`
(`edge_agent.auth` refuses to issue such tokens), so the three never collide.

Passwords of cloudlets and the operator (and, for an external broker, of
clients) are derived from the cluster secret: HMAC-SHA256(secret, user), so
whoever holds the secret (`cloudlet up`, the embedded broker, the command
line) computes them and nothing needs a password database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cloudlet.protocol import PREFIX

NODE_USER_PREFIX = "node."
ORCHESTRATOR_USER_PREFIX = "orchestrator."
OPERATOR_USER = "operator"
PASSWORD_DOMAIN = b"cloudlet mqtt password\x00"
# Mosquitto's own default for `$7$` (PBKDF2-SHA512) password hashes.
MOSQUITTO_PBKDF2_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12


@dataclass(frozen=True)
class BrokerUser:
    kind: str  # "node", "orchestrator", "operator" or "client"
    name: str  # node name (for a node or its orchestrator), "operator", or client name


def node_user(node: str) -> str:
    return NODE_USER_PREFIX + node


def orchestrator_user(node: str) -> str:
    return ORCHESTRATOR_USER_PREFIX + node


def broker_user(username: str) -> BrokerUser:
    if username.startswith(NODE_USER_PREFIX):
        return BrokerUser("node", username[len(NODE_USER_PREFIX):])
    if username.startswith(ORCHESTRATOR_USER_PREFIX):
        return BrokerUser("orchestrator", username[len(ORCHESTRATOR_USER_PREFIX):])
    if username == OPERATOR_USER:
        return BrokerUser("operator", OPERATOR_USER)
    return BrokerUser("client", username)


def is_reserved_client_name(name: str) -> bool:
    return name.startswith((NODE_USER_PREFIX, ORCHESTRATOR_USER_PREFIX)) or name == OPERATOR_USER


def derived_password(secret: bytes, username: str) -> str:
    mac = hmac.new(secret, PASSWORD_DOMAIN + username.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _levels(topic: str) -> list[str]:
    return topic.split("/")


def matches(topic: str, pattern: str) -> bool:
    """MQTT filter matching of a concrete topic against `pattern` (+ and #)."""
    t, p = _levels(topic), _levels(pattern)
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(t) == len(p)


def within(filter_: str, pattern: str) -> bool:
    """True if every topic `filter_` can match is matched by `pattern`."""
    f, p = _levels(filter_), _levels(pattern)
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(f) or f[i] == "#":
            return False
        if level != "+" and (f[i] == "+" or f[i] != level):
            return False
    return len(f) == len(p)


def _publish_patterns(user: BrokerUser) -> list[str]:
    if user.kind == "operator":
        return [f"{PREFIX}/#"]
    if user.kind == "node":
        return [f"{PREFIX}/nodes/{user.name}/#", f"{PREFIX}/nodes/+/commands",
                f"{PREFIX}/vms/+/location", f"{PREFIX}/orchestrator/#"]
    if user.kind == "orchestrator":
        return [f"{PREFIX}/nodes/+/commands", f"{PREFIX}/orchestrator/#",
                f"{PREFIX}/nodes/{user.name}/events"]
    return [f"{PREFIX}/clients/{user.name}/#"]


def _receive_patterns(user: BrokerUser) -> list[str]:
    if user.kind in ("operator", "node", "orchestrator"):
        return [f"{PREFIX}/#"]
    return [f"{PREFIX}/clients/{user.name}/#", f"{PREFIX}/nodes/+/presence",
            f"{PREFIX}/vms/+/location"]


def _safe_name(name: str) -> bool:
    # A name with wildcards or separators would widen the patterns built from it.
    return bool(name) and not any(c in name for c in "/+#\x00")


def may_publish(username: str, topic: str) -> bool:
    user = broker_user(username)
    if not _safe_name(user.name) or "+" in topic or "#" in topic:
        return False
    return any(matches(topic, p) for p in _publish_patterns(user))


def may_receive(username: str, topic: str) -> bool:
    user = broker_user(username)
    return _safe_name(user.name) and any(matches(topic, p) for p in _receive_patterns(user))


def may_subscribe(username: str, filter_: str) -> bool:
    """Only to filters wholly inside what the user may receive (a client asking for
    `cloudlet/v1/#` is refused outright, not quietly given part of it)."""
    user = broker_user(username)
    return _safe_name(user.name) and any(within(filter_, p) for p in _receive_patterns(user))


# --- files for an external Mosquitto -------------------------------------------------------


def mosquitto_password_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a Mosquitto 2 password file (`$7$`: PBKDF2-SHA512, as
    `mosquitto_passwd` writes by default)."""
    salt = salt if salt is not None else os.urandom(MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_PBKDF2_ITERATIONS)
    return (f"{username}:$7${MOSQUITTO_PBKDF2_ITERATIONS}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def mosquitto_acl(nodes: Iterable[str]) -> str:
    """A Mosquitto `acl_file` with the rules above (patterns cover the clients)."""
    lines = ["# Written by `cloudlet broker-config`: the rules of cloudlet.trust.acl.", ""]
    for name in sorted(set(nodes)):
        user = BrokerUser("node", name)
        lines.append(f"user {node_user(name)}")
        lines += [f"topic write {p}" for p in _publish_patterns(user)]
        lines += [f"topic read {p}" for p in _receive_patterns(user)]
        lines.append("")
        user = BrokerUser("orchestrator", name)
        lines.append(f"user {orchestrator_user(name)}")
        lines += [f"topic write {p}" for p in _publish_patterns(user)]
        lines += [f"topic read {p}" for p in _receive_patterns(user)]
        lines.append("")
    lines += [f"user {OPERATOR_USER}", f"topic readwrite {PREFIX}/#", ""]
    lines += ["# Every user (clients included): %u is the username.",
              f"pattern readwrite {PREFIX}/clients/%u/#",
              f"pattern read {PREFIX}/nodes/+/presence",
              f"pattern read {PREFIX}/vms/+/location", ""]
    return "\n".join(lines)
