"""The orchestrator's pure parts, rule by rule: the lease, the tracker, the view, its config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudlet.errors import ConfigError
from cloudlet.placement import MeasuredRtt, PredictivePolicy
from edge_agent.config import load_node_config
from edge_agent.orchestrator.lease import LeaseKeeper
from edge_agent.orchestrator.tracker import MoveTracker
from edge_agent.orchestrator.view import ClusterView, SessionDefaults

# --- the lease -------------------------------------------------------------------------


def test_a_lone_candidate_claims_then_leads_after_it_settles() -> None:
    k = LeaseKeeper("a#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    assert k.due(0.5) is None  # the retained lease may still be on its way
    claim = k.due(1.0)
    assert claim is not None and claim["epoch"] == 1 and claim["holder"] == "a#1"
    k.observe(claim)  # the broker echoes it
    assert not k.is_leader(1.5)
    assert k.is_leader(2.0)
    assert k.due(1.9) is None  # renewed every lease_s / 3
    renewal = k.due(2.1)
    assert renewal is not None and renewal["epoch"] == 1 and renewal["expires_unix"] == 5.1


def test_a_leader_that_cannot_renew_stops_before_its_lease_runs_out() -> None:
    k = LeaseKeeper("a#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    claim = k.due(1.0)
    assert claim is not None
    k.observe(claim)
    assert k.is_leader(2.0)
    # No renewal goes out (say the broker is gone): at expiry - guard it stops acting.
    assert not k.is_leader(4.0 - k.guard_s + 0.01)


def test_a_live_lease_of_another_is_respected_and_an_expired_one_is_taken_over() -> None:
    k = LeaseKeeper("b#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    k.observe({"holder": "a#1", "epoch": 4, "expires_unix": 10.0})
    assert k.due(5.0) is None
    assert not k.is_leader(5.0)
    claim = k.due(10.5)
    assert claim is not None and claim["epoch"] == 5  # above any epoch seen


def test_a_newer_lease_deposes_the_leader() -> None:
    k = LeaseKeeper("a#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    claim = k.due(1.0)
    assert claim is not None
    k.observe(claim)
    assert k.is_leader(2.0)
    k.observe({"holder": "b#1", "epoch": 2, "expires_unix": 9.0})
    assert not k.is_leader(2.1)
    assert k.due(2.2) is None


def test_the_epoch_starts_above_what_the_cloudlets_have_seen() -> None:
    k = LeaseKeeper("a#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    k.note_epoch(41)  # a cloudlet's fence, in its telemetry; or the journal
    claim = k.due(1.0)
    assert claim is not None and claim["epoch"] == 42


def test_malformed_leases_change_nothing() -> None:
    k = LeaseKeeper("a#1", "r", lease_s=3.0, started_unix=0.0, settle_s=1.0)
    for bad in ({}, {"holder": "x", "epoch": -1, "expires_unix": 5.0},
                {"holder": "x", "epoch": True, "expires_unix": 5.0},
                {"holder": "x", "epoch": 1, "expires_unix": math.inf}):
        k.observe(bad)
    assert k.current is None


# --- the tracker -----------------------------------------------------------------------


def _tracker(tmp: Path | None = None, **kw: Any) -> MoveTracker:
    return MoveTracker(tmp / "journal.json" if tmp else None,
                       retry_s=kw.get("retry_s", 1.0), max_attempts=kw.get("max_attempts", 2),
                       move_timeout_s=kw.get("move_timeout_s", 10.0))


def _decide(t: MoveTracker, vm: str = "v", now: float = 0.0, generation: int = 0) -> Any:
    return t.new_decision(vm=vm, source="a", target="b", generation=generation,
                          expected_gain_ms=5.0, score=2.0, predicted_duration_s=1.0,
                          predicted_downtime_s=0.01, now=now)


def test_never_two_moves_of_one_vm_in_flight() -> None:
    t = _tracker()
    assert len(t.sending([_decide(t)], 0.0)) == 1
    assert t.sending([_decide(t)], 0.1) == []
    assert t.busy(0.2) == {"v"}


def test_a_failed_move_is_retried_with_backoff_then_abandoned() -> None:
    t = _tracker(retry_s=1.0, max_attempts=2)
    (d,) = t.sending([_decide(t)], 0.0)
    out = t.outcome(d.command_id, False, {"code": "migration_aborted"}, 1.0)
    assert out is not None and out.status == "failed" and out.retry_unix == 2.0
    assert t.retries_due(1.5) == [] and "v" in t.busy(1.5)
    (again,) = t.retries_due(2.0)
    assert again.attempt == 2 and again.decision_id == d.decision_id
    assert again.generation == d.generation and again.command_id != d.command_id
    (sent,) = t.sending([again], 2.0)
    out = t.outcome(sent.command_id, False, {"code": "migration_aborted"}, 3.0)
    assert out is not None and out.status == "abandoned"
    assert "v" in t.busy(3.5)  # left alone for a while
    assert "v" not in t.busy(3.0 + 1.0 * 2 ** 2 + 0.1)


def test_a_move_with_no_outcome_times_out_and_counts_as_failed() -> None:
    t = _tracker(move_timeout_s=5.0)
    t.sending([_decide(t)], 0.0)
    assert t.expire(4.0) == []
    (out,) = t.expire(5.5)
    assert out.status == "failed" and out.detail["code"] == "no_outcome"


def test_an_order_for_a_vm_that_moved_is_not_retried() -> None:
    t = _tracker()
    (d,) = t.sending([_decide(t)], 0.0)
    out = t.outcome(d.command_id, False, {"code": "stale_decision"}, 1.0)
    assert out is not None and out.status == "abandoned"
    assert t.retries_due(100.0) == []


def test_outcomes_of_orders_not_ours_are_ignored() -> None:
    t = _tracker()
    (d,) = t.sending([_decide(t)], 0.0)
    assert t.outcome("someone-else#1", True, {}, 1.0) is None
    assert "v" in t.in_flight
    assert t.outcome(d.command_id, True, {"total_s": 1.0}, 1.0) is not None
    assert t.outcome(d.command_id, True, {}, 1.1) is None  # a duplicate event


def test_the_journal_brings_back_moves_in_flight_after_a_restart(tmp_path: Path) -> None:
    t = _tracker(tmp_path)
    (d,) = t.sending([_decide(t)], 0.0)
    t.save()
    again = _tracker(tmp_path)
    assert again.in_flight["v"] == d
    assert "v" in again.busy(1.0)  # not decided a second time
    # Its outcome event was lost with the old process; telemetry shows the VM arrived.
    out = again.seen_at("v", "b", 1, 2.0)
    assert out is not None and out.status == "succeeded"
    assert again.last_move["v"] == 2.0 and again.previous_host["v"] == "a"


def test_a_seen_vm_at_its_old_generation_is_not_taken_for_arrived(tmp_path: Path) -> None:
    t = _tracker(tmp_path)
    t.sending([_decide(t, generation=3)], 0.0)
    assert t.seen_at("v", "b", 3, 1.0) is None
    assert t.seen_at("v", "a", 4, 1.0) is None


def test_a_corrupt_journal_is_reported_and_ignored(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "journal.json").write_text("{not json")
    t = _tracker(tmp_path)
    assert t.in_flight == {}
    assert "cannot read the orchestrator journal" in caplog.text


# --- the view --------------------------------------------------------------------------


def _presence(x: float, y: float, **extra: Any) -> dict[str, Any]:
    return {"status": "online", "endpoint": "http://127.0.0.1:1", "position": [x, y],
            "capacity": {"max_vms": 10, "max_memory_bytes": 1 << 34}, "refresh_s": 2.0,
            **extra}


def _telemetry(vms: dict[str, str], generation: int = 0) -> dict[str, Any]:
    return {"interval_s": 1.0, "per_vm": {
        vm: {"owner": owner, "memory_bytes": 64 << 20, "dirty_chunks_per_s": 10.0,
             "calls_per_s": 5.0, "generation": generation} for vm, owner in vms.items()}}


def _view() -> ClusterView:
    v = ClusterView(defaults=SessionDefaults(budget_ms=30.0, service_ms=5.0),
                    link_rtt_ms=25.0, client_report_max_age_s=5.0)
    v.presence("a", _presence(0, 0), 100.0)
    v.presence("b", _presence(2500, 0), 100.0)
    return v


def test_sessions_come_from_signed_telemetry_joined_with_their_owners_reports() -> None:
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice", "vm2": "bob"}), 100.0)
    v.telemetry("b", _telemetry({}), 100.0)
    v.client_position("alice", {"x_m": 2500.0, "y_m": 0.0}, 100.0)
    snap = v.snapshot(100.5)
    assert snap is not None
    s = snap.state.sessions
    assert snap.vm_ids == ("vm1", "vm2") and list(s.host) == [0, 0]
    assert s.position_m[0].tolist() == [2500.0, 0.0]
    assert s.position_m[1].tolist() == [0.0, 0.0]  # bob reported nothing: at his cloudlet
    moves = PredictivePolicy().decide(snap.state)
    assert [snap.vm_ids[i] for i in moves.session] == ["vm1"]
    assert [snap.names[i] for i in moves.target] == ["b"]


def test_a_client_speaks_only_for_its_own_vms() -> None:
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice"}), 100.0)
    v.telemetry("b", _telemetry({}), 100.0)
    # mallory reports a position far away: only mallory's (non-existent) sessions move.
    v.client_position("mallory", {"x_m": 2500.0, "y_m": 0.0}, 100.0)
    snap = v.snapshot(100.5)
    assert snap is not None and len(PredictivePolicy().decide(snap.state)) == 0


def test_stale_inputs_age_out_by_the_documented_rules() -> None:
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice"}), 100.0)
    v.telemetry("b", _telemetry({}), 100.0)
    v.client_position("alice", {"x_m": 2500.0, "y_m": 0.0}, 100.0)
    v.client_rtt("alice", {"rtt_ms": {"a": 40.0, "b": 9.0}}, 100.0)
    snap = v.snapshot(100.5)
    assert snap is not None and snap.targets.tolist() == [True, True]
    assert isinstance(snap.state.sessions.rtt_ms, MeasuredRtt)
    # 6 s later: alice's reports (max age 5 s) no longer count ...
    v.telemetry("a", _telemetry({"vm1": "alice"}), 105.5)
    v.telemetry("b", _telemetry({}), 105.5)
    snap = v.snapshot(106.0)
    assert snap is not None
    assert snap.state.sessions.position_m[0].tolist() == [0.0, 0.0]
    rtt = snap.state.sessions.rtt_ms
    assert isinstance(rtt, MeasuredRtt) and bool(np.all(rtt.node == -1))
    # ... and past 3 telemetry intervals (1 s) a cloudlet is not a target.
    v.telemetry("a", _telemetry({"vm1": "alice"}), 108.0)
    v.presence("a", _presence(0, 0), 108.0)  # presence too is stale past 3 refreshes
    v.presence("b", _presence(2500, 0), 108.0)
    snap = v.snapshot(108.6)
    assert snap is not None and snap.targets.tolist() == [True, False]
    # Nor is one whose Will fired, however fresh its telemetry.
    v.presence("b", {"status": "offline"}, 108.7)
    v.telemetry("b", _telemetry({}), 108.7)
    snap = v.snapshot(108.8)
    assert snap is not None and snap.targets.tolist() == [True, False]
    # A cloudlet's VMs are not sessions once its telemetry is stale.
    snap = v.snapshot(111.5)
    assert snap is not None and snap.state.sessions.count == 0


def test_a_vm_that_moved_or_went_leaves_its_old_cloudlet() -> None:
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice", "vm2": "bob"}), 100.0)
    v.telemetry("b", _telemetry({"vm1": "alice"}, generation=1), 100.5)
    v.telemetry("a", _telemetry({}), 101.0)
    snap = v.snapshot(101.2)
    assert snap is not None and snap.vm_ids == ("vm1",)
    assert snap.names[int(snap.state.sessions.host[0])] == "b"
    assert snap.generations.tolist() == [1]


def test_rtt_trends_extend_measurements_when_no_position_is_known() -> None:
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice"}), 100.0)
    v.telemetry("b", _telemetry({}), 100.0)
    v.client_rtt("alice", {"rtt_ms": {"a": 10.0, "b": 20.0}}, 100.0)
    v.client_rtt("alice", {"rtt_ms": {"a": 12.0, "b": 19.0}}, 101.0)
    snap = v.snapshot(101.1)
    assert snap is not None
    rtt = snap.state.sessions.rtt_ms
    assert isinstance(rtt, MeasuredRtt)
    now, slope = rtt.lookup(np.array([0]), np.array([[0, 1]]))
    assert now.tolist() == [[12.0, 19.0]]
    assert slope[0, 0] > 0 > slope[0, 1]  # walking away from a, towards b


def test_absurd_rtts_are_dropped_and_trends_stay_finite() -> None:
    """A client's reports reach the placer's compiled value: an RTT of 1e308 ms, or
    an infinite trend made from two finite reports, would make a move's gain inf."""
    v = _view()
    v.telemetry("a", _telemetry({"vm1": "alice"}), 100.0)
    v.telemetry("b", _telemetry({}), 100.0)
    v.client_rtt("alice", {"rtt_ms": {"a": 1.0, "b": 20.0}}, 100.0)
    v.client_rtt("alice", {"rtt_ms": {"a": 1e308, "b": 59_000.0}}, 100.1)
    v.client_rtt("alice", {"rtt_ms": {"a": 2.0, "b": 1.7e308}}, 1e-300 + 100.1)
    snap = v.snapshot(100.2)
    assert snap is not None
    rtt = snap.state.sessions.rtt_ms
    assert isinstance(rtt, MeasuredRtt)
    now, slope = rtt.lookup(np.array([0]), np.array([[0, 1]]))
    assert np.isfinite(slope).all(), slope
    assert not (np.nan_to_num(now) > 60_000).any(), now


