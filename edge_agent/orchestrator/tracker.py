"""Moves the orchestrator decided: in flight, retried, abandoned, remembered.

Pure bookkeeping with its clock passed in, plus one durable file (the journal,
written with write, fsync, rename before any order of a round goes out), so a
restarted orchestrator knows what it had ordered and waits for those outcomes
instead of deciding the same moves again.

One decision moves a VM at most once, by construction: each order names the
VM's generation (its count of moves) when it was decided, and a cloudlet
refuses an order whose generation is not the VM's (`stale_decision`). A retry
is the same decision sent again (same generation), so it too can succeed only
once; a restarted or new leader that repeats a decision already carried out is
refused.

Rules: at most one move per VM in flight; a move with no outcome within
`move_timeout_s` counts as failed; a failed move is retried after `retry_s`,
then twice that, ... up to `max_attempts` in all, then abandoned, and the VM is
left alone for as long again (the placer may decide anew afterwards).
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cloudlet.fsutil import atomic_write
from cloudlet.protocol import command_message

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
JOURNAL_VERSION = 1
# Last moves remembered (cool-downs, ping-pong checks); older ones are forgotten.
MAX_REMEMBERED = 100_000


@dataclass(frozen=True)
class Decision:
    """One move as decided, with the placer's reasons, and its current attempt."""

    decision_id: str
    command_id: str
    vm: str
    source: str
    target: str
    generation: int
    expected_gain_ms: float
    score: float
    predicted_duration_s: float
    predicted_downtime_s: float
    decided_unix: float
    attempt: int = 1
    sent_unix: float = 0.0

    def command(self, epoch: int) -> dict[str, Any]:
        return command_message("migrate", command_id=self.command_id, epoch=epoch, vm=self.vm,
                               to=self.target, generation=self.generation, mode="live")


@dataclass(frozen=True)
class Outcome:
    """What became of a decision: succeeded, failed (retry due at `retry_unix`), abandoned."""

    decision: Decision
    status: str  # "succeeded", "failed", "abandoned"
    detail: dict[str, Any]
    retry_unix: float | None = None


