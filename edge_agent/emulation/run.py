"""`cloudlet emulate`, the work: plan once, simulate, then each policy on a fresh cluster.

The plan fixes everything both sides share: the scenario (trace swapped in,
policies chosen, duration cut, workloads scaled), the world replayed tick by
tick, and the scale factor. The simulator runs first (seconds), then each
policy in turn gets its own broker, daemons and users in a fresh temporary state
directory, torn down before the next. Outputs: the simulator's files for the
emulated run in DIR, the simulator's own in DIR/sim, `comparison.json`, and per
policy `DIR/POLICY/migrations.jsonl`, `calibration.json` and the daemons' logs.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cloudlet.errors import ScenarioError
from cloudlet.fsutil import atomic_write
from cloudlet.sim import load_scenario, simulate
from cloudlet.sim.engine import PolicyResult, SimResult
from cloudlet.sim.report import summary as sim_summary
from cloudlet.sim.report import write_outputs
from cloudlet.sim.scenario import Scenario
from edge_agent.emulation import compare
from edge_agent.emulation.cluster import NodeSpec, running_cluster
from edge_agent.emulation.events import MigrationLog, listen
from edge_agent.emulation.results import policy_result
from edge_agent.emulation.scaling import choose_factor, scaled
from edge_agent.emulation.scenario_file import write_resolved
from edge_agent.emulation.user import RunClock, User, UserRecord
from edge_agent.emulation.world import WorldFrames, replay

SETUP_TIMEOUT_S = 180.0  # every initial session created and its guest grown
DRAIN_TIMEOUT_S = 90.0  # after the end: answers still in flight, final sequence numbers


@dataclass(frozen=True, eq=False)
class Plan:
    scenario: Scenario  # scaled
    factor: float
    frames: WorldFrames
    ticks: int

    @property
    def duration_s(self) -> float:
        return self.ticks * self.scenario.step_s


def make_plan(path: str, *, trace: str | None = None, policies: str | None = None,
              duration_s: float | None = None, scale: float | None = None) -> Plan:
    sc = load_scenario(path)
    if trace:
        sc = sc.with_trace(Path(trace))
    if policies:
        names = tuple(n.strip() for n in policies.split(",") if n.strip())
        if not names:
            raise ScenarioError("--policies: name at least one policy")
        sc = sc.with_policies(names)
    if duration_s is not None:
        if not duration_s > 0:
            raise ScenarioError(f"--duration-s: must be > 0 (got {duration_s:g})")
        sc = replace(sc, duration_s=duration_s)
    factor = scale if scale is not None else choose_factor(sc)
    sc = scaled(sc, factor)
    frames = replay(sc)
    return Plan(sc, factor, frames, frames.ticks)


def _state_root() -> str | None:
    """RAM (/dev/shm) when there is one: four daemons checkpointing every 2 s to one
    shared disk measure the disk's flushes, which a cloudlet would not share."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def node_settings(sc: Scenario) -> dict[str, Any]:
    """Daemon settings for the emulated guests: one call may carry a whole grown
    guest, and that call (and so every call of these VMs) stays on the event loop."""
    biggest = max(w.memory_mib for w in sc.workloads)
    return {"telemetry_interval_s": 1.0, "vm_deadline_ms": 2000, "inline_deadline_ms": 2000,
            "vm_memory_mib": max(64, math.ceil(4 * biggest)),
            "max_request_kib": math.ceil(2 * biggest + 1) * 1024,
            "checkpoint_interval_s": 2.0}


def orchestrator_table(sc: Scenario, policy: str, scenario_file: Path) -> dict[str, Any] | None:
    if policy == "never":
        return None  # nothing would ever move: no orchestrator at all
    return {"enabled": True, "policy": policy, "interval_s": sc.decision_interval_s,
            "region": "default", "lease_s": 10.0, "scenario": str(scenario_file),
            "params": dict(sc.policy_params.get(policy, {}))}


