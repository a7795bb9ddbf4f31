"""What a live migration costs: bytes, time and downtime under pre-copy.

A placer that ignores migration cost ping-pongs and floods the backhaul; one that
guesses it wrong starts handoffs too late. This model follows the same steps as
the migration state machine (docs/migration.md), so its estimate can be set
against what a live migration measures:

    B  = bandwidth_mbit_s * 1e6 / 8          wire bytes per second
    r  = wire_ratio                          wire bytes per byte of state
    c  = send_s_per_gib / GiB                the source's own seconds per wire byte
    n  = source_sharing                      migrations the source sends at once (>= 1)
    k  = r * (1 / B + n * c)                 seconds per byte of state a round carries
    q  = dirty_rate_bytes_s * k              dirty bytes made per byte sent
    S  = setup_s + setup_s_per_gib * memory_bytes / GiB     before round 0
    V0 = overlay_bytes                       round 0: what the destination lacks
    Vi = min(q * V(i-1), memory_bytes)       round i: chunks dirtied meanwhile
    stop at the first i >= 1 with Vi <= stop_bytes, or Vi >= V(i-1) (no progress,
    q >= 1), or i == max_rounds; round i is then the stop-and-copy round:

    precopy_s  = S + k * (V0 + ... + V(i-1))  (the VM keeps serving)
    downtime_s = k * Vi + resume_s            (the VM is paused)
    duration_s = precopy_s + downtime_s
    wire_bytes = r * (V0 + ... + Vi)

The setup S is what a live migration does before its first byte of state: the
identity proof, the connection, the checkpoint it starts from and the first
capture and digest of the whole memory (benchmarks/results/migration.json: ~0.4 s
for 64 MiB, ~2 s for 256 MiB of dense memory, on two shared cores). `c` is the
source's own work per byte it sends (reading the chunks, compressing, framing,
the socket), in series with the link: on loopback it is the whole round time
(~80 MiB/s on those two cores), on a 25 Mbit/s link a few per cent of it. It is
per wire byte, not per byte of state: 256 MiB of memory that compresses 35x
crosses loopback in a fraction of the time the same size of dense memory takes.
It is also one source's: migrations leaving one cloudlet at once share it (`n`),
as they share a link's bandwidth (the simulator counts both as they overlap; a
live emulation showed two moves out of one cloudlet taking ~1.5x as long as one).
All three default to 0 (the model as it was before live measurements); `cloudlet
calibrate` fits them to live migrations.

For q < 1 the series is geometric and has a closed form, so one call estimates
10,000 migrations with a few array operations (`estimate`); the simulator runs
the same rounds one at a time under changing shared bandwidth (`next_round`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement import kernels

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

MiB = 1 << 20
GiB = float(1 << 30)
# Stop-and-copy once the dirty set fits in 1 MiB: at 1 Gbit/s that is ~8 ms of
# downtime, below one interaction's budget.
STOP_BYTES = 1 * MiB
# Pre-copy rounds before forcing stop-and-copy: convergence is geometric, so a VM
# that has not converged by then (dirty rate near the bandwidth) never will.
MAX_ROUNDS = 30
# Restore at the destination plus the commit message: a restore of a few MiB
# takes a few ms (benchmarks/results/vm_runtime.json), the commit one RTT.
RESUME_S = 0.010


# From this many moves, `estimate` prices each run of equal inputs once.
DEDUP_MIN_MOVES = 4096


class MigrationEstimate(NamedTuple):
    """Arrays, one entry per migration: the model's answer."""

    wire_bytes: FloatArray
    precopy_s: FloatArray
    downtime_s: FloatArray
    duration_s: FloatArray
    rounds: IntArray  # pre-copy rounds, round 0 included; stop-and-copy not counted
    setup_s: FloatArray  # part of precopy_s: before round 0 (the VM keeps serving)


