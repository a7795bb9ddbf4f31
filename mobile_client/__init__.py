"""The mobile client SDK: discovery, sessions that follow their VM, offload, local fallback.

    from mobile_client import CloudletClient

    async with CloudletClient(token, endpoints=["http://127.0.0.1:8601"]) as client:
        async with client.session("workloads/kvstore.wasm", budget_ms=30) as s:
            await s.call("kv_put", 1, 65)

Kept import-light on purpose: a phone that only offloads needs aiohttp and
msgpack, not numpy or wasmtime (those come with local execution, the `local`
extra, and are imported only when it is used), nor aiomqtt unless it discovers
cloudlets through a broker. `mobile_client.sync.BlockingClient` is the same
for scripts and notebooks.
"""

from mobile_client.client import CloudletClient, OffloadResult
from mobile_client.discovery import CloudletInfo, Discovery
from mobile_client.policy import Decision
from mobile_client.session import Session, SessionStats
from mobile_client.transport import Location

__all__ = ["CloudletClient", "CloudletInfo", "Decision", "Discovery", "Location",
           "OffloadResult", "Session", "SessionStats"]
