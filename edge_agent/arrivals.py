"""VMs on their way in by live migration, and the client streams held for them.

Why: a client told that its VM is moving (`moving`, see docs/migration.md)
opens its stream at the destination while the VM still serves at the source,
so that when the move commits it writes on a stream it already has instead of
connecting (a TCP and WebSocket handshake, a challenge, on the downtime's
path). The destination takes such a stream like any other (the same token,
the same owner check) and holds it: nothing on it is read until the VM has
landed here, then it is served as any stream, from its first message, in
order. Calls written on it meanwhile wait in its buffer, unread: they cannot
run before the VM's state is here, nor twice (they run once, through the VM's
exactly-once admission, when read), nor get lost (if the VM does not come, the
stream is closed with them unanswered, and the client resends them where the
VM is).

Bounds, so that holding costs an attacker more than it costs this cloudlet: a
stream is held only for a VM whose migration here has been admitted (any
other is refused at once, `vm_not_found`), only for its owner, at most
`MAX_HELD_PER_VM` for one VM and `MAX_HELD_PER_CLIENT` for one client
(`quota_exceeded`: a client whose many VMs arrive at once cannot take the whole
node's share from the others) and `MAX_HELD` in all (`capacity_exceeded`),
each for at most the move deadline. An arrival belongs to the attempt that
announced it: an older attempt that ends late does not close the streams held
for a newer one. What waits on a held
stream stays in the kernel: the stream handler pauses reading its socket until
the VM lands, and TCP flow control keeps the rest at the client (aiohttp's own
reader would take up to a whole message, twice the request cap, first). The price of not
reading: a client that closes a held stream is noticed only when the VM lands
(or the hold ends), so until then it counts against the bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from cloudlet.errors import CapacityExceeded, Forbidden, QuotaExceeded
from edge_agent.auth import Principal
from edge_agent.hosted import HostedVM

# A session keeps one standby per move; a few more leave room for a client with
# two sessions of a VM, or one whose standby broke and is opened again.
MAX_HELD_PER_VM = 4
# Streams one client (or peer) may hold at once across all its arriving VMs: one
# standby for each of 32 VMs moving together, an eighth of `MAX_HELD`, so a
# client cannot hold every stream the node keeps for everyone's arrivals.
MAX_HELD_PER_CLIENT = 32
# Sockets held at once for all arriving VMs; each costs a socket and its kernel
# buffers (reading is paused while it is held), nothing of the daemon's heap.
MAX_HELD = 256


@dataclass(eq=False)
class Arrival:
    """One VM whose migration here is under way: whom it belongs to, how many
    streams wait for it, and (once decided) whether it landed."""

    vm_id: str
    owner: str
    held: int = 0
    attempt: object = None  # the migration that announced it (its `Incoming`)
    landed: asyncio.Future[HostedVM | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    _waiters: set[asyncio.Future[HostedVM | None]] = field(default_factory=set)

    async def wait(self, timeout_s: float) -> HostedVM | None:
        """The hosted VM once it has landed; None if it will not come, or not within
        `timeout_s`."""
        if self.landed.done():
            return self.landed.result()
        # Its own future, which `settle` sets: the stream wakes on the loop's next
        # turn, ahead of the rest of the landing's work. (A shield over `landed`
        # took two turns, and the turn between ran that work first: its calls,
        # the downtime the client sees, waited 0.1-0.4 ms longer.) Its own, too, so
        # a timeout cancels only this wait.
        waiter: asyncio.Future[HostedVM | None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            return None
        finally:
            self._waiters.discard(waiter)

    def settle(self, hosted: HostedVM | None) -> None:
        """It landed (`hosted`) or will not come (None); the first word stands."""
        if self.landed.done():
            return
        self.landed.set_result(hosted)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(hosted)


class Arrivals:
    """The VMs arriving here (by id), and the streams held for them."""

    def __init__(self) -> None:
        self._by_vm: dict[str, Arrival] = {}
        self._by_client: dict[str, int] = {}
        self.held = 0

    def get(self, vm_id: str) -> Arrival | None:
        return self._by_vm.get(vm_id)

    def expect(self, vm_id: str, owner: str, attempt: object = None) -> Arrival:
        """A migration of `vm_id` here was admitted: its owner's streams may wait."""
        self._settle(vm_id, None)  # an older attempt that was never settled
        arrival = self._by_vm[vm_id] = Arrival(vm_id, owner, attempt=attempt)
        return arrival

    def landed(self, vm_id: str, hosted: HostedVM) -> None:
        """The VM serves here now: the held streams are served."""
        self._settle(vm_id, hosted)

    def not_coming(self, vm_id: str, attempt: object = None) -> None:
        """The migration failed (or this cloudlet is stopping): the held streams are
        closed, and their clients stay with the source. Given `attempt`, only if the
        VM's arrival is still that attempt's: a newer attempt's streams stay held."""
        arrival = self._by_vm.get(vm_id)
        if attempt is not None and arrival is not None and arrival.attempt is not attempt:
            return
        self._settle(vm_id, None)

    def close(self) -> None:
        for vm_id in list(self._by_vm):
            self._settle(vm_id, None)

    def _settle(self, vm_id: str, hosted: HostedVM | None) -> None:
        arrival = self._by_vm.pop(vm_id, None)
        if arrival is not None:
            arrival.settle(hosted)

    @contextlib.contextmanager
    def hold(self, arrival: Arrival, who: Principal) -> Iterator[Arrival]:
        """Count a stream held for `arrival`, after the same owner check a hosted VM's
        stream gets; raises a typed refusal past the bounds."""
        if not who.is_peer and arrival.owner != who.name:
            raise Forbidden(f"VM {arrival.vm_id} belongs to another client")
        if arrival.held >= MAX_HELD_PER_VM:
            raise QuotaExceeded(f"{MAX_HELD_PER_VM} streams already wait for VM "
                                f"{arrival.vm_id} to arrive", quota="held_streams_per_vm",
                                limit=MAX_HELD_PER_VM, use=arrival.held)
        mine = self._by_client.get(who.name, 0)
        if mine >= MAX_HELD_PER_CLIENT:
            raise QuotaExceeded(f"{MAX_HELD_PER_CLIENT} streams of {who.name} already wait "
                                "for VMs to arrive", quota="held_streams_per_client",
                                limit=MAX_HELD_PER_CLIENT, use=mine)
        if self.held >= MAX_HELD:
            raise CapacityExceeded(f"this cloudlet holds its maximum of {MAX_HELD} streams "
                                   "for arriving VMs")
        arrival.held += 1
        self.held += 1
        self._by_client[who.name] = mine + 1
        try:
            yield arrival
        finally:
            arrival.held -= 1
            self.held -= 1
            left = self._by_client[who.name] - 1
            if left:
                self._by_client[who.name] = left
            else:
                del self._by_client[who.name]
