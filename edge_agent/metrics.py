"""Prometheus metrics of one daemon, in the text format at `/metrics`.

prometheus_client does the exposition format and the histogram bookkeeping
well and cheaply (~1 us an observation); a registry per daemon keeps tests
that run several daemons in one process apart.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edge_agent.storage import StorageHealth

# Call latencies of interest run from tens of microseconds (a WebSocket call) to
# the deadline; buckets spaced so p50/p99 of interactive calls are resolvable.
TRANSPORTS = ("http", "ws")
LATENCY_BUCKETS_S = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3,
                     50e-3, 100e-3, 250e-3, 1.0, 5.0)


MIGRATION_PAUSE_BUCKETS_S = (1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 300e-3, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.vms = Gauge("cloudlet_vms", "VMs hosted", registry=r)
        self.memory = Gauge("cloudlet_vm_memory_bytes", "Linear memory of all VMs", registry=r)
        self.images = Gauge("cloudlet_images", "Images in the store", registry=r)
        self.calls = CallStats()
        r.register(self.calls)
        self.errors = Counter("cloudlet_errors", "Error answers by code", ["code"], registry=r)
        self.checkpoints = Counter("cloudlet_checkpoints", "VM checkpoints written", registry=r)
        self.head_timeouts = Counter(
            "cloudlet_connections_timed_out",
            "Connections closed for not sending a request head within header_timeout_s",
            registry=r)
        self.mqtt_connected = Gauge("cloudlet_mqtt_connected",
                                    "1 while connected to the broker", registry=r)
        self.control_dropped = Counter(
            "cloudlet_control_dropped", "Control-plane messages not believed (unsigned, "
            "forged, stale, replayed, from a signer without the role), by reason",
            ["reason"], registry=r)
        self.migrations = Counter("cloudlet_migrations", "VMs moved away, by mode and outcome",
                                  ["mode", "outcome"], registry=r)
        self.migration_bytes = Counter("cloudlet_migration_bytes",
                                       "Bytes sent by migrations", registry=r)
        self.migration_paused = Histogram(
            "cloudlet_migration_paused_seconds", "How long a moving VM was paused",
            buckets=MIGRATION_PAUSE_BUCKETS_S, registry=r)
        self.migration_rounds = Histogram("cloudlet_migration_rounds", "Rounds per migration",
                                          buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)

    def watch_storage(self, storage: StorageHealth) -> None:
        """Export whether state writes succeed (read at scrape time, like the calls)."""
        self.registry.register(StorageStats(storage))

    def record_migration(self, event: dict[str, Any]) -> None:
        """From a `migrated` event (edge_agent.handoff)."""
        mode = str(event.get("mode", "live"))
        if not event.get("ok"):
            self.migrations.labels(mode, "aborted").inc()
            return
        self.migrations.labels(mode, "committed").inc()
        self.migration_bytes.inc(float(event.get("bytes_sent", 0)))
        self.migration_paused.observe(float(event.get("paused_ms", 0.0)) / 1000)
        self.migration_rounds.observe(float(event.get("rounds", 1)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CallStats(Collector):
    """Call counts and the latency histogram: the per-call hot path.

    prometheus_client's Counter and Histogram take a lock per update and walk the
    buckets, ~2 us a call together; at tens of thousands of calls a second that is
    several percent of the daemon. Calls are only recorded on the event loop's
    thread, so plain integers and one bisect suffice; this collector renders them
    in the same exposition format at scrape time.
    """

    def __init__(self) -> None:
        self._tallies = {t: CallTally() for t in TRANSPORTS}

    def tally(self, transport: str) -> CallTally:
        """One transport's counts: a stream holds its `record` for every call."""
        return self._tallies[transport]

    def record(self, transport: str, ok: bool, latency_s: float) -> None:
        self._tallies[transport].record(ok, latency_s)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        calls = CounterMetricFamily("cloudlet_calls", "Calls applied or rejected",
                                    labels=["transport", "outcome"])
        for transport, tally in self._tallies.items():
            calls.add_metric([transport, "ok"], tally.ok)
            calls.add_metric([transport, "error"], tally.error)
        yield calls
        latency = HistogramMetricFamily(
            "cloudlet_call_latency_seconds",
            "Call latency inside the daemon, request in to answer out", labels=["transport"])
        for transport, tally in self._tallies.items():
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], tally.buckets,
                                strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([transport], buckets, tally.sum_s)
        yield latency


class CallTally:
    """One transport's call counts and latency buckets, as plain numbers."""

    __slots__ = ("buckets", "error", "ok", "sum_s")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def record(self, ok: bool, latency_s: float) -> None:
        if ok:
            self.ok += 1
        else:
            self.error += 1
        self.buckets[bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.sum_s += latency_s


class StorageStats(Collector):
    """`cloudlet_storage_ok` (1 while state writes succeed, 0 while degraded) and
    `cloudlet_storage_failures_total` by where the failed write came from. Kept by
    `StorageHealth`, which the daemon needs anyway for /health: one count, two views."""

    def __init__(self, storage: StorageHealth) -> None:
        self.storage = storage

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily("cloudlet_storage_ok",
                                "1 while the cloudlet's state writes succeed, 0 while degraded",
                                value=1 if self.storage.ok else 0)
        failures = CounterMetricFamily("cloudlet_storage_failures",
                                       "State writes that failed (disk full or failing)",
                                       labels=["what"])
        for what, n in self.storage.failures_total.items():
            failures.add_metric([what], n)
        yield failures
