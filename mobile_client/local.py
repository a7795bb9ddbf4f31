"""Running an image on the device itself, through `cloudlet.vm`.

The same image that runs on a cloudlet runs here, in a wasmtime VM of the
device's own. Imported only when local execution is asked for: it needs the
`local` extra (wasmtime, numpy), which a remote-only client does without.
Calls run in a worker thread (wasmtime releases the GIL while guest code runs)
so a long task does not stall the application's event loop; one VM per image,
one call at a time on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from cloudlet.errors import CloudletError

if TYPE_CHECKING:
    from cloudlet.vm import VM, ImageStore

LOCAL_DEADLINE_MS = 60_000  # a device has no neighbour to protect: generous
LOCAL_MEMORY_BYTES = 256 << 20


def available() -> bool:
    """True when the `local` extra is installed."""
    try:
        import wasmtime  # noqa: F401
    except ImportError:
        return False
    return True


class LocalRunner:
    """One VM per image on this device. `close()` frees them."""

    def __init__(self, store_dir: str | None = None) -> None:
        self._store_dir = store_dir
        self._store: ImageStore | None = None
        self._vms: dict[str, VM] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _vm(self, wasm: bytes) -> VM:
        from cloudlet.vm import VM, ImageStore, VMLimits

        if self._store is None:
            self._store = ImageStore(self._store_dir)
        image = self._store.add(wasm)
        vm = self._vms.get(image.digest)
        if vm is None:
            vm = VM.create(image, VMLimits(memory_bytes=LOCAL_MEMORY_BYTES,
                                           deadline_ms=LOCAL_DEADLINE_MS))
            self._vms[image.digest] = vm
        return vm

    async def run(self, digest: str, wasm: bytes, fn: str,
                  payload: bytes | tuple[int | float, ...]) -> tuple[Any, float]:
        """(result, elapsed ms) of one call on this device."""
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(self._run, wasm, fn, payload)

    def _run(self, wasm: bytes, fn: str,
             payload: bytes | tuple[int | float, ...]) -> tuple[Any, float]:
        vm = self._vm(wasm)
        started = time.perf_counter()
        if isinstance(payload, bytes):
            result: Any = vm.call_bytes(fn, payload)
        else:
            result = vm.call(fn, *payload)
            if isinstance(result, tuple):
                result = list(result)
        return result, (time.perf_counter() - started) * 1000

    def close(self) -> None:
        for vm in self._vms.values():
            with contextlib.suppress(CloudletError):
                vm.close()
        self._vms.clear()
