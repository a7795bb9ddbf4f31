"""Live migration of a VM between cloudlets: pre-copy, then stop-and-copy, atomic.

The protocol is two pure state machines, as h11 is for HTTP: messages in,
messages and actions out, no sockets, no asyncio, no clock but an injected one.
Any transport can carry it; `driver.py` runs it over a tiny `Channel`.

Using it from a daemon (the whole API)::

    # source cloudlet
    stats = await run_source(vm, channel, hooks=my_hooks, image_wasm=wasm_bytes)
    # stats.outcome == "committed": the VM lives at the destination (the hooks'
    # tombstone() ran before the commit went out); "aborted": it serves here again.

    # destination cloudlet
    got = await run_destination(channel, image_store, chunk_store,
                                resolve=ask_source_whether_committed)
    # got.outcome == "committed": serve got.vm, restore got.annex (reply cache).

A `Channel` is anything with ``async send(bytes)`` and ``async recv() -> bytes``
(one message each, ordered, reliable; `recv` raises once closed). Source hooks
(`SourceHooks`; `VMGate` is a ready one) are ``pause()``, ``resume()``,
``tombstone(event)``, ``annex()`` and ``throttle(call_interval_s)``.

Driving the machines directly: call `next_event()` and do what it says, in
order, until `Done`:

========================  ======  ==================================================
event                     side    the driver must
========================  ======  ==================================================
`Send`                    both    send `event.data` to the peer
`NeedData`                both    `receive(await channel.recv())`, with a deadline
`PauseVM`                 source  stop calls (let the running one finish), then
                                  `paused(annex)`
`ResumeVM`                source  serve calls at the source again (idempotent)
`Throttle`                source  let calls in no closer than `call_interval_s`
                                  (auto-converge; lift it when the migration ends)
`KeepFinal`               source  optionally: write `event.final_round` where the
                                  decision will keep it, undecided, not flushed
`BecomeTombstone`         source  record durably that the VM moved, with its final
                                  round (`event.final_round`), and redirect its
                                  calls; only then send the `Commit` that follows
`PersistRound`            dest    make a pre-copy round durable (the final round:
                                  keep it; the source has it durable)
`ActivateVM`              dest    serve `event.vm`; hand over `event.annex`
`DiscardVM`               dest    nothing: the machine already dropped everything
`Done`                    both    stop; `machine.outcome` says how it ended
========================  ======  ==================================================

On a timeout or a lost channel call `abort(code, reason)`; before the commit it
yields `ResumeVM` at the source. A destination that loses the channel after
`Ready` is in doubt: ask the source and call `resolve(committed)`.

Every migration records a `MigrationStats` (rounds, bytes per round, codec per
round, total bytes against memory size and the overlay-plus-dirty lower bound,
total time, downtime). See docs/migration.md for the protocol and guarantees.
"""

from cloudlet.migration.chunkstore import ChunkStore, chunk_digest
from cloudlet.migration.compression import Codec, CompressionChooser
from cloudlet.migration.destination import DestinationMigration, DestinationState, ImageSource
from cloudlet.migration.driver import (
    Channel,
    MemoryChannel,
    Received,
    SourceHooks,
    StreamChannel,
    VMGate,
    memory_channel_pair,
    run_destination,
    run_source,
)
from cloudlet.migration.events import (
    ActivateVM,
    BecomeTombstone,
    DiscardVM,
    Done,
    Event,
    KeepFinal,
    NeedData,
    PauseVM,
    PersistRound,
    ResumeVM,
    Send,
    Throttle,
)
from cloudlet.migration.messages import SCHEMA_VERSION, Message, decode, encode
from cloudlet.migration.pacing import CallPacer
from cloudlet.migration.source import PreCopyPolicy, SourceMigration, SourceState
from cloudlet.migration.stats import MigrationStats, RoundStats

__all__ = [
    "SCHEMA_VERSION", "ActivateVM", "BecomeTombstone", "CallPacer", "Channel", "ChunkStore",
    "Codec", "CompressionChooser", "DestinationMigration", "DestinationState", "DiscardVM",
    "Done", "Event", "ImageSource", "KeepFinal", "MemoryChannel", "Message", "MigrationStats",
    "NeedData", "PauseVM", "PersistRound", "PreCopyPolicy", "Received", "ResumeVM", "RoundStats",
    "Send", "SourceHooks", "SourceMigration", "SourceState", "StreamChannel", "Throttle",
    "VMGate", "chunk_digest", "decode", "encode", "memory_channel_pair", "run_destination",
    "run_source",
]