def each_move(runs: MigrationEstimate, run: IntArray) -> MigrationEstimate:
    """Per-run estimates (`PrecopyModel.estimate_runs`) as each move's, shaped as `run`."""
    if run.size and (run.min() < 0 or run.max() >= len(runs.duration_s)):
        raise InvalidArgument("each_move: a run index past the runs")
    out = kernels.take_runs(run.ravel(), runs.wire_bytes, runs.precopy_s, runs.downtime_s,
                            runs.duration_s, runs.setup_s,
                            np.asarray(runs.rounds, dtype=np.int64))
    shape = run.shape
    return MigrationEstimate(
        wire_bytes=out[0].reshape(shape), precopy_s=out[1].reshape(shape),
        downtime_s=out[2].reshape(shape), duration_s=out[3].reshape(shape),
        rounds=out[5].reshape(shape), setup_s=out[4].reshape(shape))


class RoundVolumes(NamedTuple):
    """Bytes of state the rounds carry (before `wire_ratio`), one entry per migration."""

    precopy_bytes: FloatArray  # V0 + ... + V(i-1)
    final_bytes: FloatArray  # Vi, the stop-and-copy round
    rounds: IntArray  # i
    seconds_per_byte: FloatArray  # k = r * (1 / B + c)


@dataclass(frozen=True)
class PrecopyModel:
    """Parameters of pre-copy; every field is documented in docs/placement.md."""

    stop_bytes: float = STOP_BYTES
    max_rounds: int = MAX_ROUNDS
    resume_s: float = RESUME_S
    wire_ratio: float = 1.0
    setup_s: float = 0.0
    setup_s_per_gib: float = 0.0
    send_s_per_gib: float = 0.0

    def __post_init__(self) -> None:
        for name in ("setup_s", "setup_s_per_gib", "send_s_per_gib"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise InvalidArgument(f"{name} must be a finite number >= 0 (got {value})")
        if not self.stop_bytes >= 0:
            raise InvalidArgument(f"stop_bytes must be >= 0 (got {self.stop_bytes})")
        if self.max_rounds < 1:
            raise InvalidArgument(f"max_rounds must be >= 1 (got {self.max_rounds})")
        if not self.resume_s >= 0:
            raise InvalidArgument(f"resume_s must be >= 0 (got {self.resume_s})")
        if not self.wire_ratio > 0:
            raise InvalidArgument(f"wire_ratio must be > 0 (got {self.wire_ratio})")

    @property
    def send_s_per_byte(self) -> float:
        """`c`: the source's own seconds per wire byte, besides the link's."""
        return self.send_s_per_gib / GiB

    def setup_time_s(self, memory_bytes: FloatArray) -> FloatArray:
        """`S`: seconds before round 0 for a VM of this memory."""
        out: FloatArray = self.setup_s + self.setup_s_per_gib * (
            np.asarray(memory_bytes, dtype=np.float64) / GiB)
        return out

    def volumes(self, overlay_bytes: FloatArray, memory_bytes: FloatArray,
                dirty_rate_bytes_s: FloatArray, bandwidth_mbit_s: FloatArray,
                source_sharing: FloatArray | float = 1.0) -> RoundVolumes:
        """The closed form of the rounds above, at a constant bandwidth (broadcasts)."""
        v0, mem, dirty, bw, share = np.broadcast_arrays(
            np.asarray(overlay_bytes, dtype=np.float64),
            np.asarray(memory_bytes, dtype=np.float64),
            np.asarray(dirty_rate_bytes_s, dtype=np.float64),
            np.asarray(bandwidth_mbit_s, dtype=np.float64),
            np.maximum(np.asarray(source_sharing, dtype=np.float64), 1.0))
        rate = np.maximum(bw, 1e-9) * (1e6 / 8.0)
        k = self.wire_ratio * (1.0 / rate + share * self.send_s_per_byte)
        q = dirty * k
        converging = q < 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            # First i >= 1 with V0 q^i <= stop_bytes.
            need = np.log(np.maximum(self.stop_bytes, 1e-300) / v0) / np.log(q)
            need = np.where((v0 <= self.stop_bytes) | (q <= 0.0), 1.0, need)
            need = np.where(np.isfinite(need), need, float(self.max_rounds))
        i_stop = np.clip(np.ceil(need - 1e-9), 1, self.max_rounds)
        i_stop = np.where(converging, i_stop, 1.0)
        qi = np.where(converging, q ** i_stop, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            series = np.where(converging & (q > 0), (1.0 - qi) / (1.0 - q), 1.0)
        final = np.where(converging, v0 * qi, np.minimum(q * v0, mem))
        return RoundVolumes(precopy_bytes=v0 * series, final_bytes=final,
                            rounds=i_stop.astype(np.int64), seconds_per_byte=k)

    def estimate(self, overlay_bytes: FloatArray, memory_bytes: FloatArray,
                 dirty_rate_bytes_s: FloatArray, bandwidth_mbit_s: FloatArray,
                 source_sharing: FloatArray | float = 1.0) -> MigrationEstimate:
        """Time, downtime and bytes of the rounds above, at a constant bandwidth, with
        `source_sharing` migrations leaving the source at once (1: alone)."""
        runs, run = self.estimate_runs(overlay_bytes, memory_bytes, dirty_rate_bytes_s,
                                       bandwidth_mbit_s, source_sharing)
        return runs if run is None else each_move(runs, run)

    def estimate_runs(self, overlay_bytes: FloatArray, memory_bytes: FloatArray,
                      dirty_rate_bytes_s: FloatArray, bandwidth_mbit_s: FloatArray,
                      source_sharing: FloatArray | float = 1.0
                      ) -> tuple[MigrationEstimate, IntArray | None]:
        """`estimate`, once per run of equal inputs: (the estimate of each run, each
        move's run, shaped as the inputs broadcast), or (each move's estimate, None)
        where runs would not pay. A placer prices each session's candidates side by
        side, and they mostly share a path bandwidth and a workload; numpy's
        elementwise results do not depend on an element's position, so the answers
        are the same."""
        raw = [np.asarray(x, dtype=np.float64) for x in (overlay_bytes, memory_bytes,
                                                         dirty_rate_bytes_s, bandwidth_mbit_s,
                                                         source_sharing)]
        shape = np.broadcast_shapes(*(x.shape for x in raw))
        args = [np.broadcast_to(x, shape) for x in raw]
        if math.prod(shape) < DEDUP_MIN_MOVES or len(shape) > 2:
            return self._estimate(*args), None
        views = [x if x.ndim == 2 else x.reshape(1, -1) for x in args]
        starts, run = kernels.runs_of_equal(*views)
        if len(starts) > len(run) // 2:
            return self._estimate(*args), None
        at = np.unravel_index(starts, views[0].shape)
        return self._estimate(*(x[at] for x in views)), run.reshape(shape)

    def _estimate(self, overlay_bytes: FloatArray, memory_bytes: FloatArray,
                  dirty_rate_bytes_s: FloatArray, bandwidth_mbit_s: FloatArray,
                  source_sharing: FloatArray | float = 1.0) -> MigrationEstimate:
        vol = self.volumes(overlay_bytes, memory_bytes, dirty_rate_bytes_s, bandwidth_mbit_s,
                           source_sharing)
        setup_s = np.broadcast_to(self.setup_time_s(memory_bytes),
                                  vol.precopy_bytes.shape).astype(np.float64)
        precopy_s = setup_s + vol.seconds_per_byte * vol.precopy_bytes
        downtime_s = vol.seconds_per_byte * vol.final_bytes + self.resume_s
        return MigrationEstimate(
            wire_bytes=self.wire_ratio * (vol.precopy_bytes + vol.final_bytes),
            precopy_s=precopy_s,
            downtime_s=downtime_s,
            duration_s=precopy_s + downtime_s,
            rounds=vol.rounds,
            setup_s=setup_s,
        )

    def next_round(self, sent_bytes: FloatArray, round_s: FloatArray,
                   memory_bytes: FloatArray, dirty_rate_bytes_s: FloatArray,
                   rounds_done: IntArray) -> tuple[FloatArray, NDArray[np.bool_]]:
        """After a pre-copy round: the next round's bytes, and whether it is stop-and-copy.

        `sent_bytes` is the state the round carried and `round_s` how long it took;
        the simulator calls this when a round ends under whatever bandwidth it got.
        """
        nxt: FloatArray = np.minimum(dirty_rate_bytes_s * round_s, memory_bytes)
        stop = ((nxt <= self.stop_bytes) | (nxt >= sent_bytes)
                | (rounds_done >= self.max_rounds))
        return nxt, stop
