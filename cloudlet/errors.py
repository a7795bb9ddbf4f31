"""One hierarchy of errors for the whole project.

Users catch errors by meaning (`except SnapshotError`), and every class carries
a stable string `code` that the daemon's HTTP and WebSocket answers will carry,
so the SDK can raise the very class the daemon raised (`error_for_code`).
Codes are part of the wire contract: never rename one, only add.
"""

from __future__ import annotations

from typing import ClassVar


class CloudletError(Exception):
    """Base of every error Cloudlet raises on purpose."""

    code: ClassVar[str] = "cloudlet_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        """The typed answer a daemon sends for this error."""
        return {"code": self.code, "message": self.message}


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


def _all_subclasses(cls: type[CloudletError]) -> list[type[CloudletError]]:
    found: list[type[CloudletError]] = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_for_code(code: str, message: str) -> CloudletError:
    """Rebuild the error a peer reported, by its stable code (unknown codes -> base class)."""
    for cls in _all_subclasses(CloudletError):
        if cls.code == code:
            return cls(message)
    return CloudletError(f"[{code}] {message}")
