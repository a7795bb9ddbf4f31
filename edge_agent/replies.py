"""Exactly-once calls: the answers a VM gave to its recent sequenced calls.

A session numbers its calls (1, 2, 3, ...; the number a call takes is the VM's
`seq` after it). When a connection drops, the client cannot know whether its
last calls were applied, so it sends them again with the same numbers. The
daemon applies a number only when it is the VM's next; for a number it has
already applied it answers from this log instead, so nothing is applied twice
and the client gets the very answer it missed.

The log keeps an answer until the client acknowledges it (`ack` on a later
call: every answer up to that number arrived), so however many calls a client
has in flight when its connection drops, each can be answered. Caps bound it
for clients that never acknowledge. Each answer remembers which call it
answered, so a different call resent under a used number (a second client
numbering calls on the same VM) is refused, not answered with someone else's
result.

Whether a call runs, is answered from here or is refused is decided by
`ExactlyOnce` (edge_agent/exactly_once.py); this module only keeps answers.

The log travels with the VM: it is kept in the snapshot's annex at every
checkpoint and migration, so a restart or a move does not turn a resent call
into a second application.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

# Answers kept for a client that never acknowledges (the SDK does, and keeps at
# most 64 calls in flight). Past either cap the oldest answers are dropped, and a
# resend of one gets `reply_expired`. The owner's memory quota may lower the byte
# cap of a log (`ReplyLog.set_cap`, edge_agent/quotas.py).
REPLY_WINDOW = 1024
REPLY_BYTES_CAP = 16 << 20
ANNEX_KEY = "replies"
# Also in the annex: how many times the VM has moved between cloudlets. Its
# location is published with it, so receivers order a VM's locations by moves,
# not by the clocks of the cloudlets it moved between.
GENERATION_KEY = "generation"


def generation_of(annex: dict[str, Any]) -> int:
    value = annex.get(GENERATION_KEY, 0)
    return value if type(value) is int and value >= 0 else 0
_FIXED_BYTES = 96  # per answer: the map, its keys, the call's identity
# The daemon's entries nest 5 levels ([seq, identity, reply] > reply > error >
# details > a value); a log from the wire may go to 8. Deeper ones are dropped:
# sizing an answer takes its `str`, which a value 1,000 levels deep (msgpack
# allows 1,024) cannot give within Python's recursion limit.
MAX_ENTRY_DEPTH = 8


def call_identity(fn: str, args: tuple[Any, ...], data: bytes | None) -> list[Any]:
    """What makes two calls the same call (msgpack-able, compared on a resend)."""
    if data is not None:
        return [fn, hashlib.blake2b(data, digest_size=16).digest()]
    return [fn, list(args)]


def result_size(fn: str) -> int:
    """`_size_of` a numeric call's result the daemon just made (`{"result", "seq",
    "durable"}`), from its function name alone: every numbered call's path, where
    looking through the reply again is a measurable share of the call."""
    return _FIXED_BYTES + len(fn)


_BYTES = (bytes, bytearray)  # a tuple: `bytes | bytearray` builds a union per call


def _size_of(identity: list[Any], reply: dict[str, Any]) -> int:
    size = _FIXED_BYTES + len(str(identity[0]))
    data = reply.get("data")
    if isinstance(data, _BYTES):
        size += len(data)
    error = reply.get("error")
    if isinstance(error, dict):
        size += len(str(error.get("message", ""))) + len(str(error.get("details", "")))
    return size


class ReplyLog:
    """The recent answers of one VM, by sequence number."""

    def __init__(self) -> None:
        # seq -> [identity, reply, its size as `_size_of` counts it]: sized once, when
        # kept, not again when acknowledged or trimmed.
        self._entries: OrderedDict[int, list[Any]] = OrderedDict()
        self._bytes = 0
        # Lowered by the owner's memory quota (edge_agent/quotas.py), never raised past
        # REPLY_BYTES_CAP.
        self.cap_bytes = REPLY_BYTES_CAP

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def add(self, seq: int, identity: list[Any], reply: dict[str, Any],
            size: int | None = None) -> None:
        """Keep `reply` as call `seq`'s answer. `size` is `_size_of(identity, reply)`
        when the caller has it already (`result_size`)."""
        if size is None:
            size = _size_of(identity, reply)
        entries = self._entries
        replaced = entries.pop(seq, None)
        if replaced is not None:  # only from a malformed log: the daemon never reuses a number
            self._bytes -= replaced[2]
        entries[seq] = [identity, reply, size]
        self._bytes += size
        if len(entries) > REPLY_WINDOW or self._bytes > self.cap_bytes:
            self._trim()

    def set_cap(self, cap_bytes: int) -> None:
        """Keep at most `cap_bytes` (at most REPLY_BYTES_CAP) of answers from now on,
        dropping the oldest at once if the log holds more."""
        self.cap_bytes = min(cap_bytes, REPLY_BYTES_CAP)
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > REPLY_WINDOW or (self._bytes > self.cap_bytes
                                                    and len(self._entries) > 1):
            _, old = self._entries.popitem(last=False)
            self._bytes -= old[2]

    def acknowledge(self, upto_seq: int) -> None:
        """The client has every answer up to `upto_seq`: forget them."""
        entries = self._entries
        while entries:
            seq = next(iter(entries))
            if seq > upto_seq:
                return
            self._bytes -= entries.pop(seq)[2]

    def get(self, seq: int) -> tuple[list[Any], dict[str, Any]] | None:
        """The kept `(identity, answer)` of call `seq`, if it is still kept. What a
        resend under that number gets is decided by edge_agent/exactly_once.py."""
        entry = self._entries.get(seq)
        return None if entry is None else (entry[0], entry[1])

    def to_wire(self) -> list[list[Any]]:
        return [[seq, identity, reply] for seq, (identity, reply, _) in self._entries.items()]

    @classmethod
    def from_wire(cls, wire: Any) -> ReplyLog:
        """From a snapshot's annex; anything malformed is dropped (it only costs a
        client `ReplyExpired` on a resend), never a refused restore."""
        log = cls()
        if isinstance(wire, list):
            kept = [item for item in wire if _is_entry(item)]
            # In number order, as the daemon adds them: `acknowledge` trims from the front.
            for seq, identity, reply in sorted(kept, key=lambda item: item[0]):
                log.add(seq, identity, reply)
        return log


def _is_entry(item: Any) -> bool:
    """`[seq, identity, reply]` with an identity as `call_identity` makes it, no
    deeper than the daemon's own entries go."""
    return (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
            and isinstance(item[1], list) and len(item[1]) == 2 and type(item[1][0]) is str
            and isinstance(item[2], dict) and _depth_at_most(item, MAX_ENTRY_DEPTH))


def _depth_at_most(value: Any, limit: int) -> bool:
    """Whether `value` nests lists and maps at most `limit` levels (iteratively: the
    point is values deeper than Python's recursion limit)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list | dict):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in
                         (node.values() if isinstance(node, dict) else node))
    return True
