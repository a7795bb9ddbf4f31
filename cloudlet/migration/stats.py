"""What every migration records: rounds, bytes, time, downtime, compression choices.

Why a record of its own: the daemon publishes it on the events topic and in
its metrics, and the benchmark compares it with the lower bound
(`overlay_plus_dirty_bytes`: the overlay, plus every chunk dirtied while the
migration ran, each counted once). Times are seconds from the driver's clock;
the driver stamps the pause and the resumption, the state machine the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoundStats:
    round: int
    chunks: int  # chunks in the round: sent with data, by reference, or as zero
    data_chunks: int  # of which sent with their content
    ref_chunks: int  # of which sent as a digest the destination holds
    raw_bytes: int  # content of the data chunks before compression
    bytes_sent: int  # encoded messages of the round (what went over the channel)
    compression: dict[str, int] = field(default_factory=dict)  # codec label -> batches
    started_s: float = 0.0
    ended_s: float = 0.0  # last ack of the round (or the Final message sent)
    final: bool = False
    call_interval_s: float = 0.0  # auto-converge's spacing of calls as the round began

    @property
    def duration_s(self) -> float:
        return self.ended_s - self.started_s

    @property
    def codec(self) -> str:
        """The codec most of the round's batches used ("none" for an empty round)."""
        return max(self.compression, key=self.compression.__getitem__, default="none")


@dataclass
class MigrationStats:
    migration_id: str
    vm_id: str
    memory_bytes: int = 0
    overlay_bytes: int = 0  # round 0's chunk content (non-zero chunks differing from pristine)
    dirtied_bytes: int = 0  # distinct non-zero chunks dirtied after round 0's capture
    held_chunks: int = 0  # overlay chunks the destination already held (not sent)
    rounds: list[RoundStats] = field(default_factory=list)
    control_bytes: int = 0  # messages other than chunk batches (offer, digests, final...)
    started_s: float = 0.0
    paused_s: float | None = None  # the driver stopped calls at the source
    committed_s: float | None = None  # the source passed the commit point
    resumed_s: float | None = None  # calls served again (at the destination or the source)
    ended_s: float | None = None
    outcome: str = "running"  # "committed", "aborted"
    abort_code: str | None = None
    link_rate_bytes_s: float | None = None  # last measured
    dirty_rate_bytes_s: float | None = None  # last measured (distinct chunks per second)
    max_call_interval_s: float = 0.0  # auto-converge's widest spacing of calls (0: none)
    # Why pre-copy stopped: "small", "fast", "not_shrinking", "byte_budget", "max_rounds".
    stop_reason: str | None = None

    @property
    def bytes_sent(self) -> int:
        return self.control_bytes + sum(r.bytes_sent for r in self.rounds)

    @property
    def overlay_plus_dirty_bytes(self) -> int:
        """The lower bound on bytes a migration without dedup or compression could send."""
        return self.overlay_bytes + self.dirtied_bytes

    @property
    def bytes_per_round(self) -> list[int]:
        return [r.bytes_sent for r in self.rounds]

    @property
    def total_s(self) -> float | None:
        return None if self.ended_s is None else self.ended_s - self.started_s

    @property
    def downtime_s(self) -> float | None:
        """Pause to resumption (or, if the driver stamped no resumption, to the commit)."""
        end = self.resumed_s if self.resumed_s is not None else self.committed_s
        if self.paused_s is None or end is None:
            return None
        return end - self.paused_s

    def mark_paused(self, now_s: float) -> None:
        self.paused_s = now_s

    def mark_resumed(self, now_s: float) -> None:
        self.resumed_s = now_s

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON- and msgpack-ready record (for events, metrics, benchmarks)."""
        d = asdict(self)
        for r, rd in zip(self.rounds, d["rounds"], strict=True):
            rd["codec"] = r.codec
            rd["duration_s"] = r.duration_s
        d.update(bytes_sent=self.bytes_sent, overlay_plus_dirty_bytes=self.overlay_plus_dirty_bytes,
                 bytes_per_round=self.bytes_per_round, total_s=self.total_s,
                 downtime_s=self.downtime_s, round_count=len(self.rounds))
        return d
