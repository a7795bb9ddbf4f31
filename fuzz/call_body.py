"""Fuzz target: HTTP call bodies (`POST /v1/vms/{vm}/call`), as the route decodes them.

The route reads the body (capped), `unpack_map`s it, `parse_call`s the map and
hands the call to the VM's host, which keeps its answer in the reply log. All
but the VM's run is done here (see `fuzz/calls.py`); only `CloudletError` may
escape.
"""

from __future__ import annotations

import contextlib

import msgpack

from cloudlet.errors import CloudletError
from edge_agent.requests import parse_call, unpack_map
from fuzz import calls, fixtures, structure

# The daemon's default cap is 1 MiB (`max_request_kib`); the decoding is the same
# at any size, and small inputs keep the fuzzer fast.
MAX_INPUT_BYTES = 16 << 10
KEYS = ("fn", "args", "data", "seq", "ack", "too_large")
DICTIONARY = fixtures.msgpack_dictionary(*KEYS)
MUTATOR = structure.msgpack_mutator(KEYS)


def TestOneInput(data: bytes) -> None:
    with contextlib.suppress(CloudletError):
        calls.keep_answer(parse_call(unpack_map(data)))


def seeds() -> dict[str, bytes]:
    out = {f"{name}.msgpack": msgpack.packb(body) for name, body in calls.REQUESTS.items()}
    out["not-a-map.msgpack"] = msgpack.packb([1, 2])
    out["int-keys.msgpack"] = msgpack.packb({1: "fn"})
    out["truncated.msgpack"] = out["bytes.msgpack"][:-3]
    out["deepest-args.msgpack"] = b"\x83\xa3seq\x01\xa2fn\xa1f\xa4args" + fixtures.deepest()
    return out
