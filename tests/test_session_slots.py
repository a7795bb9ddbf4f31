"""A session's call slots (mobile_client/slots.py): callers beyond the bound wait
in turn, and one cancelled while waiting, even after it was handed a slot, never
takes that slot with it."""

from __future__ import annotations

import asyncio

from mobile_client.slots import CallSlots

N = 4


def test_a_free_slot_is_taken_at_once_unless_others_wait() -> None:
    slots = CallSlots(N)
    assert all(slots.try_take() for _ in range(N))
    assert not slots.try_take() and slots.free == 0
    for _ in range(N):
        slots.give()
    assert slots.free == N


def test_waiting_callers_get_slots_in_turn_and_cancelled_ones_pass_theirs_on() -> None:
    async def run() -> None:
        slots = CallSlots(N)
        while slots.try_take():  # every slot taken by calls waiting for answers
            pass
        order: list[str] = []

        async def waiter(name: str) -> None:
            await slots.wait()
            order.append(name)

        first, second, third = (asyncio.create_task(waiter(n)) for n in ("a", "b", "c"))
        await asyncio.sleep(0)
        assert slots.waiting == 3
        second.cancel()  # cancelled while waiting: leaves the queue
        await asyncio.sleep(0)
        assert slots.waiting == 2
        slots.give()  # -> a
        assert not slots.try_take()  # c waits first: a newcomer does not jump the queue
        slots.give()  # -> c
        await asyncio.gather(first, third)
        assert order == ["a", "c"] and second.cancelled()
        # Handed a slot, then cancelled before it ran: the slot goes to the next.
        late, next_one = asyncio.create_task(waiter("x")), asyncio.create_task(waiter("y"))
        await asyncio.sleep(0)
        slots.give()
        late.cancel()
        await asyncio.gather(late, next_one, return_exceptions=True)
        assert late.cancelled() and order == ["a", "c", "y"]
        # Every slot given back (a, c and y hold three of them): whole again.
        for _ in range(N):
            slots.give()
        assert slots.free == N and slots.waiting == 0

    asyncio.run(run())
