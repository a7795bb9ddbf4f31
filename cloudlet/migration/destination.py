"""The destination side of a live migration: a pure state machine that rebuilds the VM.

It answers the source's offer with what it already holds (the image, chunk
digests in the cloudlet's `ChunkStore`), then keeps a restored, never-called
copy of the VM current round by round: round 0 is restored as an overlay
(`VM.restore`), every later round is applied as a delta (`vm.apply_delta`). So
the stop-and-copy round only applies its few chunks and the state, which keeps
the downtime short. Every snapshot is built through `cloudlet.vm.snapshot`'s
own wire checks, so a lying peer costs an `Abort`, never a corrupt VM.

Once `Final` is durable (or kept by the source, `Final.source_keeps`) and known
to apply (checked, memory grown) it says `Ready`, then writes it into the VM
(`next_event`, while the source decides) and holds the VM; `Commit` makes it
`ActivateVM`. If the channel goes between the two, only the source knows whether
it passed its commit point: the machine is then in doubt until the driver asks
the source (its tombstone, or its lack of one) and calls `resolve()`.

A source that `decides_at_final` (said in its `Offer`) may pass its commit
point as it sends `Final`, before any `Ready`: from the first durable round on,
every failure here (a lost channel, a timeout, a message that does not check
out) puts the machine in doubt instead of discarding. In doubt without the
final round (`has_final` false), a "committed" answer cannot be served from
memory: the driver's caller restores the VM from the rounds it persisted and
the final round the source kept with its decision.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zstandard

from cloudlet.errors import (
    CloudletError,
    MigrationError,
    MigrationInDoubt,
    MigrationProtocolError,
)
from cloudlet.migration import compression
from cloudlet.migration.chunkstore import ChunkStore, chunk_digests
from cloudlet.migration.events import (
    ActivateVM,
    DiscardVM,
    Done,
    Event,
    NeedData,
    PersistRound,
    Send,
    take_send,
)
from cloudlet.migration.messages import (
    DIGEST_BYTES,
    ROUND_END_BATCH,
    Abort,
    Accept,
    Ack,
    Chunks,
    Commit,
    Final,
    ImageData,
    Message,
    Offer,
    Ready,
    RoundEnd,
    decode,
    encode,
    is_safe_id,
)
from cloudlet.migration.stats import MigrationStats, RoundStats
from cloudlet.vm import VM, Image, Snapshot, chunks, image_digest
from cloudlet.vm.snapshot import from_wire as snapshot_from_wire  # the one checked parser
from cloudlet.vm.snapshot import read_only_view

MAX_MEMORY_BYTES = 1 << 32  # a wasm32 memory's limit; a daemon passes its own capacity


class ImageSource(Protocol):
    """Where the destination finds images (`cloudlet.vm.ImageStore` is one)."""

    def __contains__(self, digest: str) -> bool: ...
    def get(self, digest: str) -> Image: ...
    def add(self, wasm: bytes) -> Image: ...


class DestinationState(enum.Enum):
    WAITING = "waiting"  # for the offer
    RECEIVING = "receiving"  # rounds
    READY = "ready"  # VM restored and held, Ready sent, waiting for Commit
    # The channel went after Ready (or, from a source that decides at `Final`, after
    # a durable round): ask the source, then resolve().
    IN_DOUBT = "in_doubt"
    COMMITTED = "committed"
    ABORTED = "aborted"


class DestinationMigration:
    """Receive one VM. Drive it with `next_event()` and `receive()`."""

    def __init__(self, images: ImageSource, store: ChunkStore, *,
                 max_memory_bytes: int = MAX_MEMORY_BYTES,
                 admit: Callable[[Offer], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.images = images
        self.store = store
        self.max_memory_bytes = max_memory_bytes
        self.admit = admit
        self._clock = clock
        self.state = DestinationState.WAITING
        self.migration_id = ""
        self.offer: Offer | None = None
        self.vm: VM | None = None  # the restored copy, held until the commit
        self.annex: dict[str, Any] = {}
        self.stats = MigrationStats("", "")
        self._events: deque[Event] = deque()
        self._local: dict[bytes, bytes] = {}  # content this migration relies on
        self._next_round = 0
        self._batches = 0
        # Per memory, this round's (chunk ids, their content as (n, CHUNK_BYTES)).
        self._parts: dict[int, list[tuple[np.ndarray, bytes | np.ndarray]]] = {}
        self._zeros: dict[int, list[np.ndarray]] = {}
        # Round 0 of a single-memory VM is staged as it arrives (see `_StagedOverlay`).
        self._staged: _StagedOverlay | None = None
        self._staging_off = False
        # The final round, prepared and durable, to write into the VM after `Ready`.
        self._unapplied: Snapshot | None = None
        self._has_final = False

    @property
    def staging_fell_back(self) -> bool:
        """Whether round 0 went the plain way because staging it could not start."""
        return self._staging_off

    @property
    def outcome(self) -> str:
        return self.stats.outcome

    @property
    def has_final(self) -> bool:
        """Whether the final round was taken in (checked, held in `vm`): an in-doubt
        machine without it cannot activate, whatever the source answers."""
        return self._has_final

    # --- driver API ---------------------------------------------------------------------

    def next_event(self) -> Event:
        if self._events:
            return self._events.popleft()
        if self._unapplied is not None:  # `Ready` is out: the source decides meanwhile
            self._apply_final()
        if self.state in (DestinationState.COMMITTED, DestinationState.ABORTED,
                          DestinationState.IN_DOUBT):
            return Done(self.stats.outcome)
        return NeedData()

    def next_send(self) -> Send | None:
        """See `cloudlet.migration.events.take_send`."""
        return take_send(self._events)

    def receive(self, data: bytes) -> None:
        try:
            msg = decode(data)
            if self.migration_id and msg.migration_id != self.migration_id:
                raise MigrationProtocolError("message for another migration")
            self._handle(msg)
        except CloudletError as exc:
            self.abort(exc.code, exc.message)

    def abort(self, code: str, reason: str, *, tell_peer: bool = True) -> None:
        """Give up (timeout, lost channel, a message that does not check out). Once
        the source may have passed its commit point (after `Ready`; after a durable
        round from a source that decides at `Final`) this cannot discard: the source
        is told (it resumes the VM if it had not decided) and the machine goes in
        doubt."""
        if self.state is DestinationState.READY or (
                self.state is DestinationState.RECEIVING and self._source_may_decide()):
            self._doubt(code, reason, tell_peer=tell_peer)
        elif self.state in (DestinationState.WAITING, DestinationState.RECEIVING):
            self._abort(code, reason, tell_peer=tell_peer)

    def persist_failed(self, reason: str) -> None:
        """The driver could not make a round durable: this cloudlet cannot promise to
        keep the VM, so the migration aborts (the source keeps serving it: without
        this round's acknowledgement it never sends `Final`). A final round that
        fails to persist after a source that decides at `Final` may have decided
        puts the machine in doubt instead."""
        if self.state is DestinationState.READY and self._source_may_decide():
            self._doubt("migration_aborted", f"the destination cannot persist: {reason}")
        elif self.state in (DestinationState.READY, DestinationState.RECEIVING):
            self.state = DestinationState.RECEIVING  # Ready was queued, never sent
            self._abort("migration_aborted", f"the destination cannot persist: {reason}")

    def resolve(self, committed: bool) -> None:
        """The source's answer for an in-doubt migration: activate or discard the VM.
        "Committed" without the final round (`has_final` false) is MigrationInDoubt:
        the VM is restored from the rounds on disk and the source's kept copy."""
        if self.state not in (DestinationState.IN_DOUBT, DestinationState.READY):
            raise MigrationInDoubt(f"resolve() in state {self.state.value}")
        if committed and not self._has_final:
            raise MigrationInDoubt("the source committed, but its final round never "
                                   "arrived here: restore from the rounds persisted and "
                                   "the source's kept copy")
        if committed:
            self._activate()
        else:
            self._abort("migration_aborted", "the source did not commit", tell_peer=False)

    # --- internals ----------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._events.append(Send(encode(msg), msg))

    def _source_may_decide(self) -> bool:
        """A source that decides at `Final` can have decided once a round is durable
        here (it sends `Final` only after every earlier round's acknowledgement,
        which follows the round's persisting)."""
        return (self.offer is not None and self.offer.decides_at_final
                and self._next_round >= 1)

    def _stop_receiving(self, code: str, reason: str, tell_peer: bool) -> None:
        """Drop what is queued and what a round in progress holds, and tell the peer
        why (a source that has not decided resumes the VM at once; one that has
        ignores it): the common start of `_doubt` and `_abort`."""
        self._events.clear()
        if tell_peer and self.migration_id:
            self._send(Abort(self.migration_id, code=code, reason=reason))
        self._drop_staged()
        self._local.clear()
        self._parts.clear()
        self._zeros.clear()

    def _doubt(self, code: str, reason: str, *, tell_peer: bool = True) -> None:
        """Stop taking messages and keep what arrived (the VM as restored so far, the
        rounds the driver persisted): only the source knows whether it committed."""
        self._stop_receiving(code, reason, tell_peer)
        self.state = DestinationState.IN_DOUBT
        self.stats.outcome = "in_doubt"
        self.stats.ended_s = self._clock()

    def _abort(self, code: str, reason: str, *, tell_peer: bool = True) -> None:
        if self.state in (DestinationState.COMMITTED, DestinationState.ABORTED):
            return
        self._stop_receiving(code, reason, tell_peer)
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self._unapplied = None
        self._events.append(DiscardVM(code, reason))
        self.state = DestinationState.ABORTED
        self.stats.outcome, self.stats.abort_code = "aborted", code
        self.stats.ended_s = self._clock()

    def _activate(self) -> None:
        if self._unapplied is not None:
            self._apply_final()
        assert self.vm is not None
        now = self._clock()
        self.state = DestinationState.COMMITTED
        self.stats.outcome = "committed"
        self.stats.committed_s = self.stats.ended_s = now
        self._events.append(ActivateVM(self.vm, self.annex))

    def _handle(self, msg: Message) -> None:
        s = self.state
        if isinstance(msg, Abort):
            if s in (DestinationState.READY, DestinationState.IN_DOUBT):
                self.resolve(committed=False)  # the source says so: it never committed
            else:
                self._abort(msg.code, f"source aborted: {msg.reason}", tell_peer=False)
        elif isinstance(msg, Offer) and s is DestinationState.WAITING:
            self._offered(msg)
        elif isinstance(msg, ImageData) and s is DestinationState.RECEIVING:
            self._image(msg)
        elif isinstance(msg, Chunks) and s is DestinationState.RECEIVING:
            self._chunks(msg)
        elif isinstance(msg, RoundEnd) and s is DestinationState.RECEIVING:
            self._round_end(msg)
        elif isinstance(msg, Commit) and s is DestinationState.READY:
            self._activate()
        else:
            raise MigrationProtocolError(
                f"unexpected {msg.TYPE!r} while the destination is {s.value}")

    def _offered(self, msg: Offer) -> None:
        if not is_safe_id(msg.migration_id) or not is_safe_id(msg.vm_id):
            # Both name files here: a '/' or '..' in them would be a path of the peer's.
            raise MigrationProtocolError("offer: a migration or VM id that is not "
                                         "letters, digits, '-' or '_'")
        self.migration_id = msg.migration_id
        self.offer = msg
        self.stats = MigrationStats(msg.migration_id, msg.vm_id, memory_bytes=msg.memory_bytes,
                                    overlay_bytes=msg.overlay_bytes, started_s=self._clock())
        self.state = DestinationState.RECEIVING
        if not 0 <= msg.overlay_bytes <= msg.memory_bytes:
            raise MigrationProtocolError(f"offer: an overlay of {msg.overlay_bytes} bytes "
                                         f"in {msg.memory_bytes} bytes of memory")
        if msg.memory_bytes > self.max_memory_bytes:
            raise MigrationError(f"the VM's {msg.memory_bytes} bytes of memory exceed this "
                                 f"cloudlet's limit of {self.max_memory_bytes}")
        if self.admit is not None:
            self.admit(msg)  # the daemon's say (capacity, a VM by that id already here)
        if len(msg.digests) % DIGEST_BYTES:
            raise MigrationProtocolError("offer: digests are not whole")
        digests = [msg.digests[i : i + DIGEST_BYTES]
                   for i in range(0, len(msg.digests), DIGEST_BYTES)]
        held = []
        for d in digests:
            chunk = self.store.get(d)
            if chunk is not None:
                self._local[d] = chunk  # ours now, whatever the store evicts
            held.append(chunk is not None)
        self.stats.held_chunks = sum(held)
        bitmap = np.packbits(np.array(held, dtype=bool)).tobytes()
        self._send(Accept(self.migration_id, has_image=msg.image_digest in self.images,
                          held=bitmap))

    def _image(self, msg: ImageData) -> None:
        assert self.offer is not None
        if image_digest(msg.wasm) != self.offer.image_digest:
            raise MigrationProtocolError("image: the module's digest is not the offered one")
        self.images.add(msg.wasm)

    def _chunks(self, msg: Chunks) -> None:
        if msg.round != self._next_round or msg.batch != self._batches:
            raise MigrationProtocolError(f"batch {msg.round}/{msg.batch} out of order")
        if not 0 <= msg.memory < 64:  # wasm allows many memories; our images have one or two
            raise MigrationProtocolError(f"batch for memory {msg.memory}")
        batch = decode_batch(msg)
        data_ids, ref_ids, zero_ids, raw = batch.data_ids, batch.ref_ids, batch.zero_ids, batch.raw
        raw_bytes = len(raw)
        for d, piece in zip(chunk_digests(raw), _split_chunks(raw), strict=True):
            self._local[d] = piece
            self.store.put(d, piece)
        refs = []
        for i in range(len(ref_ids)):
            d = msg.ref_digests[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES]
            chunk = self._local.get(d)
            if chunk is None:
                raise MigrationProtocolError("batch refers to a chunk the destination lacks")
            refs.append(chunk)
        # (chunk ids, their content in that order): staged, or kept as received and
        # joined once at the round's end.
        ids = np.concatenate([data_ids, ref_ids]) if refs else data_ids
        content = raw + b"".join(refs) if refs else raw
        if not self._stage(msg.memory, ids, content):
            self._parts.setdefault(msg.memory, []).append((ids, content))
        self._zeros.setdefault(msg.memory, []).append(zero_ids)
        self._batches += 1
        self._record(msg.round, len(data_ids), len(ref_ids), len(zero_ids), raw_bytes,
                     len(msg.payload), msg.compression)
        self._send(Ack(self.migration_id, round=msg.round, batch=msg.batch))

    def _record(self, rnd: int, data: int, refs: int, zeros: int, raw: int, wire: int,
                codec: str) -> None:
        while len(self.stats.rounds) <= rnd:
            self.stats.rounds.append(RoundStats(len(self.stats.rounds), 0, 0, 0, 0, 0,
                                                started_s=self._clock()))
        r = self.stats.rounds[rnd]
        r.chunks += data + refs + zeros
        r.data_chunks += data
        r.ref_chunks += refs
        r.raw_bytes += raw
        r.bytes_sent += wire
        r.compression[codec] = r.compression.get(codec, 0) + 1
        r.ended_s = self._clock()

    def _stage(self, memory: int, ids: np.ndarray, content: bytes) -> bool:
        """Stage a batch of round 0 (True), or leave it to the plain path (False)."""
        if self.vm is not None or self._next_round != 0 or self._staging_off:
            return False
        assert self.offer is not None
        if self._staged is None:
            try:
                vm = VM.prepare_restore(self.images.get(self.offer.image_digest),
                                        self.offer.memory_bytes, vm_id=self.offer.vm_id,
                                        owner=self.offer.owner)
            except CloudletError:  # e.g. a multi-memory image: restored at the end instead
                self._staging_off = True
                return False
            try:
                self._staged = _StagedOverlay(vm, self.offer.overlay_bytes)
            except MemoryError:  # the plain path may still fit: it holds no second copy
                vm.close()
                self._staging_off = True
                return False
        if self._staged.add(memory, ids, content):
            return True
        # Not what staging expects: give what it holds back to the plain path.
        staged_ids, data = self._staged.ids_and_data()
        self._parts.setdefault(0, []).insert(0, (staged_ids, np.frombuffer(data, np.uint8)))
        self._drop_staged()
        self._staging_off = True
        return False

    def _drop_staged(self) -> None:
        if self._staged is not None:
            self._staged.vm.close()
            self._staged = None

    def _round_end(self, msg: RoundEnd) -> None:
        if msg.round != self._next_round or msg.batches != self._batches:
            raise MigrationProtocolError(
                f"round {msg.round} ended after {self._batches} of {msg.batches} batches")
        final = isinstance(msg, Final)
        assert self.offer is not None
        memories = []
        # Stays in self._staged until the restore succeeded: an abort closes it.
        staged = self._staged
        if staged is not None and (len(msg.pages) != 1 or self._parts.get(0)):
            self._drop_staged()  # a sender we did not expect: the plain path has it all
            staged = None
        for i, pages in enumerate(msg.pages):
            if staged is not None:
                ids, data = staged.ids_and_data()
                memories.append({"pages": pages, "chunk_ids": ids.astype("<u4").tobytes(),
                                 "zero_ids": _sorted_ids(self._zeros.get(i, [])), "data": data})
                continue
            parts = self._parts.get(i, [])
            ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint32)
            # One copy into a fresh numpy array (huge pages: a 256 MiB `bytes` join
            # took ~0.7 s of page faults on a busy host, inside the round's end).
            content = np.concatenate([np.frombuffer(p[1], dtype=np.uint8) for p in parts]
                                     ) if parts else np.zeros(0, np.uint8)
            if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
                # References or an unusual sender: put the chunks in id order (the
                # common case, batches of ascending ids, needs no more than the join).
                order = np.argsort(ids, kind="stable")
                ids = ids[order]
                content = content.reshape(-1, chunks.CHUNK_BYTES)[order]
            memories.append({"pages": pages, "chunk_ids": ids.astype("<u4").tobytes(),
                             "zero_ids": _sorted_ids(self._zeros.get(i, [])),
                             "data": read_only_view(content)})
        self._parts.clear()
        self._zeros.clear()
        wire = {
            "snapshot_id": secrets.token_hex(16),
            "kind": "overlay" if self.vm is None else "delta",
            "base_id": None if self.vm is None else self.vm.last_snapshot_id,
            "image": self.offer.image_digest, "vm_id": self.offer.vm_id,
            "owner": self.offer.owner, "seq": msg.seq, "fuel_used": msg.fuel_used,
            "limits": msg.limits, "host": msg.host, "globals": msg.globals,
            "memories": memories, "created_unix_ms": int(time.time() * 1000),
        }
        if isinstance(msg, Final):  # the reply log and the rest that travels with the VM
            wire["annex"] = msg.annex
        try:
            snap = snapshot_from_wire(wire)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MigrationProtocolError(f"round {msg.round}: malformed state: {exc!r}") from None
        if staged is not None:
            staged.vm.restore_into(snap)  # closes it on failure
            self.vm, self._staged = staged.vm, None
        elif self.vm is None:
            self.vm = VM.restore(self.images.get(self.offer.image_digest), snap)
        elif final:
            # Every check and the growth now (a refusal still aborts), the copy after
            # `Ready`: applying was ~0.25 ms of the pause, which the source's decision
            # (its fsync, the `Commit`'s trip) now overlaps.
            self.vm.prepare_delta(snap)
            self._unapplied = snap
        else:
            self.vm.apply_delta(snap)
        self._next_round += 1
        self._batches = 0
        if final:
            assert isinstance(msg, Final)
            self.annex = msg.annex
            self._has_final = True
        self._events.append(PersistRound(self.migration_id, self.offer.vm_id, msg.round, snap,
                                         final, isinstance(msg, Final) and msg.source_keeps))
        if final:
            self.state = DestinationState.READY
            self._send(Ready(self.migration_id))
        else:  # after the round is persisted (the event above comes first)
            self._send(Ack(self.migration_id, round=msg.round, batch=ROUND_END_BATCH))


    def _apply_final(self) -> None:
        """Write the prepared final round into the VM. Only the host running out of
        memory should fail it now, after `Ready`: the VM is then marked failed (its
        calls say so), and its state is in what the driver persisted before `Ready`,
        which the daemon keeps (no first checkpoint of a failed VM replaces it) and a
        restart of the destination restores if the source committed (the final
        round from the source's kept copy if it was not written here)."""
        snap, self._unapplied = self._unapplied, None
        assert self.vm is not None and snap is not None
        try:
            self.vm.apply_delta(snap)
        except Exception as exc:  # after `Ready`: never an abort, never raised
            if self.vm.failed is None:
                self.vm.failed = f"the final round could not be applied: {exc!r}"


