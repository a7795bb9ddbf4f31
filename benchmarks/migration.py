"""Benchmark of live migration between two real daemons, against plain stop-and-copy.

Prints a table and writes benchmarks/results/migration.json, and beside it
migration_records.jsonl: one migration record per live run (the keys
`cloudlet calibrate` reads: memory, overlay, dirty rate, link rate, measured
duration, downtime, wire bytes, rounds; loopback as 10,000 Mbit/s). Each case is a
memhog guest of 64 or 256 MiB, a dirty rate (0, 1 or 10 MiB/s) and a link
(loopback, or 100 or 25 Mbit/s). Per case, two fresh `cloudlet agent` processes
(source and destination, their own processes and state directories, one cluster
secret) and, for a throttled link, a `cloudlet.linkproxy.LinkProxy` in a third
process: the source reaches the destination only through it (its URL is the
migrate `endpoint`), so every migration byte crosses a token bucket at the
link's rate, in both directions.

Each case is run twice on the same pair of daemons, with the same guest content:
`POST /v1/vms/{vm}/migrate {"endpoint", "mode": "live"}` (pre-copy) and then
`{"mode": "stop_and_copy"}` (pause, one whole snapshot, resume at the
destination: the baseline). For each run, this process (the client, uvloop)
opens an SDK session (`mobile_client.CloudletClient`) that creates the VM at the
source, grows it to the size (`hog_grow`) and writes every page of it, then
calls `hog_dirty(n, seed)` every millisecond for the whole migration, `n` drawn
so the guest dirties distinct random 4 KiB pages at the case's rate (while the
VM is served: a paused VM dirties nothing, and the calls do not "catch up").
The session follows the VM to the destination by itself (the `moved` notice);
the client keeps calling there for half a second, then checks that the VM's
sequence number equals the last call's (no call lost or applied twice).

Guest memory. `hog_grow` leaves pages zero; every page is then written, so the
overlay is the whole region. memhog has no "fill with random bytes"; its
`hog_dirty` writes 16 pseudo-random words per page (8 at the page's head, 8 at
random offsets), so one pass over all pages leaves pages that zstd shrinks ~40x.
The "dense" fill makes 300 passes over every page (seeded, so reproducible):
~87% of each page's words are then random, and zstd level 1 saves only ~8%
(ratio 1.08, measured on this guest), i.e. close to incompressible, like real
heaps of compressed or encrypted data. The "sparse" fill is the single pass
(~40x under zstd). Dirtied pages keep their density (hog_dirty rewrites 16
words of a page). Every run uses fresh seeds per case, so the destination's
chunk store (dedup across migrations) never holds a case's chunks beforehand.

The full run is the target matrix with dense memory (the hard case for bytes
and time: 256 MiB over 25 Mbit/s is ~80 s of data per migration), plus, as
extras, the three 256 MiB cases over 25 Mbit/s with the sparse fill: only ~7 MiB
then cross the link (~2.4 s), so the fixed costs of a migration (the checkpoint
it starts with, capturing and digesting 256 MiB, restoring at the destination)
show instead of hiding behind the transfer. Their rows say `fill: sparse`; the
targets are judged on the matrix; the extras' figures are reported beside them
(`target_figures.extras`), misses included. About 25 minutes in all.
`--no-extras` leaves the extras out; `--quick` runs the 64 MiB loopback cases
(dense) only.

What is measured, per run:

- downtime_ms: the destination's `arrival_downtime_ms` from `GET /v1/vms/{vm}`
  (live runs): the source's last call (its pause) to the first call served at
  the destination, downtime as the user sees it; `paused_ms` is the source's
  own figure (paused until the commit).
- client_gap_ms / stop_and_copy_downtime_ms: as the client sees it, the last
  call answered by the source to the first answered by the destination
  (completion times in this process); the same measure for both modes, since a
  stop-and-copy destination does not set `arrival_downtime_ms`. A call is
  attributed to the destination if the session had followed the move when its
  answer came (the old place's answers all precede its `moved` notice, with the
  pause between them; the new place's follow it, whether the call was sent
  there, resent there, or written on the standby stream during the pause).
- total_s, bytes_sent, overlay_plus_dirty_bytes, rounds, bytes_per_round: the
  migrate call's answer (the source's `MigrationStats`); stop_and_copy_bytes is
  the snapshot's size (zstd when it saves 10%, as the daemon decides).
- precopy_max_stall_ms: the longest wait between two calls answered at the
  source while pre-copy ran (the rounds' captures hold the VM).

The downtime series (also in `--quick`): the 64 MiB, 1 MiB/s loopback case
again, as a distribution rather than one run. One pair of daemons, one SDK
session and one dense 64 MiB memhog VM, which is live-migrated back and forth
between the two (`SERIES_MOVES` moves, ping-pong) while the client calls
`hog_dirty` every millisecond at 1 MiB/s, the client's session following each
move by itself (the `moving` notice opens its standby stream to the
destination during pre-copy; `moved` switches onto it). Per move: the gap the
client saw, from the last call answered at the source to the first answered at
the destination (completion times in this process), beside the source's
`paused_ms` and the destination's `arrival_downtime_ms`. The series is run
`SERIES_RUNS` times (2 in `--quick`), each on a fresh pair of daemons, and the
figures pool every move: top-level `loopback_downtime_p50_ms`,
`loopback_downtime_p99_ms` (nearest rank: with ~72 moves, the worst one),
`loopback_downtime_n` and each run's p50 (`loopback_downtime_run_p50s_ms`, the
spread); `series.runs[k].moves` holds every move. Alternated with these runs,
the same runs with the source daemon pinned to one CPU and the destination to
another (the client free on either), as two cloudlets would be two hosts:
`loopback_downtime_pinned_p50_ms` and `..._p99_ms`, reported beside the
unpinned figures, never instead (the targets are judged unpinned);
`series_pinned` holds its runs. With fewer than two CPUs there is no pinned
set (the keys are null). A VM that comes
back to a cloudlet finds its chunks in that cloudlet's chunk store after the
first round trip, so later moves send fewer bytes in pre-copy; the pause (the
final round, the commit) and the switch are what the figures measure, and they
do not depend on that. At the end the VM's sequence
number must equal the client's last call, as in every run.

Targets: downtime under 10 ms on loopback for 64 MiB at 1 MiB/s, and
under 50 ms on the 25 Mbit/s link (64 MiB, 1 MiB/s); bytes sent within 1.1x of
overlay_plus_dirty_bytes (every live run); total time within 1.3x of
bytes_sent / link rate on the throttled links (every live run there).

Settings and caveats: the daemons' periodic checkpoint is set to 60 s (default
2 s) so that a checkpoint of the whole guest (a full snapshot, under the VM's
persist lock, which a migration waits for) never lands at a random point of a
measured run (the destination's first checkpoint after an arrival waits one
interval too, so it falls outside the run; the checkpoint a source takes as a
live migration starts is part of the migration and is measured).
`move_deadline_s` is 900 s (the default 60 s is less than a 256 MiB
stop-and-copy over 25 Mbit/s). VMs get `deadline_ms = 300`, and the daemons
`inline_deadline_ms = 300` so their calls still run inline on the loop: the
fill's passes over 256 MiB take ~10 ms on a quiet host and passed 100 ms (the
deadline before) on a slow one, which ended two full runs. Between a case's
two runs the daemons get 3 s to finish what the first left behind (the
destination files arrived chunks into its chunk store).
After a move over a throttled link the client follows the tombstone's
endpoint, i.e. it reaches the destination through the proxy too (small calls
pass its bucket at once). Everything runs on this one machine (2 cores: the
client, two daemons and the proxy share them; nothing is pinned).

Usage: python benchmarks/migration.py [--quick] [--no-extras] [--case MIB:RATE:LINK[:FILL]]
       python benchmarks/migration.py --proxy TARGET_PORT RATE_MBIT   (a link proxy alone)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import daemon as daemon_bench  # noqa: E402  (process helpers: spawn, stop, log tails)

from cloudlet.fsutil import atomic_write  # noqa: E402
from cloudlet.linkproxy import shaped_link  # noqa: E402
from cloudlet.placement.calibration import records_from_benchmark  # noqa: E402
from cloudlet.trust import peer_tokens  # noqa: E402
from cloudlet.trust.cluster import (  # noqa: E402
    cluster_tokens,
    load_authority,
    operator_identity,
)
from mobile_client import CloudletClient, Session  # noqa: E402
from tests.daemons import make_daemon  # noqa: E402

MEMHOG = ROOT / "workloads" / "memhog.wasm"
RESULTS = ROOT / "benchmarks" / "results" / "migration.json"
RECORDS = RESULTS.with_name("migration_records.jsonl")  # cloudlet calibrate's input
MSGPACK = "application/msgpack"
MiB = 1 << 20
PAGES_PER_MIB = 256  # 4 KiB pages, memhog's dirtying unit
DENSE_PASSES = 300  # hog_dirty passes over every page: ~87% random words, zstd-1 1.08x
PREFAULT_PAGES = 4096  # hog_fill(…, 0) per call before the first pass: keeps calls short
TICK_S = 0.001  # the client calls this often
MAX_CATCH_UP_S = 0.02  # after a stall, a call dirties at most this much time's worth
CALL_DEADLINE_MS = 900_000  # a call waits out a whole stop-and-copy over 25 Mbit/s
MIGRATE_TIMEOUT_S = 900.0
SETTLE_S = 3.0  # between a case's two runs
PROXY_LIFETIME_S = 3600.0  # the proxy exits by itself after this, whatever happens
# A memhog call's deadline: the dense fill's passes each write every page of the
# guest in one call (~10 ms for 256 MiB on a quiet host, past 100 ms on a slow one).
# The daemons run calls this long on their loop, as they do the default's.
VM_DEADLINE_MS = 300
DAEMON_SETTINGS: dict[str, Any] = {
    "checkpoint_interval_s": 60.0, "telemetry_interval_s": 5.0, "move_deadline_s": 900.0,
    "max_memory_mib": 2048, "vm_memory_mib": 64, "inline_deadline_ms": VM_DEADLINE_MS}
TARGETS = {
    "loopback_downtime_ms_max": 10.0,  # 64 MiB, 1 MiB/s, loopback
    "link25_downtime_ms_max": 50.0,  # 64 MiB, 1 MiB/s, 25 Mbit/s
    "bytes_vs_overlay_plus_dirty_max": 1.1,  # every live run
    "total_vs_bytes_over_bandwidth_max": 1.3,  # every live run on a throttled link
    # The downtime series (64 MiB, 1 MiB/s, loopback, ping-pong), as the client sees it.
    "loopback_downtime_p50_ms_max": 3.0,
    "loopback_downtime_p99_ms_max": 6.0,
}
SERIES_MOVES = 24  # at least 20 moves per run for the downtime distribution
# Series per configuration (unpinned, then pinned), pooled: one series' p50 moves by
# several tenths of a millisecond from run to run on this machine.
SERIES_RUNS = 3
SERIES_RUNS_QUICK = 2
SERIES_CASE = (64, 1.0)  # MiB, dirty MiB/s
SERIES_AFTER_S = 0.3  # calls served at a destination before the next move starts


@dataclass(frozen=True)
class Plan:
    memories_mib: tuple[int, ...]
    links_mbit: tuple[float | None, ...]  # None: loopback
    dirty_mib_s: tuple[float, ...]
    warmup_s: float  # dirtying before the migrate call
    after_s: float  # calling at the destination after the move
    sparse_extras: bool  # also 256 MiB over 25 Mbit/s with the sparse fill


QUICK = Plan(memories_mib=(64,), links_mbit=(None,), dirty_mib_s=(0, 1, 10),
             warmup_s=1.0, after_s=0.5, sparse_extras=False)
FULL = Plan(memories_mib=(64, 256), links_mbit=(None, 100, 25), dirty_mib_s=(0, 1, 10),
            warmup_s=1.0, after_s=0.5, sparse_extras=True)


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mib_s: float
    link_mbit: float | None
    fill: str  # "dense" or "sparse"

    @property
    def label(self) -> str:
        link = "loopback" if self.link_mbit is None else f"{self.link_mbit:g} Mbit/s"
        return f"{self.memory_mib} MiB, {self.dirty_mib_s:g} MiB/s, {link}, {self.fill}"


def cases(plan: Plan) -> list[Case]:
    out = []
    for link in plan.links_mbit:
        for mib in plan.memories_mib:
            for rate in plan.dirty_mib_s:
                out.append(Case(mib, rate, link, "dense"))
    if plan.sparse_extras and 256 in plan.memories_mib and 25 in plan.links_mbit:
        out += [Case(256, rate, 25, "sparse") for rate in plan.dirty_mib_s]
    return out


class BenchError(RuntimeError):
    pass


# --- the link proxy (its own process) ----------------------------------------------------


async def proxy_main(target_port: int, rate_mbit: float) -> None:
    async with shaped_link("127.0.0.1", target_port, rate_mbit) as proxy:
        print(f"ready proxy http://127.0.0.1:{proxy.port}", flush=True)
        await daemon_bench.serve_until_stopped(PROXY_LIFETIME_S)


# --- the client ------------------------------------------------------------------------


@dataclass
class CallRecord:
    sent: float  # perf_counter seconds
    answered: float
    pages: int
    at_destination: bool
    place: int = 0  # where it was answered: the number of moves followed by then


@dataclass
class Dirtier:
    """Calls `hog_dirty` every TICK_S through the session, dirtying `rate` MiB/s."""

    session: Session
    rate_mib_s: float
    seed: int
    records: list[CallRecord] = field(default_factory=list)
    # First and last answer per number of moves followed (the series polls these:
    # scanning every record each time cost the client's loop milliseconds).
    first_at: dict[int, float] = field(default_factory=dict)
    last_at: dict[int, float] = field(default_factory=dict)
    first_there: float | None = None  # first and last answers at the destination
    last_there: float | None = None
    stopping: bool = False
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, *, cancel: bool = False) -> None:
        """Let the running call finish and stop; its error, if any, is raised. With
        `cancel` (the run failed already), cancel it and raise nothing more."""
        self.stopping = True
        if self.task is None:
            return
        if cancel:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            return
        async with asyncio.timeout(120):
            await self.task  # raises what the loop raised: a failed call fails the run

    async def _run(self) -> None:
        s, clock = self.session, time.perf_counter
        pages_per_s = self.rate_mib_s * PAGES_PER_MIB
        owed = 0.0
        last = next_at = clock()
        k = 0
        while not self.stopping:
            now = clock()
            owed += min(now - last, MAX_CATCH_UP_S) * pages_per_s
            last = now
            pages = int(owed)
            owed -= pages
            sent = clock()
            await s.call("hog_dirty", pages, (self.seed + k) & 0x7FFFFFFF)
            answered = clock()
            # At the destination: sent after the session followed the move, or sent to
            # the source but resent at the destination after it (it waited out the pause).
            # Where it was answered: the moves the session had followed when the answer
            # came. An old stream's answers all arrive before its `moved` notice, the
            # new place's after the session followed it (whether the call was sent
            # there after the move, resent there, or written on the standby stream
            # while the source was paused).
            place = s.moves_followed
            there = place > 0
            self.records.append(CallRecord(sent, answered, pages, there, place))
            self.first_at.setdefault(place, answered)
            self.last_at[place] = answered
            if there:
                self.first_there = self.first_there or answered
                self.last_there = answered
            k += 1
            next_at = max(next_at + TICK_S, answered)
            if (wait := next_at - clock()) > 0:
                await asyncio.sleep(wait)

    def destination_span_s(self) -> float:
        if self.first_there is None or self.last_there is None:
            return 0.0
        return self.last_there - self.first_there


async def fill(session: Session, case: Case, seed: int) -> None:
    mib = await session.call("hog_grow", case.memory_mib)
    if not isinstance(mib, int) or mib < case.memory_mib:
        raise BenchError(f"hog_grow({case.memory_mib}) answered {mib!r}")
    pages = await session.call("hog_pages")
    if pages != case.memory_mib * PAGES_PER_MIB:
        raise BenchError(f"hog_pages() = {pages}, expected {case.memory_mib * PAGES_PER_MIB}")
    for start in range(0, pages, PREFAULT_PAGES):  # first touch, in short calls
        await session.call("hog_fill", start, PREFAULT_PAGES, 0)
    passes = DENSE_PASSES if case.fill == "dense" else 1
    for k in range(passes):  # npages = every page: each pass writes all of them once
        await session.call("hog_dirty", pages, (seed + k) & 0x7FFFFFFF)


@dataclass
class RunResult:
    mode: str
    answer: dict[str, Any]  # the migrate call's answer (the source's stats)
    info: dict[str, Any]  # the destination's GET /v1/vms/{vm} afterwards
    client_gap_ms: float
    precopy_max_stall_ms: float
    migrate_wall_s: float
    dirty_mib_s_warmup: float  # achieved while the VM simply served (before the move)
    dirty_mib_s_during: float  # achieved while the migrate call ran (stalls included)
    calls: int
    first_call_at_destination_ms: float  # that call's latency as the client saw it


async def migrate_once(case: Case, mode: str, token: str, operator_token: str, source: str,
                       destination: str, migrate_to: str, seed: int, plan: Plan) -> RunResult:
    """One migration of a fresh, filled VM from `source` to `destination` (reached at
    `migrate_to`: its URL, or the link proxy's), with the client calling throughout."""
    # 100 ms: the longest deadline that still runs calls inline on the daemon's loop; a
    # pass over 256 MiB takes ~10 ms, but two cores are shared with the other daemon.
    limits = {"memory_bytes": (case.memory_mib + 1) * MiB, "deadline_ms": VM_DEADLINE_MS}
    auth = {"Authorization": f"Bearer {token}"}
    async with CloudletClient(token, endpoints=[source]) as client, \
            client.session(MEMHOG, limits=limits, call_deadline_ms=CALL_DEADLINE_MS) as s, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MIGRATE_TIMEOUT_S)) as http:
        if s.location.endpoint.rstrip("/") != source:
            raise BenchError(f"the session's VM is at {s.location.endpoint}, not {source}")
        await fill(s, case, seed)
        dirtier = Dirtier(s, case.dirty_mib_s, seed + DENSE_PASSES + 1)
        dirtier.start()
        failed = True
        try:
            await asyncio.sleep(plan.warmup_s)
            if dirtier.task is not None and dirtier.task.done():
                await dirtier.task  # it failed: say why
            t0 = time.perf_counter()
            # The operator names the destination by URL (the link proxy in the path);
            # a client could only name a cloudlet known from presence.
            async with http.post(f"{source}/v1/vms/{s.vm_id}/migrate", headers={
                    "Authorization": f"Bearer {operator_token}", "Content-Type": MSGPACK},
                    data=msgpack.packb(
                    {"endpoint": migrate_to, "mode": mode})) as resp:
                raw = await resp.read()
                answer = msgpack.unpackb(raw) if raw else {}
                if resp.status != 200:
                    raise BenchError(f"migrate ({mode}) answered HTTP {resp.status}: {answer!r}")
            t1 = time.perf_counter()
            # Keep calling until the destination has served calls for `after_s`.
            deadline = time.monotonic() + 60.0
            while dirtier.destination_span_s() < plan.after_s:
                if time.monotonic() > deadline:
                    raise BenchError(f"no calls answered at the destination 60 s after the "
                                     f"move ({mode}; session at {s.location.endpoint}, "
                                     f"{s.moves_followed} moves followed)")
                if dirtier.task is not None and dirtier.task.done():
                    await dirtier.task
                await asyncio.sleep(0.05)
            failed = False
        finally:
            await dirtier.stop(cancel=failed)
        async with http.get(f"{destination}/v1/vms/{s.vm_id}", headers=auth) as resp:
            raw = await resp.read()
            info = msgpack.unpackb(raw) if raw else {}
            if resp.status != 200:
                raise BenchError(f"destination GET VM answered HTTP {resp.status}: {info!r}")
        if info.get("seq") != s.seq:
            raise BenchError(f"the VM at the destination is at call {info.get('seq')}, the "
                             f"client sent {s.seq}: a call was lost or applied twice")
        if s.moves_followed != 1:
            raise BenchError(f"the session followed {s.moves_followed} moves, expected 1")
    return analyse(mode, answer, info, dirtier.records, t0, t1)


