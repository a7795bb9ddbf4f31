"""The source side of a live migration: a pure state machine around one VM.

Pre-copy, then stop-and-copy:

1. `start()` captures the overlay (round 0) and offers its chunk digests; the
   destination answers which it holds and whether it has the image.
2. Round 0 sends the overlay's chunks, as content or as a reference by digest
   when the destination holds it, while the VM keeps serving.
3. After each round is acknowledged, the chunks dirtied since its capture are
   counted; another round sends them, until the dirty set is small (bytes, or
   time at the measured link rate), stops shrinking, another round would send
   more than the byte budget allows, or the round limit is hit. While rounds
   run, the dirty rate is sampled; when it is over half the link's rate,
   auto-converge spaces the VM's calls apart (`Throttle`) so it falls.
4. Then `PauseVM`: the driver stops calls and calls `paused(annex)`, which sends
   the last chunks and the rest of the state (`Final`). On the destination's
   `Ready` the source passes the commit point: `BecomeTombstone`, then `Commit`.
   A source that `decides_at_final` passes it as `Final` goes out instead
   (`BecomeTombstone` right after it, then the `Commit`; `Ready` only ends it): every
   earlier round is durable at the destination by then, and the decision keeps
   the final round, so the VM's whole state is durable on the two sides, and
   the decision's flush overlaps the destination's work on the round instead of
   following it.

Any failure before that point (an `Abort` from the peer, a protocol error, the
driver's `abort()` on a timeout or a lost channel) yields `ResumeVM`: the VM,
untouched but for the snapshots taken of it, serves on here.

Everything here runs between calls on the driver's thread: no I/O, no clock
but the one injected, so each edge case is a few lines of test.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cloudlet.errors import CloudletError, MigrationError, MigrationProtocolError
from cloudlet.migration.chunkstore import chunk_digests
from cloudlet.migration.compression import CompressionChooser, LinkMeter
from cloudlet.migration.events import (
    BecomeTombstone,
    Done,
    Event,
    KeepFinal,
    NeedData,
    PauseVM,
    ResumeVM,
    Send,
    Throttle,
    take_send,
)
from cloudlet.migration.messages import (
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
)
from cloudlet.migration.stats import MigrationStats, RoundStats
from cloudlet.vm import VM, Snapshot, chunks

KiB = 1 << 10
MiB = 1 << 20
MIN_SAMPLE_S = 0.05  # a dirty-rate sample over less time is noise


@dataclass(frozen=True)
class PreCopyPolicy:
    """When to stop pre-copying, and how big a batch is. Defaults and their reasons:"""

    # QEMU stops after ~30 iterations; our rounds are cheaper but a guest that
    # dirties faster than the link drains never converges, so stop well before.
    max_rounds: int = 12
    # Stop-and-copy when the dirty set is this small: 32 chunks cost ~0.2 ms to
    # capture and send on loopback. The final round also has to be applied and
    # written (fsync) at the destination inside the pause, and the client has to
    # reconnect after it: measured on 64 MiB guests, a 1 MiB final round paused the
    # VM ~8 ms, so the budget for the round itself is kept small.
    stop_dirty_bytes: int = 64 * KiB
    # ... or when the measured link would send it within this time, and it is no
    # more than `max_final_bytes`: the final round is also captured, applied and
    # fsynced inside the pause, which the link rate says nothing about (and a
    # rate measured from a burst of acks on loopback can be wildly high).
    target_downtime_s: float = 0.0005
    max_final_bytes: int = 512 * KiB
    # A round must shrink the dirty set below this share of the previous round's,
    # or pre-copy is not converging and more rounds only add bytes.
    min_shrink: float = 0.9
    # Every live round resends chunks the guest dirtied again after they were sent.
    # Stop pre-copying when the next round (and the one its dirtying implies) would
    # take the bytes sent past this multiple of the least that must be sent: the
    # overlay plus each dirtied chunk once (the target is 1.1; the rest is margin
    # for the final round and control messages).
    max_bytes_ratio: float = 1.08
    # Auto-converge (QEMU's name for it): a guest dirtying memory at more than
    # `converge_share` of the link's rate outruns pre-copy. Space its calls apart,
    # multiplying the spacing by 2-4 per measurement (aiming at
    # `converge_target_share`), between these bounds: it slows, but keeps serving,
    # where the alternative is a final round of seconds with the VM stopped.
    auto_converge: bool = True
    converge_share: float = 0.5
    converge_target_share: float = 0.125
    min_call_interval_s: float = 0.005
    max_call_interval_s: float = 0.25
    # How often the dirty rate is sampled inside a round (one look at the write
    # tracker's marks: proportional to what was written, between two calls).
    sample_interval_s: float = 0.5
    # Chunk data per batch: big enough that per-message costs vanish, small
    # enough for aiohttp's default 4 MiB WebSocket message cap and a fine-grained
    # link measurement.
    batch_bytes: int = 1 * MiB
    # In flight before waiting for acks: at least `window_batches`, and more while
    # their encoded size is under `window_bytes`. Four 1 MiB batches keep a
    # 25-100 Mbit/s link busy across a few ms of round trip without queueing
    # seconds of data in buffers; but compressed 40x, four batches are 100 KB, a
    # window the round trip (and the destination's work per batch) would throttle.
    window_batches: int = 4
    window_bytes: int = 1 * MiB
    max_window_batches: int = 64
    compression: bool = True


class SourceState(enum.Enum):
    IDLE = "idle"
    NEGOTIATING = "negotiating"  # offer sent, waiting for accept
    PRECOPY = "precopy"  # sending rounds while the VM serves
    STOPPING = "stopping"  # PauseVM emitted, waiting for paused()
    FINAL = "final"  # final round sent, waiting for Ready
    # Decided as the final round went (`decides_at_final`), Commit queued behind the
    # decision: waiting for Ready, so the channel stays open until it is out.
    DECIDED = "decided"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass
class _Round:
    number: int
    snap: Snapshot
    # Per memory, per data chunk; None for the final round, sent as content: its
    # chunks were just written (one the destination holds is rare), and hashing
    # them (sha256) took ~0.1 ms of the pause.
    digests: list[list[bytes]] | None
    batches: deque[tuple[int, int, int]]  # (memory, start, end) slices of chunk_ids
    sent_batches: int = 0
    end_sent: bool = False


class SourceMigration:
    """Migrate `vm` out. Drive it with `start()`, `next_event()`, `receive()`, `paused()`."""

    def __init__(self, vm: VM, *, migration_id: str | None = None,
                 policy: PreCopyPolicy | None = None,
                 image_wasm: bytes | Callable[[], bytes] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.perf_counter,
                 keeps_final: bool = False, decides_at_final: bool = False) -> None:
        if decides_at_final and not keeps_final:
            raise ValueError("decides_at_final needs keeps_final: the decision is what "
                             "keeps the final round durable")
        self.vm = vm
        # The driver keeps the final round durable with its decision (`KeepFinal`,
        # `BecomeTombstone.final_round`), and says so in `Final`.
        self.keeps_final = keeps_final
        # The commit point is `Final`'s sending, not `Ready` (see the module's
        # docstring); said in the `Offer`, so the destination never discards on its
        # own once a round is durable there.
        self.decides_at_final = decides_at_final
        self.migration_id = migration_id or secrets.token_hex(8)
        self.policy = policy or PreCopyPolicy()
        self._image_wasm = image_wasm
        self._clock = clock
        self.state = SourceState.IDLE
        self.stats = MigrationStats(self.migration_id, vm.id)
        self._events: deque[Event] = deque()
        self._round: _Round | None = None
        self._annex: dict[str, Any] = {}
        self._kept: tuple[Snapshot, Snapshot] | None = None  # the final round, as kept
        self._deciding = False  # the decision at `Final` is queued (`_decide_at_final`)
        self._ready_early = False  # and `Ready` came before the driver took it
        self._dest_has: set[bytes] = set()
        self._offered: list[bytes] = []
        self._in_flight: dict[tuple[int, int], int] = {}  # (round, batch) -> bytes
        self._meter = LinkMeter()
        self._chooser = CompressionChooser(enabled=self.policy.compression, clock=cpu_clock)
        self._dirtied: list[set[int]] = []
        self._last_dirty_bytes: int | None = None
        self._precopy_rounds = 0
        # Auto-converge: the spacing asked of the driver, and the last dirty sample
        # (time, bytes dirtied since the current round's capture).
        self.call_interval_s = 0.0
        self._sampled_s = 0.0
        self._sampled_dirty = 0
        self._captured_s = 0.0  # when the current round was captured

    # --- driver API -----------------------------------------------------------------

    @property
    def outcome(self) -> str:
        return self.stats.outcome

    def start(self) -> None:
        """Capture round 0 (the overlay) and queue the offer."""
        if self.state is not SourceState.IDLE:
            raise MigrationError("start() was already called")
        self.stats.started_s = self._sampled_s = self._captured_s = self._clock()
        try:
            snap = self.vm.snapshot()
        except CloudletError as exc:
            self._abort(exc.code, f"cannot snapshot the VM: {exc.message}", tell_peer=False)
            return
        rnd = self._round = self._new_round(0, snap)
        assert rnd.digests is not None  # round 0 is never the final round
        unique = list(dict.fromkeys(d for ds in rnd.digests for d in ds))
        self._offered = unique
        self.stats.memory_bytes = snap.memory_bytes
        self.stats.overlay_bytes = snap.overlay_bytes
        self._dirtied = [set() for _ in snap.memories]
        self._send(Offer(self.migration_id, vm_id=self.vm.id, owner=self.vm.owner,
                         image_digest=self.vm.image.digest, memory_bytes=snap.memory_bytes,
                         overlay_bytes=snap.overlay_bytes, digests=b"".join(unique),
                         decides_at_final=self.decides_at_final))
        self.state = SourceState.NEGOTIATING

    def next_event(self) -> Event:
        """What the driver must do next (call again after doing it)."""
        ev = self._next_event()
        if isinstance(ev, BecomeTombstone) and self.state is SourceState.FINAL:
            # Decided at `Final`: the decision is the driver's from here (it never
            # cuts one short, and says so if it fails). Not before: until `Final`
            # was sent, a lost channel or a timeout must still resume the VM.
            self.state = SourceState.COMMITTED if self._ready_early else SourceState.DECIDED
            self.stats.outcome = "committed"
            self.stats.committed_s = self._clock()
        return ev

    def _next_event(self) -> Event:
        if self._events:
            return self._events.popleft()
        if self.state in (SourceState.COMMITTED, SourceState.ABORTED):
            return Done(self.stats.outcome)
        if self.state is SourceState.DECIDED:
            return NeedData()  # `Ready`, to send the Commit
        if self.state is SourceState.STOPPING:
            return PauseVM()
        if self.state in (SourceState.PRECOPY, SourceState.FINAL) and self._round is not None:
            try:
                self._pump()
            except CloudletError as exc:
                self._abort(exc.code, exc.message)
            if self._events:
                return self._events.popleft()
            if self._stopping():
                return PauseVM()
        return NeedData()

    def next_send(self) -> Send | None:
        """See `cloudlet.migration.events.take_send`."""
        return take_send(self._events)

    def receive(self, data: bytes) -> None:
        """Feed one message from the destination."""
        try:
            msg = decode(data)
            if msg.migration_id != self.migration_id:
                raise MigrationProtocolError("message for another migration")
            self._handle(msg)
        except MigrationProtocolError as exc:
            self.abort(exc.code, exc.message)  # a no-op once decided: nothing undoes that

    def paused(self, annex: dict[str, Any] | None = None) -> None:
        """The driver has stopped calls (after `PauseVM`): capture and queue the final round."""
        if self.state is not SourceState.STOPPING:
            raise MigrationError(f"paused() in state {self.state.value}")
        self.stats.mark_paused(self._clock())
        try:
            snap = self.vm.snapshot(delta=True)
        except CloudletError as exc:
            self._abort(exc.code, f"cannot snapshot the VM: {exc.message}")
            return
        self._note_dirtied(snap)
        self._round = self._new_round(len(self.stats.rounds), snap)
        self._annex = dict(annex or {})
        self.state = SourceState.FINAL

    def decision_failed(self, code: str, reason: str) -> None:
        """The driver could not make the decision durable (its `BecomeTombstone`
        failed: a full disk, a record gone, a refusal): the migration did not commit
        after all. The queued `Commit` is withdrawn, the destination is told to abort
        (it holds the VM, ready, not serving, or is still taking the final round
        in: it drops it), and the VM resumes here."""
        if self.state not in (SourceState.COMMITTED, SourceState.DECIDED):
            raise MigrationError(f"decision_failed() in state {self.state.value}")
        self.stats.committed_s = None
        self._abort(code, reason)

    def abort(self, code: str, reason: str, *, tell_peer: bool = True) -> None:
        """Give up (timeout, lost channel, shutdown). A no-op once decided or aborted."""
        if self.state in (SourceState.COMMITTED, SourceState.DECIDED, SourceState.ABORTED):
            return
        self._abort(code, reason, tell_peer=tell_peer)

    # --- internals --------------------------------------------------------------------

    def _send(self, msg: Message, round_stats: RoundStats | None = None) -> int:
        data = encode(msg)
        self._events.append(Send(data, msg))
        if round_stats is None:
            self.stats.control_bytes += len(data)
        else:
            round_stats.bytes_sent += len(data)
        return len(data)

    def _abort(self, code: str, reason: str, *, tell_peer: bool = True) -> None:
        self._events.clear()
        if tell_peer and self.state is not SourceState.IDLE:
            self._send(Abort(self.migration_id, code=code, reason=reason))
        self._events.append(ResumeVM(code, reason))
        self.state = SourceState.ABORTED
        self.stats.outcome, self.stats.abort_code = "aborted", code
        self.stats.ended_s = self._clock()

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Abort):
            # Past the commit point an abort changes nothing: a destination that may
            # be asked to land the VM asks the source (and hears "committed").
            if self.state not in (SourceState.COMMITTED, SourceState.DECIDED,
                                  SourceState.ABORTED):
                self._abort(msg.code, f"destination aborted: {msg.reason}", tell_peer=False)
            return
        if isinstance(msg, Accept) and self.state is SourceState.NEGOTIATING:
            self._accepted(msg)
        elif isinstance(msg, Ack) and self.state in (SourceState.PRECOPY, SourceState.STOPPING,
                                                     SourceState.FINAL, SourceState.DECIDED):
            self._acked(msg)
        elif isinstance(msg, Ready) and self.state is SourceState.FINAL and self._deciding:
            self._ready_early = True  # before the driver took the decision: it ends there
        elif isinstance(msg, Ready) and self.state is SourceState.FINAL and self._final_sent():
            self._commit()
        elif isinstance(msg, Ready) and self.state is SourceState.DECIDED:
            self.state = SourceState.COMMITTED
            self.stats.ended_s = self.stats.rounds[-1].ended_s = self._clock()
        else:
            raise MigrationProtocolError(
                f"unexpected {msg.TYPE!r} while the source is {self.state.value}")

    def _accepted(self, msg: Accept) -> None:
        n = len(self._offered)
        if len(msg.held) != (n + 7) // 8:
            raise MigrationProtocolError("accept: the held bitmap does not match the offer")
        held = np.unpackbits(np.frombuffer(msg.held, dtype=np.uint8), count=n).astype(bool)
        self._dest_has = {d for d, h in zip(self._offered, held.tolist(), strict=True) if h}
        self.stats.held_chunks = int(held.sum())
        if not msg.has_image:
            wasm = self._image_wasm() if callable(self._image_wasm) else self._image_wasm
            if wasm is None:
                self._abort("image_not_found", "the destination lacks the image and the "
                            "source has no module bytes to send")
                return
            self._send(ImageData(self.migration_id, wasm=wasm))
        self.state = SourceState.PRECOPY

    def _acked(self, msg: Ack) -> None:
        size = self._in_flight.pop((msg.round, msg.batch), None)
        if size is None:
            raise MigrationProtocolError(f"ack of a batch never sent: {msg.round}/{msg.batch}")
        now = self._clock()
        self._meter.acked(size, now, idle=not self._in_flight)
        self.stats.link_rate_bytes_s = self._meter.rate_bytes_s
        if msg.round < len(self.stats.rounds):
            self.stats.rounds[msg.round].ended_s = now

    def _stopping(self) -> bool:  # a method, so that type checkers see the state may change
        return self.state is SourceState.STOPPING

    def _final_sent(self) -> bool:
        return self._round is not None and self._round.end_sent

    def _commit(self) -> None:
        now = self._clock()
        self.state = SourceState.COMMITTED
        self.stats.outcome = "committed"
        self.stats.committed_s = self.stats.ended_s = now
        self.stats.rounds[-1].ended_s = now
        assert self._round is not None  # the final round: `_final_sent()` said so
        self._queue_decision(self._round.snap)

    def _decides_now(self, rnd: _Round) -> bool:
        """Whether the decision goes with `Final`: asked for, and only for a VM that
        did not grow past what the destination admitted in the offer (its one
        refusal of a final round that is not a bug). The final round always follows
        round 0 (`paused` numbers it after the rounds sent), so the destination holds
        durable rounds and asks the source if it loses it."""
        return (self.decides_at_final
                and rnd.snap.memory_bytes <= self.stats.memory_bytes)

    def _decide_at_final(self, snap: Snapshot) -> None:
        """The commit point as `Final` goes: the driver makes the decision (with the
        final round in it) durable while the destination checks and stages the
        round, and the `Commit` follows it at once, not after `Ready` (the
        destination reads it after `Final`, in order, so it is ready by then; a
        round trip less when its `Ready` would come after the decision). If the
        decision fails, the queued `Commit` is withdrawn (`decision_failed`).
        Queued behind `Final`: the machine is decided once the driver takes the
        `BecomeTombstone` (`next_event`), so that a `Final` that cannot be sent
        still aborts (and drops both)."""
        self._deciding = True
        self._queue_decision(snap)

    def _queue_decision(self, snap: Snapshot) -> None:
        """The decision (the final round `snap` kept in it), then the `Commit` that
        the driver withdraws if the decision fails (`decision_failed`)."""
        self._events.append(BecomeTombstone(self.migration_id, self.vm.id,
                                            self._final_round(snap)))
        self._send(Commit(self.migration_id))

    def _final_round(self, snap: Snapshot) -> Snapshot:
        """The final round as the destination restores it: the delta, with the annex
        (made once: `KeepFinal` and `BecomeTombstone` carry the same one)."""
        if self._kept is None or self._kept[0] is not snap:
            self._kept = (snap, replace(snap, annex=self._annex))
        return self._kept[1]

    def _new_round(self, number: int, snap: Snapshot) -> _Round:
        if self.state is not SourceState.STOPPING or len(self._chooser.costs) <= 1:
            # The final round runs inside the pause: it reuses the last measurement
            # (trying three zstd levels costs ~2 ms) rather than measure again.
            self._chooser.measure(
                b"".join(m.data[: 64 * chunks.CHUNK_BYTES] for m in snap.memories))
        per_batch = max(1, self.policy.batch_bytes // chunks.CHUNK_BYTES)
        batches: deque[tuple[int, int, int]] = deque()
        for i, mem in enumerate(snap.memories):
            n = len(mem.chunk_ids)
            if n == 0 and len(mem.zero_ids):
                batches.append((i, 0, 0))
            for start in range(0, n, per_batch):
                batches.append((i, start, min(n, start + per_batch)))
        final = self.state is SourceState.STOPPING
        digests = None if final else [chunk_digests(m.data) for m in snap.memories]
        rnd = _Round(number, snap, digests, batches)
        now = self._clock()
        self.stats.rounds.append(RoundStats(round=number, chunks=0, data_chunks=0, ref_chunks=0,
                                            raw_bytes=0, bytes_sent=0, started_s=now,
                                            final=final,
                                            call_interval_s=self.call_interval_s))
        if number:  # the capture reset the dirty base (round 0's was the start's)
            self._sampled_s, self._sampled_dirty, self._captured_s = now, 0, now
        return rnd

    def _note_dirtied(self, snap: Snapshot) -> None:
        for seen, mem in zip(self._dirtied, snap.memories, strict=True):
            seen.update(mem.chunk_ids.tolist())
        self.stats.dirtied_bytes = sum(map(len, self._dirtied)) * chunks.CHUNK_BYTES

    def _pump(self) -> None:
        """Queue what the window allows: batches, then the round's end, then decide."""
        rnd = self._round
        assert rnd is not None
        self._sample_dirty_rate()
        while rnd.batches and self._window_open():
            self._send_batch(rnd, *rnd.batches.popleft())
        if rnd.batches or self._events:
            return
        if not rnd.end_sent:
            rnd.end_sent = True
            self._send_round_end(rnd)
            return  # decide on a later call: the VM serves while the driver sends this
        if self.state is SourceState.PRECOPY and not self._in_flight:
            # Drop this frame's hold on the acked round too, or its data (64 MiB for
            # a round 0) is freed only when `_pump` returns: in the step that pauses.
            del rnd
            self._next_round()
            if self.state is SourceState.PRECOPY:
                self._pump()  # the new round's first batches

    def _window_open(self) -> bool:
        p, n = self.policy, len(self._in_flight)
        return n < p.window_batches or (
            n < p.max_window_batches and sum(self._in_flight.values()) < p.window_bytes)

    def _send_batch(self, rnd: _Round, memory: int, start: int, end: int) -> None:
        mem = rnd.snap.memories[memory]
        stats = self.stats.rounds[rnd.number]
        ids = mem.chunk_ids[start:end]
        arr = np.frombuffer(mem.data, dtype=np.uint8).reshape(-1, chunks.CHUNK_BYTES)
        if rnd.digests is None:  # the final round: every chunk as content
            is_ref = np.zeros(len(ids), dtype=bool)
            raw = arr[start:end].tobytes()
            ref_digests = b""
        else:
            digests = rnd.digests[memory][start:end]
            is_ref = np.fromiter((d in self._dest_has for d in digests), dtype=bool,
                                 count=len(ids))
            data_pos = np.flatnonzero(~is_ref)
            raw = arr[start + data_pos].tobytes()
            self._dest_has.update(digests[i] for i in data_pos.tolist())
            ref_digests = b"".join(d for d, r in zip(digests, is_ref.tolist(), strict=True) if r)
        n_data = len(raw) // chunks.CHUNK_BYTES
        codec = self._chooser.choose(n_data, self._meter.rate_bytes_s)
        payload = self._chooser.compress(codec, raw)
        if len(payload) >= len(raw):
            codec, payload = self._chooser.costs[0].codec, raw
        zero = mem.zero_ids if start == 0 else mem.zero_ids[:0]
        batch = rnd.sent_batches
        rnd.sent_batches += 1
        size = self._send(Chunks(
            self.migration_id, round=rnd.number, batch=batch, memory=memory,
            data_ids=ids[~is_ref].astype("<u4").tobytes(),
            ref_ids=ids[is_ref].astype("<u4").tobytes(),
            ref_digests=ref_digests, zero_ids=zero.astype("<u4").tobytes(),
            compression=codec.name, payload=payload),
            stats)
        stats.chunks += len(ids) + len(zero)
        stats.data_chunks += n_data
        stats.ref_chunks += int(is_ref.sum())
        stats.raw_bytes += len(raw)
        stats.compression[codec.label] = stats.compression.get(codec.label, 0) + 1
        if not self._in_flight:
            self._meter.busy(self._clock())
        self._in_flight[(rnd.number, batch)] = size

    def _send_round_end(self, rnd: _Round) -> None:
        snap = rnd.snap
        fields: dict[str, Any] = dict(
            round=rnd.number, batches=rnd.sent_batches, pages=[m.pages for m in snap.memories],
            seq=snap.seq, fuel_used=snap.fuel_used, limits=snap.limits.to_wire(),
            globals=snap.globals, host=snap.host)
        stats = self.stats.rounds[rnd.number]
        if self.state is SourceState.FINAL:
            self._send(Final(self.migration_id, annex=self._annex,
                             source_keeps=self.keeps_final, **fields), stats)
            if self._decides_now(rnd):
                self._decide_at_final(snap)
            elif self.keeps_final:
                self._events.append(KeepFinal(self._final_round(snap)))
        else:
            size = self._send(RoundEnd(self.migration_id, **fields), stats)
            # In flight until the destination says the round is applied and durable:
            # the next round (or the pause) waits for it.
            if not self._in_flight:
                self._meter.busy(self._clock())
            self._in_flight[(rnd.number, ROUND_END_BATCH)] = size
        if not rnd.sent_batches:
            stats.ended_s = self._clock()

    def _next_round(self) -> None:
        """Every batch is acked: another pre-copy round, or stop and copy."""
        # Free the acked round's data here, while the VM serves: unmapping a 64 MiB
        # round 0 takes ~5 ms, which would otherwise land inside the downtime.
        self._round = None
        dirty_ids = self.vm.dirty_chunks()
        dirty_bytes = sum(map(len, dirty_ids)) * chunks.CHUNK_BYTES
        self._observe_dirty(dirty_bytes, self._clock(), round_end=True)
        p = self.policy
        rate = self._meter.rate_bytes_s
        previous = self._last_dirty_bytes
        reasons = (
            ("max_rounds", self._precopy_rounds >= p.max_rounds),
            ("small", dirty_bytes <= p.stop_dirty_bytes),
            ("fast", rate is not None and dirty_bytes <= p.max_final_bytes
             and dirty_bytes / rate <= p.target_downtime_s),
            ("not_shrinking", previous is not None and dirty_bytes > p.min_shrink * previous
             and not self._calls_outlast_a_round(dirty_bytes, rate)),
            ("byte_budget", self._over_budget(dirty_ids, dirty_bytes)),
        )
        stop_reason = next((name for name, hit in reasons if hit), None)
        if stop_reason is not None:
            self.stats.stop_reason = stop_reason
            self.state = SourceState.STOPPING
            return
        self._converge()  # only when going on: spacing calls just before the pause is moot
        self._last_dirty_bytes = dirty_bytes
        self._precopy_rounds += 1
        snap = self.vm.snapshot(delta=True)
        self._note_dirtied(snap)
        self._round = self._new_round(len(self.stats.rounds), snap)


    # --- auto-converge and the byte budget ---------------------------------------------

    def _sample_dirty_rate(self) -> None:
        """Inside a pre-copy round, every `sample_interval_s`: measure, maybe throttle."""
        p = self.policy
        if not p.auto_converge or self.state is not SourceState.PRECOPY:
            return
        now = self._clock()
        if now - self._sampled_s >= p.sample_interval_s:
            dirty = sum(map(len, self.vm.dirty_chunks())) * chunks.CHUNK_BYTES
            if self._observe_dirty(dirty, now):
                self._converge()

    def _observe_dirty(self, dirty_bytes: int, now: float, *, round_end: bool = False) -> bool:
        """`dirty_bytes` were dirtied since the round's capture: record the rate since
        the last sample (a distinct-chunk rate: a chunk dirtied twice counts once, so
        a nearly all-dirty memory reads low); True if there was one to record. At a
        round's end a sample too recent to say anything gives way to the whole
        round's rate: a guest writing in bursts between samples must not go unseen."""
        elapsed = now - self._sampled_s
        if elapsed >= MIN_SAMPLE_S:
            rate = max(0, dirty_bytes - self._sampled_dirty) / elapsed
        elif round_end and now - self._captured_s >= MIN_SAMPLE_S:
            rate = dirty_bytes / (now - self._captured_s)
        else:
            return False  # too short to say anything: keep the last rate
        self._sampled_s, self._sampled_dirty = now, dirty_bytes
        self.stats.dirty_rate_bytes_s = rate
        return True

    def _dirty_share(self) -> float | None:
        """The last dirty rate over the link's, both as bytes on the wire (the link is
        measured through acks of encoded batches: what compresses well drains faster)."""
        link, rate = self._meter.rate_bytes_s, self.stats.dirty_rate_bytes_s
        if not link or rate is None:
            return None
        return rate * self._wire_ratio() / link

    def _converge(self) -> None:
        """Auto-converge: widen the spacing of calls while the guest outruns the link."""
        p = self.policy
        share = self._dirty_share()
        if not p.auto_converge or share is None or share <= p.converge_share:
            return
        factor = min(4.0, max(2.0, share / p.converge_target_share))
        interval = min(p.max_call_interval_s,
                       max(p.min_call_interval_s, self.call_interval_s * factor))
        if interval > self.call_interval_s:
            self.call_interval_s = interval
            self.stats.max_call_interval_s = interval
            self._events.append(Throttle(interval, self.stats.dirty_rate_bytes_s or 0.0,
                                         self._meter.rate_bytes_s or 0.0))

    def _calls_outlast_a_round(self, dirty_bytes: int, rate: float | None) -> bool:
        """Auto-converge spaces the VM's calls at least twice as far apart as the next
        round should take, and that round is small (at most `max_final_bytes`). A
        round that did not shrink the dirty set then most likely caught one of those
        calls, and whether the next one catches any is chance: one that catches
        none leaves the final round nearly empty. Stopping instead pauses the VM for
        a whole call's dirtying (256 MiB dirtied at 10 MiB/s over 25 Mbit/s, calls
        250 ms apart: a 193 KB final round, 57 ms of link time with the VM paused).
        `max_rounds` and the byte budget still bound the rounds this adds.

        The next round's length is the larger of its link time and the length of the
        round just acknowledged, which moved about as much: that one includes what
        the link rate leaves out (the capture, the destination's write, the acks'
        round trip), and a rate measured from a burst of acks can be far too high."""
        interval = self.call_interval_s
        if not interval or not rate or dirty_bytes > self.policy.max_final_bytes:
            return False
        expected_s = max(self._wire_ratio() * dirty_bytes / rate,
                         self.stats.rounds[-1].duration_s)
        return expected_s <= interval / 2

    def _over_budget(self, dirty_ids: list[chunks.ChunkIds], dirty_bytes: int) -> bool:
        """Would one more live round (sending `dirty_ids`, then the final round its
        dirtying implies) take the bytes sent past `max_bytes_ratio` x the least a
        migration must send (the overlay plus each dirtied chunk once)?"""
        fresh = sum(len(set(ids.tolist()) - seen)
                    for ids, seen in zip(dirty_ids, self._dirtied, strict=True))
        floor = self.stats.overlay_bytes + self.stats.dirtied_bytes + fresh * chunks.CHUNK_BYTES
        # The next round lasts dirty_bytes / link; the guest dirties rate x that meanwhile.
        share = self._dirty_share()
        shrink = 1.0 if share is None else min(1.0, share)
        # Chunk rounds only: control messages (the offer's digests, an image the
        # destination lacked) are not resending, and must not cut pre-copy short.
        sent = sum(r.bytes_sent for r in self.stats.rounds)
        expected = sent + self._wire_ratio() * dirty_bytes * (1.0 + shrink)
        return expected > self.policy.max_bytes_ratio * floor

    def _wire_ratio(self) -> float:
        """Bytes on the wire per byte of chunk content, as the last data round went
        (compression makes it < 1; 1 before anything was measured)."""
        for r in reversed(self.stats.rounds):
            if r.raw_bytes:
                return min(1.05, r.bytes_sent / r.raw_bytes)
        return 1.0
