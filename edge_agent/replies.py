"""Exactly-once calls: the answers a VM gave to its recent sequenced calls.

A session numbers its calls (1, 2, 3, ...; the number a call takes is the VM's
`seq` after it). When a connection drops, the client cannot know whether its
last calls were applied, so it sends them again with the same numbers. The
daemon applies a number only when it is the VM's next one; for a number it has
already applied it answers from this log instead, so nothing is applied twice
and the client gets the very answer it missed.

The log travels with the VM: it is kept in the snapshot's annex at every
checkpoint and migration, so a restart or a move does not turn a resent call
into a second application.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from cloudlet.errors import ReplyExpired, SequenceGap, error_from_wire

# How many answers a VM keeps. A client resends at most the calls it has in
# flight, and the SDK keeps at most 64 in flight per session, so 256 leaves room
# for several clients racing after a reconnect.
REPLY_WINDOW = 256
# Answers can be large (a frame); past this many bytes the oldest are dropped
# even inside the window, so a VM's log never holds more than this in memory.
REPLY_BYTES_CAP = 4 << 20
ANNEX_KEY = "replies"


def _size_of(reply: dict[str, Any]) -> int:
    data = reply.get("data")
    return 64 + (len(data) if isinstance(data, bytes | bytearray) else 0)


class ReplyLog:
    """The recent answers of one VM, by sequence number."""

    def __init__(self) -> None:
        self._replies: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._replies)

    def add(self, seq: int, reply: dict[str, Any]) -> None:
        self._replies[seq] = reply
        self._bytes += _size_of(reply)
        while len(self._replies) > REPLY_WINDOW or (self._bytes > REPLY_BYTES_CAP
                                                    and len(self._replies) > 1):
            _, old = self._replies.popitem(last=False)
            self._bytes -= _size_of(old)

    def replay(self, seq: int, vm_seq: int) -> dict[str, Any]:
        """The answer to call `seq` that is not the VM's next (`vm_seq + 1`): the
        kept answer of an applied call (its error raised again), or a typed error."""
        if seq > vm_seq + 1:
            raise SequenceGap(f"call {seq} is ahead of this VM, which takes call {vm_seq + 1} "
                              "next: calls in between were never applied here",
                              expected=vm_seq + 1)
        reply = self._replies.get(seq)
        if reply is None:
            raise ReplyExpired(f"call {seq} was applied (the VM is at {vm_seq}), but its "
                               f"answer is no longer kept (the last {REPLY_WINDOW} are)")
        if "error" in reply:
            raise error_from_wire(reply["error"])
        return reply

    def to_wire(self) -> list[list[Any]]:
        return [[seq, reply] for seq, reply in self._replies.items()]

    @classmethod
    def from_wire(cls, wire: Any) -> ReplyLog:
        """From a snapshot's annex; anything malformed is dropped (it only costs a
        client `ReplyExpired` on a resend), never a refused restore."""
        log = cls()
        if isinstance(wire, list):
            for item in wire:
                if (isinstance(item, list) and len(item) == 2 and type(item[0]) is int
                        and isinstance(item[1], dict)):
                    log.add(item[0], item[1])
        return log