def dirty_rate(records: list[CallRecord], since: float, until: float) -> float:
    """MiB/s dirtied by the calls sent in [since, until], over their span."""
    window = [r for r in records if since <= r.sent <= until]
    span = (window[-1].answered - window[0].sent) if window else 0.0
    return sum(r.pages for r in window) / PAGES_PER_MIB / span if span > 0 else 0.0


def analyse(mode: str, answer: dict[str, Any], info: dict[str, Any],
            records: list[CallRecord], t0: float, t1: float) -> RunResult:
    at_source = [r for r in records if not r.at_destination]
    there = [r for r in records if r.at_destination]
    if not at_source or not there:
        raise BenchError(f"{mode}: calls at the source {len(at_source)}, at the "
                         f"destination {len(there)}: cannot place the move")
    if any(r.at_destination for r in records[:len(at_source)]):
        raise BenchError(f"{mode}: calls answered at the source after calls answered at "
                         "the destination")
    last_src, first_dst = at_source[-1], there[0]
    # Pre-copy stalls: gaps between successive answers at the source during the move.
    during = [r.answered for r in at_source if r.answered >= t0]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    return RunResult(
        mode=mode, answer=answer, info=info,
        client_gap_ms=(first_dst.answered - last_src.answered) * 1000,
        precopy_max_stall_ms=max(gaps, default=0.0) * 1000,
        migrate_wall_s=t1 - t0,
        dirty_mib_s_warmup=dirty_rate(records, records[0].sent, t0),
        dirty_mib_s_during=dirty_rate(records, t0, t1),
        calls=len(records),
        first_call_at_destination_ms=(first_dst.answered - first_dst.sent) * 1000)


