"""Fuzz target: a whole incoming live migration, message after message, into the
destination's state machine (`DestinationMigration.receive`).

`migration_message` fuzzes each message alone; the bugs of a protocol are in
sequences: a batch for a memory the round never ends, a round end whose pages
disagree with the batches, ids past the memory, a final round on no base, a
commit before ready. The machine turns every `CloudletError` into an abort by
itself, so here nothing may escape `receive` at all. What it emits is then
done as the daemon does: a round to persist is encoded and read back (it is
written to disk, and read at a restart), an arrived VM's reply log is read from
its annex, and every VM is closed.

An input is a msgpack list of the source's messages, each a map as `decode`
reads it (or raw bytes): the structure-aware mutator then changes fields, not
msgpack framing.
"""

from __future__ import annotations

from typing import Any

import msgpack

from cloudlet.migration import (
    ActivateVM,
    ChunkStore,
    DestinationMigration,
    Done,
    NeedData,
    PersistRound,
)
from cloudlet.migration.messages import decode
from cloudlet.vm import Snapshot
from edge_agent.replies import ANNEX_KEY, ReplyLog
from fuzz import fixtures, migration_message, structure

MAX_INPUT_BYTES = 64 << 10
MAX_MESSAGES = 64
# The cloudlet's admission cap for an arriving VM (the daemon's is its free memory).
MAX_MEMORY_BYTES = 64 << 20
KEYS = migration_message.KEYS
DICTIONARY = migration_message.DICTIONARY
MUTATOR = structure.msgpack_mutator(KEYS)


def TestOneInput(data: bytes) -> None:
    try:
        messages = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return
    if not isinstance(messages, list):
        return
    dst = DestinationMigration(fixtures.store(), ChunkStore(), max_memory_bytes=MAX_MEMORY_BYTES)
    try:
        for message in messages[:MAX_MESSAGES]:
            raw = message if isinstance(message, bytes) else _packed(message)
            if raw is None:
                continue
            dst.receive(raw)
            _drain(dst)
    finally:
        if dst.vm is not None:
            dst.vm.close()
        dst.abort("migration_aborted", "the fuzz input ended", tell_peer=False)


def _packed(message: Any) -> bytes | None:
    try:
        packed: bytes = msgpack.packb(message)
    except (ValueError, TypeError, OverflowError):
        return None
    return packed


def _drain(dst: DestinationMigration) -> None:
    for _ in range(1000):
        event = dst.next_event()
        if isinstance(event, PersistRound):
            Snapshot.from_bytes(event.snapshot.to_bytes())
        elif isinstance(event, ActivateVM):
            ReplyLog.from_wire(event.annex.get(ANNEX_KEY))
            event.vm.close()
            dst.vm = None
        elif isinstance(event, NeedData | Done):
            return


def seeds() -> dict[str, bytes]:
    """What the source sent in real migrations of two workloads, each whole, then
    cut before its end and with a message dropped."""
    out: dict[str, bytes] = {}
    for compression in (False, True):
        codec = "zstd" if compression else "none"
        for name, calls in (("memhog", [("hog_grow", 1), ("hog_dirty", 3, 9)]),
                            ("kvstore", [("kv_put", 5, 6)])):
            sent = [data for from_source, data in
                    fixtures.record_migration(name, calls, compression=compression)
                    if from_source]
            maps = [_as_map(data) for data in sent]
            out[f"{name}-{codec}.msgpack"] = msgpack.packb(maps)
            if not compression:
                out[f"{name}-{codec}-cut.msgpack"] = msgpack.packb(maps[: len(maps) // 2])
                out[f"{name}-{codec}-gap.msgpack"] = msgpack.packb(maps[:2] + maps[3:])
    return out


def _as_map(data: bytes) -> dict[str, Any]:
    decode(data)  # what was recorded decodes
    body: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return body
