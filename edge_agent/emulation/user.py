"""One emulated user: a real SDK session that moves, interacts and dirties its guest.

The user's session is a VM of workloads/vdi.wasm. One interaction is one
`vdi_events` call carrying a key press and a pointer move (what a remote-display
client sends per input, and gets back the dirty regions to redraw), arriving as
a Poisson process at the workload's `interaction_rate_hz`; its latency is from
its arrival to its answer, so an interaction that waits for a paused VM counts
the wait. The guest is grown to the workload's (scaled) `memory_mib` when the
session starts, with `overlay_mib` of it random (what a destination lacks), and
dirtied at `dirty_rate_mib_s` by one `vdi_events` call a second whose events are
all of a type the guest skips: its input buffer is rewritten, nothing else.

Every second the user reports its position (`report_position`); every half
second its links take the latency model's delays for where it is. A user
present in several stretches of a trace has one session per stretch. What it
records (each interaction's latency, the calls it sent and had answered, and the
VM's own sequence number at the end) is what the report and the exactly-once
check are made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloudlet.errors import CloudletError, VMMoved
from cloudlet.sim.scenario import WorkloadSpec
from edge_agent.emulation.links import ClientLinks
from edge_agent.emulation.world import WorldFrames
from mobile_client import CloudletClient
from mobile_client.session import Session
from mobile_client.transport import Location

log = logging.getLogger(__name__)

VDI = Path(__file__).resolve().parents[2] / "workloads" / "vdi.wasm"
INTERACTION_FN = "vdi_events"
EVENT_SIZE = 5  # vdi.c: {type u8, a u16le, b u16le}
CALL_DEADLINE_MS = 60_000  # calls wait out any move; the run waits for every answer
DISCOVERY_TIMEOUT_S = 20.0  # every cloudlet's presence seen before choosing one
MiB = 1 << 20


@dataclass
class SessionOutcome:
    vm: str
    node: str
    start_seq: int
    final_seq: int | None
    memory_bytes: int | None = None  # the guest's, at the end
    sent: int = 0
    acked: int = 0
    failed: int = 0


@dataclass
class UserRecord:
    slot: int
    name: str
    workload: int
    arrivals_s: list[float] = field(default_factory=list)  # every interaction
    latency_ms: list[float] = field(default_factory=list)  # NaN: not served
    sessions: list[SessionOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class RunClock:
    """Emulated time: 0 when every initial session is ready."""

    duration_s: float
    started: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.started.set()

    def now(self) -> float:
        return time.monotonic() - self.t0 if self.started.is_set() else 0.0

    async def until(self, t_s: float) -> None:
        await self.started.wait()
        delay = t_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


def events_payload(n_bytes: int, rng: np.random.Generator, *, skip_only: bool) -> bytes:
    """`n_bytes` of vdi events: random, with every event's type byte 0 (skipped by
    the guest) when `skip_only`, else a key press and a pointer move."""
    if not skip_only:
        key = int(rng.integers(32, 127))
        x, y = (int(v) for v in rng.integers(0, 192, 2))
        return (bytes([1]) + key.to_bytes(2, "little") + b"\0\0"
                + bytes([3]) + x.to_bytes(2, "little") + y.to_bytes(2, "little"))
    n = max(n_bytes - n_bytes % EVENT_SIZE, EVENT_SIZE)
    raw = np.frombuffer(os.urandom(n), dtype=np.uint8).copy()
    raw[::EVENT_SIZE] = 0
    return raw.tobytes()


def grow_payload(memory_bytes: float, overlay_bytes: float, rng: np.random.Generator) -> bytes:
    """One call that makes the guest's input buffer (and so its memory) about
    `memory_bytes`, of which `overlay_bytes` random and the rest zero."""
    total = max(int(memory_bytes * 0.97), EVENT_SIZE)
    random_part = events_payload(int(min(overlay_bytes, total)), rng, skip_only=True)
    return random_part + bytes(max(total - len(random_part), 0))


def periods(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) tick ranges where the user is present."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for t, on in enumerate(active.tolist()):
        if on and start is None:
            start = t
        elif not on and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, len(active)))
    return out


def make_client(token: str, broker: str, links: ClientLinks) -> CloudletClient:
    """The SDK client: cloudlets found through the broker (where it also reports its
    RTTs), each dialled through this user's link to it."""
    return CloudletClient(token, broker=broker, connect_via=links.connect_via)