class MoveTracker:
    def __init__(self, journal: Path | None, *, retry_s: float, max_attempts: int,
                 move_timeout_s: float) -> None:
        self.journal = journal
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self.move_timeout_s = move_timeout_s
        self.in_flight: dict[str, Decision] = {}  # by VM
        self.by_command: dict[str, str] = {}  # command id -> VM
        self.retry_at: dict[str, tuple[float, Decision]] = {}  # VM -> (when, failed decision)
        self.held_until: dict[str, float] = {}  # VM -> unix: abandoned, left alone
        self.last_move: dict[str, float] = {}  # VM -> unix of its last completed move
        self.previous_host: dict[str, str] = {}
        self.epoch_seen = 0
        if journal is not None:
            self._load(journal)

    # --- deciding -----------------------------------------------------------------------

    def busy(self, now: float) -> set[str]:
        """VMs the placer may not move now: in flight, awaiting a retry, or left alone."""
        for vm in [vm for vm, until in self.held_until.items() if until <= now]:
            del self.held_until[vm]
        return set(self.in_flight) | set(self.retry_at) | set(self.held_until)

    def new_decision(self, *, vm: str, source: str, target: str, generation: int,
                     expected_gain_ms: float, score: float, predicted_duration_s: float,
                     predicted_downtime_s: float, now: float) -> Decision:
        decision_id = f"{vm}@{generation}->{target}"
        return Decision(decision_id=decision_id, command_id=_command_id(decision_id, 1),
                        vm=vm, source=source, target=target, generation=generation,
                        expected_gain_ms=expected_gain_ms, score=score,
                        predicted_duration_s=predicted_duration_s,
                        predicted_downtime_s=predicted_downtime_s, decided_unix=now)

    def sending(self, decisions: list[Decision], now: float) -> list[Decision]:
        """Record decisions about to be sent (the caller then calls `save`, then sends)."""
        sent = []
        for d in decisions:
            if d.vm in self.in_flight:
                continue  # never two moves of one VM in flight
            d = replace(d, sent_unix=now)
            self.in_flight[d.vm] = d
            self.by_command[d.command_id] = d.vm
            self.retry_at.pop(d.vm, None)
            sent.append(d)
        return sent

    def retries_due(self, now: float) -> list[Decision]:
        """Failed decisions whose retry is due, as their next attempt (not yet sent)."""
        due = []
        for vm, (when, d) in list(self.retry_at.items()):
            if when <= now:
                del self.retry_at[vm]
                attempt = d.attempt + 1
                due.append(replace(d, attempt=attempt,
                                   command_id=_command_id(d.decision_id, attempt)))
        return due

    # --- outcomes -----------------------------------------------------------------------

    def outcome(self, command_id: str, ok: bool, detail: dict[str, Any],
                now: float) -> Outcome | None:
        """A cloudlet's event for one of our orders; None if it is not ours (or late)."""
        vm = self.by_command.pop(command_id, None)
        if vm is None:
            return None
        d = self.in_flight.pop(vm, None)
        if d is None or d.command_id != command_id:
            if d is not None:
                self.in_flight[vm] = d
            return None
        if ok:
            self.last_move[vm] = now
            self.previous_host[vm] = d.source
            self._trim()
            return Outcome(d, "succeeded", detail)
        code = detail.get("code") if isinstance(detail, dict) else None
        if code in ("stale_decision", "vm_not_found", "vm_moved"):
            # The VM is not where the decision found it: nothing to retry.
            return Outcome(d, "abandoned", detail)
        return self._failed(d, detail, now)

    def expire(self, now: float) -> list[Outcome]:
        """Moves with no outcome in `move_timeout_s` count as failed."""
        out = []
        for vm, d in list(self.in_flight.items()):
            if now - d.sent_unix > self.move_timeout_s:
                del self.in_flight[vm]
                self.by_command.pop(d.command_id, None)
                out.append(self._failed(d, {"code": "no_outcome", "message": (
                    f"no outcome within {self.move_timeout_s:g} s")}, now))
        return out

    def seen_at(self, vm: str, node: str, generation: int, now: float) -> Outcome | None:
        """Telemetry placed `vm` on `node` at `generation`: if that is where an order in
        flight was taking it (its outcome event lost, e.g. while this orchestrator was
        down), the move succeeded."""
        d = self.in_flight.get(vm)
        if d is None or node != d.target or generation <= d.generation:
            return None
        del self.in_flight[vm]
        self.by_command.pop(d.command_id, None)
        self.last_move[vm] = now
        self.previous_host[vm] = d.source
        return Outcome(d, "succeeded", {"seen": "in telemetry"})

    def _failed(self, d: Decision, detail: dict[str, Any], now: float) -> Outcome:
        if d.attempt >= self.max_attempts:
            self.held_until[d.vm] = now + self.retry_s * 2 ** self.max_attempts
            return Outcome(d, "abandoned", detail)
        when = now + self.retry_s * 2 ** (d.attempt - 1)
        self.retry_at[d.vm] = (when, d)
        return Outcome(d, "failed", detail, retry_unix=when)

    def drop_retry(self, vm: str) -> None:
        """A retry no longer makes sense (the VM moved or went, the target is gone)."""
        self.retry_at.pop(vm, None)

    def _trim(self) -> None:
        if len(self.last_move) > MAX_REMEMBERED:
            for vm in sorted(self.last_move, key=self.last_move.__getitem__)[
                    :len(self.last_move) - MAX_REMEMBERED]:
                self.last_move.pop(vm, None)
                self.previous_host.pop(vm, None)

    # --- the journal --------------------------------------------------------------------

    def save(self) -> None:
        """Write the journal durably (before the orders it lists are sent)."""
        if self.journal is None:
            return
        body = {"v": JOURNAL_VERSION, "epoch": self.epoch_seen,
                "in_flight": [asdict(d) for d in self.in_flight.values()],
                "retry": [[when, asdict(d)] for when, d in self.retry_at.values()],
                "held_until": self.held_until, "last_move": self.last_move,
                "previous_host": self.previous_host}
        atomic_write(self.journal, json.dumps(body).encode())

    def _load(self, path: Path) -> None:
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("cannot read the orchestrator journal %s (%r): starting without it; "
                      "cloudlets still refuse orders for VMs that moved since", path, exc)
            return
        try:
            if body.get("v") != JOURNAL_VERSION:
                raise ValueError(f"version {body.get('v')!r}")
            self.epoch_seen = int(body.get("epoch", 0))
            for raw in body.get("in_flight", []):
                d = Decision(**raw)
                self.in_flight[d.vm] = d
                self.by_command[d.command_id] = d.vm
            for when, raw in body.get("retry", []):
                d = Decision(**raw)
                self.retry_at[d.vm] = (float(when), d)
            self.held_until = {str(k): float(v) for k, v in body.get("held_until", {}).items()}
            self.last_move = {str(k): float(v) for k, v in body.get("last_move", {}).items()}
            self.previous_host = {str(k): str(v)
                                  for k, v in body.get("previous_host", {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            log.error("the orchestrator journal %s is malformed (%r): starting without it",
                      path, exc)
            self.in_flight.clear()
            self.by_command.clear()
            self.retry_at.clear()


def _command_id(decision_id: str, attempt: int) -> str:
    return f"{decision_id}#{attempt}.{secrets.token_hex(4)}"
