"""Restart intensity: how many restarts a supervisor tolerates before it gives up.

Erlang/OTP semantics: a supervisor with intensity ``max_restarts`` (MaxR) and period
``period`` (MaxT) gives up when **more than** MaxR restarts fall within MaxT seconds. The
restart being attempted counts, and the window is closed at both ends: a restart at ``t``
still counts at ``now`` when ``now - t <= period`` (OTP keeps ``R >= Now - Period``).
``max_restarts = 0`` therefore means "never restart".
"""

from __future__ import annotations

from collections import deque

__all__ = ["RestartIntensity"]


class RestartIntensity:
    """The sliding window of recent restart times of one supervisor incarnation.

    Memory stays bounded by ``max_restarts + 1`` timestamps: older ones are pruned on every
    call, and a supervisor stops recording once it has given up.
    """

    __slots__ = ("_times", "max_restarts", "period")

    def __init__(self, max_restarts: int, period: float) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.max_restarts = max_restarts
        self.period = period
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now``; return whether it stays within the intensity.

        ``False`` means this restart is the one too many: the caller must give up instead of
        restarting. Times must be non-decreasing (``trio.current_time()`` is monotonic).
        """
        self._prune(now)
        self._times.append(now)
        return len(self._times) <= self.max_restarts

    def recent(self, now: float | None = None) -> tuple[float, ...]:
        """The restart times that still count against the intensity at ``now``, oldest first.

        Without ``now``, every time kept since the last call to :meth:`allow`.
        """
        return tuple(t for t in self._times if now is None or now - t <= self.period)

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0] > self.period:
            self._times.popleft()