async def emulate_policy(plan: Plan, policy: str, out: Path, progress: bool
                         ) -> tuple[PolicyResult, list[dict[str, Any]], dict[str, Any]]:
    sc = plan.scenario
    frames = plan.frames
    topo = frames.topology
    specs = [NodeSpec(name, float(x), float(y), int(topo.network.capacity_vms[i]))
             for i, (name, (x, y)) in enumerate(zip(topo.names, topo.position_m.tolist(),
                                                    strict=True))]
    pdir = out / policy
    pdir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"cloudlet-emulate-{policy}-",
                                     dir=_state_root()) as tmp:
        state = Path(tmp)
        resolved = write_resolved(sc, plan.factor, state / "scenario.toml")
        try:
            async with running_cluster(
                    state, specs, backhaul_mbit_s=sc.backhaul.bandwidth_mbit_s,
                    node_settings=node_settings(sc),
                    orchestrator=orchestrator_table(sc, policy, resolved)) as cluster:
                clock = RunClock(plan.duration_s)
                mlog = MigrationLog(clock.now)
                subscribed = asyncio.Event()
                listener = asyncio.get_running_loop().create_task(
                    listen(cluster.broker_url, cluster.operator_login(), mlog, subscribed))
                try:
                    await asyncio.wait_for(subscribed.wait(), 30)
                    users = await _run_users(plan, policy, cluster, clock, progress)
                finally:
                    listener.cancel()
                    await asyncio.gather(listener, return_exceptions=True)
        finally:
            logs = pdir / "logs"
            logs.mkdir(exist_ok=True)
            for log in (state / "nodes").glob("*/log"):
                shutil.copyfile(log, logs / f"{log.parent.name}.log")
    wall = time.perf_counter() - wall0
    index = {n: i for i, n in enumerate(topo.names)}
    records = mlog.records
    for r in records:
        a, b = index.get(str(r["source"])), index.get(str(r["target"]))
        r["bandwidth_mbit_s"] = (float(topo.network.backhaul.path_bandwidth_mbit_s(
                                     np.array(a), np.array(b)))
                                 if a is not None and b is not None
                                 else sc.backhaul.bandwidth_mbit_s)
    calib = compare.calibration(records, topo.network.cost)
    with open(pdir / "migrations.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    atomic_write(pdir / "calibration.json", (json.dumps(
        {"model": "pre-copy (docs/placement.md)", **calib}, indent=2) + "\n").encode())
    result = policy_result(policy, sc, frames, plan.ticks, users, records,
                           len(mlog.failed), wall)
    return result, records, calib


async def _run_users(plan: Plan, policy: str, cluster: Any, clock: RunClock,
                     progress: bool) -> list[UserRecord]:
    sc = plan.scenario
    frames = plan.frames
    # A user's links go straight to each daemon: its traffic is small, and one proxy
    # hop fewer is CPU left to the daemons. Only migrations cross the ingress links.
    targets = [(n.advertised, n.port) for n in cluster.nodes]
    users = []
    for slot in range(frames.slots):
        on = np.flatnonzero(frames.active[:plan.ticks, slot])
        wl = int(frames.workload[on[0], slot]) if len(on) else 0
        name = f"user-{slot}"
        seed = int(np.random.SeedSequence([sc.seed, 0xE3, slot]).generate_state(1)[0])
        users.append(User(slot, name, cluster.token(name), cluster.broker_url, frames,
                          targets, sc.workloads[wl], wl, clock, seed))
    tasks = [asyncio.get_running_loop().create_task(u.run()) for u in users]
    try:
        await asyncio.wait_for(asyncio.gather(*(u.ready.wait() for u in users)),
                               SETUP_TIMEOUT_S)
        clock.start()
        await _progress(plan, policy, clock, users, progress)
        done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for t in pending:
            t.cancel()
        return [await t if t in done else u.record for t, u in zip(tasks, users, strict=True)]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _progress(plan: Plan, policy: str, clock: RunClock, users: list[User],
                    progress: bool) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(plan.duration_s), unit="s", desc=f"emulate {policy}",
                   leave=False, mininterval=0.5, disable=None)
    try:
        shown = 0
        while clock.now() < plan.duration_s:
            await asyncio.sleep(min(0.5, max(plan.duration_s - clock.now(), 0.01)))
            now = min(round(clock.now()), round(plan.duration_s))
            if bar is not None and now > shown:
                bar.update(now - shown)
                bar.set_postfix(interactions=sum(len(u.record.arrivals_s) for u in users),
                                refresh=False)
                shown = now
    finally:
        if bar is not None:
            bar.close()


