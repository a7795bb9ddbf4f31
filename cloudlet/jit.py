"""Compile a module's numeric loops with numba, lazily: `@compiled` functions run as
machine code from their module's first call on, or as plain Python without numba
(the same answers, slowly).

Lazily because importing numba costs a process ~0.1 s and 60 MB: the daemon
imports the placer's modules to read its configuration and should pay none of it
unless it places. On the first call of any function of a module, every `@compiled`
function of that module is replaced in the module's namespace by its numba
dispatcher, so that compiled code finds its helpers by their global names.
Machine code is cached beside the module (numba's `cache=True`).

numba's error model is numpy's: a float divided by zero is inf or nan, as in numpy,
rather than an exception checked on every division. Helpers called per element
should take scalars only: a compiled call that passes arrays costs ~30 ns
(reference counting), more than the work of a lookup.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

# Per module (by name): its @compiled functions in definition order, and whether
# they have been replaced yet.
_PLAIN: dict[str, dict[str, Callable[..., Any]]] = {}
_READY: set[str] = set()
_LOCK = threading.RLock()


def cache_in(directory: Path, source_dir: Path) -> None:
    """Keep numba's machine code under `directory` when it cannot be kept beside the
    compiled modules in `source_dir` (numba's default, shared by every process) and
    NUMBA_CACHE_DIR does not say where.

    A daemon whose service may write only its state directory (systemd's
    ProtectSystem=strict) could otherwise cache nowhere, and would compile every
    kernel again at every start (seconds before its orchestrator contests its
    lease). Call before the first compile: numba reads the setting when it is
    imported."""
    if "NUMBA_CACHE_DIR" in os.environ or "numba" in sys.modules:
        return
    beside = source_dir / "__pycache__"
    if os.access(beside if beside.exists() else source_dir, os.W_OK):
        return
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no numba cache in %s (%s): compiled code is not kept", directory, exc)
        return
    os.environ["NUMBA_CACHE_DIR"] = str(directory)


def compiled(fn: F) -> F:
    """`fn`, compiled on the first call of any @compiled function of its module."""
    module = fn.__module__
    _PLAIN.setdefault(module, {})[fn.__name__] = fn
    namespace = fn.__globals__

    @functools.wraps(fn)
    def first_call(*args: Any) -> Any:
        _compile_module(module, namespace)
        return namespace[fn.__name__](*args)

    return cast(F, first_call)


def _compile_module(module: str, namespace: dict[str, Any]) -> None:
    with _LOCK:  # threads' first calls (placement/slices.py) compile a module once
        if module in _READY:
            return
        plain = _PLAIN[module]
        try:
            import numba

            jit = numba.njit(cache=True, nogil=True, error_model="numpy")
            compiled_fns = {name: jit(fn) for name, fn in plain.items()}
        except Exception as exc:  # pragma: no cover - the `sim` extra installs numba
            # No numba, or one that cannot work here (no writable cache directory, an
            # llvmlite that fails to load): the same answers in plain Python, slowly.
            if not isinstance(exc, ImportError):
                log.warning("numba unusable (%r): %s runs as plain Python", exc, module)
            namespace.update(plain)
        else:
            namespace.update(compiled_fns)
        _READY.add(module)
