"""What trust costs on the control plane: sealing and checking one message.

    python benchmarks/control_plane.py [--quick]

Measures, on this machine and in one run, for a typical message of each kind
(a presence, a migrate command, a telemetry report of 100 VMs):

- `seal`: what a cloudlet pays to publish it (msgpack, Ed25519 sign);
- `open`: checking the certificate (cached after the first) and the signature;
- `gate`: everything a receiver does before acting (open, the rules, replay);
- baselines measured in the same run: decoding the unsigned message as it was
  before (msgpack only), and HMAC-SHA256 over the same bytes (the symmetric
  scheme we did not choose; see docs/security.md).

Writes `benchmarks/results/control_plane.json` with `sign_us`, `verify_us` and
`gate_us` (per-message medians, the presence message) plus the full table.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudlet.protocol import (
    command_message,
    commands_topic,
    presence_message,
    presence_topic,
    telemetry_message,
    telemetry_topic,
)
from cloudlet.trust.certs import (
    ROLE_CLOUDLET,
    ROLE_ORCHESTRATOR,
    CertificateAuthority,
    CertificateVerifier,
)
from cloudlet.trust.gate import ControlGate
from cloudlet.trust.keys import SigningKey
from cloudlet.trust.sealed import Identity, open_sealed, seal

RESULTS = Path(__file__).resolve().parent / "results" / "control_plane.json"


def per_call_us(fn: Callable[[int], object], n: int, repeats: int) -> tuple[float, float]:
    """Median and spread (max/min) of the per-call time over `repeats` batches of `n`."""
    batches = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(n):
            fn(i)
        batches.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(batches), max(batches) / min(batches)


def messages(node: str) -> dict[str, tuple[str, dict[str, Any]]]:
    per_vm = {f"{i:016x}": {"calls_per_s": 12.5, "dirty_chunks_per_s": 3.0,
                            "memory_bytes": 64 << 20} for i in range(100)}
    return {
        "presence": (presence_topic(node), presence_message(
            node, "http://10.0.0.7:8601", session="0123456789abcdef", position_m=(1200.0, 80.0),
            zone="north", capacity={"max_vms": 1000, "max_memory_bytes": 8 << 30}, vms=12,
            refresh_s=30.0)),
        "command": (commands_topic(node), command_message(
            "migrate", command_id="c-000042", epoch=7, vm="0123456789abcdef", to="harbor")),
        "telemetry (100 VMs)": (telemetry_topic(node), telemetry_message(
            node, vms=100, memory_bytes=100 << 26, calls_per_s=1250.0, load=0.7,
            per_vm=per_vm)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    n, repeats = (300, 5) if args.quick else (3000, 9)
    authority = CertificateAuthority(SigningKey.generate())
    verifier = CertificateVerifier(authority.public_key)
    key = SigningKey.generate()
    me = Identity.load(key, authority.issue("downtown", [ROLE_CLOUDLET, ROLE_ORCHESTRATOR],
                                            key.public_bytes), verifier)
    hmac_key = b"k" * 32
    rows: list[dict[str, Any]] = []
    print(f"{'message':<22}{'bytes':>7}{'unsigned':>10}{'hmac':>8}{'seal':>8}{'open':>8}"
          f"{'gate':>8}  (us per message, median of {repeats} x {n})")
    for name, (topic, body) in messages("downtown").items():
        plain = msgpack.packb(body)
        sealed = seal(me, topic, body)
        # Each gate call needs a fresh message (a replayed one is refused): seal them first.
        fresh = [seal(me, topic, body) for _ in range(n)]
        unsigned_us, _ = per_call_us(lambda i, p=plain: msgpack.unpackb(p), n, repeats)
        hmac_us, _ = per_call_us(
            lambda i, p=plain: hmac.new(hmac_key, p, hashlib.sha256).digest(), n, repeats)
        seal_us, seal_spread = per_call_us(lambda i, t=topic, b=body: seal(me, t, b), n,
                                           repeats)
        open_us, open_spread = per_call_us(
            lambda i, t=topic, s=sealed: open_sealed(verifier, t, s), n, repeats)
        gate_runs = []
        for _ in range(repeats):
            gate = ControlGate(verifier, window_s=3600)
            started = time.perf_counter()
            for raw in fresh:
                gate.admit(topic, raw)
            gate_runs.append((time.perf_counter() - started) / n * 1e6)
        gate_us = statistics.median(gate_runs)
        row = {"message": name, "bytes_unsigned": len(plain), "bytes_sealed": len(sealed),
               "unsigned_decode_us": unsigned_us, "hmac_us": hmac_us, "seal_us": seal_us,
               "seal_spread": seal_spread, "open_us": open_us, "open_spread": open_spread,
               "gate_us": gate_us, "gate_spread": max(gate_runs) / min(gate_runs)}
        rows.append(row)
        print(f"{name:<22}{len(sealed):>7}{unsigned_us:>10.1f}{hmac_us:>8.1f}{seal_us:>8.1f}"
              f"{open_us:>8.1f}{gate_us:>8.1f}")
    presence = rows[0]
    out = {"sign_us": presence["seal_us"], "verify_us": presence["open_us"],
           "gate_us": presence["gate_us"], "quick": args.quick, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nsigning one presence costs {presence['seal_us']:.0f} us, checking it "
          f"{presence['open_us']:.0f} us ({presence['gate_us']:.0f} us with every rule); "
          f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
