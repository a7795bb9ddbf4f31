"""VM lifetime: nothing leaks, nothing dangles, and limits hold whatever the caller does."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from cloudlet.errors import BadCall, VMDeadlineExceeded, VMFailed
from cloudlet.vm import VM, Image, ImageStore, VMLimits
from cloudlet.vm.engine import Runtime
from tests.conftest import WORKLOADS, wat


def _mappings() -> int:
    return len(Path("/proc/self/maps").read_text().splitlines())


def test_vms_dropped_without_close_are_freed(workload: dict[str, Image]) -> None:
    gc.collect()
    before = _mappings()
    refs = []
    for i in range(200):
        vm = VM.create(workload["kvstore"])
        vm.call("kv_put", 1, i)
        refs.append(weakref.ref(vm))
        del vm
    gc.collect()
    assert not any(r() for r in refs)
    assert _mappings() - before < 20  # their memories were unmapped


def test_memory_view_stays_valid_after_close(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 1)
    assert vm.call("hog_fill", 0, 1, 7) == 1
    view = vm.memory_view()
    base = vm.call("hog_base")
    vm.close()
    gc.collect()
    assert view[base] == 7  # the view keeps the memory mapped: no use-after-free
    with pytest.raises(VMFailed):
        vm.memory_view()
    with pytest.raises(VMFailed):
        vm.dirty_chunks()
    with pytest.raises(VMFailed):
        vm.call("noop")


def test_deadlines_hold_after_the_runtime_ticker_was_stopped(tmp_path: Path) -> None:
    runtime = Runtime()
    image = ImageStore(tmp_path, runtime=runtime).add_file(WORKLOADS / "memhog.wasm")
    vm = VM.create(image, VMLimits(deadline_ms=30, fuel_per_call=None))
    runtime.close()  # stops the epoch ticker; the next call must restart it
    with pytest.raises(VMDeadlineExceeded):
        vm.call("hog_spin")
    runtime.close()


def test_memory_index_and_offset_are_checked(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    for index in (-1, 1, "0", 0.0):
        with pytest.raises(BadCall):
            vm.write_memory(100, b"x", index=index)  # type: ignore[arg-type]
        with pytest.raises(BadCall):
            vm.memory_view(index)  # type: ignore[arg-type]
    with pytest.raises(BadCall):
        vm.write_memory(-1, b"x")


def test_arguments_out_of_range_are_bad_calls(store: ImageStore) -> None:
    image = store.add(wat("""(module
      (func (export "id32") (param i32) (result i32) (local.get 0))
      (func (export "id64") (param i64) (result i64) (local.get 0))
      (func (export "idf") (param f32) (result f32) (local.get 0))
      (memory 1)
      (func (export "cloudlet_input") (param i32) (result i64) (i64.const 0))
      (func (export "b") (param i32 i32) (result i64) (i64.const 0)))"""))
    vm = VM.create(image)
    assert vm.call("id32", 2**32 - 1) == -1  # unsigned form of the same bits is fine
    for fn, value in (("id32", 2**32 + 5), ("id32", -(2**31) - 1), ("id64", 2**64 + 3),
                      ("idf", 10**400)):
        with pytest.raises(BadCall):
            vm.call(fn, value)
    with pytest.raises(BadCall, match="cloudlet_input"):
        vm.call_bytes("b", b"data")  # its cloudlet_input has the wrong type
    assert vm.seq == 1
