"""The orchestrator's one I/O edge: its broker connection and its decision loop.

It connects as `orchestrator.NODE` (a broker user of its own, so it never
shares or steals its cloudlet's connection), subscribes to presence,
telemetry, events, its region's lease and the clients' reports, and every
`interval_s`:

1. keeps its lease (claims or renews it; `lease.LeaseKeeper` decides);
2. if it leads: builds the `ClusterState` (`view`), runs the policy (the very
   object `cloudlet sim` runs), writes its journal (`tracker`), then sends each
   move as a signed `migrate` order with its epoch and the VM's generation;
3. follows each order to its outcome on the source's events topic, retries a
   failed one with backoff, and abandons it after the last attempt with an
   event of its own (`move_abandoned` on `nodes/NODE/events`).

Every decision is logged with its reasons (expected gain, score, predicted
duration and downtime) and then with what happened (measured duration and
downtime), and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from cloudlet import placement
from cloudlet.errors import ConfigError, TrustError
from cloudlet.jit import cache_in
from cloudlet.placement import Policy, make_policy
from cloudlet.placement.warm import warm_up
from cloudlet.protocol import (
    ALL_EVENTS,
    ALL_POSITIONS,
    ALL_PRESENCE,
    ALL_RTT,
    ALL_TELEMETRY,
    Kind,
    commands_topic,
    decode_report,
    event_message,
    events_topic,
    lease_topic,
    parse_topic,
)
from cloudlet.trust import acl
from cloudlet.trust.certs import CertificateVerifier
from cloudlet.trust.cluster import load_secret
from cloudlet.trust.gate import Believed, ControlGate
from cloudlet.trust.sealed import Identity, seal
from edge_agent.config import NodeConfig
from edge_agent.control import broker_address
from edge_agent.orchestrator.lease import LeaseKeeper
from edge_agent.orchestrator.metrics import OrchestratorMetrics
from edge_agent.orchestrator.tracker import JOURNAL_FILE, Decision, MoveTracker, Outcome
from edge_agent.orchestrator.view import ClusterView, SessionDefaults

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
ORCHESTRATOR_DIR = "orchestrator"
# The placer's compiled code, under the state directory (cloudlet.jit.cache_in).
NUMBA_CACHE_DIR = "numba-cache"


def build_view(config: NodeConfig) -> tuple[ClusterView, Policy]:
    """The view and the policy, from the `[orchestrator]` table (and its scenario)."""
    oc = config.orchestrator
    path = oc.scenario_path
    if path is None:
        view = ClusterView(
            defaults=SessionDefaults(oc.budget_ms, oc.service_ms, oc.overlay_share),
            bandwidth_mbit_s=oc.backhaul_bandwidth_mbit_s, link_rtt_ms=oc.backhaul_link_rtt_ms,
            client_report_max_age_s=oc.client_report_max_age_s,
            telemetry_max_age_intervals=oc.telemetry_max_age_intervals)
        return view, make_policy(oc.policy, **oc.params)
    # Only with a scenario: the simulator's modules are not needed otherwise.
    from cloudlet.sim import load_scenario, scenario_topology

    sc = load_scenario(path)
    topology = scenario_topology(sc)
    w = sc.workloads[0]
    defaults = SessionDefaults(w.budget_ms, w.service_ms,
                               min(w.overlay_mib / w.memory_mib, 1.0) if w.memory_mib else 1.0)
    view = ClusterView(defaults=defaults, fixed_network=topology.network,
                       client_report_max_age_s=oc.client_report_max_age_s,
                       telemetry_max_age_intervals=oc.telemetry_max_age_intervals)
    params = {**sc.policy_params.get(oc.policy, {}), **oc.params}
    return view, make_policy(oc.policy, **params)


def broker_credentials(config: NodeConfig) -> tuple[str | None, str | None]:
    """`orchestrator.NODE` and its password, derived from the cluster secret; none when
    the cloudlet itself uses an anonymous broker."""
    if not config.broker_username:
        return None, None
    if not config.secret_file:
        raise ConfigError("the orchestrator needs the cluster secret (secret_file) for its "
                          "broker password")
    user = acl.orchestrator_user(config.name)
    return user, acl.derived_password(load_secret(config.secret_file), user)


class Orchestrator:
    def __init__(self, config: NodeConfig, identity: Identity, verifier: CertificateVerifier,
                 metrics: OrchestratorMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.oc = config.orchestrator
        self.identity = identity
        self.metrics = metrics
        self.clock = clock
        self.view, self.policy = build_view(config)
        self.gate = ControlGate(verifier, window_s=config.control_window_s)
        folder = config.state_path / ORCHESTRATOR_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.tracker = MoveTracker(folder / JOURNAL_FILE, retry_s=self.oc.retry_s,
                                   max_attempts=self.oc.max_attempts,
                                   move_timeout_s=self.oc.move_timeout_s)
        # The holder names this process, not only its cloudlet: a restarted
        # orchestrator (or a second one on the same node) claims anew.
        self.holder = f"{config.name}#{secrets.token_hex(4)}"
        self.keeper = LeaseKeeper(self.holder, self.oc.region, lease_s=self.oc.lease_s,
                                  started_unix=clock())
        self.keeper.note_epoch(self.tracker.epoch_seen)
        self.username, self.password = broker_credentials(config)
        self.connected = asyncio.Event()
        self._stopping = False  # `stop()`: `run` ends rather than reconnect
        self.rounds = 0
        self.last_round_s = 0.0
        self.outcomes: list[Outcome] = []  # recent, for tests and the emulator
        self._client: aiomqtt.Client | None = None
        self._was_leading = False
        self._journal_dirty = False
        self._failed_kinds: set[str] = set()
        # One child per kind, looked up once (`labels` takes a lock and a dict per call).
        self._ingested = {k: metrics.ingested.labels(k.value) for k in Kind}

    # --- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected and decide until cancelled, reconnecting with backoff."""
        # The placer's compiled loops load on their first call: off the event loop and
        # before the lease is contested, so that a slow first round cannot stall the
        # lease's renewals (cloudlet.placement.warm).
        cache_in(self.config.state_path / NUMBA_CACHE_DIR, Path(placement.__file__).parent)
        try:
            await asyncio.to_thread(warm_up, self.policy)
        except Exception:
            # Not fatal: the first round compiles what it needs, only later.
            log.exception("orchestrator: warming the placer up failed")
        host, port, tls = broker_address(self.config.broker_url)
        backoff = BACKOFF_START_S
        self._stopping = False
        while True:
            try:
                await self._session(host, port, tls or self.config.broker_tls)
            except* (aiomqtt.MqttError, OSError) as group:
                log.warning("orchestrator: broker lost or unreachable (%s); retrying in %.1f s",
                            group.exceptions[0], backoff)
            finally:
                if self.connected.is_set():
                    backoff = BACKOFF_START_S
                self.connected.clear()
                self.metrics.leader.set(0)
                self._client = None
            if self._stopping:  # the session's end may be an error in place of the cancel
                raise asyncio.CancelledError
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """Stopping: `run`, cancelled next, must end, not reconnect (as
        `ControlPlane.stop`: on Python 3.11 the cancellation can arrive as an
        MqttError)."""
        self._stopping = True

    async def _session(self, host: str, port: int, tls: bool) -> None:
        c = self.config
        tls_context = ssl.create_default_context(cafile=c.broker_ca_file or None) if tls else None
        async with aiomqtt.Client(
            host, port, identifier=f"orchestrator-{c.name}-{os.getpid()}-{secrets.token_hex(2)}",
            keepalive=c.mqtt_keepalive_s, username=self.username, password=self.password,
            tls_context=tls_context, clean_session=True, queue_type=_inbox(self._take_message),
        ) as client:
            self._client = client
            for topic in (ALL_PRESENCE, ALL_TELEMETRY, ALL_EVENTS, lease_topic(self.oc.region)):
                await client.subscribe(topic, qos=1)
            for topic in (ALL_RTT, ALL_POSITIONS):
                await client.subscribe(topic, qos=0)
            self.connected.set()
            log.info("orchestrator %s (policy %s, region %s) connected to %s", self.holder,
                     self.policy.name, self.oc.region, c.broker_url)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._decide_loop(client))

    # --- receiving ----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        # Messages are taken in as they are read (`_inbox`): nothing is ever queued, so
        # this only waits for the connection to end (aiomqtt raises MqttError then).
        async for _ in client.messages:
            pass

    def _take_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        try:
            self.take(message.topic.value, payload)
        except Exception:
            # Never out of here: raised inside aiomqtt's read, it would end the
            # connection, and a retained message that trips a bug would then end
            # every connection after it. Dropped, counted, logged once per topic kind.
            self.metrics.dropped.labels("error").inc()
            kind = message.topic.value.rsplit("/", 1)[-1][:32]
            if kind not in self._failed_kinds:
                self._failed_kinds.add(kind)
                log.exception("orchestrator: a %s message could not be taken in (dropped; "
                              "logged once per kind)", kind)

    def take(self, topic: str, payload: bytes | bytearray) -> None:
        """One control-plane message (public: the benchmark feeds it directly too)."""
        ref = parse_topic(topic)
        if ref is None:
            return
        now = self.clock()
        if ref.kind in (Kind.RTT, Kind.POSITION):
            # Unsigned: the broker let only client `ref.name` write this topic.
            body = decode_report(payload)
            if body is None:
                self.metrics.dropped.labels("malformed").inc()
                return
            if ref.kind is Kind.RTT:
                self.view.client_rtt(ref.name, body, now)
            else:
                self.view.client_position(ref.name, body, now)
            self._ingested[ref.kind].inc()
            return
        try:
            believed = self.gate.admit(topic, payload)
        except TrustError as exc:
            self.metrics.dropped.labels(str(exc.details.get("reason", "untrusted"))).inc()
            return
        if believed is None:
            return
        self._ingested[ref.kind].inc()
        self._believed(believed, now)

    def _believed(self, b: Believed, now: float) -> None:
        if b.kind is Kind.PRESENCE:
            self.view.presence(b.name, b.body, b.ts)
        elif b.kind is Kind.TELEMETRY:
            self.view.telemetry(b.name, b.body, b.ts)
            epoch = b.body.get("epoch")
            if type(epoch) is int:
                self.keeper.note_epoch(epoch)
            per_vm = b.body.get("per_vm")
            if isinstance(per_vm, dict) and self.tracker.in_flight:
                for vm in list(self.tracker.in_flight):
                    info = per_vm.get(vm)
                    if isinstance(info, dict) and type(info.get("generation")) is int:
                        outcome = self.tracker.seen_at(vm, b.name, info["generation"], now)
                        if outcome is not None:
                            self._report(outcome)
        elif b.kind is Kind.LEASE:
            self.keeper.observe(b.body)
        elif b.kind is Kind.EVENTS:
            cid = b.body.get("id")
            if isinstance(cid, str):
                ok = b.body.get("ok") is True
                detail = b.body.get("result") if ok else b.body.get("error")
                outcome = self.tracker.outcome(cid, ok, detail if isinstance(detail, dict)
                                               else {}, now)
                if outcome is not None:
                    self._report(outcome)

    # --- deciding -----------------------------------------------------------------------

    async def _decide_loop(self, client: aiomqtt.Client) -> None:
        while True:
            started = time.monotonic()
            await self._tick(client)
            await asyncio.sleep(max(0.0, self.oc.interval_s - (time.monotonic() - started)))

    async def _tick(self, client: aiomqtt.Client) -> None:
        now = self.clock()
        lease = self.keeper.due(now)
        if lease is not None:
            topic = lease_topic(self.oc.region)
            await client.publish(topic, seal(self.identity, topic, lease), qos=1, retain=True)
        leading = self.keeper.is_leader(now)
        if leading != self._was_leading:
            self._was_leading = leading
            if leading:
                log.info("leading region %s with epoch %d", self.oc.region, self.keeper.epoch)
            else:
                log.warning("no longer leading region %s (lease held by %s)", self.oc.region,
                            self.keeper.current.holder if self.keeper.current else "nobody")
        self.metrics.leader.set(1 if leading else 0)
        self.metrics.epoch.set(max(self.keeper.epoch, 0))
        for outcome in self.tracker.expire(now):
            self._report(outcome)
        if leading:
            await self.round(client, now)
        if self._journal_dirty:
            self._journal_dirty = False
            await asyncio.to_thread(self.tracker.save)

    async def round(self, client: aiomqtt.Client | None, now: float) -> list[Decision]:
        """One decision round; returns the orders sent (or, without a client, decided)."""
        t0 = time.perf_counter()
        decisions = self.decide(now)
        if decisions:
            self.tracker.epoch_seen = max(self.tracker.epoch_seen, self.keeper.epoch)
            # The journal first: a crash after an order went out must not forget it.
            await asyncio.to_thread(self.tracker.save)
            if client is not None:
                epoch = self.keeper.epoch
                for d in decisions:
                    topic = commands_topic(d.source)
                    await client.publish(topic, seal(self.identity, topic, d.command(epoch)),
                                         qos=1)
        self.last_round_s = time.perf_counter() - t0
        self.metrics.round_seconds.observe(self.last_round_s)
        self.rounds += 1
        return decisions

    def decide(self, now: float) -> list[Decision]:
        """Run the policy on the current view; record and return the orders to send."""
        retries = self._valid_retries(now)
        busy = self.tracker.busy(now)
        index = self.view.cloudlets.index
        snap = self.view.snapshot(
            now, arriving=[(d.vm, index.get(d.target, -1))
                           for d in self.tracker.in_flight.values()],
            unmovable=busy, last_move_s=self.tracker.last_move,
            previous_host={vm: index[n] for vm, n in self.tracker.previous_host.items()
                           if n in index},
            moving=[(index.get(d.source, -1), index.get(d.target, -1))
                    for d in self.tracker.in_flight.values()])
        if snap is None:
            return self.tracker.sending(retries, now)
        self.metrics.sessions.set(snap.state.sessions.count)
        self.metrics.targets.set(int(np.count_nonzero(snap.targets)))
        self.metrics.state_age.set(snap.state_age_s)
        moves = self.policy.decide(snap.state)
        log.debug("round: %d sessions, %d targets, %d moves", snap.state.sessions.count,
                  int(np.count_nonzero(snap.targets)), len(moves))
        fresh = []
        for k in range(len(moves)):
            row = int(moves.session[k])
            fresh.append(self.tracker.new_decision(
                vm=snap.vm_ids[row], source=snap.names[int(moves.source[k])],
                target=snap.names[int(moves.target[k])],
                generation=int(snap.generations[row]),
                expected_gain_ms=float(moves.expected_gain_ms[k]), score=float(moves.score[k]),
                predicted_duration_s=float(moves.duration_s[k]),
                predicted_downtime_s=float(moves.downtime_s[k]), now=now))
        sent = self.tracker.sending(retries + fresh, now)
        for d in sent:
            self.metrics.moves.labels("started").inc()
            log.info("move VM %s %s -> %s (attempt %d): expected gain %.1f ms, score %.2f, "
                     "predicted %.2f s with %.0f ms paused", d.vm, d.source, d.target,
                     d.attempt, d.expected_gain_ms, d.score, d.predicted_duration_s,
                     d.predicted_downtime_s * 1000)
        return sent

    def _valid_retries(self, now: float) -> list[Decision]:
        """Due retries whose VM is still where it was decided and whose target may
        still receive it. The rest are abandoned (with an event): the VM moved or
        went, or the target died; the placer decides afresh from the new state."""
        out = []
        names = self.view.cloudlets.index
        targets = self.view.cloudlets.targets(now, self.oc.telemetry_max_age_intervals)
        for d in self.tracker.retries_due(now):
            row = self.view.sessions.index.get(d.vm)
            at = int(self.view.sessions.host[row]) if row is not None else -1
            target = names.get(d.target)
            if at != names.get(d.source):
                why = {"code": "vm_moved", "message": f"VM {d.vm} is no longer on {d.source}"}
            elif target is None or not bool(targets[target]):
                why = {"code": "target_gone", "message": f"cloudlet {d.target} is offline "
                                                         "or its telemetry is stale"}
            else:
                out.append(d)
                continue
            self._report(Outcome(d, "abandoned", why))
        return out

    # --- outcomes -----------------------------------------------------------------------

    def _report(self, outcome: Outcome) -> None:
        d = outcome.decision
        self._journal_dirty = True  # saved by the next tick
        self.metrics.moves.labels(outcome.status).inc()
        self.outcomes.append(outcome)
        del self.outcomes[:-1000]
        detail = outcome.detail
        if outcome.status == "succeeded" and "seen" in detail:
            log.info("moved VM %s %s -> %s (its outcome was missed; %s)", d.vm, d.source,
                     d.target, detail["seen"])
        elif outcome.status == "succeeded":
            log.info("moved VM %s %s -> %s: %.2f s with %.1f ms paused (predicted %.2f s, "
                     "%.0f ms)", d.vm, d.source, d.target, _num(detail.get("total_s")),
                     _num(detail.get("downtime_ms")), d.predicted_duration_s,
                     d.predicted_downtime_s * 1000)
        elif outcome.status == "failed":
            log.warning("move VM %s %s -> %s failed (attempt %d: %s); retrying in %.0f s",
                        d.vm, d.source, d.target, d.attempt, detail.get("message", detail),
                        (outcome.retry_unix or 0) - self.clock())
        else:
            log.warning("move VM %s %s -> %s abandoned after %d attempts: %s", d.vm,
                        d.source, d.target, d.attempt, detail.get("message", detail))
            self._publish_event({"op": "move_abandoned", "vm": d.vm, "from": d.source,
                                 "to": d.target, "attempts": d.attempt,
                                 "decision": d.decision_id,
                                 "error": {k: v for k, v in detail.items()
                                           if k in ("code", "message")}})

    def _publish_event(self, event: dict[str, Any]) -> None:
        client = self._client
        if client is None:
            return
        topic = events_topic(self.config.name)
        payload = seal(self.identity, topic, event_message(self.config.name, **event))
        task = asyncio.get_running_loop().create_task(client.publish(topic, payload, qos=1))
        task.add_done_callback(_log_failure)


def _inbox(take: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's message queue as a pass-through: each message is taken in as soon as
    the socket is read, in order, on the event loop (aiomqtt hands every message to
    its queue's `put_nowait`).

    Iterating `client.messages` costs a task and several loop turns per message, and
    under a flood the socket is read one message per turn, faster than they are
    handed out: the backlog grows without bound (and with it the garbage collector's
    work) while intake falls to a fraction of what `take` can do. Taken in as read,
    the socket is read no faster than messages are taken in, and a backlog stays with
    the broker, whose business it is (it drops QoS 0 reports beyond its queue)."""

    class Inbox(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            take(item)

    return Inbox


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not publish an orchestrator event: %r", task.exception())


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def journal_path(state: Path) -> Path:
    return state / ORCHESTRATOR_DIR / JOURNAL_FILE
