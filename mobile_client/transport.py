"""The SDK's HTTP side: one aiohttp client, the bearer token, typed errors.

Every answer that is not a success is turned back into the very error class
the daemon raised (by its stable code, `cloudlet.errors.error_from_wire`), so
an application catches `Unauthorized` or `VMNotFound`, not HTTP statuses.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack

from cloudlet.errors import CloudletError, NoCloudletAvailable, RequestTimeout, error_from_wire

MSGPACK = "application/msgpack"
# Management requests (upload, create, destroy) may compile an image: give them time.
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Location:
    """A cloudlet: its node name and its endpoint URL."""

    node: str
    endpoint: str


def client_name(token: str) -> str:
    """The client a token names (tokens are signed, not secret: the name is readable)."""
    try:
        payload = base64.urlsafe_b64decode(token.split(".")[0] + "==")
        return payload.decode().split("|", 2)[2]
    except (ValueError, IndexError, UnicodeDecodeError):
        return "anonymous"


def image_digest(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


class Http:
    """Requests to cloudlets with this client's token. `async with` owns the connections.

    The token is read on every request, so an application may replace it
    (`http.token = new`) before it expires; sessions reconnect with the new one."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Http:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        return self

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

    async def request(self, method: str, where: Location, path: str, *,
                      body: Any = None, raw: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> Any:
        """Decoded msgpack answer; a typed error for anything else."""
        data = raw if raw is not None else (msgpack.packb(body) if body is not None else None)
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        headers = {**(headers or {}), "Authorization": f"Bearer {self.token}"}
        try:
            async with self.session.request(method, where.endpoint + path, data=data,
                                            headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                status = resp.status
                is_json = "json" in resp.headers.get("Content-Type", "")
        except TimeoutError:
            raise RequestTimeout(f"{where.node} did not answer {method} {path} in time") from None
        except aiohttp.ClientError as exc:
            raise NoCloudletAvailable(f"cannot reach cloudlet {where.node} at "
                                      f"{where.endpoint}: {exc}") from None
        decoded = json.loads(payload) if is_json and payload else _decode(payload)
        if status >= 400:
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
        try:
            return await self.session.ws_connect(
                f"{where.endpoint}/v1/vms/{vm_id}/stream",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0), max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            # The handshake's error body is not readable here; ask plainly for the reason.
            if exc.status in (404, 410, 401, 403):
                await self.vm_info(where, vm_id)  # raises the typed error
            raise NoCloudletAvailable(f"stream to {where.node} refused: {exc.status}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NoCloudletAvailable(f"cannot reach cloudlet {where.node} at "
                                      f"{where.endpoint}: {exc!r}") from None


def _decode(payload: bytes) -> Any:
    if not payload:
        return {}
    try:
        return msgpack.unpackb(payload)
    except (ValueError, msgpack.UnpackException):
        return {"code": "request_error", "message": payload[:200].decode(errors="replace")}
