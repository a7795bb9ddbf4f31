"""Fuzz target: live-migration messages from a peer, `messages.decode`, and for a
batch of chunks `decode_batch` (its ids and its bounded zstd decompression).

Both sides of a migration decode every message the peer sends with `decode`
(type-checked fields, a size cap), and the destination unpacks each batch with
`decode_batch` before it touches any VM. Both may raise only
`MigrationProtocolError` (a `CloudletError`): the state machine turns it into
an abort. The deeper steps (a batch applied, a round restored) are the
`migration_destination` target's.
"""

from __future__ import annotations

import contextlib
import dataclasses

from cloudlet.errors import CloudletError
from cloudlet.migration.destination import decode_batch
from cloudlet.migration.messages import MESSAGE_TYPES, Chunks, decode
from fuzz import fixtures, structure

MAX_INPUT_BYTES = 64 << 10
# The peer channel's cap is 32 MiB (MAX_MESSAGE_BYTES); decoding does not depend
# on it, and 1 MiB keeps a zstd batch's honest output small enough to fuzz fast.
CAP_BYTES = 1 << 20
KEYS = ("v", "t", *sorted({f.name for cls in MESSAGE_TYPES.values()
                           for f in dataclasses.fields(cls)}))
DICTIONARY = fixtures.msgpack_dictionary(*KEYS, "none", "zstd", *MESSAGE_TYPES)
MUTATOR = structure.msgpack_mutator(KEYS)


def TestOneInput(data: bytes) -> None:
    with contextlib.suppress(CloudletError):
        msg = decode(data, CAP_BYTES)
        if isinstance(msg, Chunks):
            decode_batch(msg)


def seeds() -> dict[str, bytes]:
    """Every message of two real migrations (each type once per codec), plus a few
    messages no honest peer sends."""
    from cloudlet.migration.messages import Abort, ImageData, encode

    out: dict[str, bytes] = {}
    for compression in (False, True):
        codec = "zstd" if compression else "none"
        for name, calls in (("memhog", [("hog_grow", 1), ("hog_dirty", 3, 9)]),
                            ("kvstore", [("kv_put", 5, 6)])):
            for from_source, data in fixtures.record_migration(name, calls,
                                                               compression=compression):
                msg = decode(data)
                side = "src" if from_source else "dst"
                key = f"{name}-{side}-{msg.TYPE}-{codec}.msgpack"
                out.setdefault(key, data)
    out["image.msgpack"] = encode(ImageData("fuzz", wasm=fixtures.wasm("memhog")[:512]))
    out["abort.msgpack"] = encode(Abort("fuzz", code="migration_aborted", reason="test"))
    out["not-a-map.msgpack"] = b"\x93\x01\x02\x03"
    out["version-2.msgpack"] = b"\x82\xa1v\x02\xa1t\xa5ready"
    return out
