"""What the harnesses and their seeds share: the workloads' images, deterministic
VMs and base snapshots, and damaged variants of good inputs.

Why: the best seeds are real bytes (a snapshot of a real workload, the messages
of a real migration), and a harness that restores a decoded snapshot needs the
very image it was taken of. Everything here is deterministic (virtual clock,
fixed random seed, fixed snapshot ids), so `python -m fuzz seed` rebuilds the
same corpus and a delta seed applies to the same base the harness builds.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

from cloudlet.vm import VM, Image, ImageStore, Snapshot, VMLimits
from fuzz.runner import fuzz_home

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "workloads"
WORKLOAD_NAMES = ("kvstore", "filter", "vdi", "memhog")
# Small guests keep one restore in the milliseconds; the workloads boot in 2-3 pages.
LIMITS = VMLimits(memory_bytes=16 << 20, fuel_per_call=100_000_000, deadline_ms=1_000)
RANDOM_SEED = bytes(32)


@functools.cache
def store() -> ImageStore:
    return ImageStore(fuzz_home() / "images")


@functools.cache
def images() -> dict[str, Image]:
    """The workloads' images by name."""
    return {name: store().add_file(WORKLOADS / f"{name}.wasm") for name in WORKLOAD_NAMES}


def image_by_digest(digest: str) -> Image | None:
    return next((i for i in images().values() if i.digest == digest), None)


def wasm(name: str) -> bytes:
    return (WORKLOADS / f"{name}.wasm").read_bytes()


def boot(name: str) -> VM:
    """A fresh VM of a workload, the same state every time."""
    return VM.create(images()[name], LIMITS, vm_id=f"fuzz-{name}", owner="fuzz",
                     clock="virtual", random_seed=RANDOM_SEED)


def base_id(image: Image) -> str:
    return f"fuzz-base-{image.digest[:12]}"


@functools.cache
def base_snapshot(digest: str) -> Snapshot:
    """The overlay a fuzzed delta applies on: the workload right after boot, with a
    fixed id (a delta names its base by id, which no fuzzer could guess)."""
    image = image_by_digest(digest)
    assert image is not None
    name = next(n for n, i in images().items() if i is image)
    vm = boot(name)
    try:
        return fixed(vm.snapshot(), base_id(image))
    finally:
        vm.close()


def fixed(snap: Snapshot, snapshot_id: str) -> Snapshot:
    """`snap` with a chosen id and time, so seeds are the same on every rebuild."""
    return replace(snap, snapshot_id=snapshot_id, created_unix_ms=1_700_000_000_000)


def damaged(name: str, data: bytes) -> dict[str, bytes]:
    """A good input cut short and with one byte flipped: where decoders slip."""
    middle = len(data) // 2
    return {
        f"{name}.truncated": data[:middle],
        f"{name}.short-by-one": data[:-1],
        f"{name}.flipped": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :],
    }


def record_migration(name: str, calls: list[tuple[Any, ...]], *,
                     compression: bool) -> list[tuple[bool, bytes]]:
    """Every message of a real live migration of a workload, in order, as
    (sent by the source, bytes): run in process, as tests/test_migration.py does,
    with `calls` applied before it and after each pre-copy round (chunks to send, and
    more than one round)."""
    from cloudlet.migration import (
        ChunkStore,
        DestinationMigration,
        Done,
        NeedData,
        PauseVM,
        PreCopyPolicy,
        Send,
        SourceMigration,
    )
    from cloudlet.migration.messages import RoundEnd

    vm = boot(name)
    for fn, *args in calls:  # an overlay to send in round 0
        vm.call(fn, *args)
    policy = PreCopyPolicy(stop_dirty_bytes=4096, target_downtime_s=0.0, batch_bytes=8192,
                           compression=compression)
    src = SourceMigration(vm, migration_id=f"fuzz-{name}", policy=policy)
    dst = DestinationMigration(store(), ChunkStore())
    sent: list[tuple[bool, bytes]] = []
    src.start()
    try:
        for _ in range(10_000):
            ev, dev = src.next_event(), dst.next_event()
            if isinstance(ev, Send):
                sent.append((True, ev.data))
                dst.receive(ev.data)
                if isinstance(ev.message, RoundEnd) and ev.message.TYPE == "round_end":
                    for fn, *args in calls:
                        vm.call(fn, *args)
            elif isinstance(ev, PauseVM):
                src.paused({"replies": [[1, ["kv_put", [1, 2]], {"result": 1, "seq": 1}]]})
            if isinstance(dev, Send):
                sent.append((False, dev.data))
                src.receive(dev.data)
            if isinstance(ev, Done) and isinstance(dev, Done):
                return sent
            assert not (isinstance(ev, NeedData) and isinstance(dev, NeedData)), "deadlock"
        raise AssertionError("the migration did not end")
    finally:
        vm.close()
        if dst.vm is not None:
            dst.vm.close()


# msgpack's edge shapes, for the msgpack targets' dictionaries (`DICTIONARY`): the
# largest and smallest integers, long-length headers, deep nesting, ext types and
# timestamps. Mutation finds such byte runs slowly; a dictionary hands them over.
MSGPACK_TOKENS: tuple[bytes, ...] = (
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\xd3\x7f\xff\xff\xff\xff\xff\xff\xff", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\x91" * 16, b"\x81\xa1k" * 8,
    b"\xd4\x00\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xc7\x0c\xff" + bytes(12), b"\xc0",
    b"\xc2", b"\xc3",
)


def msgpack_dictionary(*keys: str) -> list[bytes]:
    """`keys` as msgpack strings (how map keys appear on the wire), plus the tokens."""
    import msgpack

    return [msgpack.packb(k) for k in keys] + list(MSGPACK_TOKENS)


def deepest(leaf: bytes = b"\x90") -> bytes:
    """A msgpack value nested as deep as msgpack's unpacker allows (1024 levels with
    the map around it): the deepest structure any of our decoders can be handed.
    Coverage does not reward depth, so mutation alone rarely builds one."""
    return b"\x91" * 1020 + leaf