def _with_extra(result: SimResult, out: Path, plan: Plan, emulated: dict[str, PolicyResult],
                plots: bool) -> None:
    emu = replace(result, policies=emulated, world_wall_s=0.0)
    write_outputs(emu, out, plots=plots)
    doc = sim_summary(emu)
    doc.update(mode="emulated", scale_factor=plan.factor,
               scaled_workloads=[{"name": w.name, "memory_mib": w.memory_mib,
                                  "overlay_mib": w.overlay_mib,
                                  "dirty_rate_mib_s": w.dirty_rate_mib_s}
                                 for w in plan.scenario.workloads])
    atomic_write(out / "summary.json", (json.dumps(doc, indent=2) + "\n").encode())


def emulate(plan: Plan, out: Path, *, progress: bool = True, plots: bool = True) -> int:
    """Simulate, emulate every policy, write everything; print the tables."""
    sc = plan.scenario
    t0 = time.perf_counter()
    sim = simulate(sc, progress=False)
    write_outputs(sim, out / "sim", plots=plots)
    print(f"{sc.name}: {plan.frames.topology.size} cloudlets, {plan.frames.slots} users, "
          f"{plan.duration_s:g} s; guests scaled by {plan.factor:g} "
          f"(memory {', '.join(f'{w.memory_mib:g}' for w in sc.workloads)} MiB); "
          f"simulated in {time.perf_counter() - t0:.1f} s", flush=True)
    emulated: dict[str, PolicyResult] = {}
    calibs: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    for policy in sc.policies:
        try:
            result, records, calib = asyncio.run(_main(plan, policy, out, progress))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(f"interrupted while emulating {policy}: its cloudlets, broker and links "
                  "are stopped; no comparison written", file=sys.stderr)
            return 130
        emulated[policy] = result
        calibs[policy] = (records, calib)
        s = result.summary
        print(f"emulated {policy}: {s['interactions']} interactions, "
              f"{100 * s['within_budget']:.1f}% within budget, {s['migrations']} migrations, "
              f"lost {s['lost_calls']}, duplicated {s['duplicate_calls']} "
              f"({s['wall_s']:.0f} s)", flush=True)
    _with_extra(sim, out, plan, emulated, plots)
    comp = compare.comparison(sim.policies, emulated)
    atomic_write(out / "comparison.json", (json.dumps(
        {"scenario": sc.name, "scale_factor": plan.factor, "policies": comp},
        indent=2) + "\n").encode())
    print(compare.comparison_table(comp, {n: r.summary for n, r in emulated.items()}))
    for policy, (records, calib) in calibs.items():
        if records:
            print(f"\n{policy}: live migrations, pre-copy model vs measured")
            print(compare.calibration_table(records, calib))
    print(f"outputs in {out}/ (guests scaled by {plan.factor:g})", file=sys.stderr)
    return 0


async def _main(plan: Plan, policy: str, out: Path, progress: bool
                ) -> tuple[PolicyResult, list[dict[str, Any]], dict[str, Any]]:
    import signal

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM as Ctrl-C: cancel, so every cluster is torn down
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    races = BroadcastRaces()
    loop.set_exception_handler(races)
    try:
        return await emulate_policy(plan, policy, out, progress)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if races.count:
            print(f"{policy}: the embedded broker (amqtt) dropped {races.count} broadcast(s) "
                  "to a race between a broadcast and a subscription", file=sys.stderr)


class BroadcastRaces:
    """The event loop's exception handler: counts amqtt's known race (a broadcast
    iterating the subscriptions while a client subscribes fails with RuntimeError,
    and that one message is not delivered) instead of printing its traceback;
    anything else goes to the default handler."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        future = context.get("future")
        exc = context.get("exception")
        coro = getattr(future, "get_coro", lambda: None)() if future is not None else None
        if (isinstance(exc, RuntimeError) and coro is not None
                and getattr(coro, "__qualname__", "").endswith("_run_broadcast")):
            self.count += 1
            return
        loop.default_exception_handler(context)
