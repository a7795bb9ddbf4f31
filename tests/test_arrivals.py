"""The destination's registry of arriving VMs and the streams held for them, alone.

`Arrivals` decides who may wait for a VM on its way in by live migration, how
many may, and what each learns when the migration ends. Each rule is a few
lines here, with no daemon; tests/test_migration_standby.py checks the same
rules on real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import edge_agent.arrivals as arrivals_module
from cloudlet.errors import CapacityExceeded, Forbidden, QuotaExceeded
from edge_agent.arrivals import MAX_HELD_PER_VM, Arrivals
from edge_agent.auth import Principal

OWNER = Principal("alice", is_peer=False)
OTHER = Principal("mallory", is_peer=False)
PEER = Principal("peer:west", is_peer=True)
HOSTED: Any = object()  # stands for the HostedVM that landed (only its identity matters)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_held_streams_learn_that_the_vm_landed_or_is_not_coming() -> None:
    async def case() -> None:
        arrivals = Arrivals()
        landing = arrivals.expect("vm-1", "alice")
        failing = arrivals.expect("vm-2", "alice")
        with arrivals.hold(landing, OWNER), arrivals.hold(failing, OWNER):
            waits = [asyncio.ensure_future(a.wait(5.0)) for a in (landing, failing)]
            await asyncio.sleep(0)
            arrivals.landed("vm-1", HOSTED)
            arrivals.not_coming("vm-2")
            assert await asyncio.gather(*waits) == [HOSTED, None]
        assert arrivals.get("vm-1") is None and arrivals.get("vm-2") is None
        assert arrivals.held == 0 and landing.held == 0
        arrivals.not_coming("vm-1")  # late news of a settled arrival changes nothing
        assert await landing.wait(0.01) is HOSTED

    run(case())


def test_a_held_stream_wakes_ahead_of_the_rest_of_the_landing() -> None:
    """The destination lands the VM, gives the loop one turn, then goes on with its
    own work (removing files, the chunk store): the held stream, whose client's
    call waits on it, must have run by then."""
    async def case() -> None:
        arrivals = Arrivals()
        arrival = arrivals.expect("vm-1", "alice")
        order: list[str] = []

        async def held() -> None:
            assert await arrival.wait(5.0) is HOSTED
            order.append("stream")

        task = asyncio.ensure_future(held())
        await asyncio.sleep(0)
        arrivals.landed("vm-1", HOSTED)
        await asyncio.sleep(0)
        order.append("rest of the landing")
        await task
        assert order == ["stream", "rest of the landing"]

    run(case())


def test_a_held_stream_waits_at_most_its_bound() -> None:
    async def case() -> None:
        arrival = Arrivals().expect("vm-1", "alice")
        assert await arrival.wait(0.01) is None  # not landed in time: closed, not hung
        assert not arrival.landed.done()  # the arrival itself goes on

    run(case())


def test_only_the_owner_or_a_peer_may_wait_and_only_within_the_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def case() -> None:
        arrivals = Arrivals()
        arrival = arrivals.expect("vm-1", "alice")
        with pytest.raises(Forbidden), arrivals.hold(arrival, OTHER):
            pass
        with arrivals.hold(arrival, PEER):
            assert arrival.held == 1
        with contextlib.ExitStack() as held:
            for _ in range(MAX_HELD_PER_VM):
                held.enter_context(arrivals.hold(arrival, OWNER))
            with pytest.raises(QuotaExceeded) as refused, arrivals.hold(arrival, OWNER):
                pass
            assert refused.value.details["limit"] == MAX_HELD_PER_VM
        assert arrival.held == 0 and arrivals.held == 0
        monkeypatch.setattr(arrivals_module, "MAX_HELD", 2)
        others = [arrivals.expect(f"vm-{k}", "alice") for k in (2, 3, 4)]
        with arrivals.hold(others[0], OWNER), arrivals.hold(others[1], OWNER), \
                pytest.raises(CapacityExceeded), arrivals.hold(others[2], OWNER):
            pass
        assert arrivals.held == 0

    run(case())


def test_a_new_attempt_and_closing_settle_what_waited_before() -> None:
    async def case() -> None:
        arrivals = Arrivals()
        first = arrivals.expect("vm-1", "alice")
        second = arrivals.expect("vm-1", "alice")  # the first attempt never settled
        assert await first.wait(1.0) is None and arrivals.get("vm-1") is second
        arrivals.close()  # the cloudlet stops: every held stream is let go
        assert await second.wait(1.0) is None and arrivals.get("vm-1") is None

    run(case())