# --- the downtime series: one VM moved back and forth ----------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least `q` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-int(q * 1000) * len(ordered) // 1000) - 1))]


async def series_moves(token: str, operator_tokens: dict[str, str], a: str, b: str,
                       seed: int, moves: int) -> list[dict[str, Any]]:
    """Move one filled VM a -> b -> a ... `moves` times with the client calling
    throughout; per move, the client's gap and the daemons' own figures."""
    mib, rate = SERIES_CASE
    case = Case(mib, rate, None, "dense")
    limits = {"memory_bytes": (mib + 1) * MiB, "deadline_ms": VM_DEADLINE_MS}
    auth = {"Authorization": f"Bearer {token}"}
    out: list[dict[str, Any]] = []
    async with CloudletClient(token, endpoints=[a]) as client, \
            client.session(MEMHOG, limits=limits, call_deadline_ms=CALL_DEADLINE_MS) as s, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MIGRATE_TIMEOUT_S)) as http:
        await fill(s, case, seed)
        dirtier = Dirtier(s, rate, seed + DENSE_PASSES + 1)
        dirtier.start()
        failed = True
        try:
            await asyncio.sleep(1.0)
            here, there = a, b
            for k in range(1, moves + 1):
                async with http.post(f"{here}/v1/vms/{s.vm_id}/migrate", headers={
                        "Authorization": f"Bearer {operator_tokens[here]}",
                        "Content-Type": MSGPACK},
                        data=msgpack.packb({"endpoint": there, "mode": "live"})) as resp:
                    answer = msgpack.unpackb(await resp.read())
                    if resp.status != 200:
                        raise BenchError(f"move {k} answered HTTP {resp.status}: {answer!r}")
                deadline = time.monotonic() + 60.0
                while True:  # until the destination has served calls for a while
                    first_k = dirtier.first_at.get(k)
                    if first_k is not None and dirtier.last_at[k] - first_k >= SERIES_AFTER_S:
                        break
                    if time.monotonic() > deadline or (dirtier.task and dirtier.task.done()):
                        if dirtier.task is not None and dirtier.task.done():
                            await dirtier.task
                        raise BenchError(f"move {k}: no calls at the destination")
                    await asyncio.sleep(0.05)
                async with http.get(f"{there}/v1/vms/{s.vm_id}", headers=auth) as resp:
                    info = msgpack.unpackb(await resp.read())
                gap_s = dirtier.first_at[k] - dirtier.last_at[k - 1]
                out.append({"move": k, "client_gap_ms": gap_s * 1000,
                            "paused_ms": answer["paused_ms"],
                            "arrival_downtime_ms": info.get("arrival_downtime_ms"),
                            "total_s": answer["total_s"], "bytes_sent": answer["bytes_sent"],
                            "rounds": answer["rounds"]})
                here, there = there, here
            failed = False
        finally:
            await dirtier.stop(cancel=failed)
        async with http.get(f"{here}/v1/vms/{s.vm_id}", headers=auth) as resp:
            info = msgpack.unpackb(await resp.read())
        if info.get("seq") != s.seq:
            raise BenchError(f"the VM is at call {info.get('seq')}, the client sent {s.seq}: "
                             "a call was lost or applied twice")
        if s.moves_followed != moves:
            raise BenchError(f"the session followed {s.moves_followed} moves, not {moves}")
        for move in out:
            move["standby_switches_total"] = s.standby_switches
    return out


