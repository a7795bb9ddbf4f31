"""What the session protocol asks of its driver, and what it tells the application.

Why objects and not callbacks: the exactly-once rules stay a pure function of
what the protocol is fed (h11's design), so each case is a table row in a test,
and the order of the outputs is the contract. A driver loops on
`SessionProtocol.next_event()` and does what each event says, in order; the
events that ask for an outcome (`DescribeVM`, `OpenStream`, `Locate`,
`NeedData`) are answered by calling the matching `SessionProtocol` method before
the next `next_event()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from cloudlet.errors import CloudletError
from cloudlet.protocol import Location


class Numbered(NamedTuple):
    """What `SessionProtocol.call()` gives back: the call's sequence number, and its
    frame when the driver is to write it on the open stream now (None: the
    protocol sends it itself, as a `Send`, once a stream is up). A named tuple, not
    a frozen dataclass like the events: one is made per call, and a frozen
    dataclass's `__init__` costs half again as much."""

    seq: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class Send:
    """Write `data` on the current stream, as one binary frame. A failure to write
    is a closed stream (`stream_closed()`): the next stream resends it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedData:
    """Read the stream's next frame: feed it to `receive_data()`, or call
    `stream_closed()` when the stream ended or broke."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Call `seq` was answered: hand `value` to the application that waits for it."""

    seq: int
    value: Any


@dataclass(frozen=True, slots=True)
class CallFailed:
    """Call `seq` ended with `error`: raise it to the application that waits for it."""

    seq: int
    error: CloudletError


@dataclass(frozen=True, slots=True)
class DescribeVM:
    """Ask the cloudlet at `location` about the VM (its `seq` and size cap): feed the
    answer to `described()`, a typed error to `describe_failed()`."""

    location: Location


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open the VM's stream at `location`: then `stream_opened()`, or `open_failed()`."""

    location: Location


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Close the current stream, if one is open (closing twice is harmless). With
    `in_background`, the next stream need not wait for the close handshake: the VM
    has left that place, which takes no more calls for it. Otherwise wait for it: the
    old place has then handled every call written on the stream before the next
    stream resends them."""

    in_background: bool = False


@dataclass(frozen=True, slots=True)
class OpenStandby:
    """The VM is moving to `location` (a `moving` notice): open its stream there in
    the background, while the current stream goes on serving, and keep it aside.
    Report `standby_opened(location)` once it is up (keep it only if that returns
    True), and `standby_closed(location)` if opening fails or it ends later. Never
    write on it and never feed its frames: nothing is sent there until the move
    commits (`UseStandby`). Why: the destination holds the stream until the VM
    arrives, so at the commit the switch is a write, not a connect."""

    location: Location


@dataclass(frozen=True, slots=True)
class DropStandby:
    """Close the standby stream, or stop opening it (the VM went elsewhere, or the
    session ended). Harmless when there is none."""


@dataclass(frozen=True, slots=True)
class UseStandby:
    """The VM moved where the standby stream is open: make it the current stream,
    in place of an `OpenStream(location)`; then `stream_opened()`, or
    `open_failed()` if it is gone by now (the protocol then opens one at once)."""

    location: Location


@dataclass(frozen=True, slots=True)
class Locate:
    """Find where VM `vm_id` is now (its retained location, the known cloudlets):
    feed the place, or None, to `located()`."""

    vm_id: str


@dataclass(frozen=True, slots=True)
class Vouch:
    """`by` moved the VM to `where`: trust `where` on `by`'s word (it proved itself,
    and proved `where` before handing it the VM), before the stream opens there."""

    where: Location
    by: Location


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait `delay_s` before the next `next_event()`: the cloudlet is failing (`cause`),
    or closes streams before answering anything (`cause` None)."""

    delay_s: float
    cause: CloudletError | None


@dataclass(frozen=True, slots=True)
class Lost:
    """The session is over (`error`: the VM's state is gone, the token no longer
    admits it, or it was closed). Every waiting call has had its `CallFailed`."""

    error: CloudletError


NEED_DATA = NeedData()

Event = (Send | NeedData | Answer | CallFailed | DescribeVM | OpenStream | CloseStream
         | OpenStandby | DropStandby | UseStandby | Locate | Vouch | Backoff | Lost)
