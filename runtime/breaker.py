"""The providers' circuit breaker, :class:`FailureRateBreaker`: a failure *rate* over a window,
for trio, judged the way resilience4j judges (its CircuitBreaker docs). Its twin,
``storage.breaker.ConsecutiveFailureBreaker`` (the persistence actor's: consecutive failures,
one trial), shares its state type, :class:`~storage.breaker.BreakerState`.

pybreaker, purgatory and circuitbreaker count *consecutive* failures and let any number of
trial calls through once half-open; none of them targets trio. This one:

* judges the failure **rate** over a sliding window of the last ``window_size`` calls, and only
  once ``minimum_calls`` have been seen, so one early failure cannot open it;
* counts a call that took ``slow_call_seconds`` or longer as a failure even if it succeeded,
  because an upstream that answers in a minute is as unusable as one that does not answer;
* while **open**, refuses every call at once with :class:`BreakerOpen`, naming the breaker and
  when it will let a trial through;
* after ``open_seconds`` goes **half-open** and lets exactly ``half_open_calls`` trial calls
  through; their failure rate decides between closed and open again.

Time is ``trio.current_time()``, so tests drive it with ``trio.testing.MockClock``. Everything
runs in the trio thread, so no lock is needed. A result that arrives from a call started in an
earlier state (say, a slow call started while closed that ends after the breaker opened) is
dropped: it says nothing about the state it would otherwise be judged in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import structlog
import trio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.status_model import BreakerStatus
from storage.breaker import BreakerState
from storage.errors import RetryLater

log = structlog.get_logger("breaker")


class CallOutcome(Enum):
    """How a finished call counts: against the upstream's health, for it, or not at all."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # e.g. cancelled, or refused for reasons that are not the upstream's