def test_garbage_in_reports_and_telemetry_is_ignored() -> None:
    v = _view()
    v.client_rtt("x", {"rtt_ms": {"a": "fast", "b": -1, "zz": 3.0, 5: 1.0}}, 100.0)
    v.client_rtt("x", {"rtt_ms": "nope"}, 100.0)
    v.client_position("x", {"x_m": math.nan, "y_m": 1.0}, 100.0)
    v.client_position("x", {"x_m": True, "y_m": 1.0}, 100.0)
    v.telemetry("a", {"per_vm": {"vm1": {"owner": 7}, "vm2": "x", 3: {}}}, 100.0)
    v.telemetry("a", {"per_vm": [1, 2]}, 100.1)
    snap = v.snapshot(100.2)
    assert snap is not None and snap.state.sessions.count == 0


# --- the config ------------------------------------------------------------------------


def test_the_orchestrator_table_is_read_strictly(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nname = "a"\n[orchestrator]\nenabled = true\npolicy = "threshold"\n'
                   "interval_s = 2\n[orchestrator.params]\ncooldown_s = 5.0\n")
    c = load_node_config(cfg).orchestrator
    assert c.enabled and c.policy == "threshold" and c.interval_s == 2.0
    assert c.params == {"cooldown_s": 5.0}
    for bad, says in (('polcy = "never"', "unknown key 'polcy'"),
                      ('policy = "psychic"', "unknown policy"),
                      ("interval_s = 0", "interval_s"),
                      ("lease_s = \"long\"", "lease_s must be a float"),
                      ('scenario = "nowhere.toml"', "no such file"),
                      ("[orchestrator.params]\nhorizon = 3", "policy 'predictive'")):
        cfg.write_text(f'[node]\nname = "a"\n[orchestrator]\n{bad}\n')
        with pytest.raises(ConfigError, match=says):
            load_node_config(cfg)
