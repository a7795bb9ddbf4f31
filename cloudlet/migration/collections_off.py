"""No garbage collection on a migration's downtime path.

Why: a full collection of a daemon's heap (a large VM's migration alone holds
tens of thousands of chunk digests) takes milliseconds, and the interpreter
starts one whenever its allocation counters say so: inside the pause as likely
as anywhere. Measured on single 256 MiB moves, one sitting: the source paused
4.4-6.4 ms when the collector was free to run there, 2.0-2.9 ms when it was
held off, and the client's gap went from 6.4-8.3 to 3.8-5.2 ms. The
collection is deferred, not dropped: it runs at the next allocation threshold
after the hold ends, outside the pause.

A hold is process-wide (so is the collector) and counted, so two migrations
of one daemon nest; the collector is enabled again only if it was enabled
when the first hold began. The drivers hold it on the downtime's path (the
source from the pause to its end, the destination from the final round to its
end); the daemon holds it on over the landing and its held streams' first
calls.
"""

from __future__ import annotations

import gc

_holds = 0
_was_enabled = False


def hold() -> None:
    """Stop automatic collections until the matching `release()`."""
    global _holds, _was_enabled
    if _holds == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _holds += 1


def release() -> None:
    """End one `hold()`; the last one lets the collector run again."""
    global _holds
    if _holds == 0:
        return
    _holds -= 1
    if _holds == 0 and _was_enabled:
        gc.enable()
