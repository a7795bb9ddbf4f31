"""A client's links: one delayed proxy per cloudlet, following where the user is.

Every byte between an emulated user and cloudlet j passes through the user's
own `LinkProxy` to j (straight to the daemon, not through its ingress link: a
user's traffic is small beside a migration's), whose one-way delay is the latency model's
at the user's position: (access RTT + backhaul RTT from its access point to
j) / 2. No queueing term is added: the real queueing of the real daemons is
what gets measured. The SDK dials these proxies through `connect_via`, which
maps the URL a cloudlet advertises to the proxy of that cloudlet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from cloudlet.linkproxy import LinkProxy, LinkShape

# A cloudlet the latency model has no figure for (the user is not present) gets
# this: far enough that no one would pick it.
ABSENT_DELAY_MS = 500.0


class ClientLinks:
    """`async with ClientLinks(targets) as links:` then `links.connect_via(url)`."""

    def __init__(self, targets: Sequence[tuple[str, int]]) -> None:
        """`targets`: (advertised URL, port to forward to) of each cloudlet, in
        topology order."""
        self._targets = list(targets)
        self.advertised = [url for url, _ in self._targets]
        self.proxies: list[LinkProxy] = []
        self._via: dict[str, str] = {}
        self._stack = contextlib.AsyncExitStack()
        self.delays_ms: list[float] = [ABSENT_DELAY_MS] * len(self._targets)

    async def __aenter__(self) -> ClientLinks:
        try:
            for url, port in self._targets:
                shape = LinkShape(None, ABSENT_DELAY_MS)
                proxy = await self._stack.enter_async_context(
                    LinkProxy("127.0.0.1", port, up=shape, down=shape))
                self.proxies.append(proxy)
                self._via[url.rstrip("/")] = f"http://127.0.0.1:{proxy.port}"
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def connect_via(self, url: str) -> str:
        """The base URL the SDK dials for a cloudlet's advertised `url`."""
        return self._via.get(url.rstrip("/"), url)

    def set_delays(self, one_way_ms: Sequence[float]) -> None:
        """Set every link's one-way delay (NaN: absent), live connections included."""
        for i, (proxy, d) in enumerate(zip(self.proxies, one_way_ms, strict=True)):
            delay = ABSENT_DELAY_MS if d != d else max(float(d), 0.0)
            if abs(delay - self.delays_ms[i]) < 1e-6:
                continue
            self.delays_ms[i] = delay
            proxy.set_delay(delay)
