"""One hierarchy of errors for the whole project.

Users catch errors by meaning (`except SnapshotError`), and every class carries
a stable string `code` that the daemon's HTTP and WebSocket answers will carry,
so the SDK can raise the very class the daemon raised (`error_for_code`).
Codes are part of the wire contract: never rename one, only add.
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar


class CloudletError(Exception):
    """Base of every error Cloudlet raises on purpose.

    `details` carries what a program needs to act on the error (where a VM moved
    to, which sequence number the VM expects); it travels in the wire answer.
    """

    code: ClassVar[str] = "cloudlet_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_wire(self) -> dict[str, Any]:
        """The typed answer a daemon sends for this error."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire


# --- images --------------------------------------------------------------------


class ImageError(CloudletError):
    code = "image_error"


class ImageRejected(ImageError):
    """The module is not a valid or allowed image; the message names what is wrong."""

    code = "image_rejected"


class ImageTooLarge(ImageRejected):
    code = "image_too_large"


class ImageNotFound(ImageError):
    code = "image_not_found"


# --- VMs -----------------------------------------------------------------------


class VMError(CloudletError):
    code = "vm_error"


class BadCall(VMError):
    """The call itself is wrong (unknown function, wrong arguments); nothing ran."""

    code = "bad_call"


class VMTrapped(VMError):
    """The guest trapped (unreachable, out-of-bounds access, ...). The VM stays usable."""

    code = "vm_trapped"


class VMStackOverflow(VMTrapped):
    code = "vm_stack_overflow"


class VMInterrupted(VMError):
    """A limit stopped a runaway call. The VM stays usable."""

    code = "vm_interrupted"


class VMOutOfFuel(VMInterrupted):
    code = "vm_out_of_fuel"


class VMDeadlineExceeded(VMInterrupted):
    code = "vm_deadline_exceeded"


class VMMemoryLimit(VMError):
    """The guest asked for more memory than its cap, or a restore would exceed it."""

    code = "vm_memory_limit"


class VMFailed(VMError):
    """The VM is marked failed (it exited, or its state can no longer be trusted)."""

    code = "vm_failed"


class VMExited(VMFailed):
    """The guest called `proc_exit`; the VM is failed from then on."""

    code = "vm_exited"


# --- snapshots -------------------------------------------------------------------


class SnapshotError(CloudletError):
    code = "snapshot_error"


class SnapshotCorrupt(SnapshotError):
    """Truncated, corrupted or malformed: nothing was restored."""

    code = "snapshot_corrupt"


class SnapshotTooLarge(SnapshotError):
    code = "snapshot_too_large"


class SnapshotVersionUnsupported(SnapshotError):
    code = "snapshot_version_unsupported"


class SnapshotImageMismatch(SnapshotError):
    """The snapshot belongs to another image (or another base snapshot)."""

    code = "snapshot_image_mismatch"


# --- configuration ---------------------------------------------------------------


class ConfigError(CloudletError):
    code = "config_error"


class ScenarioError(ConfigError):
    """A simulation scenario file is wrong; the message names the file and the key."""

    code = "scenario_invalid"


class SweepError(ScenarioError):
    """A sweep file (`cloudlet sweep`) is wrong, or one of its overrides makes the
    scenario wrong; the message names the sweep file and the key."""

    code = "sweep_invalid"


class CalibrationError(ConfigError):
    """Migration records given to `cloudlet calibrate` are unusable; the message names
    the file and the line (or the run) and what is wrong with it."""

    code = "calibration_invalid"


class MissingDependency(ConfigError):
    """A command needs a package this install lacks; the message names the extra."""

    code = "missing_dependency"


class TraceInputInvalid(ConfigError):
    """A network or routes file given to `cloudlet trace sumo` is unusable (missing,
    not XML, or not the SUMO file it should be); the message names the file."""

    code = "trace_input_invalid"


class TraceToolFailed(CloudletError):
    """SUMO or one of its tools (netgenerate, randomTrips.py) failed while making a
    trace; the message names the step and ends with the tail of the tool's stderr."""

    code = "trace_tool_failed"


class NoBroker(ConfigError):
    """Something that only the broker carries (a client's position reports) was asked
    of a client made without one (`endpoints=[...]` only)."""

    code = "no_broker"


class StateDirLocked(ConfigError):
    """Another live process holds this state directory (a daemon, or `cloudlet up`).
    Two processes serving the same checkpoints would each restore the same VMs and
    let their states diverge; the message names the holder (pid, command, since)."""

    code = "state_dir_locked"


class InvalidArgument(CloudletError, ValueError):
    """A value given to the API is out of its documented range (also a ValueError)."""

    code = "invalid_argument"


# --- requests (the daemon's data plane) ---------------------------------------------


class RequestError(CloudletError):
    code = "request_error"


class MalformedRequest(RequestError):
    """The body is not the msgpack (or fields) the endpoint takes."""

    code = "malformed_request"


class RequestTooLarge(RequestError):
    code = "request_too_large"


class RequestTimeout(RequestError):
    """The request (or a slow client sending it) ran past the daemon's deadline."""

    code = "request_timeout"


class Unauthorized(RequestError):
    """Missing, malformed, expired or forged credentials."""

    code = "unauthorized"


class Forbidden(RequestError):
    """Valid credentials, but not for this: someone else's VM, or a peer-only route."""

    code = "forbidden"


class VMNotFound(RequestError):
    code = "vm_not_found"


class ImageInUse(RequestError):
    code = "image_in_use"


