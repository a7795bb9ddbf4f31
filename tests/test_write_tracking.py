"""Write tracking must see every write: tracked digests always equal a full hash.

The ground truth is hashing every chunk of memory; the tracked digests come from
the dirty bitmap the instrumentation maintains. Any store form the rewriter
missed would show up here as a chunk whose tracked digest is stale.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlet.errors import VMError
from cloudlet.vm import VM, Image, ImageStore, chunks
from tests.conftest import wat_file

STORE_OPS = {  # name -> bytes written
    "st_i32": 4, "st_i64": 8, "st_f32": 4, "st_f64": 8, "st_i32_8": 1, "st_i32_16": 2,
    "st_i64_8": 1, "st_i64_16": 2, "st_i64_32": 4, "st_off": 8, "st_v128": 16, "st_lane": 8,
}
FLOATS = {"st_f32", "st_f64"}
WIDE = {"st_i64", "st_i64_8", "st_i64_16", "st_i64_32", "st_off", "st_v128", "st_lane"}


def full_hashes(vm: VM) -> np.ndarray:
    return chunks.hash_chunks(vm.memory_view(0))


def assert_tracked_exact(vm: VM) -> None:
    tracked = vm.chunk_hashes()[0]
    truth = full_hashes(vm)
    stale = np.flatnonzero(tracked != truth)
    assert not len(stale), f"tracking missed chunks {stale.tolist()}"


near_boundary = st.one_of(
    st.integers(min_value=0, max_value=4 * 65536),
    st.builds(lambda k, d: k * 4096 + d, st.integers(1, 60), st.integers(-17, 17)),
)
op = st.one_of(
    st.tuples(st.sampled_from(sorted(STORE_OPS)), near_boundary, st.integers(1, 2**31)),
    st.tuples(st.just("fill"), near_boundary, st.integers(0, 255), st.integers(0, 20000)),
    st.tuples(st.just("copy"), near_boundary, near_boundary, st.integers(0, 20000)),
    st.tuples(st.just("init"), near_boundary, st.integers(0, 32)),
    st.tuples(st.just("grow"), st.integers(0, 2)),
    st.tuples(st.just("snapshot")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=30))
def test_every_store_form_is_tracked(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    image = _stores_image()
    assert image.dirty_export is not None
    vm = VM.create(image)
    for name, *args in ops:
        if name == "snapshot":
            vm.snapshot(delta=vm.last_snapshot_id is not None)
            continue
        if name in STORE_OPS:
            # every byte non-zero: a store of zeros into zeroed memory changes nothing
            args[1] = args[1] | 0x01010101
            if name in WIDE:
                args[1] = ((args[1] << 32) | args[1]) - (1 << 63)
            elif name in FLOATS:
                args[1] = float(args[1])
        with contextlib.suppress(VMError):  # out-of-bounds writes trap; still tracked
            vm.call(name, *args)
        assert_tracked_exact(vm)


def test_host_writes_are_tracked(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    vm.call_bytes("kv_set", b"k=" + b"v" * 10000)  # the input buffer is written by the host
    assert_tracked_exact(vm)
    vm.write_memory(70000, b"\x01" * 5000)
    assert_tracked_exact(vm)


def test_wasi_host_writes_are_tracked(store: ImageStore) -> None:
    vm = VM.create(store.add(wat_file("wasi.wat")))
    for fn, args in (("rand", ()), ("now", (1,)), ("log", ())):
        vm.call(fn, *args)
        assert_tracked_exact(vm)


def test_tracking_survives_restore_and_delta(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 4)
    vm.call("hog_dirty", 40, 1)
    copy = VM.restore(workload["memhog"], vm.snapshot())
    assert_tracked_exact(copy)
    copy.call("hog_dirty", 10, 2)
    assert_tracked_exact(copy)
    vm.call("hog_dirty", 10, 2)
    delta = vm.snapshot(delta=True)
    assert delta.chunk_count <= 11  # only what was written, found without a full scan


def test_untracked_images_still_work(tmp_path: object) -> None:
    from pathlib import Path

    from tests.conftest import WORKLOADS

    store = ImageStore(Path(str(tmp_path)), track_writes=False)
    image = store.add_file(WORKLOADS / "memhog.wasm")
    assert image.dirty_export is None
    vm = VM.create(image)
    vm.call("hog_grow", 2)
    vm.call("hog_dirty", 5, 3)
    assert (vm.chunk_hashes()[0] == full_hashes(vm)).all()
    assert VM.restore(image, vm.snapshot()).call("hog_checksum") == vm.call("hog_checksum")


_cache: dict[str, Image] = {}


def _stores_image() -> Image:
    if "img" not in _cache:
        import tempfile

        _cache["img"] = ImageStore(tempfile.mkdtemp()).add(wat_file("stores.wat"))
    return _cache["img"]


def test_a_cap_that_changes_the_boot_is_refused(store: ImageStore) -> None:
    """An _initialize that grows memory boots differently under a small cap: that VM
    would not be in the pristine state overlays and tracking assume."""
    from cloudlet.errors import VMMemoryLimit
    from cloudlet.vm import VMLimits
    from tests.conftest import wat

    image = store.add(wat("""(module (memory 1)
      (func (export "_initialize") (i32.store (i32.const 0) (memory.grow (i32.const 20))))
      (func (export "get") (result i32) (i32.load (i32.const 0))))"""))
    with pytest.raises(VMMemoryLimit, match="needs"):
        VM.create(image, VMLimits(memory_bytes=1 << 20))
    vm = VM.create(image, VMLimits(memory_bytes=4 << 20))
    assert vm.call("get") == 1
    assert_tracked_exact(vm)


def test_a_module_at_the_locals_limit_falls_back_to_hashing(tmp_path: object) -> None:
    """Tracking adds locals; a valid module already at wasmtime's 50,000 must still load."""
    from pathlib import Path

    from tests.conftest import wat

    locals_ = " ".join(["i32"] * 49_999)
    image = ImageStore(Path(str(tmp_path))).add(wat(
        f"""(module (memory 1) (func (export "f") (param i32) (local {locals_})
          (i32.store (local.get 0) (i32.const 5))))"""))
    assert image.dirty_export is None
    vm = VM.create(image)
    vm.call("f", 8192)
    assert (vm.chunk_hashes()[0] == full_hashes(vm)).all()
