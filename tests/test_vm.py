"""VMs: calls and the bytes ABI, sequence numbers, limits, runaway guests, host functions."""

from __future__ import annotations

import struct

import pytest

from cloudlet.errors import (
    BadCall,
    ImageNotFound,
    VMDeadlineExceeded,
    VMExited,
    VMFailed,
    VMOutOfFuel,
    VMStackOverflow,
    VMTrapped,
)
from cloudlet.vm import VM, Image, ImageStore, VMLimits
from tests.conftest import wat_file

MiB = 1 << 20
SEED = bytes(range(32))


def test_numeric_calls_and_sequence_numbers(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    assert vm.seq == 0
    assert vm.call("kv_put", 7, 70) == 1
    assert vm.call("kv_put", 7, 71) == 0
    assert vm.call("kv_get", 7) == 71
    assert vm.call("add", 2**31 - 1, 1) == -(2**31)  # i32 wraps, reported signed
    assert vm.call("noop") is None
    assert vm.seq == 5


def test_rejected_calls_do_not_advance_seq(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    with pytest.raises(BadCall, match="no function"):
        vm.call("nope")
    with pytest.raises(BadCall, match="takes 2"):
        vm.call("kv_put", 1)
    with pytest.raises(BadCall, match="must be"):
        vm.call("kv_put", 1, "x")  # type: ignore[arg-type]
    with pytest.raises(BadCall, match="not a bytes function"):
        vm.call_bytes("kv_get", b"x")
    assert vm.seq == 0


def test_a_copy_binds_ahead_the_exports_its_original_was_called_through(
        workload: dict[str, Image]) -> None:
    """What a VM was called through travels with a live migration (`called`), and the
    copy binds those exports before its first call (`bind_ahead`). The list comes
    from a peer: names the image does not export as numeric functions, non-strings
    and anything past the limit are skipped, and no call runs."""
    original = VM.create(workload["kvstore"])
    original.call("kv_put", 1, 10)
    original.call("kv_get", 1)
    assert original.called == ("kv_put", "kv_get")

    copy = VM.restore(workload["kvstore"], original.snapshot())
    assert copy.called == ()
    memory_export = workload["kvstore"].memories[0].export  # an export, not a function
    hostile: list[object] = ["nope", 7, None, memory_export, *original.called, "kv_put", "add"]
    assert copy.bind_ahead(hostile, limit=7) == 2  # "add" is past the limit
    assert copy.called == ("kv_put", "kv_get") and copy.seq == original.seq
    assert copy.bind_ahead(original.called) == 0  # bound already
    assert copy.call("kv_get", 1) == 10


def test_bytes_abi(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["kvstore"])
    assert vm.call_bytes("kv_set", b"k=v1") == b""
    assert vm.call_bytes("kv_set", b"k=" + bytes(range(256)) * 40) == b"v1"
    assert vm.call_bytes("kv_lookup", b"k") == bytes(range(256)) * 40
    assert vm.seq == 3  # one step per bytes call, not per wasm call


def test_vdi_events_return_dirty_regions(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["vdi"])
    events = struct.pack("<BHH", 2, 10, 10) + struct.pack("<BHH", 1, 65, 0)
    out = vm.call_bytes("vdi_events", events)
    (count,) = struct.unpack_from("<H", out)
    assert count >= 1 and len(out) == 2 + 8 * count
    assert vm.call("vdi_frame") == 0  # the frame reset the dirty list


def test_image_filter_frame(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["filter"])
    frame = struct.pack("<HH", 4, 3) + bytes([0, 90] * 6)
    out = vm.call_bytes("filter_blur", frame)
    assert out[:4] == frame[:4] and len(out) == len(frame)
    assert all(0 < b < 90 for b in out[4:])  # blurred between the extremes
    assert vm.call("filter_frames") == 1


def test_endless_loop_hits_deadline_and_vm_stays_usable(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"], VMLimits(deadline_ms=50, fuel_per_call=None))
    with pytest.raises(VMDeadlineExceeded):
        vm.call("hog_spin")
    assert vm.call("add", 1, 2) == 3
    assert vm.seq == 2  # the interrupted call was applied (it may have written)


def test_endless_loop_runs_out_of_fuel(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"], VMLimits(fuel_per_call=1_000_000))
    with pytest.raises(VMOutOfFuel):
        vm.call("hog_spin")
    assert vm.call("add", 1, 2) == 3
    assert vm.fuel_used >= 1_000_000


def test_memory_bomb_is_capped(workload: dict[str, Image]) -> None:
    cap = 8 * MiB
    vm = VM.create(workload["memhog"], VMLimits(memory_bytes=cap))
    pages = vm.call("hog_bomb")
    assert pages * 65536 <= cap and vm.memory_bytes <= cap
    assert vm.call("hog_grow", 64) == -1  # growth past the cap fails, no crash
    assert vm.call("add", 2, 2) == 4


def test_trap_and_stack_overflow_are_typed(workload: dict[str, Image]) -> None:
    vm = VM.create(workload["memhog"])
    with pytest.raises(VMTrapped, match="unreachable"):
        vm.call("hog_trap", 1)
    with pytest.raises(VMStackOverflow):
        vm.call("hog_recurse", 10_000_000)
    assert vm.call("hog_trap", 0) == 7


def test_runaway_guests_leave_other_vms_untouched(workload: dict[str, Image]) -> None:
    bystander = VM.create(workload["kvstore"])
    for k in range(100):
        bystander.call("kv_put", k, k * k)
    before = bystander.call("kv_checksum")
    bad = VM.create(workload["memhog"], VMLimits(memory_bytes=4 * MiB, deadline_ms=30))
    for fn, args, err in (("hog_spin", (), VMDeadlineExceeded), ("hog_trap", (1,), VMTrapped),
                          ("hog_recurse", (10_000_000,), VMStackOverflow)):
        with pytest.raises(err):
            bad.call(fn, *args)
    bad.call("hog_bomb")
    assert bystander.call("kv_checksum") == before
    assert bystander.call("kv_count") == 100


def test_wasi_host_functions_and_exit(store: ImageStore) -> None:
    image = store.add(wat_file("wasi.wat"))
    assert set(image.imports) == {"random_get", "clock_time_get", "fd_write", "proc_exit"}
    a = VM.create(image, clock="virtual", random_seed=SEED)
    b = VM.create(image, clock="virtual", random_seed=SEED)
    assert [a.call("rand") for _ in range(5)] == [b.call("rand") for _ in range(5)]
    t1, t2 = a.call("now", 1), a.call("now", 1)
    assert t2 > t1
    assert a.call("log") == 6 and bytes(a.host.log or b"") == b"hello\n"
    with pytest.raises(VMExited, match="status 3"):
        a.call("exit", 3)
    with pytest.raises(VMFailed):
        a.call("rand")
    with pytest.raises(VMFailed):
        a.snapshot()


def test_real_clock_is_monotonic_and_random_differs_per_vm(store: ImageStore) -> None:
    image = store.add(wat_file("wasi.wat"))
    a, b = VM.create(image), VM.create(image)
    assert a.call("now", 1) < a.call("now", 1)
    assert [a.call("rand") for _ in range(4)] != [b.call("rand") for _ in range(4)]


def test_many_vms_share_one_image(workload: dict[str, Image]) -> None:
    vms = [VM.create(workload["kvstore"]) for _ in range(200)]
    for i, vm in enumerate(vms):
        vm.call("kv_put", 1, i)
    assert [vm.call("kv_get", 1) for vm in vms] == list(range(200))
    for vm in vms:
        vm.close()


def test_image_store_reloads_compiled_images(store_dir: object, tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path)) / "store"
    raw = (Path(__file__).parent.parent / "workloads" / "kvstore.wasm").read_bytes()
    first = ImageStore(root).add(raw)
    again = ImageStore(root).get(first.digest)  # a new process would do exactly this
    assert again.digest == first.digest
    assert [p.pages for p in again.pristine] == [p.pages for p in first.pristine]
    assert (again.pristine[0].hashes == first.pristine[0].hashes).all()
    assert VM.create(again).call("kv_put", 1, 1) == 1
    with pytest.raises(ImageNotFound):
        ImageStore(root).get("0" * 64)
    ImageStore(root).delete(first.digest)
    assert ImageStore(root).list() == []
