"""The SDK's HTTP side: one aiohttp client, the bearer token, typed errors.

Every answer that is not a success is turned back into the very error class
the daemon raised (by its stable code, `cloudlet.errors.error_from_wire`), so
an application catches `Unauthorized` or `VMNotFound`, not HTTP statuses.

The token never goes to an endpoint that has not proven it is a cloudlet of
the token's cluster (`cloudlet.trust.proof`: a fresh challenge answered with a
certified key; the token itself names the cluster's authority). A proof is
remembered per endpoint for `PROOF_TTL_S`; probing renews it for free (its
first `/health` carries the challenge), so a session's calls never wait for
one. A forged location, a squatter on an old address, or any server a message
pointed at gets no token and no call.

`connect_via` separates where a cloudlet *is* from where the client *dials* it:
it maps a cloudlet's endpoint URL to the base URL actually connected to (a
port forward, or in an emulation a link proxy with that client's delay to that
cloudlet). Everything logical (locations, the node a proof must name, moved
notices, proofs kept per endpoint) stays on the real endpoint; only the
connection goes elsewhere. What answers there must still prove it is the
cloudlet named, so a mapping can misroute but not impersonate.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack

from cloudlet.errors import (
    CloudletError,
    InvalidArgument,
    NoCloudletAvailable,
    PeerUnverified,
    RequestTimeout,
    TrustError,
    Unauthorized,
    error_from_wire,
)
from cloudlet.protocol import Location
from cloudlet.trust import proof
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.client_tokens import read_claims

MSGPACK = "application/msgpack"
# Management requests (upload, create, destroy) may compile an image: give them time.
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3.0
# How long a proof of identity is trusted for an endpoint, at most. A proof is
# also forgotten when a request to the endpoint fails in transport and whenever a
# new connection to it is opened: a server that took over a dead cloudlet's
# address is reached over new connections, so it is challenged before the token
# goes on them (the residual window: docs/security.md).
PROOF_TTL_S = 60.0
# How long a cloudlet's word that its VM moved to another counts as that one's proof
# (long enough for the reconnect that follows, short enough to expire unused).
VOUCH_TTL_S = 10.0
__all__ = ["ConnectVia", "Http", "Location", "client_name", "image_digest"]

# A cloudlet's endpoint URL -> the base URL to dial for it.
ConnectVia = Callable[[str], str]


def client_name(token: str) -> str:
    """The client a token names (tokens are signed, not secret: the name is readable)."""
    try:
        return read_claims(token).client
    except Unauthorized:
        return "anonymous"


def named(where: Location) -> str | None:
    """The node `where` is expected to be, or None when only its URL is known (a
    fixed endpoint list names cloudlets by URL until they prove who they are)."""
    return None if where.node == where.endpoint or not where.node else where.node


def image_digest(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


class Http:
    """Requests to cloudlets with this client's token. `async with` owns the connections.

    The token is read on every request, so an application may replace it
    (`http.token = new`) before it expires; sessions reconnect with the new one."""

    def __init__(self, token: str, *, connect_via: ConnectVia | None = None) -> None:
        self.token = token
        self.connect_via = connect_via
        self._session: aiohttp.ClientSession | None = None
        self._proven: dict[str, tuple[str, float]] = {}  # endpoint -> (node, until)

    @property
    def token(self) -> str:
        return self._token

    @token.setter
    def token(self, value: str) -> None:
        """A token names its cluster's authority: the trust anchor comes with it."""
        self._token = value
        claims = read_claims(value)
        self.verifier = CertificateVerifier(claims.authority_public_key)

    async def __aenter__(self) -> Http:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._new_connection)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            trace_configs=[trace])
        return self

    async def _new_connection(self, session: aiohttp.ClientSession, ctx: Any,
                              params: aiohttp.TraceConnectionCreateEndParams) -> None:
        """A new connection to an endpoint is not covered by its earlier proof: the
        next authenticated request proves the endpoint again (its proof request,
        made on this very connection, re-establishes it)."""
        request = getattr(ctx, "trace_request_ctx", None)
        if (isinstance(request, dict) and isinstance(request.get("endpoint"), str)
                and not request.get("proving")):
            self._proven.pop(request["endpoint"], None)

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise CloudletError("the client is closed")
        return self._session

    def dial(self, endpoint: str) -> str:
        """The base URL to connect to for the cloudlet at `endpoint` (`connect_via`,
        asked afresh each time: an emulation may change its links)."""
        if self.connect_via is None:
            return endpoint
        try:
            url = self.connect_via(endpoint)
        except Exception as exc:  # the application's mapping: report it, typed
            raise InvalidArgument(f"connect_via failed for {endpoint}: {exc!r}") from exc
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"connect_via mapped {endpoint} to {url!r}, not an "
                                  "http(s) URL")
        return url.rstrip("/")

    # --- who is at an endpoint -----------------------------------------------------------

    def proven(self, where: Location) -> Location | None:
        """`where` with its proven node name, if proven recently enough."""
        known = self._proven.get(where.endpoint)
        if known is None or known[1] < time.monotonic():
            return None
        expected = named(where)
        if expected is not None and known[0] != expected:
            return None
        return Location(known[0], where.endpoint)

    def vouch(self, where: Location, *, by: Location) -> None:
        """`by`, a cloudlet proven now, names `where` (a node) as its VM's new home. A
        cloudlet holds the cluster's secret, so trusting its word adds nothing an
        attacker who controls it lacks; and it proved `where` before it moved the VM
        there. So `where` counts as proven for a short while: a follow after a
        migration then reconnects at once, without a challenge on the downtime's path."""
        voucher = self.proven(by)
        if voucher is None or named(where) is None:
            return  # only a proven cloudlet vouches, and only for a named one
        known = self._proven.get(where.endpoint)
        until = time.monotonic() + VOUCH_TTL_S
        if known is None or known[0] != where.node or known[1] < until:
            self._proven[where.endpoint] = (where.node, until)

    def check_proof(self, where: Location, challenge: bytes, answer: Any) -> Location:
        """Check an endpoint's answer to `challenge`; remember it on success."""
        try:
            cert = proof.check(self.verifier, challenge, answer, named(where))
        except TrustError as exc:
            self._proven.pop(where.endpoint, None)
            raise PeerUnverified(f"{where.endpoint} did not prove it is cloudlet "
                                 f"{named(where) or '(any)'} of this cluster: {exc.message}; "
                                 "nothing was sent to it",
                                 reason=exc.details.get("reason")) from None
        self._proven[where.endpoint] = (cert.subject, time.monotonic() + PROOF_TTL_S)
        return Location(cert.subject, where.endpoint)

    async def prove(self, where: Location) -> Location:
        """`where`, proven to be a cloudlet of this cluster (and the one it is named as)
        before anything secret goes there; `PeerUnverified` otherwise."""
        known = self.proven(where)
        if known is not None:
            return known
        challenge = proof.new_challenge()
        try:
            health = await self.request("GET", where, "/health", authenticated=False,
                                        params={"challenge": challenge.hex()},
                                        timeout_s=CONNECT_TIMEOUT_S * 2, proving=True)
        except (NoCloudletAvailable, RequestTimeout):
            raise  # unreachable: callers retry or try another cloudlet
        except CloudletError as exc:
            # An error *answer* from an endpoint that has not proven itself is believed
            # no more than the rest of what it says: a `vm_moved` from it would choose
            # where the client goes next. It did not prove itself; that is all.
            self._proven.pop(where.endpoint, None)
            raise PeerUnverified(f"{where.endpoint} answered its challenge with an error "
                                 f"({exc.code}), not a proof; nothing was sent to it",
                                 reason="no_proof") from None
        answer = health.get("identity") if isinstance(health, dict) else None
        return self.check_proof(where, challenge, answer)

    # --- requests -----------------------------------------------------------------------

    async def request(self, method: str, where: Location, path: str, *,
                      body: Any = None, raw: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      timeout_s: float | None = None, authenticated: bool = True,
                      params: dict[str, str] | None = None, proving: bool = False) -> Any:
        """Decoded msgpack answer; a typed error for anything else. An authenticated
        request goes only to a proven endpoint (`prove`)."""
        data = raw if raw is not None else (msgpack.packb(body) if body is not None else None)
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        headers = dict(headers or {})
        if authenticated:
            await self.prove(where)
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.dial(where.endpoint) + path
        try:
            # No redirects: a cloudlet never sends one, and following one would let any
            # server pass the proof with a real cloudlet's answer.
            async with self.session.request(
                    method, url, data=data, headers=headers, timeout=timeout,
                    params=params, allow_redirects=False,
                    trace_request_ctx={"endpoint": where.endpoint, "proving": proving}) as resp:
                payload = await resp.read()
                status = resp.status
                is_json = "json" in resp.headers.get("Content-Type", "")
        except TimeoutError:
            self._proven.pop(where.endpoint, None)
            raise RequestTimeout(f"{where.node} did not answer {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            self._proven.pop(where.endpoint, None)  # whoever answers next proves itself
            raise NoCloudletAvailable(f"cannot reach cloudlet {where.node} at "
                                      f"{where.endpoint}: {exc}") from None
        decoded = _decode_json(payload) if is_json and payload else _decode(payload)
        if status >= 300:  # a redirect too: not followed, and not an answer
            raise error_from_wire(decoded if isinstance(decoded, dict) else {
                "code": "request_error", "message": f"HTTP {status} from {where.node}"})
        return decoded

    async def delete_vm(self, where: Location, vm_id: str, max_forwards: int = 8) -> None:
        """Destroy a VM, following it if it moved (a session's VM may have moved a
        moment before the application let it go)."""
        from cloudlet.errors import VMMoved

        for _ in range(max_forwards):
            try:
                await self.request("DELETE", where, f"/v1/vms/{vm_id}", timeout_s=5.0)
                return
            except VMMoved as moved:
                where = Location(str(moved.details.get("node")),
                                 str(moved.details.get("endpoint")))

    async def vm_info(self, where: Location, vm_id: str) -> dict[str, Any]:
        info: dict[str, Any] = await self.request("GET", where, f"/v1/vms/{vm_id}",
                                                  timeout_s=CONNECT_TIMEOUT_S * 2)
        return info

    async def ws_connect(self, where: Location, vm_id: str) -> aiohttp.ClientWebSocketResponse:
        await self.prove(where)
        try:
            return await self.session.ws_connect(
                f"{self.dial(where.endpoint)}/v1/vms/{vm_id}/stream",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0), max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            # The handshake's error body is not readable here; ask plainly for the reason.
            if exc.status in (404, 410, 401, 403):
                await self.vm_info(where, vm_id)  # raises the typed error
            raise NoCloudletAvailable(f"stream to {where.node} refused: {exc.status}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._proven.pop(where.endpoint, None)
            raise NoCloudletAvailable(f"cannot reach cloudlet {where.node} at "
                                      f"{where.endpoint}: {exc!r}") from None


def _decode_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return {"code": "request_error", "message": payload[:200].decode(errors="replace")}


def _decode(payload: bytes) -> Any:
    if not payload:
        return {}
    try:
        return msgpack.unpackb(payload)
    except (ValueError, msgpack.UnpackException):
        return {"code": "request_error", "message": payload[:200].decode(errors="replace")}
