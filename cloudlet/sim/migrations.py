"""The migrations in flight of one policy, as a table, and their progress per tick.

Each row follows the pre-copy model of cloudlet.placement.cost round by round:
a setup (identity proof, connection, checkpoint, first capture) while the VM
serves, round 0 sends the overlay, later rounds what was dirtied meanwhile, then
the VM pauses for stop-and-copy and resumes at the destination. Migrations in
flight share each directed backhaul link equally, so a burst of handoffs slows
each other down.

A tick can hold several phases of one migration (a short setup, two rounds and
the stop-and-copy), so `progress` repeats one vectorised sub-step over all rows
until every row has spent the tick or finished; the loop runs over sub-steps
(bounded by the rounds a migration may take), never over migrations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloudlet.placement import PrecopyModel
from cloudlet.sim.columns import Columns, column

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Phases of a migration in flight (`Migrations.phase`).
SETUP, PRECOPY, STOP_COPY, RESUME = 0, 1, 2, 3
# Time left in a tick below which a row has spent it (float round-off, not time).
_SPENT_S = 1e-12


@dataclass(frozen=True, eq=False)
class Pauses:
    """The sessions whose VM was paused during a tick: their slots, how long the VM
    was paused within the tick, and the mean wait of an interaction that arrived
    during the pause (half the paused time, plus the pause still to come when it
    does not end in this tick)."""

    slot: IntArray
    paused_s: FloatArray
    wait_s: FloatArray


@dataclass(frozen=True, eq=False)
class Progress:
    """What one tick did to the migrations in flight, one entry per row."""

    done: BoolArray  # resumed at the destination within the tick
    sent_bytes: FloatArray  # wire bytes sent within the tick
    paused_s: FloatArray  # seconds the VM was paused within the tick
    rate_bytes_s: FloatArray  # each row's sending rate this tick


@dataclass(eq=False)
class Migrations(Columns):
    """One row per migration in flight."""

    slot: IntArray = field(metadata=column(-1, np.int64))  # whose session moves
    source: IntArray = field(metadata=column(-1, np.int64))
    target: IntArray = field(metadata=column(-1, np.int64))
    phase: IntArray = field(metadata=column(SETUP, np.int64))  # SETUP ... RESUME
    # Wire bytes left in this round, and the state bytes the round carries.
    remaining_bytes: FloatArray = field(metadata=column(0.0, np.float64))
    round_bytes: FloatArray = field(metadata=column(0.0, np.float64))
    elapsed_s: FloatArray = field(metadata=column(0.0, np.float64))  # into this round
    rounds: IntArray = field(metadata=column(0, np.int64))
    timer_s: FloatArray = field(metadata=column(0.0, np.float64))  # left of SETUP or RESUME
    stop_s: FloatArray = field(metadata=column(0.0, np.float64))  # the stop-and-copy's length
    # The directed link ids of the path (GraphBackhaul.path), -1 past its end; as
    # wide as the longest path in flight.
    links: IntArray = field(metadata=column(-1, np.int64, (1,)))

    def start(self, slots: IntArray, source: IntArray, target: IntArray,
              overlay_bytes: FloatArray, setup_s: FloatArray,
              paths: IntArray | list[IntArray], cost: PrecopyModel) -> None:
        """Add one row per move: setup first (the VM serves at its source
        meanwhile), then round 0 carries the overlay. A zero setup ends at once
        and round 0 starts in the same tick. `paths` holds each move's directed
        link ids: (moves, P), -1 past the end, or one array per move."""
        k = len(slots)
        if isinstance(paths, list):
            padded = np.full((k, max((len(p) for p in paths), default=1)), -1,
                             dtype=np.int64)
            for i, p in enumerate(paths):
                padded[i, :len(p)] = p
            paths = padded
        width = max(self.links.shape[1], paths.shape[1])
        links = np.full((k, width), -1, dtype=np.int64)
        links[:, :paths.shape[1]] = paths
        self._widen(width)
        self.extend(Migrations(
            slot=slots, source=source, target=target,
            phase=np.full(k, SETUP, dtype=np.int64),
            remaining_bytes=overlay_bytes * cost.wire_ratio, round_bytes=overlay_bytes,
            elapsed_s=np.zeros(k), rounds=np.zeros(k, dtype=np.int64), timer_s=setup_s,
            stop_s=np.zeros(k), links=links))

    def _widen(self, width: int) -> None:
        old = np.full((len(self), width), -1, dtype=np.int64)
        old[:, :self.links.shape[1]] = self.links
        self.links = old

    def progress(self, link_rate_bytes_s: FloatArray, cloudlets: int, dt_s: float,
                 cost: PrecopyModel, memory_bytes: FloatArray,
                 dirty_rate_bytes_s: FloatArray) -> Progress:
        """Spend one tick of `dt_s` on every row. `memory_bytes` and
        `dirty_rate_bytes_s` are per row (its session's workload)."""
        rate = self._rates(link_rate_bytes_s, cloudlets, dt_s, cost)
        m = len(self)
        left = np.full(m, dt_s)
        done = np.zeros(m, dtype=bool)
        sent = np.zeros(m)
        paused = np.zeros(m)
        for _ in range(cost.max_rounds + 5):
            act = (left > _SPENT_S) & ~done
            if not act.any():
                break
            done |= self._run_timers(act, left, paused)
            ended = self._send(act, left, rate, paused, sent, cost.resume_s)
            self._next_rounds(ended, cost, memory_bytes, dirty_rate_bytes_s)
        return Progress(done, sent, paused, rate)

    def _rates(self, link_rate_bytes_s: FloatArray, cloudlets: int, dt_s: float,
               cost: PrecopyModel) -> FloatArray:
        """Each row's sending rate: an equal share of each directed link on its path
        among the rows sending on it, the narrowest share winning."""
        links = self.links
        phase = self.phase
        # Sending, or about to within this tick (a setup ending now): those share links.
        sending = ((phase == PRECOPY) | (phase == STOP_COPY)
                   | ((phase == SETUP) & (self.timer_s < dt_s)))[:, None] & (links >= 0)
        counts = np.bincount(links[sending], minlength=len(link_rate_bytes_s))
        share = np.where(links >= 0,
                         link_rate_bytes_s[np.maximum(links, 0)]
                         / np.maximum(counts[np.maximum(links, 0)], 1), np.inf)
        rate: FloatArray = share.min(axis=1)
        if cost.send_s_per_gib > 0:
            # The source's own work per wire byte, in series with the link and shared
            # by the migrations it sends at once (cost.py).
            from_source = np.bincount(self.source[sending.any(axis=1)], minlength=cloudlets)
            share_src = np.maximum(from_source[self.source], 1)
            rate = 1.0 / (1.0 / rate + share_src * cost.send_s_per_byte)
        return rate

    def _run_timers(self, act: BoolArray, left: FloatArray, paused: FloatArray) -> BoolArray:
        """SETUP and RESUME run on a timer; returns the rows whose resume ended."""
        phase = self.phase
        timer = self.timer_s
        timed = act & ((phase == SETUP) | (phase == RESUME))
        fin = timed & (timer <= left)
        part = timed & ~fin
        res = phase == RESUME
        paused[fin & res] += timer[fin & res]
        paused[part & res] += left[part & res]
        left[fin] -= timer[fin]
        timer[part] -= left[part]
        left[part] = 0.0
        timer[fin] = 0.0
        phase[fin & (phase == SETUP)] = PRECOPY
        resumed: BoolArray = fin & res
        return resumed

    def _send(self, act: BoolArray, left: FloatArray, rate: FloatArray,
              paused: FloatArray, sent: FloatArray, resume_s: float) -> BoolArray:
        """PRECOPY and STOP_COPY send bytes for the time each row has left; returns
        the rows whose round (pre-copy or stop-and-copy) ended."""
        phase = self.phase
        remaining = self.remaining_bytes
        elapsed = self.elapsed_s
        tr = act & ((phase == PRECOPY) | (phase == STOP_COPY)) & (left > _SPENT_S)
        need = remaining / rate
        fin = tr & (need <= left)
        part = tr & ~fin
        stop_copy = phase == STOP_COPY
        paused[part & stop_copy] += left[part & stop_copy]
        paused[fin & stop_copy] += need[fin & stop_copy]
        moved = rate * left
        sent[part] += moved[part]
        remaining[part] -= moved[part]
        elapsed[part] += left[part]
        left[part] = 0.0
        sent[fin] += remaining[fin]
        elapsed[fin] += need[fin]
        left[fin] -= need[fin]
        remaining[fin] = 0.0
        stopped = fin & stop_copy
        phase[stopped] = RESUME
        self.stop_s[stopped] = elapsed[stopped]
        self.timer_s[stopped] = resume_s
        ended: BoolArray = fin
        return ended

    def _next_rounds(self, ended: BoolArray, cost: PrecopyModel, memory_bytes: FloatArray,
                     dirty_rate_bytes_s: FloatArray) -> None:
        """Rows whose pre-copy round just ended start the next one, or stop-and-copy."""
        pre = ended & (self.phase == PRECOPY)
        if not pre.any():
            return
        self.rounds[pre] += 1
        nxt, stop = cost.next_round(self.round_bytes[pre], self.elapsed_s[pre],
                                    memory_bytes[pre], dirty_rate_bytes_s[pre],
                                    self.rounds[pre])
        self.round_bytes[pre] = nxt
        self.remaining_bytes[pre] = nxt * cost.wire_ratio
        self.elapsed_s[pre] = 0.0
        self.phase[pre] = np.where(stop, STOP_COPY, PRECOPY)

    def pauses(self, progress: Progress, resume_s: float) -> Pauses | None:
        """The sessions paused during the tick `progress` spent, if any."""
        paused = progress.paused_s
        hit = paused > 0
        if not hit.any():
            return None
        still = np.where(progress.done, 0.0,
                         np.where(self.phase == STOP_COPY,
                                  self.remaining_bytes / progress.rate_bytes_s + resume_s,
                                  self.timer_s))
        return Pauses(self.slot[hit], paused[hit], paused[hit] / 2 + still[hit])
