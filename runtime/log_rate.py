"""A rate limit for log lines that a peer can cause: the first ones are written, the rest are
counted, and the count rides on the next line that gets through.

A hostile or broken client can make the server notice something wrong thousands of times a
second (garbage frames, notifications into a full mailbox). One line each would let it fill
the disk and push everything else out of the log's rotation. A token bucket bounds the lines;
nothing is hidden, since the next line says how many were ``suppressed`` before it, and the
counters the lines describe (status, metrics) are never rate limited.
"""

from __future__ import annotations

import threading
import time

__all__ = ["LogRate"]


class LogRate:
    """At most ``burst`` lines at once, refilled at ``per_second``. Safe from any thread."""

    __slots__ = ("_level", "_lock", "_stamp", "_suppressed", "burst", "per_second")

    def __init__(self, *, per_second: float = 1.0, burst: int = 10) -> None:
        self.per_second = per_second
        self.burst = burst
        self._level = float(burst)
        self._stamp = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        """``None``: do not log this one (it is counted). Otherwise log it, with the returned
        number of lines suppressed since the last one that was logged."""
        with self._lock:
            now = time.monotonic()
            self._level = min(self.burst, self._level + (now - self._stamp) * self.per_second)
            self._stamp = now
            if self._level < 1:
                self._suppressed += 1
                return None
            self._level -= 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
