"""An image as the runtime boots it: the compiled module, its layout, its pristine state.

The record that VMs and snapshots read, apart from the store that makes it
(`image.py`): the store boots a VM to learn an image's pristine state, so the
record has to sit below the VM, and the store above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import wasmtime

from cloudlet.vm import chunks
from cloudlet.vm.engine import Runtime
from cloudlet.vm.instrument import GlobalInfo, MemoryInfo
from cloudlet.vm.memory import PristineMemory

# _initialize runs under its image's boot limits (these unless the image store was
# given others), not the VM's own: it already completed once at registration,
# and a snapshot's limits must never make its image unbootable.
BOOT_FUEL = 10_000_000_000
BOOT_DEADLINE_MS = 10_000


@dataclass(frozen=True)
class FuncSig:
    params: tuple[str, ...]
    results: tuple[str, ...]


@dataclass(eq=False)
class Image:
    """A compiled, instrumented image, ready to boot VMs from."""

    digest: str
    size_bytes: int
    runtime: Runtime
    module: wasmtime.Module
    pre: Any  # wasmtime InstancePre
    memories: tuple[MemoryInfo, ...]
    globals: tuple[GlobalInfo, ...]
    imports: tuple[str, ...]
    functions: dict[str, FuncSig]
    dirty_export: str | None = None  # write-tracking bitmap (None: dirty chunks by hashing)
    pristine: tuple[PristineMemory, ...] = ()
    # `_initialize` runs within these on every boot (registration, creation, restore),
    # like a call within its fuel and deadline: a host decides what a boot may cost.
    boot_fuel: int = BOOT_FUEL
    boot_deadline_ms: int = BOOT_DEADLINE_MS

    @property
    def pristine_bytes(self) -> int:
        return sum(p.pages * chunks.WASM_PAGE_BYTES for p in self.pristine)
