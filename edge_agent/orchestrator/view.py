"""What the control plane says about the cluster, aged, as the placer's `ClusterState`.

Pure: believed messages in (presence, telemetry, client reports), a
`ClusterState` out, the clock passed in. Nothing here trusts a payload: signed
messages reach it only through the orchestrator's `ControlGate`, client
reports only from the topic of the client the broker let write it.

Sessions. A session is a VM, as its cloudlet's signed telemetry lists it
(owner, memory, dirty rate, call rate, generation), joined with what its owner
reports (RTTs to the cloudlets it probed, its position). A client can only
speak for VMs it owns: a report names no VM, so no client can make the placer
move someone else's.

Aging rules (docs/orchestrator.md):

- a cloudlet is a target only while online (its Will has not fired), its
  presence is fresh (within 3 refresh periods) and its telemetry is fresh
  (within `telemetry_max_age_intervals` of its own interval);
- a cloudlet's VMs are sessions only while its telemetry is fresh (older, they
  may have moved or died: nothing is decided about them);
- a client's RTTs and position count while younger than
  `client_report_max_age_s`; older, the model alone estimates its RTTs and
  it is taken to stand still at its cloudlet.

Scale. A round for 10,000 sessions must take milliseconds, so everything a
round reads is kept in arrays, updated in place as messages arrive: one row
per cloudlet, per client and per session.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudlet.placement import (
    ClusterState,
    InFlight,
    LatencyModel,
    MeasuredRtt,
    Network,
    PrecopyModel,
    Sessions,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# RTTs kept per client: the few cloudlets it probed (nearest first).
RTT_SLOTS = 8
STALE_AFTER_REFRESHES = 3.0
# The trend of an RTT is an exponentially weighted slope: the newest pair of
# reports weighs this much. Enough smoothing that one jittery probe does not
# look like a user walking away.
SLOPE_WEIGHT = 0.3
# A reported RTT above a minute is not a measurement of an edge link: dropped.
MAX_MEASURED_RTT_MS = 60_000.0
# An interaction rate for a VM that has not been called since the last telemetry:
# not zero, or an idle session could never be worth a move.
MIN_RATE_HZ = 0.2
CHUNK_BYTES = 4096


def _grow(a: Any, size: int, fill: Any) -> Any:
    if len(a) >= size:
        return a
    extra = np.full((max(size, 2 * len(a)) - len(a), *a.shape[1:]), fill, dtype=a.dtype)
    return np.concatenate([a, extra])


@dataclass(frozen=True)
class SessionDefaults:
    """What a session asks for when nobody says: budget, service time, overlay share."""

    budget_ms: float = 30.0
    service_ms: float = 5.0
    overlay_share: float = 1.0


class Cloudlets:
    """One row per cloudlet ever seen (rows are never reused: sessions point at them)."""

    def __init__(self, fixed: tuple[str, ...] = ()) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        n = 16
        self.position = np.zeros((n, 2))
        self.capacity_vms = np.zeros(n, dtype=np.int64)
        self.capacity_memory = np.zeros(n)
        self.online = np.zeros(n, dtype=bool)
        self.presence_at = np.full(n, -math.inf)
        self.refresh_s = np.full(n, 30.0)
        self.telemetry_at = np.full(n, -math.inf)
        self.telemetry_every_s = np.full(n, 5.0)
        self.fixed = bool(fixed)
        self.changed = True  # the network must be rebuilt
        for name in fixed:
            self._add(name)

    def __len__(self) -> int:
        return len(self.names)

    def _add(self, name: str) -> int:
        i = len(self.names)
        self.index[name] = i
        self.names.append(name)
        n = i + 1
        self.position = _grow(self.position, n, 0.0)
        self.capacity_vms = _grow(self.capacity_vms, n, 0)
        self.capacity_memory = _grow(self.capacity_memory, n, 0.0)
        self.online = _grow(self.online, n, False)
        self.presence_at = _grow(self.presence_at, n, -math.inf)
        self.refresh_s = _grow(self.refresh_s, n, 30.0)
        self.telemetry_at = _grow(self.telemetry_at, n, -math.inf)
        self.telemetry_every_s = _grow(self.telemetry_every_s, n, 5.0)
        self.changed = True
        return i

    def row(self, name: str, create: bool = True) -> int | None:
        i = self.index.get(name)
        if i is None and create and not self.fixed:
            i = self._add(name)
        return i

    def targets(self, now: float, telemetry_max_age_intervals: float) -> BoolArray:
        n = len(self)
        presence_ok = now - self.presence_at[:n] <= STALE_AFTER_REFRESHES * self.refresh_s[:n]
        telemetry_ok = (now - self.telemetry_at[:n]
                        <= telemetry_max_age_intervals * self.telemetry_every_s[:n])
        ok: BoolArray = self.online[:n] & presence_ok & telemetry_ok
        return ok


class Clients:
    """One row per client that reported: its RTTs (sparse, with trends) and position."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        n = 64
        self.rtt_node = np.full((n, RTT_SLOTS), -1, dtype=np.int64)
        self.rtt_ms = np.full((n, RTT_SLOTS), np.nan)
        self.slope = np.zeros((n, RTT_SLOTS))
        self.rtt_at = np.full(n, -math.inf)
        self.position = np.zeros((n, 2))
        self.velocity = np.zeros((n, 2))
        self.position_at = np.full(n, -math.inf)

    def row(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = len(self.index)
            self.index[name] = i
            n = i + 1
            self.rtt_node = _grow(self.rtt_node, n, -1)
            self.rtt_ms = _grow(self.rtt_ms, n, np.nan)
            self.slope = _grow(self.slope, n, 0.0)
            self.rtt_at = _grow(self.rtt_at, n, -math.inf)
            self.position = _grow(self.position, n, 0.0)
            self.velocity = _grow(self.velocity, n, 0.0)
            self.position_at = _grow(self.position_at, n, -math.inf)
        return i


class SessionTable:
    """One row per VM the cloudlets' telemetry lists; rows of gone VMs are reused."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        self.vm_of: list[str] = []
        n = 64
        self.alive = np.zeros(n, dtype=bool)
        self.host = np.full(n, -1, dtype=np.int64)
        self.client = np.full(n, -1, dtype=np.int64)
        self.memory = np.zeros(n)
        self.dirty = np.zeros(n)
        self.rate = np.zeros(n)
        self.generation = np.zeros(n, dtype=np.int64)

    def upsert(self, vm: str) -> int:
        i = self.index.get(vm)
        if i is not None:
            return i
        if self.free:
            i = self.free.pop()
            self.vm_of[i] = vm
        else:
            i = len(self.vm_of)
            self.vm_of.append(vm)
            n = i + 1
            self.alive = _grow(self.alive, n, False)
            self.host = _grow(self.host, n, -1)
            self.client = _grow(self.client, n, -1)
            self.memory = _grow(self.memory, n, 0.0)
            self.dirty = _grow(self.dirty, n, 0.0)
            self.rate = _grow(self.rate, n, 0.0)
            self.generation = _grow(self.generation, n, 0)
        self.index[vm] = i
        self.alive[i] = True
        return i

    def drop(self, vm: str) -> None:
        i = self.index.pop(vm, None)
        if i is not None:
            self.alive[i] = False
            self.host[i] = -1
            self.free.append(i)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One round's input: the state, and how to name its rows."""

    state: ClusterState
    vm_ids: tuple[str, ...]  # per session row
    generations: IntArray  # per session row
    names: tuple[str, ...]  # per cloudlet row
    targets: BoolArray  # per cloudlet row: may receive a VM now
    state_age_s: float  # age of the oldest cloudlet telemetry the round used


class ClusterView:
    """The orchestrator's picture of the cluster, from believed messages."""

    def __init__(self, *, defaults: SessionDefaults, latency: LatencyModel | None = None,
                 cost: PrecopyModel | None = None, fixed_network: Network | None = None,
                 bandwidth_mbit_s: float = 1000.0, link_rtt_ms: float = 2.0,
                 client_report_max_age_s: float = 10.0,
                 telemetry_max_age_intervals: float = 3.0) -> None:
        self.defaults = defaults
        self.latency = latency or (fixed_network.latency if fixed_network else LatencyModel())
        self.cost = cost or (fixed_network.cost if fixed_network else PrecopyModel())
        self.fixed_network = fixed_network
        self.cloudlets = Cloudlets(fixed_network.names if fixed_network is not None else ())
        if fixed_network is not None:
            n = fixed_network.size
            self.cloudlets.position[:n] = fixed_network.position_m
            self.cloudlets.capacity_vms[:n] = fixed_network.capacity_vms
            self.cloudlets.capacity_memory[:n] = fixed_network.capacity_memory_bytes
        self.clients = Clients()
        self.sessions = SessionTable()
        self.bandwidth_mbit_s = bandwidth_mbit_s
        self.link_rtt_ms = link_rtt_ms
        self.client_report_max_age_s = client_report_max_age_s
        self.telemetry_max_age_intervals = telemetry_max_age_intervals
        self._network: Network | None = fixed_network
        self._vms_of_node: dict[int, set[str]] = {}
        self.ignored_nodes: set[str] = set()  # seen, but not in the scenario's network

    # --- ingest ---------------------------------------------------------------------------

    def presence(self, node: str, body: dict[str, Any], signed_at: float) -> None:
        i = self.cloudlets.row(node)
        if i is None:
            self.ignored_nodes.add(node)
            return
        c = self.cloudlets
        c.online[i] = body.get("status") == "online"
        c.presence_at[i] = signed_at
        refresh = body.get("refresh_s")
        if isinstance(refresh, int | float) and refresh > 0:
            c.refresh_s[i] = float(refresh)
        if not c.online[i] or self.fixed_network is not None:
            return  # a scenario's network says where cloudlets are and what they hold
        position = _pair(body.get("position"))
        if position is not None and tuple(c.position[i]) != position:
            c.position[i] = position
            c.changed = True
        capacity = body.get("capacity")
        if isinstance(capacity, dict):
            vms, mem = capacity.get("max_vms"), capacity.get("max_memory_bytes")
            if type(vms) is int and vms != c.capacity_vms[i]:
                c.capacity_vms[i] = vms
                c.changed = True
            if isinstance(mem, int | float) and float(mem) != c.capacity_memory[i]:
                c.capacity_memory[i] = float(mem)
                c.changed = True

    def telemetry(self, node: str, body: dict[str, Any], signed_at: float) -> None:
        i = self.cloudlets.row(node)
        if i is None:
            self.ignored_nodes.add(node)
            return
        c = self.cloudlets
        if signed_at < c.telemetry_at[i]:
            return
        c.telemetry_at[i] = signed_at
        every = body.get("interval_s")
        if isinstance(every, int | float) and every > 0:
            c.telemetry_every_s[i] = float(every)
        per_vm = body.get("per_vm")
        listed: set[str] = set()
        t = self.sessions
        if isinstance(per_vm, dict):
            for vm, info in per_vm.items():
                if not isinstance(vm, str) or not isinstance(info, dict):
                    continue
                owner = info.get("owner")
                if not isinstance(owner, str) or not owner:
                    continue
                row = t.upsert(vm)
                old_host = int(t.host[row])
                if old_host >= 0 and old_host != i:
                    self._vms_of_node.get(old_host, set()).discard(vm)
                t.host[row] = i
                t.client[row] = self.clients.row(owner)
                t.memory[row] = _number(info.get("memory_bytes"))
                t.dirty[row] = _number(info.get("dirty_chunks_per_s")) * CHUNK_BYTES
                t.rate[row] = max(_number(info.get("calls_per_s")), MIN_RATE_HZ)
                generation = info.get("generation")
                t.generation[row] = generation if type(generation) is int else 0
                listed.add(vm)
        # VMs this cloudlet listed before and not now: gone from here (moved, destroyed).
        for vm in self._vms_of_node.get(i, set()) - listed:
            gone = t.index.get(vm)
            if gone is not None and t.host[gone] == i:
                t.drop(vm)
        self._vms_of_node[i] = listed

    def client_rtt(self, client: str, body: dict[str, Any], now: float) -> None:
        # The hot path of ingest (clients report often): plain Python over the few
        # values, then one assignment per row, not one numpy item at a time.
        rtts = body.get("rtt_ms")
        if not isinstance(rtts, dict):
            return
        index = self.cloudlets.index
        pairs: list[tuple[float, int]] = []
        for node, ms in rtts.items():
            kind = type(ms)  # msgpack gives exact ints and floats; a bool is neither here
            if ((kind is not float and kind is not int) or not math.isfinite(ms) or ms < 0
                    or ms > MAX_MEASURED_RTT_MS):
                continue
            i = index.get(node) if isinstance(node, str) else None
            if i is not None:
                pairs.append((float(ms), i))
        pairs.sort()
        del pairs[RTT_SLOTS:]
        c = self.clients
        r = c.row(client)
        dt = now - float(c.rtt_at[r])
        trend = 0 < dt <= self.client_report_max_age_s
        old = dict(zip(c.rtt_node[r].tolist(),
                       zip(c.rtt_ms[r].tolist(), c.slope[r].tolist(), strict=True),
                       strict=True))
        nodes = [-1] * RTT_SLOTS
        values = [math.nan] * RTT_SLOTS
        slopes = [0.0] * RTT_SLOTS
        for k, (ms, i) in enumerate(pairs):
            nodes[k] = i
            values[k] = ms
            prev = old.get(i)
            if trend and prev is not None and not math.isnan(prev[0]):
                slope = SLOPE_WEIGHT * (ms - prev[0]) / dt + (1 - SLOPE_WEIGHT) * prev[1]
                # Finite RTTs can still make an infinite trend (1e308 ms 0.1 s after
                # 1 ms): the placer's value would then be inf, not a refusal.
                slopes[k] = slope if math.isfinite(slope) else 0.0
        c.rtt_node[r] = nodes
        c.rtt_ms[r] = values
        c.slope[r] = slopes
        c.rtt_at[r] = now

    def client_position(self, client: str, body: dict[str, Any], now: float) -> None:
        x, y = body.get("x_m"), body.get("y_m")
        if not _finite(x) or not _finite(y):
            return
        c = self.clients
        r = c.row(client)
        xy = np.array([float(x), float(y)])  # type: ignore[arg-type]
        vx, vy = body.get("vx_m_s"), body.get("vy_m_s")
        if _finite(vx) and _finite(vy):
            c.velocity[r] = (float(vx), float(vy))  # type: ignore[arg-type]
        else:
            dt = now - c.position_at[r]
            if 0 < dt <= self.client_report_max_age_s:
                c.velocity[r] = (xy - c.position[r]) / dt
            else:
                c.velocity[r] = 0.0
        c.position[r] = xy
        c.position_at[r] = now

    # --- one round's state -------------------------------------------------------------

    def network(self) -> Network | None:
        c = self.cloudlets
        if self._network is not None and (self.fixed_network is not None or not c.changed):
            return self._network
        n = len(c)
        if n == 0:
            return None
        pos = c.position[:n].copy()
        d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(axis=-1))
        rtt = self.latency.link_rtt_ms(d, np.full((n, n), self.link_rtt_ms))
        np.fill_diagonal(rtt, 0.0)
        bw = np.full((n, n), self.bandwidth_mbit_s)
        self._network = Network.build(pos, c.capacity_vms[:n].copy(), c.capacity_memory[:n].copy(),
                                      rtt, bw, latency=self.latency, cost=self.cost,
                                      names=tuple(c.names))
        c.changed = False
        return self._network

    def snapshot(self, now: float, *, arriving: Iterable[tuple[str, int]] = (),
                 unmovable: set[str] | frozenset[str] = frozenset(),
                 last_move_s: dict[str, float] | None = None,
                 previous_host: dict[str, int] | None = None,
                 moving: Iterable[tuple[int, int]] = ()) -> Snapshot | None:
        """This round's `ClusterState` (None while no cloudlet is known).

        `arriving` lists (vm, target row) of moves in flight: the target has reserved
        room for them. `unmovable` VMs (a move in flight, or held back after failures)
        are sessions the placer may not move. `last_move_s` (by the orchestrator's
        clock, as `now`) and `previous_host` feed cool-downs and ping-pong checks.
        `moving` lists (source row, target row) of the moves in flight: the placer
        prices a new move on the backhaul they share and admits it only while the
        path has room (cloudlet.placement.congestion); rows outside the network
        are left out.
        """
        net = self.network()
        if net is None:
            return None
        c, t, cl = self.cloudlets, self.sessions, self.clients
        n = net.size
        targets = c.targets(now, self.telemetry_max_age_intervals)[:n]
        fresh_nodes = (now - c.telemetry_at[:n]
                       <= self.telemetry_max_age_intervals * c.telemetry_every_s[:n])
        count = len(t.vm_of)
        rows = np.flatnonzero(t.alive[:count])
        hosts = t.host[rows]
        rows = rows[(hosts >= 0) & (hosts < n)]
        rows = rows[fresh_nodes[t.host[rows]]]
        host = t.host[rows]
        vms = np.bincount(host, minlength=n).astype(np.int64)
        serving = vms.copy()  # what queues: the VMs hosted (arriving ones serve elsewhere)
        memory = t.memory[rows]
        used = np.bincount(host, weights=memory, minlength=n)
        for vm, target in arriving:
            if 0 <= target < n:
                vms[target] += 1
                row = t.index.get(vm)
                used[target] += t.memory[row] if row is not None else 0.0
        # A cloudlet that may not receive a VM now looks full to the placer.
        vms = np.where(targets, vms, np.maximum(vms, net.capacity_vms))
        used_bytes: FloatArray = np.where(targets, used, np.maximum(
            used, net.capacity_memory_bytes)).astype(np.float64)
        client = t.client[rows]
        rep_fresh = now - cl.rtt_at[client] <= self.client_report_max_age_s
        pos_fresh = now - cl.position_at[client] <= self.client_report_max_age_s
        position = np.where(pos_fresh[:, None], cl.position[client], net.position_m[host])
        velocity = np.where(pos_fresh[:, None], cl.velocity[client], 0.0)
        rtt_node = np.where(rep_fresh[:, None], cl.rtt_node[client], -1)
        vm_ids = tuple(t.vm_of[r] for r in rows.tolist())
        movable = np.ones(len(rows), dtype=bool)
        last = np.full(len(rows), -math.inf)
        prev = np.full(len(rows), -1, dtype=np.int64)
        if unmovable or last_move_s or previous_host:
            for k, vm in enumerate(vm_ids):
                if vm in unmovable:
                    movable[k] = False
                if last_move_s and vm in last_move_s:
                    last[k] = last_move_s[vm]
                if previous_host and vm in previous_host:
                    prev[k] = previous_host[vm]
        d = self.defaults
        m = len(rows)
        sessions = Sessions(
            host=host, position_m=position, velocity_m_s=velocity, memory_bytes=memory,
            overlay_bytes=memory * d.overlay_share, dirty_rate_bytes_s=t.dirty[rows],
            budget_ms=np.full(m, d.budget_ms), service_ms=np.full(m, d.service_ms),
            interaction_rate_hz=t.rate[rows], last_move_s=last, previous_host=prev,
            movable=movable,
            rtt_ms=MeasuredRtt(rtt_node, np.where(rep_fresh[:, None], cl.rtt_ms[client], np.nan),
                               np.where(rep_fresh[:, None], cl.slope[client], 0.0)))
        used_at = c.telemetry_at[:n][np.isin(np.arange(n), np.unique(host))]
        age = float(now - used_at.min()) if len(used_at) else 0.0
        pairs = np.array([(a, b) for a, b in moving if 0 <= a < n and 0 <= b < n],
                         dtype=np.int64).reshape(-1, 2)
        state = ClusterState(time_s=now, network=net, vms=vms, memory_used_bytes=used_bytes,
                             sessions=sessions, serving_vms=serving,
                             in_flight=InFlight(pairs[:, 0].copy(), pairs[:, 1].copy()))
        return Snapshot(state=state, vm_ids=vm_ids, generations=t.generation[rows].copy(),
                        names=tuple(c.names[:n]), targets=targets, state_age_s=age)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) \
        and value >= 0 else 0.0


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2 and all(_finite(v) for v in value):
        return (float(value[0]), float(value[1]))
    return None
