"""Migration's pieces in isolation: the wire format, the chunk store, the codec choice."""

from __future__ import annotations

import os
import random

import msgpack
import pytest

from cloudlet.errors import MigrationProtocolError, MigrationVersionUnsupported
from cloudlet.migration import messages as m
from cloudlet.migration.chunkstore import ChunkStore, chunk_digest
from cloudlet.migration.compression import CompressionChooser, decompress
from cloudlet.vm import CHUNK_BYTES, VM, Image

STATE = dict(pages=[17], seq=3, fuel_used=9, limits={"memory_bytes": 1 << 20,
             "fuel_per_call": None, "deadline_ms": 5}, globals={"g": 1, "f": 0.5},
             host={"clock": "virtual"})
EXAMPLES: list[m.Message] = [
    m.Offer("id", vm_id="v", owner=None, image_digest="ab", memory_bytes=1, overlay_bytes=0,
            digests=bytes(32)),
    m.Accept("id", has_image=True, held=b"\x80"),
    m.ImageData("id", wasm=b"\0asm"),
    m.Chunks("id", round=0, batch=1, memory=0, data_ids=b"\1\0\0\0", ref_ids=b"",
             ref_digests=b"", zero_ids=b"", compression="none", payload=bytes(CHUNK_BYTES)),
    m.Ack("id", round=0, batch=1),
    m.RoundEnd("id", round=0, batches=2, **STATE),  # type: ignore[arg-type]
    m.Final("id", round=1, batches=0, annex={"replies": {7: b"x"}}, **STATE),  # type: ignore[arg-type]
    m.Ready("id"), m.Commit("id"), m.Abort("id", code="c", reason="r"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: msg.TYPE)
def test_every_message_round_trips(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


def _body(msg: m.Message) -> dict[object, object]:
    body: dict[object, object] = msgpack.unpackb(m.encode(msg), strict_map_key=False)
    return body


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda b: b.update(v=2), MigrationVersionUnsupported),
    (lambda b: b.pop("v"), MigrationVersionUnsupported),
    (lambda b: b.update(t="teleport"), MigrationProtocolError),
    (lambda b: b.pop("round"), MigrationProtocolError),
    (lambda b: b.update(round="0"), MigrationProtocolError),
    (lambda b: b.update(round=True), MigrationProtocolError),
    (lambda b: b.update(payload="text"), MigrationProtocolError),
    (lambda b: b.update(extra=1), MigrationProtocolError),
], ids=["version", "no-version", "unknown-type", "missing-field", "str-for-int", "bool-for-int",
        "str-for-bytes", "unknown-field"])
def test_malformed_messages_raise_typed_errors(mutate: object, error: type[Exception]) -> None:
    body = _body(EXAMPLES[3])
    mutate(body)  # type: ignore[operator]
    with pytest.raises(error):
        m.decode(msgpack.packb(body))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]),
                                  random.Random(61).randbytes(64)])
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(MigrationProtocolError):
        m.decode(data)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(MigrationProtocolError):
        m.decode(bytes(100), max_bytes=10)


def test_chunk_store_is_bounded_lru_and_skips_zero_chunks() -> None:
    store = ChunkStore(capacity_bytes=2 * CHUNK_BYTES)
    a, b, c = (bytes([i]) * CHUNK_BYTES for i in (1, 2, 3))
    for chunk in (a, b):
        store.put(chunk_digest(chunk), chunk)
    assert store.get(chunk_digest(a)) == a  # a is now the most recent
    store.put(chunk_digest(c), c)
    assert chunk_digest(b) not in store and chunk_digest(a) in store and len(store) == 2
    store.put(chunk_digest(bytes(CHUNK_BYTES)), bytes(CHUNK_BYTES))
    assert len(store) == 2 and store.size_bytes == 2 * CHUNK_BYTES


def test_chunk_store_fills_from_images_and_vms(workload: dict[str, Image]) -> None:
    store = ChunkStore()
    assert store.add_image(workload["memhog"]) >= 1  # pristine memory is mostly zero
    vm = VM.create(workload["memhog"])
    vm.call("hog_grow", 1)
    vm.call("hog_fill", 0, 16, 7)  # 16 identical chunks: stored once
    before = len(store)
    assert store.add_vm(vm) >= 16 and len(store) <= before + 3  # the 16 count once


def test_compression_none_on_a_fast_link_zstd_on_a_slow_one() -> None:
    # A fixed cost per compression (1 ms for the sample), not this machine's timing:
    # the choice is what is tested, and a loaded machine must not flip it.
    ticks = iter(range(0, 1000, 1))
    chooser = CompressionChooser(clock=lambda: next(ticks) / 1000)
    data = (b"session state " * 300)[:CHUNK_BYTES] * 64
    chooser.measure(data)
    assert chooser.choose(64, rate_bytes_s=10e9).name == "none"
    slow = chooser.choose(64, rate_bytes_s=25e6 / 8)
    assert slow.name == "zstd"
    out = chooser.compress(slow, data)
    assert len(out) < len(data) / 4 and decompress("zstd", out, len(data)) == data


def test_incompressible_data_is_sent_as_is() -> None:
    chooser = CompressionChooser()
    chooser.measure(os.urandom(64 * CHUNK_BYTES))
    assert chooser.choose(64, rate_bytes_s=25e6 / 8).name == "none"


def test_decompression_never_yields_more_than_announced() -> None:
    chooser = CompressionChooser()
    chooser.measure(bytes(CHUNK_BYTES * 4))
    bomb = chooser.compress(chooser.costs[1].codec, bytes(CHUNK_BYTES * 1000))
    assert len(decompress("zstd", bomb, CHUNK_BYTES)) == CHUNK_BYTES + 1  # caught as a lie
