"""The call path's shortcuts keep every limit: deadlines that are re-armed only when
the epoch clock ticks, fuel refilled per call, and arguments and results read
through typed views of the call's array (cloudlet/vm/fastcall.py)."""

from __future__ import annotations

import time

import pytest

from cloudlet.errors import BadCall, VMDeadlineExceeded, VMOutOfFuel
from cloudlet.vm import VM, Image, VMLimits
from cloudlet.vm.engine import EPOCH_TICK_S

DEADLINE_MS = 30


def spin_s(vm: VM) -> float:
    """How long a spinning call ran before its deadline stopped it."""
    started = time.monotonic()
    with pytest.raises(VMDeadlineExceeded):
        vm.call("hog_spin")
    return time.monotonic() - started


def test_a_deadline_armed_many_calls_ago_still_stops_a_spinning_call(
        workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"], VMLimits(deadline_ms=DEADLINE_MS, fuel_per_call=None))
    for _ in range(2000):  # quick calls, most within one tick: the deadline is not re-armed
        assert vm.call("add", 1, 2) == 3
    took_s = spin_s(vm)
    # At least its deadline, at most its deadline plus the tick it may gain and the
    # partial tick (and slack for a loaded machine).
    assert DEADLINE_MS / 1000 - EPOCH_TICK_S <= took_s <= DEADLINE_MS / 1000 + 1.0


def test_a_deadline_that_ran_out_is_rearmed_for_the_next_call(
        workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"], VMLimits(deadline_ms=DEADLINE_MS, fuel_per_call=None))
    spin_s(vm)
    assert vm.call("add", 2, 3) == 5  # not interrupted by the deadline that passed
    assert spin_s(vm) >= DEADLINE_MS / 1000 - EPOCH_TICK_S  # a whole deadline again
    assert vm.seq == 3


def test_each_call_gets_its_whole_fuel(workload: dict[str, Image]) -> None:
    fuel = 1_000_000
    vm = VM.create(workload["memhog"], VMLimits(fuel_per_call=fuel))
    for _ in range(100):
        vm.call("add", 1, 2)
    used = vm.fuel_used
    with pytest.raises(VMOutOfFuel):
        vm.call("hog_spin")
    assert vm.fuel_used - used == fuel  # the spin had all of it, not what calls left


@pytest.mark.parametrize(("fn", "args", "expected"), [
    ("add", (2**31 - 1, 1), -(2**31)),  # i32 wraps, reported signed
    ("add", (2**32 - 1, 0), -1),  # the unsigned form of an i32's bits
    ("add", (-5, 3), -2),
    ("kv_put", (7, 70), 1),
    ("noop", (), None),
])
def test_arguments_and_results_through_the_views(workload: dict[str, Image], fn: str,
                                                 args: tuple[int, ...], expected: object) -> None:
    vm = VM.create(workload["kvstore"])
    assert vm.call(fn, *args) == expected


@pytest.mark.parametrize(("args", "match"), [
    ((2**32, 0), "does not fit i32"),
    ((-(2**31) - 1, 0), "does not fit i32"),
    ((1.5, 2), "must be"),
    ((1,), "takes 2 arguments"),
])
def test_arguments_that_do_not_fit_are_refused_before_the_guest(
        workload: dict[str, Image], args: tuple[int | float, ...], match: str) -> None:
    vm = VM.create(workload["kvstore"])
    with pytest.raises(BadCall, match=match):
        vm.call("add", *args)
    assert vm.seq == 0
    assert vm.call("add", 1, 2) == 3  # nothing left behind in the argument array