class CapacityExceeded(RequestError):
    """The cloudlet is full (VM count or memory); try another."""

    code = "capacity_exceeded"


class ShuttingDown(RequestError):
    code = "shutting_down"


class QuotaExceeded(RequestError):
    """This client holds its share of the cloudlet (VMs, memory or images); other
    clients are unaffected. `details` names the quota, its limit and the use."""

    code = "quota_exceeded"


class StorageFull(CloudletError, OSError):
    """The cloudlet cannot write its state (disk full or failing). Nothing was
    reported as saved that was not: the last good checkpoint is kept.

    Also an `OSError` (with the failed write's `errno`), so code written to
    survive a failed write before this class existed still catches it."""

    code = "storage_full"


# --- the control plane and peers: who may say what ---------------------------------


class TrustError(CloudletError):
    """A signed message or credential that cannot be believed: unsigned, forged,
    expired, replayed, for another audience, or from a signer without the role."""

    code = "untrusted"


class StaleEpoch(TrustError):
    """A command carries an orchestrator epoch older than the newest this cloudlet
    has seen: it comes from a deposed leader and is refused."""

    code = "stale_epoch"


class PeerUnverified(TrustError):
    """An endpoint did not prove it is the cloudlet it was named as: nothing (no
    credential, no VM state) was sent to it."""

    code = "peer_unverified"


class VMMoved(RequestError):
    """The VM lives on another cloudlet now; `details` names it (`node`, `endpoint`)."""

    code = "vm_moved"


# --- sessions: exactly-once calls (the SDK and the daemon agree on these) ----------


class SequenceError(RequestError):
    code = "sequence_error"


class SequenceGap(SequenceError):
    """A call's sequence number is ahead of the VM's: calls in between were never
    applied here (or were lost with a kill -9). `details["expected"]` is the number
    the VM takes next, so a client holding the missing calls can resend them."""

    code = "sequence_gap"


class ReplyExpired(SequenceError):
    """The call was applied long ago and its answer is no longer kept: a client
    resent a call far older than the daemon's reply window."""

    code = "reply_expired"


class SequenceConflict(SequenceError):
    """The call's number was already used by a different call: two clients number
    calls on one VM. This call was not applied; `details["vm_seq"]` is the VM's."""

    code = "sequence_conflict"


class SessionLost(SequenceError):
    """The session's VM rolled back past calls the client no longer holds, or can
    be found on no cloudlet: its state is gone, and the SDK says so rather than guess."""

    code = "session_lost"


class CallTimeout(RequestTimeout):
    """The client's deadline for one call passed. The call may still be applied
    (exactly once): the session keeps resending it until it is answered."""

    code = "call_timeout"


class NoCloudletAvailable(RequestError):
    """Discovery knows no reachable cloudlet (and local execution was not allowed)."""

    code = "no_cloudlet_available"


# --- migration (cloudlet/migration) -------------------------------------------------------


class MigrationError(CloudletError):
    code = "migration_error"


class MigrationAborted(MigrationError):
    """The migration did not commit: the VM runs on at its source (the destination
    discarded everything it received)."""

    code = "migration_aborted"


class MigrationProtocolError(MigrationError):
    """A peer sent a malformed, unknown or out-of-order migration message."""

    code = "migration_protocol_error"


class MigrationVersionUnsupported(MigrationProtocolError):
    code = "migration_version_unsupported"


class MigrationTimeout(MigrationAborted):
    """A wait for the peer ran past its deadline; the migration aborted."""

    code = "migration_timeout"


class MigrationChannelLost(MigrationAborted):
    """The channel to the peer closed before the commit; the migration aborted."""

    code = "migration_channel_lost"


class KeptRoundNotFound(MigrationError):
    """A source keeps no final round of this migration (it never moved a VM by it, or
    its destination already said it has its own copy)."""

    code = "kept_round_not_found"


class MigrationInDoubt(MigrationError):
    """The destination holds a restored VM but lost the channel between `Ready` and
    `Commit`: only the source knows whether it committed. Ask it, then `resolve()`."""

    code = "migration_in_doubt"


class StaleDecision(MigrationError):
    """An orchestrator's order to move a VM was decided when the VM was at another
    generation (it has moved since): carried out now, one decision would move it twice."""

    code = "stale_decision"


def _all_subclasses(cls: type[CloudletError]) -> list[type[CloudletError]]:
    found: list[type[CloudletError]] = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_for_code(code: str, message: str,
                   details: dict[str, Any] | None = None) -> CloudletError:
    """Rebuild the error a peer reported, by its stable code (unknown codes -> base class)."""
    for cls in _all_subclasses(CloudletError):
        if cls.code == code:
            exc = cls(message)
            break
    else:
        exc = CloudletError(f"[{code}] {message}")
    exc.details = dict(details or {})
    return exc


def error_from_wire(wire: Any) -> CloudletError:
    """The error a daemon's `{"code", "message", "details"?}` answer stands for; any
    other shape is itself reported, as a `CloudletError`, never a crash."""
    if not isinstance(wire, dict) or not isinstance(wire.get("code"), str):
        return CloudletError(f"malformed error answer: {reprlib.repr(wire)}"[:300])
    message, details = wire.get("message", ""), wire.get("details")
    # reprlib, not str: a peer's value may be nested past Python's recursion limit.
    return error_for_code(wire["code"], message if isinstance(message, str)
                          else reprlib.repr(message),
                          details if isinstance(details, dict) else None)
