"""Guests written for tests and benchmarks, in WebAssembly text, compiled on the fly."""

from __future__ import annotations

import wasmtime

FUEL_PER_LOOP = 8  # fuel one iteration of SLOW_BOOT's loop burns (wasmtime counts ops)
# A guest whose boot (`_initialize`) burns a chosen amount of fuel: the neighbour
# that boots slow VMs, in the isolation tests and the daemon benchmark.
SLOW_BOOT = """
(module
  (memory (export "memory") 1)
  (func (export "_initialize") (local $i i32)
    (loop $burn
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $burn (i32.lt_u (local.get $i) (i32.const {iterations})))))
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1))))
"""


def slow_boot_image(boot_fuel: int, share: float = 0.9) -> bytes:
    """A module whose `_initialize` burns `share` of `boot_fuel`."""
    return bytes(wasmtime.wat2wasm(SLOW_BOOT.format(
        iterations=int(boot_fuel * share) // FUEL_PER_LOOP)))
