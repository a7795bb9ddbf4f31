"""Structure-aware mutation for msgpack inputs: change the decoded value, not its bytes.

Why: five of our decoders read msgpack, and their bugs hide in values, not in
bytes: a field of the wrong type, an integer at 2^64 - 1, a map where a string
was, a structure 1,000 levels deep where a name was. Byte mutation reaches these
slowly (most flips break the msgpack before any of our code runs) and coverage
does not reward them (a deeper list runs the same lines). So half the time a
target's mutator decodes the input, changes one node of the value tree, and
encodes it again; the other half it leaves the bytes to libFuzzer's own
mutations (`atheris.Mutate`), which keep finding what is wrong below msgpack.

Mutators are deterministic in their seed, as libFuzzer requires to replay a run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

Mutator = Callable[[bytes, int, int], bytes]
# Share of mutations left to libFuzzer's byte-level mutator.
BYTE_SHARE = 0.5
# Values that decoders get wrong: integer and float edges, every msgpack type,
# empty and long strings. (Lists and maps are fresh each time: see `_scalar`.)
EDGE_VALUES: tuple[Any, ...] = (
    0, 1, -1, 2, 255, 4096, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
    (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, 0.0, -0.0, 0.5, -1.5, 1e308, float("nan"),
    float("inf"), float("-inf"), True, False, None, "", "x", "\u00e9" * 3, "x" * 300,
    b"", b"\x00" * 4, b"\xff" * 16, b"\x00" * 4096,
    msgpack.ExtType(1, b"x"), msgpack.Timestamp(0, 0),
)
# How deep `nest` wraps a value: a little, a lot, and up to msgpack's own limit
# (1024 levels; the input's own depth plus these may exceed it, then the
# encoded input is refused early, which is fine: other depths are tried too).
NEST_DEPTHS = (1, 3, 50, 400, 900, 1015)
MAX_SLOTS = 4096  # nodes considered per mutation: inputs are small; a cap keeps it O(1)


def msgpack_mutator(keys: Sequence[str], *, wrap: Callable[[bytes], bytes] | None = None,
                    unwrap: Callable[[bytes], bytes | None] | None = None) -> Mutator:
    """A libFuzzer custom mutator for inputs that are msgpack (or, with `unwrap`
    and `wrap`, contain msgpack: a snapshot's body). `keys` are map keys the
    decoder reads, added to maps now and then."""

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        import atheris  # only ever called inside the fuzzing worker

        rng = random.Random(seed)
        inner = unwrap(data) if unwrap is not None else data
        if inner is not None and rng.random() >= BYTE_SHARE:
            out = mutate_msgpack(inner, rng, keys)
            if out is not None:
                out = wrap(out) if wrap is not None else out
                if len(out) <= max_size:
                    return out
        mutated: bytes = atheris.Mutate(data, max_size)
        return mutated

    return mutate


def mutate_msgpack(data: bytes, rng: random.Random, keys: Sequence[str]) -> bytes | None:
    """`data` decoded, one node changed, encoded again; None if it is not msgpack."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    value = mutate_value(value, rng, keys)
    try:
        packed: bytes = msgpack.packb(value)
    except (ValueError, TypeError, OverflowError):  # a cycle made by `copy`, too deep
        return None
    return packed


def mutate_value(root: Any, rng: random.Random, keys: Sequence[str]) -> Any:
    """`root` with one node replaced, wrapped, retyped, copied, added or removed."""
    slots = _slots(root)
    parent, where = rng.choice(slots)
    current = root if parent is None else parent[where]
    op = rng.randrange(6)
    if op == 0:
        new = _scalar(rng)
    elif op == 1:
        new = nest(current, rng.choice(NEST_DEPTHS), as_map=rng.random() < 0.3)
    elif op == 2:
        other_parent, other_where = rng.choice(slots)
        new = root if other_parent is None else other_parent[other_where]
    elif op == 3:
        new = _retyped(current, rng)
    elif op == 4 and isinstance(current, dict):
        new = dict(current)
        new[_key(rng, keys)] = _scalar(rng)
    elif op == 4 and isinstance(current, list):
        new = [*current, _scalar(rng)]
    elif op == 5 and isinstance(current, dict) and current:
        new = dict(current)
        del new[rng.choice(list(new))]
    elif op == 5 and isinstance(current, list) and current:
        new = list(current)
        del new[rng.randrange(len(new))]
    else:
        new = _scalar(rng)
    if parent is None:
        return new
    if isinstance(parent, dict) and op == 1 and rng.random() < 0.2:
        del parent[where]  # the same value under a key the map had not
        parent[_key(rng, keys)] = new
    else:
        parent[where] = new
    return root


def nest(value: Any, depth: int, *, as_map: bool = False) -> Any:
    """`value` inside `depth` lists (or single-key maps)."""
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


def _slots(root: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every node, the root as (None, None); iterative,
    since a value may be nested deeper than Python's recursion limit."""
    slots: list[tuple[Any, Any]] = [(None, None)]
    stack = [root]
    while stack and len(slots) < MAX_SLOTS:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                slots.append((node, key))
                stack.append(child)
        elif isinstance(node, list):
            for index, child in enumerate(node):
                slots.append((node, index))
                stack.append(child)
    return slots


def _key(rng: random.Random, keys: Sequence[str]) -> Any:
    """A map key: mostly one the decoder reads, else any hashable edge value."""
    return rng.choice(keys) if keys and rng.random() < 0.8 else rng.choice(EDGE_VALUES)


def _scalar(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return [] if rng.random() < 0.5 else {}
    return rng.choice(EDGE_VALUES)


def _retyped(value: Any, rng: random.Random) -> Any:
    """The same content as another type: what a decoder that checks types must refuse."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return rng.choice([float(value) if abs(value) < 1 << 53 else -1.0, str(value),
                           value.to_bytes(8, "little", signed=True) if -(1 << 63) <= value
                           < 1 << 63 else b"", value != 0])
    if isinstance(value, float):
        return int(value) if value == value and abs(value) < 1e18 else str(value)
    if isinstance(value, str):
        return value.encode() if rng.random() < 0.5 else [value]
    if isinstance(value, bytes):
        return value.decode("latin-1") if rng.random() < 0.5 else list(value[:64])
    if isinstance(value, list):
        return dict(enumerate(value)) if rng.random() < 0.5 else tuple(value)
    if isinstance(value, dict):
        return list(value.values())
    return None