def run_series_sets(root: Path, runs: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`runs` series unpinned and `runs` pinned, alternated (unpinned, pinned,
    unpinned, ...) so that the host's drift over the minutes they take falls on both
    alike; each set pooled. The pinned set is None on fewer than two CPUs."""
    cpus = pinning_cpus()
    if cpus is None:
        print("[series] fewer than two CPUs: no pinned series", flush=True)
    done: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for k in range(runs):
        for pin in (False, True) if cpus is not None else (False,):
            t = time.perf_counter()
            what = (f"source on CPU {cpus[0]}, destination on CPU {cpus[1]}"
                    if pin and cpus is not None else "unpinned")
            print(f"[series {k + 1}/{runs}] {SERIES_MOVES} moves of 64 MiB at 1 MiB/s, "
                  f"loopback, {what} ...", end="", flush=True)
            run_dir = root / f"{'pinned' if pin else 'series'}{k}"
            run_dir.mkdir()
            got = run_series(run_dir, SERIES_MOVES, pinned=cpus if pin else None)
            done[pin].append(got)
            print(f" client gap p50 {got['client_gap_p50_ms']:.2f} ms, p99 "
                  f"{got['client_gap_p99_ms']:.2f} ms ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    pinned = pool_series(done[True], pinned=True) if done[True] else None
    return pool_series(done[False], pinned=False), pinned


def pool_series(done: list[dict[str, Any]], pinned: bool) -> dict[str, Any]:
    """Downtime series (`run_series`), each on a fresh pair of daemons, pooled: the
    figures are over every move of every run, and each run's p50 and p99 show the
    spread."""
    moves_all = [m for r in done for m in r["moves"]]
    gaps = [m["client_gap_ms"] for m in moves_all]
    paused = [m["paused_ms"] for m in moves_all]
    return {"pinned": pinned, "runs": done, "n": len(gaps),
            "client_gap_p50_ms": percentile(gaps, 0.50),
            "client_gap_p99_ms": percentile(gaps, 0.99),
            "client_gap_min_ms": min(gaps), "client_gap_max_ms": max(gaps),
            "run_p50s_ms": [r["client_gap_p50_ms"] for r in done],
            "run_p99s_ms": [r["client_gap_p99_ms"] for r in done],
            "paused_p50_ms": percentile(paused, 0.50), "paused_max_ms": max(paused),
            "standby_switches": sum(r["standby_switches"] for r in done)}


def pinning_cpus() -> tuple[int, int] | None:
    """Two CPUs this process may use, for the source and the destination of a pinned
    series; None with fewer (the pinned series is then skipped, not failed)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def run_series(tmp: Path, moves: int, pinned: tuple[int, int] | None = None
               ) -> dict[str, Any]:
    """The downtime series on a fresh pair of daemons (see the module docstring);
    `pinned`: the source's CPU and the destination's."""
    children: list[daemon_bench.Server] = []
    index = 99
    try:
        src, dst = start_pair(tmp, index, children, pinned=pinned)
        token = cluster_tokens(tmp).issue("bench-series", 7200)
        operator = operator_identity(load_authority(tmp))
        operators = {src.url: peer_tokens.mint(operator, f"src{index}", ttl_s=3600),
                     dst.url: peer_tokens.mint(operator, f"dst{index}", ttl_s=3600)}
        try:
            per_move = uvloop.run(series_moves(token, operators, src.url, dst.url, 7_000_001,
                                               moves))
        except BaseException:
            for server in children:
                print(f"--- {server.name} log tail:\n{server.log_tail()}", file=sys.stderr)
            raise
    finally:
        for server in reversed(children):
            daemon_bench.stop(server)
    gaps = [m["client_gap_ms"] for m in per_move]
    paused = [m["paused_ms"] for m in per_move]
    return {"moves": per_move, "n": len(gaps),
            "client_gap_p50_ms": percentile(gaps, 0.50),
            "client_gap_p99_ms": percentile(gaps, 0.99),
            "client_gap_min_ms": min(gaps), "client_gap_max_ms": max(gaps),
            "paused_p50_ms": percentile(paused, 0.50), "paused_max_ms": max(paused),
            "standby_switches": per_move[-1]["standby_switches_total"] if per_move else 0}


# --- one case: processes, two runs ---------------------------------------------------------


def start_pair(tmp: Path, index: int, children: list[daemon_bench.Server],
               pinned: tuple[int, int] | None = None
               ) -> tuple[daemon_bench.Server, daemon_bench.Server]:
    """Source and destination daemons; `pinned` puts each on the CPU it names (the
    client stays free to run on either)."""
    secret = tmp / "cluster.key"
    servers = []
    for k, role in enumerate(("src", "dst")):
        d = make_daemon(tmp, f"{role}{index}", secret_path=secret, **DAEMON_SETTINGS)
        argv = [sys.executable, "-m", "cloudlet.cli", "agent", "--config", str(d.config_path)]
        servers.append(daemon_bench.spawn(f"{role}{index}", argv, d.log_path, children,
                                          None if pinned is None else {pinned[k]}))
    return servers[0], servers[1]


def start_proxy(tmp: Path, index: int, target_url: str, rate_mbit: float,
                children: list[daemon_bench.Server]) -> daemon_bench.Server:
    port = target_url.rsplit(":", 1)[1]
    argv = [sys.executable, str(Path(__file__).resolve()), "--proxy", port, f"{rate_mbit:g}"]
    return daemon_bench.spawn(f"proxy{index}", argv, tmp / f"proxy{index}.log", children, None)


def run_case(case: Case, index: int, tmp: Path, plan: Plan) -> dict[str, Any]:
    children: list[daemon_bench.Server] = []
    try:
        src, dst = start_pair(tmp, index, children)
        migrate_to = dst.url
        if case.link_mbit is not None:
            migrate_to = start_proxy(tmp, index, dst.url, case.link_mbit, children).url
        token = cluster_tokens(tmp).issue(f"bench-{index}", 7200)
        operator = operator_identity(load_authority(tmp))
        seed = 1_000_003 * (index + 1)
        results: dict[str, RunResult] = {}
        for mode in ("live", "stop_and_copy"):
            if results:
                time.sleep(SETTLE_S)  # the destination's after-arrival work is not the baseline's
            try:
                results[mode] = uvloop.run(migrate_once(
                    case, mode, token, peer_tokens.mint(operator, f"src{index}", ttl_s=300),
                    src.url, dst.url, migrate_to, seed, plan))
            except BaseException:
                for server in children:
                    print(f"--- {server.name} log tail:\n{server.log_tail()}", file=sys.stderr)
                raise
    finally:
        for server in reversed(children):
            daemon_bench.stop(server)
    return record(case, results["live"], results["stop_and_copy"])


def record(case: Case, live: RunResult, sc: RunResult) -> dict[str, Any]:
    a, b = live.answer, sc.answer
    if "arrival_downtime_ms" not in live.info:
        raise BenchError(f"{case.label}: the destination reports no arrival_downtime_ms after "
                         f"the live migration: {live.info!r}")
    rate = None if case.link_mbit is None else case.link_mbit * 1e6 / 8
    link_time = None if rate is None else a["bytes_sent"] / rate
    sc_link_time = None if rate is None else b["bytes_sent"] / rate
    return {
        "memory_mib": case.memory_mib, "dirty_mib_s": case.dirty_mib_s,
        "link_mbit": case.link_mbit, "fill": case.fill,
        # live (pre-copy)
        "downtime_ms": live.info["arrival_downtime_ms"],
        "paused_ms": a["paused_ms"],
        "client_gap_ms": live.client_gap_ms,
        "total_s": a["total_s"],
        "bytes_sent": a["bytes_sent"],
        "overlay_plus_dirty_bytes": a["overlay_plus_dirty_bytes"],
        "overlay_bytes": a.get("overlay_bytes"),
        "dirtied_bytes": a.get("dirtied_bytes"),
        "memory_bytes": a.get("memory_bytes"),
        "rounds": a["rounds"],
        "bytes_per_round": a["bytes_per_round"],
        "link_rate_bytes_s": a.get("link_rate_bytes_s"),
        "bytes_vs_overlay_plus_dirty": a["bytes_sent"] / a["overlay_plus_dirty_bytes"],
        "link_time_s": link_time,
        "total_vs_link_time": None if link_time is None else a["total_s"] / link_time,
        "precopy_max_stall_ms": live.precopy_max_stall_ms,
        "first_call_at_destination_ms": live.first_call_at_destination_ms,
        "dirty_mib_s_warmup": live.dirty_mib_s_warmup,
        "dirty_mib_s_during": live.dirty_mib_s_during,
        "migrate_wall_s": live.migrate_wall_s,
        "calls": live.calls,
        # stop-and-copy of the whole snapshot, same case, same guest content
        "stop_and_copy_downtime_ms": sc.client_gap_ms,
        "stop_and_copy_paused_ms": b["paused_ms"],
        "stop_and_copy_total_s": b["total_s"],
        "stop_and_copy_bytes": b["bytes_sent"],
        "stop_and_copy_link_time_s": sc_link_time,
        "stop_and_copy_first_call_at_destination_ms": sc.first_call_at_destination_ms,
        "stop_and_copy_dirty_mib_s_warmup": sc.dirty_mib_s_warmup,
        "stop_and_copy_calls": sc.calls,
        "live_answer": a,
        "stop_and_copy_answer": b,
    }


# --- results ---------------------------------------------------------------------------


def find(runs: list[dict[str, Any]], mib: int, rate: float,
         link: float | None) -> dict[str, Any] | None:
    return next((r for r in runs if r["memory_mib"] == mib and r["dirty_mib_s"] == rate
                 and r["link_mbit"] == link and r["fill"] == "dense"), None)


def judge(all_runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meets, figures): each target met or not (None: not measured in this run), on
    the target matrix (dense memory); the sparse extras get figures of their own."""
    runs = [r for r in all_runs if r["fill"] == "dense"]
    extras = [r for r in all_runs if r["fill"] == "sparse"]
    if not runs:
        raise BenchError("no run of the target matrix (dense memory) to judge")
    loop = find(runs, 64, 1, None)
    l25 = find(runs, 64, 1, 25)
    throttled = [r for r in runs if r["link_mbit"] is not None]
    worst_bytes = max(runs, key=lambda r: r["bytes_vs_overlay_plus_dirty"])
    worst_time = max(throttled, key=lambda r: r["total_vs_link_time"], default=None)
    meets = {
        "loopback_downtime_ms": None if loop is None else
            loop["downtime_ms"] < TARGETS["loopback_downtime_ms_max"],
        "link25_downtime_ms": None if l25 is None else
            l25["downtime_ms"] < TARGETS["link25_downtime_ms_max"],
        "bytes_vs_overlay_plus_dirty": worst_bytes["bytes_vs_overlay_plus_dirty"]
            <= TARGETS["bytes_vs_overlay_plus_dirty_max"],
        "total_vs_bytes_over_bandwidth": None if worst_time is None else
            worst_time["total_vs_link_time"] <= TARGETS["total_vs_bytes_over_bandwidth_max"],
    }
    figures = {
        "loopback_downtime_ms": None if loop is None else loop["downtime_ms"],
        "loopback_client_gap_ms": None if loop is None else loop["client_gap_ms"],
        "link25_downtime_ms": None if l25 is None else l25["downtime_ms"],
        "link25_client_gap_ms": None if l25 is None else l25["client_gap_ms"],
        "bytes_vs_overlay_plus_dirty_worst": worst_bytes["bytes_vs_overlay_plus_dirty"],
        "total_vs_bytes_over_bandwidth_worst":
            None if worst_time is None else worst_time["total_vs_link_time"],
        "extras": {  # sparse memory: the fixed costs of a migration, not the target matrix
            "runs": [label(r) for r in extras],
            "bytes_vs_overlay_plus_dirty_worst": max(
                (r["bytes_vs_overlay_plus_dirty"] for r in extras), default=None),
            "total_vs_bytes_over_bandwidth_worst": max(
                (r["total_vs_link_time"] for r in extras if r["total_vs_link_time"]),
                default=None),
            "time_misses": [label(r) for r in extras if r["total_vs_link_time"]
                            and r["total_vs_link_time"]
                            > TARGETS["total_vs_bytes_over_bandwidth_max"]],
            "downtime_ms_max": max((r["downtime_ms"] for r in extras), default=None),
        },
        "bytes_misses": [label(r) for r in runs if r["bytes_vs_overlay_plus_dirty"]
                         > TARGETS["bytes_vs_overlay_plus_dirty_max"]],
        "time_misses": [label(r) for r in throttled if r["total_vs_link_time"]
                        > TARGETS["total_vs_bytes_over_bandwidth_max"]],
    }
    return meets, figures


def label(r: dict[str, Any]) -> str:
    link = "loopback" if r["link_mbit"] is None else f"{r['link_mbit']:g} Mbit/s"
    sparse = ", sparse" if r["fill"] == "sparse" else ""
    return f"{r['memory_mib']} MiB, {r['dirty_mib_s']:g} MiB/s, {link}{sparse}"


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(runs: list[dict[str, Any]]) -> None:
    print(f"{'MiB':>4}{'dirty':>6}{'link':>5}{'fill':>7} |{'rnds':>5}{'sent MiB':>9}"
          f"{'bound':>7}{'ratio':>6}{'total s':>8}{'/link':>6}{'down ms':>9}{'paused':>9}"
          f"{'client':>9}{'stall':>6} |{'s&c MiB':>8}{'total s':>8}{'/link':>6}{'down ms':>9}")
    for r in runs:
        link = "lo" if r["link_mbit"] is None else f"{r['link_mbit']:g}"
        sc_ratio = (None if r["stop_and_copy_link_time_s"] is None else
                    r["stop_and_copy_total_s"] / r["stop_and_copy_link_time_s"])
        print(f"{r['memory_mib']:>4}{r['dirty_mib_s']:>6g}{link:>5}{r['fill']:>7} |"
              f"{r['rounds']:>5}{r['bytes_sent'] / MiB:>9.2f}"
              f"{r['overlay_plus_dirty_bytes'] / MiB:>7.1f}"
              f"{r['bytes_vs_overlay_plus_dirty']:>6.2f}{r['total_s']:>8.2f}"
              f"{fmt(r['total_vs_link_time'], '.2f'):>6}{r['downtime_ms']:>9.1f}"
              f"{r['paused_ms']:>9.1f}{r['client_gap_ms']:>9.1f}"
              f"{r['precopy_max_stall_ms']:>6.0f} |"
              f"{r['stop_and_copy_bytes'] / MiB:>8.2f}{r['stop_and_copy_total_s']:>8.2f}"
              f"{fmt(sc_ratio, '.2f'):>6}{r['stop_and_copy_downtime_ms']:>9.0f}")
    print("(live: rounds; MiB sent; lower bound = overlay + dirtied chunks, MiB; their ratio; "
          "total s; total / (bytes / link rate); downtime = the destination's "
          "arrival_downtime_ms; ms paused at the source; gap the client saw, ms; longest "
          "stall of calls during pre-copy, ms.  s&c = stop-and-copy of the whole snapshot: "
          "MiB, total s, / link time, gap the client saw, ms)")


def print_targets(meets: dict[str, Any], figures: dict[str, Any]) -> None:
    word = {True: "yes", False: "MISS", None: "not run"}
    print(f"\ndowntime, loopback, 64 MiB at 1 MiB/s: {fmt(figures['loopback_downtime_ms'], '.1f')}"
          f" ms (target < {TARGETS['loopback_downtime_ms_max']:g})  "
          f"{word[meets['loopback_downtime_ms']]}")
    print(f"downtime, 25 Mbit/s, 64 MiB at 1 MiB/s: {fmt(figures['link25_downtime_ms'], '.1f')}"
          f" ms (target < {TARGETS['link25_downtime_ms_max']:g})  "
          f"{word[meets['link25_downtime_ms']]}")
    print(f"bytes / (overlay + dirtied), worst run: "
          f"{figures['bytes_vs_overlay_plus_dirty_worst']:.3f} (target <= "
          f"{TARGETS['bytes_vs_overlay_plus_dirty_max']:g})  "
          f"{word[meets['bytes_vs_overlay_plus_dirty']]}"
          + (f"  misses: {'; '.join(figures['bytes_misses'])}" if figures["bytes_misses"]
             else ""))
    print(f"total / (bytes / link rate), worst throttled run: "
          f"{fmt(figures['total_vs_bytes_over_bandwidth_worst'], '.2f')} (target <= "
          f"{TARGETS['total_vs_bytes_over_bandwidth_max']:g})  "
          f"{word[meets['total_vs_bytes_over_bandwidth']]}"
          + (f"  misses: {'; '.join(figures['time_misses'])}" if figures["time_misses"]
             else ""))
    ex = figures["extras"]
    if ex["runs"]:
        print(f"extras (sparse memory, not judged): total / (bytes / link rate) worst "
              f"{fmt(ex['total_vs_bytes_over_bandwidth_worst'], '.2f')}"
              + (f", over {TARGETS['total_vs_bytes_over_bandwidth_max']:g} in: "
                 f"{'; '.join(ex['time_misses'])}" if ex["time_misses"] else "")
              + f"; bytes worst {fmt(ex['bytes_vs_overlay_plus_dirty_worst'], '.3f')}; "
              f"downtime up to {fmt(ex['downtime_ms_max'], '.1f')} ms")


def source_tree() -> dict[str, Any]:
    """The commit measured, and whether the tree had uncommitted changes."""
    def git(*argv: str) -> str:
        out = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout
    try:
        # Porcelain lines are "XY path": not stripped, or the first loses its X.
        return {"commit": git("rev-parse", "HEAD").strip() or None,
                "modified": [line[3:] for line in git("status", "--porcelain").splitlines()
                             if line and not line.startswith("??")]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}


def parse_case(text: str) -> tuple[int, float, float | None, str]:
    """"64:10:100" -> (64, 10.0, 100.0, "dense"); "256:1:25:sparse" -> (..., "sparse")."""
    try:
        mib, rate, link, *fill = text.split(":")
        if fill not in ([], ["dense"], ["sparse"]):
            raise ValueError(fill)
        return (int(mib), float(rate), None if link == "lo" else float(link),
                fill[0] if fill else "dense")
    except ValueError:
        raise SystemExit(f"--case {text!r}: expected MIB:RATE:LINK[:FILL], e.g. 64:10:100, "
                         "64:1:lo or 256:0:25:sparse") from None


def write_records(results: dict[str, Any], path: Path) -> None:
    """The live runs as migration records, one JSON object a line."""
    lines = [json.dumps(r.to_dict(), sort_keys=True) for r in records_from_benchmark(results)]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the 64 MiB loopback cases and two downtime series "
                             "of each kind (~4 minutes)")
    parser.add_argument("--no-extras", action="store_true",
                        help="without the sparse 256 MiB cases over 25 Mbit/s")
    parser.add_argument("--case", action="append", default=[], metavar="MIB:RATE:LINK[:FILL]",
                        help="only this case of the plan (LINK: Mbit/s or 'lo'; FILL: dense, "
                             "the default, or sparse; repeatable); prints the table; JSON to "
                             "$TMPDIR/migration-cases.json")
    parser.add_argument("--proxy", nargs=2, metavar=("TARGET_PORT", "RATE_MBIT"),
                        help="only run a link proxy to 127.0.0.1:TARGET_PORT")
    args = parser.parse_args()
    if args.proxy is not None:
        uvloop.run(proxy_main(int(args.proxy[0]), float(args.proxy[1])))
        return 0
    started = time.perf_counter()
    tree_at_start = source_tree()
    plan = QUICK if args.quick else FULL
    if args.no_extras:
        plan = Plan(**{**plan.__dict__, "sparse_extras": False})
    todo = cases(plan)
    if args.case:
        wanted = {parse_case(c) for c in args.case}
        todo = [c for c in todo
                if (c.memory_mib, c.dirty_mib_s, c.link_mbit, c.fill) in wanted]
        if len(todo) != len(wanted):
            parser.error(f"--case: not in the plan: {', '.join(args.case)}")
    runs: list[dict[str, Any]] = []
    case_s: list[float] = []
    series: dict[str, Any] | None = None
    pinned: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as d:
        if not args.case:
            series, pinned = run_series_sets(Path(d), SERIES_RUNS_QUICK if args.quick
                                             else SERIES_RUNS)
        for index, case in enumerate(todo):
            t = time.perf_counter()
            print(f"[{index + 1}/{len(todo)}] {case.label} ...", end="", flush=True)
            case_dir = Path(d) / f"case{index}"
            case_dir.mkdir()
            runs.append(run_case(case, index, case_dir, plan))
            case_s.append(time.perf_counter() - t)
            r = runs[-1]
            print(f" live {r['downtime_ms']:.1f} ms down, {r['total_s']:.2f} s; "
                  f"stop-and-copy {r['stop_and_copy_downtime_ms']:.1f} ms down "
                  f"({case_s[-1]:.0f} s)", flush=True)
    meets, figures = judge(runs)
    p50 = None if series is None else series["client_gap_p50_ms"]
    p99 = None if series is None else series["client_gap_p99_ms"]
    meets["loopback_downtime_p50_ms"] = (None if p50 is None
                                         else p50 <= TARGETS["loopback_downtime_p50_ms_max"])
    meets["loopback_downtime_p99_ms"] = (None if p99 is None
                                         else p99 <= TARGETS["loopback_downtime_p99_ms_max"])
    tree_at_end = source_tree()
    if tree_at_end != tree_at_start:
        print(f"\nWARNING: the source tree changed during the run ({tree_at_start} -> "
              f"{tree_at_end}): later cases ran other code", file=sys.stderr)
    extras = [label(r) for r in runs if r["fill"] == "sparse"]
    results: dict[str, Any] = {
        "loopback_downtime_p50_ms": p50,
        "loopback_downtime_p99_ms": p99,
        "loopback_downtime_n": None if series is None else series["n"],
        "loopback_downtime_run_p50s_ms": None if series is None else series["run_p50s_ms"],
        # Beside, not instead: the same series with each daemon on a core of its own.
        "loopback_downtime_pinned_p50_ms": None if pinned is None
        else pinned["client_gap_p50_ms"],
        "loopback_downtime_pinned_p99_ms": None if pinned is None
        else pinned["client_gap_p99_ms"],
        "series": series,
        "series_pinned": pinned,
        "runs": runs,
        "targets": TARGETS,
        "meets": meets,
        "target_figures": figures,
        "extras": ("sparse memory (~40x under zstd), in addition to the dense matrix and "
                   "not judged with it: " + "; ".join(extras)) if extras else None,
        "plan": {**plan.__dict__, "dense_passes": DENSE_PASSES, "tick_s": TICK_S},
        "daemon_settings": DAEMON_SETTINGS,
        "case_wall_s": case_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__, "platform": platform.platform(),
                    "note": "client, both daemons and the link proxy share this machine, "
                            "unpinned (series_pinned: each daemon on a core of its own)"},
        "source": tree_at_start,
        "source_at_end": tree_at_end,
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
    }
    print()
    print_table(runs)
    print_targets(meets, figures)
    if series is not None:
        word = {True: "yes", False: "MISS"}
        gaps = sorted(m["client_gap_ms"] for r in series["runs"] for m in r["moves"])
        print(f"downtime as the client sees it, {series['n']} moves in "
              f"{len(series['runs'])} runs (64 MiB, 1 MiB/s, loopback, unpinned): "
              f"p50 {p50:.2f} ms (target <= "
              f"{TARGETS['loopback_downtime_p50_ms_max']:g})  "
              f"{word[bool(meets['loopback_downtime_p50_ms'])]}; p99 {p99:.2f} ms (target <= "
              f"{TARGETS['loopback_downtime_p99_ms_max']:g})  "
              f"{word[bool(meets['loopback_downtime_p99_ms'])]}; paused p50 "
              f"{series['paused_p50_ms']:.2f} ms; {series['standby_switches']} of "
              f"{series['n']} moves switched onto a standby stream")
        print("  every gap, ms: " + " ".join(f"{g:.1f}" for g in gaps))
        print("  each run's p50, ms: " + " ".join(f"{x:.2f}" for x in series["run_p50s_ms"]))
    if pinned is not None:
        print(f"the same with each daemon on a core of its own ({pinned['n']} moves, not "
              f"judged): p50 {pinned['client_gap_p50_ms']:.2f} ms (runs: "
              + " ".join(f"{x:.2f}" for x in pinned["run_p50s_ms"])
              + f"), p99 {pinned['client_gap_p99_ms']:.2f} ms")
    if extras:
        print(f"\nextras: {results['extras']}")
    med = statistics.median(case_s) if case_s else 0.0
    if args.case:
        out = Path(tempfile.gettempdir()) / "migration-cases.json"
        atomic_write(out, (json.dumps(results, indent=2) + "\n").encode())
        write_records(results, out.with_name(RECORDS.name.replace("migration", "migration-cases")))
        print(f"\n--case: {results['wall_s']:.1f} s; wrote {out}, not {RESULTS.name}")
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, (json.dumps(results, indent=2) + "\n").encode())
    write_records(results, RECORDS)
    print(f"\nwrote {RESULTS.relative_to(ROOT)} in {results['wall_s']:.1f} s "
          f"({len(runs)} cases, median {med:.0f} s each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
