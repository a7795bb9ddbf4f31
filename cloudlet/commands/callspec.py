"""How a call is written on the command line, shared by `cloudlet vm run`, `cloudlet
offload` and `cloudlet session`: `"FN ARG..."`, bytes arguments as `s:TEXT`,
`x:HEX` or `@FILE`, results one line each (bytes as `x:HEX`).

Kept free of wasmtime and numpy: the client commands use it on devices that
only offload.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from cloudlet.errors import BadCall

INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # a wasm i64, signed or unsigned


def split_call(spec: str) -> tuple[str, list[str]]:
    """`"FN ARG..."` -> (FN, [ARG, ...])."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise BadCall(f"cannot parse call {spec!r}: {exc}") from None
    if not words:
        raise BadCall("empty call")
    return words[0], words[1:]


def is_bytes_arg(arg: str) -> bool:
    return arg.startswith(("s:", "x:", "@"))


def bytes_arg(arg: str) -> bytes:
    if arg.startswith("s:"):
        return os.fsencode(arg[2:])  # the argument's original bytes, UTF-8 or not
    if arg.startswith("x:"):
        try:
            return bytes.fromhex(arg[2:])
        except ValueError:
            raise BadCall(f"{arg!r} is not valid hex") from None
    try:
        return Path(arg[1:]).read_bytes()
    except OSError as exc:
        raise BadCall(f"cannot read {arg[1:]}: {exc.strerror}") from None


def number_arg(arg: str, fn: str) -> int | float:
    """A numeric argument without a signature at hand (the cloudlet checks types):
    an integer (decimal or 0x-hex) if it reads as one, else a float."""
    try:
        value = int(arg, 0)
    except ValueError:
        try:
            return float(arg)
        except ValueError:
            raise BadCall(f"{fn}: {arg!r} is neither a number nor s:/x:/@ bytes") from None
    if not INT_MIN <= value <= INT_MAX:
        raise BadCall(f"{fn}: {arg} does not fit a 64-bit integer")
    return value


def format_result(result: Any) -> str:
    if result is None:
        return ""
    if isinstance(result, bytes):
        return "x:" + result.hex()
    if isinstance(result, tuple | list):
        return " ".join(format_result(r) for r in result)
    if isinstance(result, float):
        return repr(result)
    return str(result)
