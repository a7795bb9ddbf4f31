"""Freshness and replay: a signed message is believed once, and only while it is new.

Two kinds of messages need two rules:

- Orders and reports (commands, events) cause an action each time they are
  believed. Each must be recent (`|now - ts| <= window_s`) and its nonce unseen
  within the window: `ReplayWindow`. Nonces are forgotten after twice the
  window, since anything older fails the time check anyway; so memory is
  bounded by the rate of genuine messages, and the table has a hard cap beyond
  which it refuses (fails closed) rather than forget nonces early.
- State (presence, VM locations, leases, telemetry) is retained by the broker
  and may be old when it is read: a VM may sit on a cloudlet for days. It is
  believed if it is newer than what this receiver believes already for that
  topic: `NewestFirst`. A replayed old state is older, so it changes nothing.

The window assumes the cluster's clocks agree within a few seconds (NTP); the
default window is generous on purpose (`DEFAULT_WINDOW_S`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from cloudlet.errors import TrustError
from cloudlet.trust.certs import Clock, untrusted

# Orders older than this are refused. Commands are acted on within milliseconds;
# 30 s allows for a broker that queued a QoS 1 message across a short reconnect
# and for clocks a few seconds apart.
DEFAULT_WINDOW_S = 30.0
# Each remembered nonce is ~100 bytes; a million is ~100 MB. Genuine orders in a
# metro run at a few per second, so this cap is only reached by a flood.
MAX_NONCES = 200_000
MAX_KEYS = 1_000_000


class ReplayWindow:
    """Accepts each (signer, nonce) once, within `window_s` of the receiver's clock."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, *, clock: Clock = time.time,
                 max_nonces: int = MAX_NONCES) -> None:
        self.window_s = window_s
        self.clock = clock
        self.max_nonces = max_nonces
        self._seen: OrderedDict[tuple[str, bytes], float] = OrderedDict()  # -> forget at

    def check(self, signer: str, ts: float, nonce: bytes) -> None:
        """Raise `TrustError` (reason `stale` or `replayed`) unless this is new."""
        now = self.clock()
        self._forget(now)
        if abs(now - ts) > self.window_s:
            raise untrusted("stale", f"a message from {signer!r} is {now - ts:+.0f} s old "
                                     f"(the window is {self.window_s:.0f} s)")
        key = (signer, nonce)
        if key in self._seen:
            raise untrusted("replayed", f"a message from {signer!r} was replayed")
        if len(self._seen) >= self.max_nonces:
            raise untrusted("overloaded", "too many recent messages to check for replay")
        self._seen[key] = now + 2 * self.window_s

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, forget_at = next(iter(seen.items()))
            if forget_at > now:
                return
            del seen[key]

    def __len__(self) -> int:
        return len(self._seen)


Order = tuple[float, ...]


class NewestFirst:
    """For retained state: believe a message only if it is newer than the last one
    believed for the same key (a topic). "Newer" is an order: the signed time, or
    for a VM's location (moves, time), so that the clocks of two cloudlets a VM
    moved between never decide. The same nonce is the same message seen twice (a
    broker's redelivery), which is not an attack: `is_duplicate`."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._newest: dict[str, tuple[Order, bytes]] = {}
        self.max_keys = max_keys

    def is_duplicate(self, key: str, nonce: bytes) -> bool:
        last = self._newest.get(key)
        return last is not None and last[1] == nonce

    def check(self, key: str, signer: str, order: Order, nonce: bytes) -> None:
        last = self._newest.get(key)
        if last is not None and order <= last[0]:
            raise untrusted("replayed", f"an older state of {key} from {signer!r} "
                                        f"(newer one already believed)")
        if last is None and len(self._newest) >= self.max_keys:
            raise untrusted("overloaded", "too many topics to track")

    def accept(self, key: str, order: Order, nonce: bytes) -> None:
        """Believe it. Order never goes back for a key: a message believed by another
        rule (a Will, older than the presence it ends) keeps the newer order."""
        last = self._newest.get(key)
        self._newest[key] = (max(order, last[0]) if last is not None else order, nonce)

    def forget(self, key: str) -> None:
        self._newest.pop(key, None)


__all__ = ["DEFAULT_WINDOW_S", "NewestFirst", "ReplayWindow", "TrustError"]
