"""Fuzz target: client and peer bearer tokens, `Authority.check` on any header.

Every request but `/health` carries an `Authorization` header that the daemon
parses before anything else, from anyone on the network. The header arrives as
aiohttp decodes it (UTF-8, undecodable bytes kept as surrogates), and only
`Unauthorized` may come out of a bad one. A token that passes must be one this
cluster signed: the fuzzer cannot forge the HMAC, so a pass on anything but the
seeds' own tokens would be a bypass.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

from cloudlet.errors import CloudletError
from edge_agent.auth import Authority

MAX_INPUT_BYTES = 1024
SECRET = bytes(range(32))  # any fixed cluster secret: the seeds' tokens are signed with it
NOW = 1_700_000_000.0  # a fixed clock: expiry is part of what is fuzzed, not of the weather
DICTIONARY = [b"Bearer ", b"bearer ", b"peer:", b"1|", b"|", b".", b"=", b"%", b"\xed\xa0\x80"]
AUTHORITY = Authority(SECRET)
SIGNED = {
    "client": AUTHORITY.issue("alice", 3600, now=NOW),
    "peer": AUTHORITY.issue_peer("harbor", 3600, now=NOW),
    "expired": AUTHORITY.issue("bob", 60, now=NOW - 3600),
}
PASSING = frozenset({"alice", "peer:harbor"})


def TestOneInput(data: bytes) -> None:
    header = data.decode("utf-8", "surrogateescape")
    with contextlib.suppress(CloudletError):
        who = AUTHORITY.check(header, now=NOW)
        # The MAC covers the whole payload (version, expiry, name), so whatever
        # passes carries one of the payloads signed above, however it is spelled.
        assert who.name in PASSING, f"a token this cluster never signed passed as {who.name!r}"
        assert who.is_peer == who.name.startswith("peer:")


def seeds() -> dict[str, bytes]:
    out = {f"{name}.txt": f"Bearer {token}".encode() for name, token in SIGNED.items()}
    client = SIGNED["client"]
    out["lowercase-scheme.txt"] = f"bearer {client}".encode()
    out["basic.txt"] = b"Basic YWxpY2U6cGFzcw=="
    out["no-token.txt"] = b"Bearer "
    out["three-parts.txt"] = f"Bearer {client}.x".encode()
    out["forged.txt"] = f"Bearer {client[:-2]}AA".encode()
    # A peer's name signed with the client key: what a client would forge to pass as a peer.
    payload = f"1|{int(NOW) + 60}|peer:harbor".encode()
    client_key = hmac.new(SECRET, b"cloudlet client tokens", "sha256").digest()
    mac = hmac.new(client_key, payload, hashlib.sha256).digest()
    out["peer-name-client-key.txt"] = b"Bearer " + b".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=") for part in (payload, mac))
    out["latin1.txt"] = b"Bearer \xe9t\xe9.\xff"
    return out