@dataclass(frozen=True)
class Batch:
    """What a `Chunks` message carries, unpacked and checked for shape (whether its
    ids fit the VM's memory is for the round's end, with the rest of the state)."""

    data_ids: np.ndarray
    ref_ids: np.ndarray
    zero_ids: np.ndarray
    raw: bytes  # the data chunks' content, CHUNK_BYTES each, in `data_ids` order


def decode_batch(msg: Chunks) -> Batch:
    """A batch's ids and decompressed content, or MigrationProtocolError: the part of
    receiving a batch that only reads the peer's bytes (fuzzed on its own)."""
    data_ids, ref_ids, zero_ids = (_ids(b) for b in (msg.data_ids, msg.ref_ids, msg.zero_ids))
    if len(msg.ref_digests) != len(ref_ids) * DIGEST_BYTES:
        raise MigrationProtocolError("batch: references and digests do not match")
    raw_bytes = len(data_ids) * chunks.CHUNK_BYTES
    try:
        raw = compression.decompress(msg.compression, msg.payload, raw_bytes)
    except (ValueError, zstandard.ZstdError) as exc:
        raise MigrationProtocolError(f"batch does not decompress: {exc}") from None
    if len(raw) != raw_bytes:
        raise MigrationProtocolError(f"batch has {len(raw)} bytes for {len(data_ids)} chunks")
    return Batch(data_ids, ref_ids, zero_ids, raw)


