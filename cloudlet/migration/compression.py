"""Per-round compression chosen from what is measured, as in Elijah's adaptive VM handoff.

Why: compression only pays when the link, not the CPU, is the bottleneck. On
loopback (GB/s) zstd would add CPU time to every round and to the downtime; on
a 25 Mbit/s link a level that halves the bytes halves the round. So each round
measures, on a sample of its own chunks, the CPU cost per chunk and the ratio of
each candidate, and each batch takes the candidate with the least estimated
time: CPU to compress it plus its compressed bytes over the measured link rate.

The link rate comes from the destination's acks (bytes acknowledged per second
while batches were in flight), so it includes everything that limits a round:
the wire, the proxy, the destination's CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from cloudlet.vm import chunks

# zstd levels tried. 1 is the fastest (~1 GB/s here); 3 is zstd's default; 9
# still compresses at tens of MB/s, well above any link we would need it on.
# Higher levels cost 10-100x the CPU for a few percent more.
CANDIDATE_LEVELS: tuple[int, ...] = (1, 3, 9)
SAMPLE_CHUNKS = 32  # 128 KiB: enough for a stable ratio, ~1-3 ms to try all levels
# Before any ack has measured the link, assume it is slow enough that level 1
# pays when the data compresses at all (round 0's first batches, then measured).
UNMEASURED_RATE_BYTES_S = 50e6
RATE_SMOOTHING = 0.5  # weight of the newest measurement (EWMA)
MIN_MEASURE_BYTES = 64 * 1024  # shorter spans are dominated by latency, not rate


@dataclass(frozen=True)
class Codec:
    name: str  # "none" or "zstd"
    level: int = 0

    @property
    def label(self) -> str:
        return "none" if self.name == "none" else f"zstd-{self.level}"


NONE = Codec("none")


@dataclass(frozen=True)
class CodecCost:
    codec: Codec
    cpu_s_per_chunk: float
    ratio: float  # compressed / raw


class LinkMeter:
    """Throughput of the link as seen through acks (bytes per second, smoothed)."""

    def __init__(self) -> None:
        self.rate_bytes_s: float | None = None
        self._span_bytes = 0
        self._span_start_s: float | None = None

    def busy(self, now_s: float) -> None:
        """Batches went in flight (from idle): start a measurement span."""
        if self._span_start_s is None:
            self._span_start_s = now_s
            self._span_bytes = 0

    def acked(self, size_bytes: int, now_s: float, idle: bool) -> None:
        if self._span_start_s is None:
            return
        self._span_bytes += size_bytes
        elapsed_s = now_s - self._span_start_s
        if self._span_bytes >= MIN_MEASURE_BYTES and elapsed_s > 0:
            sample = self._span_bytes / elapsed_s
            self.rate_bytes_s = sample if self.rate_bytes_s is None else (
                RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * self.rate_bytes_s)
            self._span_start_s, self._span_bytes = now_s, 0
        if idle:
            self._span_start_s = None


class CompressionChooser:
    """Measures candidates on a round's sample; picks a codec per batch."""

    def __init__(self, levels: tuple[int, ...] = CANDIDATE_LEVELS, *,
                 clock: Callable[[], float] = time.perf_counter,
                 enabled: bool = True) -> None:
        self.levels = levels
        self.enabled = enabled
        self._clock = clock
        self._compressors = {lvl: zstandard.ZstdCompressor(level=lvl) for lvl in levels}
        self.costs: list[CodecCost] = [CodecCost(NONE, 0.0, 1.0)]

    def measure(self, data: bytes) -> None:
        """Measure every candidate on a sample of `data` (a round's chunk data)."""
        self.costs = [CodecCost(NONE, 0.0, 1.0)]
        if not self.enabled or not data:
            return
        n = len(data) // chunks.CHUNK_BYTES
        if n > SAMPLE_CHUNKS:  # spread the sample over the round, not just its start
            step = n // SAMPLE_CHUNKS
            view = memoryview(data)
            sample = b"".join(view[i * step * chunks.CHUNK_BYTES :][: chunks.CHUNK_BYTES]
                              for i in range(SAMPLE_CHUNKS))
        else:
            sample = data
        count = len(sample) // chunks.CHUNK_BYTES
        for level, comp in self._compressors.items():
            start = self._clock()
            out = comp.compress(sample)
            cpu_s = max(self._clock() - start, 0.0)
            self.costs.append(CodecCost(Codec("zstd", level), cpu_s / count,
                                        len(out) / len(sample)))

    def choose(self, n_chunks: int, rate_bytes_s: float | None) -> Codec:
        """The candidate with the least CPU + transfer time for `n_chunks` chunks."""
        rate = rate_bytes_s or UNMEASURED_RATE_BYTES_S
        raw = n_chunks * chunks.CHUNK_BYTES
        return min(self.costs,
                   key=lambda c: n_chunks * c.cpu_s_per_chunk + raw * c.ratio / rate).codec

    def compress(self, codec: Codec, data: bytes) -> bytes:
        if codec.name == "none":
            return data
        out: bytes = self._compressors[codec.level].compress(data)
        return out


def decompress(name: str, payload: bytes, raw_bytes: int) -> bytes:
    """Decompress at most `raw_bytes` (+1 to catch a lie): never trust a frame's size."""
    if name == "none":
        return payload
    if name != "zstd":
        raise ValueError(f"unknown compression {name!r}")
    # Not `decompress(max_output_size=...)`: it trusts a frame's own size claim.
    with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
        out: bytes = reader.read(raw_bytes + 1)
    return out
