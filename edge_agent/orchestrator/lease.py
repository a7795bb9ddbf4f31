"""One leader per region: a lease on `orchestrator/{region}/lease`, with an expiry
and a fencing epoch.

Pure (messages and the clock in, what to publish out), so every rule is a unit
test. The broker orders the messages of one topic, and every candidate's gate
believes the same newest one, so candidates agree on who holds the lease:

- a candidate waits `settle_s` after connecting, to see the retained lease;
- with no lease, or one past its expiry, it claims one: epoch = one more than
  any it has seen (on leases, in its journal, in the cloudlets' telemetry);
- it leads once its own claim is the newest lease it believes and `settle_s`
  has passed without a newer one; a newer lease by someone else deposes it;
- a leader renews every `lease_s / 3`; it stops acting `guard_s` before its own
  lease would expire unrenewed (a paused or partitioned leader stops by its own
  clock, and a new one waits for the whole lease to run out);
- cloudlets refuse orders of an epoch older than the newest they have seen,
  on a lease or an order, so a deposed leader that still believes it leads
  moves nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cloudlet.protocol import SCHEMA_VERSION


@dataclass(frozen=True)
class Lease:
    holder: str
    epoch: int
    expires_unix: float

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Lease | None:
        holder, epoch, expires = body.get("holder"), body.get("epoch"), body.get("expires_unix")
        if (not isinstance(holder, str) or type(epoch) is not int or epoch < 0
                or not isinstance(expires, int | float) or not math.isfinite(expires)):
            return None
        return cls(holder, epoch, float(expires))


class LeaseKeeper:
    def __init__(self, me: str, region: str, *, lease_s: float, started_unix: float,
                 settle_s: float = 1.0) -> None:
        self.me = me
        self.region = region
        self.lease_s = lease_s
        self.settle_s = settle_s
        self.guard_s = min(1.0, lease_s / 10)
        self.started_unix = started_unix
        self.current: Lease | None = None
        self.newest_epoch = 0
        self.claim: Lease | None = None
        self.claimed_unix = 0.0
        self.leading = False
        self.my_expiry = 0.0
        self.last_publish = -math.inf

    def note_epoch(self, epoch: int) -> None:
        """An epoch seen elsewhere (the journal, a cloudlet's fence)."""
        self.newest_epoch = max(self.newest_epoch, epoch)

    def observe(self, body: dict[str, Any]) -> None:
        """A believed lease message of this region."""
        lease = Lease.from_body(body)
        if lease is None:
            return
        self.current = lease
        self.note_epoch(lease.epoch)
        mine = self.claim is not None and lease.holder == self.me \
            and lease.epoch == self.claim.epoch
        if not mine and (self.claim is None or lease.epoch >= self.claim.epoch):
            self.leading = False  # someone else holds it now
            self.claim = None

    def is_leader(self, now: float) -> bool:
        if self.claim is None:
            return False
        if not self.leading and now - self.claimed_unix >= self.settle_s \
                and self.current == self.claim:
            self.leading = True
        if self.leading and now >= self.my_expiry - self.guard_s:
            self.leading = False
            self.claim = None
        return self.leading

    @property
    def epoch(self) -> int:
        return self.claim.epoch if self.claim is not None else -1

    def due(self, now: float) -> dict[str, Any] | None:
        """The lease message to publish now (a claim or a renewal), or None."""
        if now - self.started_unix < self.settle_s:
            return None  # the retained lease may not have arrived yet
        if self.claim is not None and self.current is not None \
                and self.current.holder == self.me and self.current.epoch == self.claim.epoch:
            if now - self.last_publish < self.lease_s / 3:
                return None
            return self._publish(self.claim.epoch, now)
        if self.claim is not None:
            if now - self.claimed_unix < self.settle_s + self.lease_s / 3:
                return None  # our claim is on its way
            self.claim = None  # it never came back as the newest: try again below
        cur = self.current
        if cur is not None and cur.holder != self.me and cur.expires_unix > now:
            return None  # someone leads
        return self._publish(self.newest_epoch + 1, now, claim=True)

    def _publish(self, epoch: int, now: float, claim: bool = False) -> dict[str, Any]:
        expires = now + self.lease_s
        lease = Lease(self.me, epoch, expires)
        if claim:
            self.claimed_unix = now
            self.leading = False
        self.claim = lease
        self.my_expiry = expires
        self.last_publish = now
        self.newest_epoch = max(self.newest_epoch, epoch)
        return {"v": SCHEMA_VERSION, "region": self.region, "holder": self.me,
                "epoch": epoch, "expires_unix": expires}

    def renewed(self, body: dict[str, Any]) -> None:
        """Our own lease came back from the broker (it is now the believed one)."""
        self.observe(body)