def _ids(raw: bytes) -> np.ndarray:
    if len(raw) % 4:
        raise MigrationProtocolError("chunk ids are not a list of u32")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


PREFAULT_SLICE_BYTES = 8 << 20  # memory touched per staged batch: ~8x the batch's data


class _StagedOverlay:
    """Round 0 assembled while it arrives, instead of after its last byte.

    Why: restoring a 256 MiB round 0 at its end meant two fresh 256 MiB buffers
    (the joined content, then the VM's memory) and ~1.2 s of first-touch page
    faults between the last batch and the acknowledgment: on a 25 Mbit/s link
    that doubled the time to move a compressible guest. Here the content is
    copied into one buffer as batches come, and the VM is booted with its memory
    grown and faulted in a slice per batch; the round's end only copies.
    Batches must come in ascending chunk order for memory 0 (what the source
    sends); anything else hands the staged part back to the plain path."""

    def __init__(self, vm: VM, overlay_bytes: int) -> None:
        self.vm = vm
        self.buffer = np.empty(overlay_bytes, dtype=np.uint8)
        self.filled = 0
        self.ids: list[np.ndarray] = []
        self.last_id = -1

    def add(self, memory: int, ids: np.ndarray, content: bytes) -> bool:
        n = len(content)
        ascending = len(ids) == 0 or (int(ids[0]) > self.last_id
                                      and bool(np.all(ids[1:] > ids[:-1])))
        if memory != 0 or not ascending or self.filled + n > len(self.buffer):
            return False
        self.buffer[self.filled : self.filled + n] = np.frombuffer(content, dtype=np.uint8)
        self.filled += n
        self.ids.append(ids)
        if len(ids):
            self.last_id = int(ids[-1])
        self.vm.prefault(PREFAULT_SLICE_BYTES)
        return True

    def ids_and_data(self) -> tuple[np.ndarray, memoryview]:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.uint32)
        return ids, read_only_view(self.buffer[: self.filled])


def _sorted_ids(parts: list[np.ndarray]) -> bytes:
    ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint32)
    return ids.astype("<u4").tobytes()


def _split_chunks(raw: bytes) -> list[bytes]:
    step = chunks.CHUNK_BYTES
    return [raw[o : o + step] for o in range(0, len(raw), step)]
