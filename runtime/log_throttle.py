"""Log lines that a peer can cause, at most one per key and period.

Anything a remote peer can trigger at will (a refused handshake, a reset, a timed-out
handshake, a full descriptor table) must not let that peer write the log at its own pace: the
first occurrence is logged at once, repeats within ``period`` seconds are only counted, and
the next line logged for that key carries how many were suppressed since the previous one.
A burst that ends within the period is therefore reported by its first line alone; its size
appears on the next line of that key, whenever that comes. Counters that the lines describe
(status, metrics) are never throttled: nothing is hidden, only not written out line by line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

#: Seconds between two lines of the same key (60 s would hide too much of an attack's shape,
#: 1 s would still be thousands of lines an hour).
DEFAULT_PERIOD = 10.0


class _Emit(Protocol):
    def __call__(self, event: str, /, **fields: object) -> object: ...


class LogThrottle:
    """Per-key rate limit for log calls (keys are chosen by the caller: event and reason).

    Safe from any thread (dead letters come from pykka actors' threads too). Keys should come
    from a small set (events, reasons), never from what a peer sends: each key is remembered.
    """

    def __init__(self, period: float = DEFAULT_PERIOD, clock: Callable[[], float] | None = None):
        self.period = period
        self._clock = clock or time.monotonic
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(self, emit: _Emit, event: str, *, key: str | None = None, **fields: object) -> bool:
        """Call ``emit(event, **fields)`` unless a line of ``key`` (default: ``event``) was
        emitted less than ``period`` seconds ago; returns whether it was emitted."""
        key = key or event
        with self._lock:
            now = self._clock()
            if now < self._next.get(key, -float("inf")):
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._next[key] = now + self.period
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        emit(event, **fields)
        return True
