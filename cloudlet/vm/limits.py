"""What one VM may use: memory per linear memory, fuel and wall clock per call.

A value of its own, below both the VM that enforces it and the snapshot that
carries it (a restored VM keeps its limits). Each is documented in docs/abi.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudlet.errors import InvalidArgument
from cloudlet.vm.engine import EPOCH_TICK_S

MiB = 1 << 20
MAX_FUEL = (1 << 63) - 1
MIN_MEMORY_BYTES = MiB
MAX_MEMORY_BYTES = 1 << 32
MAX_DEADLINE_MS = 24 * 3600 * 1000  # a call running for a day is a bug, not a workload


def _int_in(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


@dataclass(frozen=True)
class VMLimits:
    """Per-VM limits. Defaults suit an interactive session; each is documented in docs/abi.md."""

    # Cap on each linear memory; memory.grow fails past it. At least 1 MiB: the
    # write-tracking bitmap is a 1 MiB memory under the same per-memory cap.
    memory_bytes: int = 256 * MiB
    fuel_per_call: int | None = 10_000_000_000  # ~seconds of compute; None = unlimited
    deadline_ms: int = 2_000  # wall clock per call (resolution: the 10 ms epoch tick)

    def __post_init__(self) -> None:
        # bool is an int subclass; and ctypes would silently wrap values past 64 bits.
        if not _int_in(self.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES):
            raise InvalidArgument(
                f"memory_bytes must be an integer from {MIN_MEMORY_BYTES} (1 MiB) to "
                f"{MAX_MEMORY_BYTES} (4 GiB, all a wasm32 memory can address)")
        if self.fuel_per_call is not None and not _int_in(self.fuel_per_call, 1, MAX_FUEL):
            raise InvalidArgument(f"fuel_per_call must be an integer from 1 to {MAX_FUEL}, or None")
        if not _int_in(self.deadline_ms, 1, MAX_DEADLINE_MS):
            raise InvalidArgument(f"deadline_ms must be an integer from 1 to {MAX_DEADLINE_MS}")

    @property
    def deadline_ticks(self) -> int:
        # +1: the current tick may be about to end, so one tick is always partial.
        return -(-self.deadline_ms // int(EPOCH_TICK_S * 1000)) + 1

    @property
    def fuel(self) -> int:
        """Fuel each call starts with (`fuel_per_call`, or the most there is)."""
        return self.fuel_per_call or MAX_FUEL

    def to_wire(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "fuel_per_call": self.fuel_per_call,
                "deadline_ms": self.deadline_ms}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> VMLimits:
        return cls(memory_bytes=d["memory_bytes"], fuel_per_call=d["fuel_per_call"],
                   deadline_ms=d["deadline_ms"])
