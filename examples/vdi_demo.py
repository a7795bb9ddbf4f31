#!/usr/bin/env python3
"""A VDI-style interactive session offloaded to the nearest cloudlet.

A remote-desktop client sends each user interaction (keys typed, pointer moves,
clicks) as a batch of input events to its VM on a cloudlet, which updates the
screen and answers with the regions that changed. What the user feels is the
round trip of each interaction, so this prints its percentiles against the
session's latency budget.

    cloudlet up &                                  # a local metro
    export CLOUDLET_TOKEN=$(cloudlet token --client demo)
    python examples/vdi_demo.py                    # cloudlets found through the broker
    python examples/vdi_demo.py --endpoint http://127.0.0.1:8601 --interactions 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import struct
import sys
import time
from pathlib import Path

from mobile_client import CloudletClient

VDI_IMAGE = Path(__file__).resolve().parent.parent / "workloads" / "vdi.wasm"
EV_KEY, EV_CLICK, EV_MOVE = 1, 2, 3  # the event types of workloads/vdi.c


def interaction(rng: random.Random, width: int, height: int) -> bytes:
    """One user interaction: a few keystrokes, a pointer glide, sometimes a click."""
    events = [struct.pack("<BHH", EV_KEY, rng.randrange(32, 127), 0)
              for _ in range(rng.randint(1, 4))]
    x, y = rng.randrange(width), rng.randrange(height)
    for _ in range(rng.randint(2, 8)):
        x = min(width - 1, max(0, x + rng.randint(-12, 12)))
        y = min(height - 1, max(0, y + rng.randint(-12, 12)))
        events.append(struct.pack("<BHH", EV_MOVE, x, y))
    if rng.random() < 0.2:
        events.append(struct.pack("<BHH", EV_CLICK, x, y))
    return b"".join(events)


async def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("CLOUDLET_TOKEN")
    if not token:
        print("set CLOUDLET_TOKEN (e.g. $(cloudlet token --client demo)) or pass --token",
              file=sys.stderr)
        return 2
    broker = None if args.endpoint else args.broker
    rng = random.Random(args.seed)
    async with CloudletClient(token, endpoints=args.endpoint, broker=broker) as client:
        if broker:
            await client.discovery.wait_for(lambda d: bool(d.online()), 5.0)
        async with client.session(VDI_IMAGE, budget_ms=args.budget_ms) as s:
            await s.call("vdi_init", args.width, args.height)
            print(f"VDI session: VM {s.vm_id} on {s.location.node}, "
                  f"{args.width}x{args.height} screen, budget {args.budget_ms:g} ms")
            regions = 0
            period_s = 1 / args.rate_hz
            next_at = time.perf_counter()
            for _ in range(args.interactions):
                dirty = await s.call("vdi_events", interaction(rng, args.width, args.height))
                assert isinstance(dirty, bytes)
                regions += struct.unpack_from("<H", dirty)[0]
                next_at += period_s
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            checksum = await s.call("vdi_checksum")
            st = s.stats()
    print(f"{args.interactions} interactions, {regions} screen regions redrawn, "
          f"screen checksum {checksum & 0xFFFFFFFF:08x}")
    print(f"latency p50 {st.p50_ms:.2f} ms, p95 {st.p95_ms:.2f} ms, p99 {st.p99_ms:.2f} ms; "
          f"{st.within_budget:.1%} within the {args.budget_ms:g} ms budget; "
          f"{st.moves_followed} moves followed, {st.reconnects} reconnects")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", action="append", default=[], metavar="URL")
    parser.add_argument("--broker", default=os.environ.get("CLOUDLET_BROKER")
                        or "mqtt://127.0.0.1:1883",
                        help="where cloudlets announce themselves (default $CLOUDLET_BROKER, "
                             "else cloudlet up's default)")
    parser.add_argument("--token")
    parser.add_argument("--interactions", type=int, default=300)
    parser.add_argument("--rate-hz", type=float, default=60.0,
                        help="interactions per second (a 60 Hz display)")
    parser.add_argument("--budget-ms", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
