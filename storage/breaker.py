"""The storage circuit breaker, :class:`ConsecutiveFailureBreaker`: stop hammering a database
that is down or slow. Its twin, ``runtime.breaker.FailureRateBreaker`` (the providers': a
failure rate over a window, several trials), shares :class:`BreakerState`, defined here, in
the bottom layer, so that both can use it.

Closed, every batch goes to the database. ``failure_threshold`` consecutive failures (an error,
or a success slower than ``slow_call``) open it: batches then go straight to the journal. After
``reset_after`` seconds one trial is allowed (half-open): success closes the breaker, failure
opens it again for twice as long, up to ``max_reset_after``. One trial at a time, not the
unlimited trials of pybreaker and friends (their half-open states gate no call, per pybreaker's,
purgatory's and circuitbreaker's sources): the caller is one thread, and a trial against a dead
server can block it for the connect timeout.

Not thread-safe: the persistence actor's thread owns it. ``clock`` is injectable so tests can
step time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    """Where a circuit breaker stands (both breakers); its value is what status shows."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ConsecutiveFailureBreaker:
    """``failure_threshold`` consecutive failures open it; one trial when half-open (module
    doc)."""

    def __init__(
        self,
        *,
        failure_threshold: int = 1,
        reset_after: float = 0.5,
        max_reset_after: float = 30.0,
        slow_call: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.initial_reset = reset_after
        self.max_reset_after = max_reset_after
        self.slow_call = slow_call
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._reset_after = reset_after
        self._opened_at = 0.0
        self._trial_at = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def retry_in(self) -> float:
        """Seconds until a trial is allowed (0 when closed or due)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._reset_after - self._clock())

    def allow(self) -> bool:
        """May the caller try the database now? When open and due, this grants the one trial."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN and self.retry_in == 0.0:
            self._state = BreakerState.HALF_OPEN
            self._trial_at = self._clock()
            return True
        if (
            self._state is BreakerState.HALF_OPEN
            and self._clock() - self._trial_at > self.max_reset_after
        ):
            # The last trial was never reported (its caller failed in an unexpected way):
            # do not stay half-open, and so closed to the database, forever.
            self._trial_at = self._clock()
            return True
        return False

    def record(self, *, ok: bool, duration: float = 0.0) -> None:
        """Report how the call that :meth:`allow` permitted went."""
        if ok and duration < self.slow_call:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._reset_after = self.initial_reset
            return
        if self._state is BreakerState.HALF_OPEN:
            self._reset_after = min(self._reset_after * 2, self.max_reset_after)
            self._open()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()

    def force_trial(self) -> None:
        """Make the next :meth:`allow` grant a trial now (an explicit flush), whatever the
        schedule says."""
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock() - self._reset_after

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
