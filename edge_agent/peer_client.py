"""Talking to another cloudlet: prove who it is first, then present a token for it alone.

Before a cloudlet sends anything that matters to an endpoint (a peer token, an
image, a VM's memory), the endpoint must prove it is the cloudlet it is taken
for (`cloudlet.trust.proof`: a fresh challenge signed with that cloudlet's
certified key). Only then is a peer token minted, for that cloudlet as its
audience and for a minute: if it leaks, it opens nothing else and soon not
even that. One aiohttp client is kept for all peers (connections are reused
across the requests of one move).
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import aiohttp
import msgpack

from cloudlet.errors import MigrationAborted, PeerUnverified, TrustError, error_from_wire
from cloudlet.protocol import Location
from cloudlet.trust import peer_tokens, proof
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.sealed import Identity

log = logging.getLogger(__name__)

PROOF_TIMEOUT_S = 5.0


class PeerClient:
    """This cloudlet's client to its peers. `async with` owns the HTTP connections."""

    def __init__(self, identity: Identity, verifier: CertificateVerifier,
                 timeout_s: float, *, tls_ca_file: str = "") -> None:
        self.identity = identity
        self.verifier = verifier
        self._timeout_s = timeout_s
        self._tls_ca_file = tls_ca_file
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerClient:
        # HTTPS peers are checked against the configured CA (or the system's): with TLS
        # on, a peer proves its name to the transport as well as its key to us.
        tls = ssl.create_default_context(cafile=self._tls_ca_file or None)
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(ssl=tls))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise MigrationAborted("the cloudlet is shutting down")
        return self._http

    async def prove(self, where: Location, expected: str | None) -> Location:
        """`where` as proven: the endpoint answered a fresh challenge with the key of a
        cloudlet of this cluster (`expected`, when given). `PeerUnverified` otherwise,
        and nothing else was sent to it."""
        challenge = proof.new_challenge()
        try:
            # No redirects, here or below: a redirect would let any server pass the
            # proof with a real cloudlet's answer (and carry bodies elsewhere).
            async with self.http.get(f"{where.endpoint}/health",
                                     params={"challenge": challenge.hex()},
                                     timeout=aiohttp.ClientTimeout(total=PROOF_TIMEOUT_S),
                                     allow_redirects=False) as resp:
                raw = await resp.read()
            answer = json.loads(raw).get("identity") if raw else None
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            raise PeerUnverified(f"{where.endpoint} did not prove it is cloudlet "
                                 f"{expected or '(any)'}: {exc!r}"[:300]) from None
        try:
            cert = proof.check(self.verifier, challenge, answer, expected)
        except TrustError as exc:
            log.warning("refused to send anything to %s: %s", where.endpoint, exc.message)
            raise PeerUnverified(f"{where.endpoint} did not prove it is cloudlet "
                                 f"{expected or '(any)'}: {exc.message}",
                                 reason=exc.details.get("reason")) from None
        return Location(cert.subject, where.endpoint)

    def headers(self, audience: str) -> dict[str, str]:
        """Credentials for `audience` only (call after `prove`)."""
        return {"Authorization": "Bearer " + peer_tokens.mint(self.identity, audience)}

    async def get(self, where: Location, path: str) -> dict[str, Any]:
        async with self.http.get(where.endpoint + path, headers=self.headers(where.node),
                                 allow_redirects=False) as resp:
            return await decoded(resp, 200)

    async def post(self, where: Location, path: str, data: bytes, expect: int,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
        async with self.http.post(where.endpoint + path, data=data,
                                  headers={**(headers or {}), **self.headers(where.node)},
                                  allow_redirects=False) as resp:
            return await decoded(resp, expect)


async def decoded(resp: aiohttp.ClientResponse, expect: int) -> dict[str, Any]:
    raw = await resp.read()
    try:
        if "json" in resp.headers.get("Content-Type", ""):
            body = json.loads(raw)
        else:
            body = msgpack.unpackb(raw) if raw else {}
    except (ValueError, msgpack.UnpackException):
        body = {"code": "malformed_answer", "message": raw[:200].decode(errors="replace")}
    if resp.status != expect:
        raise error_from_wire(body)
    if not isinstance(body, dict):
        raise MigrationAborted(f"the peer answered {body!r:.100}")
    return body