class User:
    def __init__(self, slot: int, name: str, token: str, broker: str, frames: WorldFrames,
                 targets: list[tuple[str, int]], workload: WorkloadSpec, workload_index: int,
                 clock: RunClock, seed: int) -> None:
        self.slot = slot
        self.token = token
        self.broker = broker
        self.frames = frames
        self.targets = targets
        self.w = workload
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self.record = UserRecord(slot, name, workload_index)
        self.ready = asyncio.Event()  # set once the first session is up (or not needed)
        self._periods = periods(frames.active[:, slot])
        step = frames.step_s
        self._spans = [(a * step, min(b * step, clock.duration_s)) for a, b in self._periods
                       if a * step < clock.duration_s]
        if not self._spans or self._spans[0][0] > 0:
            self.ready.set()

    async def run(self) -> UserRecord:
        try:
            async with ClientLinks(self.targets) as links:
                self._set_links(links, 0.0)
                async with make_client(self.token, self.broker, links) as client:
                    n = len(self.targets)
                    await client.discovery.wait_for(lambda d: len(d.online()) >= n,
                                                    DISCOVERY_TIMEOUT_S)
                    for start_s, end_s in self._spans:
                        if start_s > 0:
                            await self.clock.until(start_s)
                        await self._stretch(client, links, start_s, end_s)
        except CloudletError as exc:
            self.record.errors.append(f"{type(exc).__name__}: {exc.message}")
            log.warning("user %s: %s", self.record.name, exc.message)
        finally:
            self.ready.set()
        return self.record

    def _set_links(self, links: ClientLinks, t_s: float) -> None:
        links.set_delays(self.frames.delay_ms[self.frames.tick_at(t_s), self.slot].tolist())

    async def _stretch(self, client: CloudletClient, links: ClientLinks, start_s: float,
                       end_s: float) -> None:
        """One stretch of presence: a session, its guest grown, then interactions,
        dirtying and movement until `end_s`; the VM's final `seq` at the end."""
        self._set_links(links, start_s)
        await self._report(client, start_s)
        arrivals: list[float] = []
        # Interactions start arriving at start_s, session or not: those that arrive
        # before the session is up (or, if none can be made, all) are not served.
        gen = asyncio.get_running_loop().create_task(self._arrivals(arrivals, start_s, end_s))
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    s = await stack.enter_async_context(client.session(
                        VDI, budget_ms=self.w.budget_ms, call_deadline_ms=CALL_DEADLINE_MS))
                    outcome = SessionOutcome(s.vm_id, s.location.node, s.seq, None)
                    self.record.sessions.append(outcome)
                    # A first small call connects the stream, and with it the session
                    # learns how large a call this cloudlet takes: the growing one is.
                    await self._call(s, outcome, events_payload(0, self.rng, skip_only=False))
                    await self._call(s, outcome, grow_payload(
                        self.w.memory_mib * MiB, self.w.overlay_mib * MiB, self.rng))
                except CloudletError as exc:
                    self.record.errors.append(f"{type(exc).__name__}: {exc.message}")
                    log.warning("user %s: no session from %.0f s: %s", self.record.name,
                                start_s, exc.message)
                    self.ready.set()
                    await gen  # every interaction of the stretch goes unserved
                    return
                finally:
                    self.ready.set()
                await self.clock.started.wait()
                gen.cancel()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._move(client, links, end_s))
                    tg.create_task(self._dirty(s, outcome, end_s))
                    t = max(self.clock.now(), start_s)
                    rate = self.w.interaction_rate_hz
                    while rate > 0:
                        t += float(self.rng.exponential(1.0 / rate))
                        if t >= end_s:
                            break
                        await self.clock.until(t)
                        tg.create_task(self._interact(s, outcome, t))
                outcome.final_seq, outcome.memory_bytes = await self._final_seq(client, s)
        finally:
            gen.cancel()
            for t in arrivals:
                self.record.arrivals_s.append(t)
                self.record.latency_ms.append(math.nan)

    async def _arrivals(self, out: list[float], start_s: float, end_s: float) -> None:
        """Interactions that arrive while the session is being set up (not served)."""
        await self.clock.started.wait()
        rate = self.w.interaction_rate_hz
        t = max(self.clock.now(), start_s)
        while rate > 0:
            t += float(self.rng.exponential(1.0 / rate))
            if t >= end_s:
                return
            await self.clock.until(t)
            out.append(t)

    async def _interact(self, s: Session, outcome: SessionOutcome, arrival_s: float) -> None:
        ok = await self._call(s, outcome, events_payload(0, self.rng, skip_only=False))
        self.record.arrivals_s.append(arrival_s)
        self.record.latency_ms.append((self.clock.now() - arrival_s) * 1000 if ok else math.nan)

    async def _call(self, s: Session, outcome: SessionOutcome, payload: bytes) -> bool:
        outcome.sent += 1
        try:
            await s.call(INTERACTION_FN, payload)
        except CloudletError as exc:
            outcome.failed += 1
            self.record.errors.append(f"{type(exc).__name__}: {exc.message}")
            return False
        outcome.acked += 1
        return True

    async def _dirty(self, s: Session, outcome: SessionOutcome, end_s: float) -> None:
        n = int(self.w.dirty_rate_mib_s * MiB)
        if n <= 0:
            return
        t = self.clock.now()
        while t + 1.0 < end_s:
            t += 1.0
            await self.clock.until(t)
            await self._call(s, outcome, events_payload(n, self.rng, skip_only=True))

    async def _move(self, client: CloudletClient, links: ClientLinks, end_s: float) -> None:
        t = self.clock.now()
        k = 0
        while t < end_s:
            self._set_links(links, t)
            if k % 2 == 0:
                await self._report(client, t)
            k += 1
            t += 0.5
            await self.clock.until(t)

    async def _report(self, client: CloudletClient, t_s: float) -> None:
        x, y = self.frames.xy[self.frames.tick_at(t_s), self.slot].tolist()
        with contextlib.suppress(CloudletError, OSError):
            await client.report_position(float(x), float(y))

    async def _final_seq(self, client: CloudletClient, s: Session
                         ) -> tuple[int | None, int | None]:
        """The VM's own sequence number (and memory size), from the cloudlet that
        has it now."""
        where = s.location
        for _ in range(8):
            try:
                info = await client.http.vm_info(where, s.vm_id)
                seq, mem = info.get("seq"), info.get("memory_bytes")
                return (seq if isinstance(seq, int) else None,
                        mem if isinstance(mem, int) else None)
            except VMMoved as moved:
                where = Location(str(moved.details.get("node")),
                                 str(moved.details.get("endpoint")))
            except CloudletError as exc:
                self.record.errors.append(f"final seq: {exc.message}")
                return None, None
        return None, None
