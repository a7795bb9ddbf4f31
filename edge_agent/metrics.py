"""Prometheus metrics of one daemon, in the text format at `/metrics`.

prometheus_client does the exposition format and the histogram bookkeeping
well and cheaply (~1 us an observation); a registry per daemon keeps tests
that run several daemons in one process apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Call latencies of interest run from tens of microseconds (a WebSocket call) to
# the deadline; buckets spaced so p50/p99 of interactive calls are resolvable.
TRANSPORTS = ("http", "ws")
LATENCY_BUCKETS_S = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3,
                     50e-3, 100e-3, 250e-3, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.vms = Gauge("cloudlet_vms", "VMs hosted", registry=r)
        self.memory = Gauge("cloudlet_vm_memory_bytes", "Linear memory of all VMs", registry=r)
        self.images = Gauge("cloudlet_images", "Images in the store", registry=r)
        self.calls = Counter("cloudlet_calls", "Calls applied or rejected",
                             ["transport", "outcome"], registry=r)
        self.latency = Histogram("cloudlet_call_latency_seconds",
                                 "Call latency inside the daemon, request in to answer out",
                                 ["transport"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.errors = Counter("cloudlet_errors", "Error answers by code", ["code"], registry=r)
        self.checkpoints = Counter("cloudlet_checkpoints", "VM checkpoints written", registry=r)
        self.mqtt_connected = Gauge("cloudlet_mqtt_connected",
                                    "1 while connected to the broker", registry=r)

        # Children bound once: a labels() lookup costs ~1 us, on every call otherwise.
        self.call_outcome = {(t, o): self.calls.labels(t, o)
                             for t in TRANSPORTS for o in ("ok", "error")}
        self.call_latency = {t: self.latency.labels(t) for t in TRANSPORTS}

    def render(self) -> bytes:
        return generate_latest(self.registry)
