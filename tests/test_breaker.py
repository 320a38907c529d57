"""The circuit breaker's states and transitions, on trio's MockClock (jumped by hand)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from trio.testing import MockClock

from runtime.breaker import (
    BreakerConfig,
    BreakerOpen,
    BreakerState,
    CallOutcome,
    FailureRateBreaker,
)

OK, FAIL, IGNORE = CallOutcome.SUCCESS, CallOutcome.FAILURE, CallOutcome.IGNORED

CONFIG = BreakerConfig(
    window_size=5,
    minimum_calls=4,
    failure_rate_threshold=0.5,
    slow_call_seconds=10,
    open_seconds=30,
    half_open_calls=2,
)


def _calls(breaker: FailureRateBreaker, outcomes: Sequence[CallOutcome]) -> None:
    for outcome in outcomes:
        breaker.acquire().finish(outcome)


async def test_it_judges_nothing_before_the_minimum_number_of_calls(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [FAIL, FAIL, FAIL])
    snapshot = breaker.snapshot()
    assert snapshot.state is BreakerState.CLOSED
    assert snapshot.failure_rate is None
    assert (snapshot.window_calls, snapshot.window_failures) == (3, 3)


async def test_it_opens_on_the_failure_rate_not_on_consecutive_failures(
    mock_clock: MockClock,
) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [FAIL, OK, OK, FAIL])  # 2 of 4 = 0.5, never two failures in a row
    assert breaker.snapshot().state is BreakerState.OPEN


async def test_the_window_slides(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [OK, OK, FAIL, OK, FAIL])  # 2 of 5 = 0.4: closed
    assert breaker.snapshot().state is BreakerState.CLOSED
    _calls(breaker, [OK] * 5)  # the two failures slide out
    assert breaker.snapshot().window_failures == 0
    _calls(breaker, [FAIL, FAIL])  # OK OK OK FAIL FAIL: 2 of 5
    assert breaker.snapshot().state is BreakerState.CLOSED
    _calls(breaker, [FAIL])  # 3 of 5
    assert breaker.snapshot().state is BreakerState.OPEN


async def test_open_refuses_at_once_naming_itself_and_when_it_retries(
    mock_clock: MockClock,
) -> None:
    breaker = FailureRateBreaker("kimi", CONFIG)
    _calls(breaker, [FAIL] * 4)
    mock_clock.jump(12)
    with pytest.raises(BreakerOpen) as caught:
        breaker.acquire()
    assert caught.value.name == "kimi"
    assert caught.value.retry_after == pytest.approx(18)
    assert "'kimi'" in str(caught.value)
    assert "18.0 s" in str(caught.value)
    snapshot = breaker.snapshot()
    assert snapshot.rejected == 1
    assert snapshot.retry_after_s == pytest.approx(18)


async def test_half_open_lets_exactly_the_configured_trials_through(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [FAIL] * 4)
    mock_clock.jump(30)
    assert breaker.snapshot().state is BreakerState.HALF_OPEN
    trials = [breaker.acquire(), breaker.acquire()]
    with pytest.raises(BreakerOpen, match="half-open"):
        breaker.acquire()
    assert breaker.snapshot().half_open_in_flight == 2
    for trial in trials:
        trial.finish(OK)
    assert breaker.snapshot().state is BreakerState.CLOSED
    assert breaker.snapshot().window_calls == 0  # a fresh window after closing


async def test_a_failing_trial_reopens_for_another_full_period(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [FAIL] * 4)
    mock_clock.jump(30)
    _calls(breaker, [OK, FAIL])  # 0.5 of the trials failed
    assert breaker.snapshot().state is BreakerState.OPEN
    mock_clock.jump(29.9)
    assert breaker.snapshot().state is BreakerState.OPEN
    mock_clock.jump(0.1)
    assert breaker.snapshot().state is BreakerState.HALF_OPEN
    assert breaker.snapshot().times_opened == 2


async def test_an_ignored_trial_gives_its_slot_back(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [FAIL] * 4)
    mock_clock.jump(30)
    first, second = breaker.acquire(), breaker.acquire()
    first.finish(IGNORE)  # e.g. the caller was cancelled: says nothing about the upstream
    third = breaker.acquire()
    second.finish(OK)
    third.finish(OK)
    assert breaker.snapshot().state is BreakerState.CLOSED


async def test_slow_successes_count_as_failures(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    for _ in range(4):
        with breaker.guard():
            mock_clock.jump(10)  # the call "takes" exactly the slow threshold
    snapshot = breaker.snapshot()
    assert snapshot.state is BreakerState.OPEN
    assert breaker.snapshot().times_opened == 1


async def test_a_finish_can_say_which_duration_is_judged(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    for _ in range(4):
        permit = breaker.acquire()
        mock_clock.jump(60)  # a long stream...
        permit.finish(OK, elapsed=0.5)  # ...whose first chunk came quickly
    assert breaker.snapshot().state is BreakerState.CLOSED
    assert breaker.snapshot().window_slow == 0


async def test_guard_records_exceptions_and_ignores_cancellation(
    autojump_clock: MockClock,
) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    for _ in range(3):
        with trio.move_on_after(1), breaker.guard():
            await trio.sleep_forever()
    assert breaker.snapshot().window_calls == 0
    with pytest.raises(RuntimeError), breaker.guard():
        raise RuntimeError("upstream broke")
    assert breaker.snapshot().window_failures == 1


async def test_results_from_before_a_transition_are_dropped(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    straggler = breaker.acquire()  # started while closed
    _calls(breaker, [FAIL] * 4)
    mock_clock.jump(30)
    trial = breaker.acquire()
    straggler.finish(FAIL)  # ends during half-open: not one of its trials
    straggler.finish(FAIL)  # and finishing twice is harmless
    assert breaker.snapshot().half_open_results == 0
    trial.finish(OK)
    breaker.acquire().finish(OK)
    assert breaker.snapshot().state is BreakerState.CLOSED


async def test_the_snapshot_is_plain_data(mock_clock: MockClock) -> None:
    breaker = FailureRateBreaker("glm", CONFIG)
    _calls(breaker, [OK, FAIL, OK, OK])
    data = breaker.snapshot().model_dump(mode="json")
    assert data["state"] == "closed"
    assert data["failure_rate"] == 0.25
    assert data["name"] == "glm"


def test_a_minimum_larger_than_the_window_is_refused() -> None:
    with pytest.raises(ValidationError, match="minimum_calls"):
        BreakerConfig(window_size=5, minimum_calls=6)


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 8),
    minimum=st.integers(1, 8),
    threshold=st.sampled_from([0.2, 0.5, 0.75, 1.0]),
    failures=st.lists(st.booleans(), max_size=30),
)
def test_it_opens_exactly_when_the_window_rate_reaches_the_threshold(
    window: int, minimum: int, threshold: float, failures: list[bool]
) -> None:
    minimum = min(minimum, window)
    config = BreakerConfig(
        window_size=window, minimum_calls=minimum, failure_rate_threshold=threshold
    )

    async def scenario() -> None:
        breaker = FailureRateBreaker("model", config)
        for index, failed in enumerate(failures):
            breaker.acquire().finish(FAIL if failed else OK)
            recent = failures[max(0, index + 1 - window) : index + 1]
            should_open = len(recent) >= minimum and sum(recent) / len(recent) >= threshold
            assert (breaker.state is BreakerState.OPEN) == should_open
            if should_open:
                return

    trio.run(scenario, clock=MockClock())