class BreakerConfig(BaseModel):
    """resilience4j's knobs, with its defaults where they fit an LLM upstream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_size: int = Field(default=20, ge=1, description="Calls in the sliding window.")
    minimum_calls: int = Field(
        default=10, ge=1, description="Calls the window must hold before the rate is judged."
    )
    failure_rate_threshold: float = Field(
        default=0.5, gt=0, le=1, description="Failure rate (slow calls included) that opens."
    )
    slow_call_seconds: float = Field(
        default=60.0, gt=0, description="A call this long or longer counts as a failure."
    )
    open_seconds: float = Field(
        default=60.0, gt=0, description="How long calls fail at once before a trial."
    )
    half_open_calls: int = Field(
        default=3, ge=1, description="Trial calls let through when half-open."
    )

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> BreakerConfig:
        if self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) cannot exceed "
                f"window_size ({self.window_size}): the rate would never be judged"
            )
        return self


class BreakerOpen(RetryLater):
    """The breaker refused the call without trying it; ``retry_after`` is when it tries again
    (``None`` while half-open: shortly)."""

    def __init__(self, name: str, state: BreakerState, retry_after: float | None) -> None:
        self.name = name
        self.state = state
        self.retry_after = retry_after
        if state is BreakerState.OPEN and retry_after is not None:
            message = (
                f"circuit breaker {name!r} is open: calls fail at once until a trial "
                f"in {retry_after:.1f} s"
            )
        else:
            message = (
                f"circuit breaker {name!r} is half-open and its trial calls are in flight: "
                "retry shortly"
            )
        super().__init__(message)


class BreakerSnapshot(BreakerStatus):
    """A breaker's state: the public status (``exai status`` shows these fields, and only
    these: a model field serialises as its declared type) and what only tests and the provider
    read besides. A copy, safe to serialise."""

    window_slow: int = Field(description="Of the window's failures, how many were slow.")
    half_open_in_flight: int
    half_open_results: int


@dataclass(frozen=True, slots=True)
class _Result:
    failed: bool
    slow: bool


class Permit:
    """One call the breaker let through. Finish it exactly once (:meth:`finish`)."""

    __slots__ = ("_breaker", "_done", "_generation", "_half_open", "_started")

    def __init__(self, breaker: FailureRateBreaker, generation: int, *, half_open: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._half_open = half_open
        self._started = trio.current_time()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def finish(self, outcome: CallOutcome, *, elapsed: float | None = None) -> None:
        """Record how the call went; later calls are no-ops, so cleanup paths may repeat it.

        ``elapsed`` overrides the time judged against ``slow_call_seconds`` (a stream is
        judged by its first chunk, not by how long the whole answer took).
        """
        if self._done:
            return
        self._done = True
        if elapsed is None:
            elapsed = trio.current_time() - self._started
        self._breaker._finish(self, outcome, elapsed)  # the permit is part of the breaker


def default_classify(error: BaseException) -> CallOutcome:
    """Cancellation says nothing about the upstream; any other exception is a failure."""
    if isinstance(error, trio.Cancelled):
        return CallOutcome.IGNORED
    return CallOutcome.FAILURE


class FailureRateBreaker:
    """One upstream's breaker. Use :meth:`guard`, or :meth:`acquire` and ``Permit.finish``."""

    def __init__(self, name: str, config: BreakerConfig | None = None) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._state = BreakerState.CLOSED
        self._window: deque[_Result] = deque(maxlen=self.config.window_size)
        self._generation = 0  # bumped on every transition; stale permits are ignored
        self._open_until = -math.inf
        self._trials_issued = 0
        self._trials: list[_Result] = []
        self._times_opened = 0
        self._rejected = 0

    @property
    def state(self) -> BreakerState:
        self._advance(trio.current_time())
        return self._state

    def acquire(self) -> Permit:
        """Let one call through, or raise :class:`BreakerOpen` at once."""
        now = trio.current_time()
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            return Permit(self, self._generation, half_open=False)
        if self._state is BreakerState.HALF_OPEN and self._trials_issued < (
            self.config.half_open_calls
        ):
            self._trials_issued += 1
            return Permit(self, self._generation, half_open=True)
        self._rejected += 1
        retry_after = max(0.0, self._open_until - now) if self._state is BreakerState.OPEN else None
        raise BreakerOpen(self.name, self._state, retry_after)

    @contextmanager
    def guard(
        self, classify: Callable[[BaseException], CallOutcome] = default_classify
    ) -> Iterator[Permit]:
        """``with breaker.guard() as permit:`` around one call.

        Leaving normally records a success unless the body already finished the permit; an
        exception is recorded as ``classify(exc)`` says, then propagates.
        """
        permit = self.acquire()
        try:
            yield permit
        except BaseException as exc:
            permit.finish(classify(exc))
            raise
        permit.finish(CallOutcome.SUCCESS)

    def snapshot(self) -> BreakerSnapshot:
        now = trio.current_time()
        self._advance(now)
        failures = sum(1 for r in self._window if r.failed)
        judged = len(self._window) >= self.config.minimum_calls
        return BreakerSnapshot(
            name=self.name,
            state=self._state,
            window_calls=len(self._window),
            window_failures=failures,
            window_slow=sum(1 for r in self._window if r.slow),
            failure_rate=failures / len(self._window) if judged else None,
            retry_after_s=(
                max(0.0, self._open_until - now) if self._state is BreakerState.OPEN else None
            ),
            half_open_in_flight=self._trials_issued - len(self._trials),
            half_open_results=len(self._trials),
            times_opened=self._times_opened,
            rejected=self._rejected,
        )

    # -- transitions -------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        # Open -> half-open happens lazily, when someone looks: no timer task to own.
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._transition(BreakerState.HALF_OPEN)
            log.info("breaker.half_open", breaker=self.name, trials=self.config.half_open_calls)

    def _finish(self, permit: Permit, outcome: CallOutcome, elapsed: float) -> None:
        if permit._generation != self._generation:
            return
        if outcome is CallOutcome.IGNORED:
            if permit._half_open:
                self._trials_issued -= 1  # give the trial slot back for another call
            return
        slow = elapsed >= self.config.slow_call_seconds
        result = _Result(failed=outcome is CallOutcome.FAILURE or slow, slow=slow)
        if self._state is BreakerState.CLOSED:
            self._judge_closed(result)
        elif self._state is BreakerState.HALF_OPEN:
            self._judge_trial(result)

    def _judge_closed(self, result: _Result) -> None:
        self._window.append(result)
        if len(self._window) < self.config.minimum_calls:
            return
        failures = sum(1 for r in self._window if r.failed)
        rate = failures / len(self._window)
        if rate >= self.config.failure_rate_threshold:
            self._open(rate=rate, calls=len(self._window))

    def _judge_trial(self, result: _Result) -> None:
        self._trials.append(result)
        if len(self._trials) < self.config.half_open_calls:
            return
        rate = sum(1 for r in self._trials if r.failed) / len(self._trials)
        if rate >= self.config.failure_rate_threshold:
            self._open(rate=rate, calls=len(self._trials))
        else:
            self._transition(BreakerState.CLOSED)
            log.info("breaker.closed", breaker=self.name, trial_failure_rate=rate)

    def _open(self, *, rate: float, calls: int) -> None:
        self._transition(BreakerState.OPEN)
        self._open_until = trio.current_time() + self.config.open_seconds
        self._times_opened += 1
        log.warning(
            "breaker.opened",
            breaker=self.name,
            failure_rate=round(rate, 3),
            calls=calls,
            retry_after=self.config.open_seconds,
        )

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._window.clear()
        self._trials_issued = 0
        self._trials = []
