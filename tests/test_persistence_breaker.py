"""The storage circuit breaker, on a clock the test steps (no sleeping)."""

from __future__ import annotations

from storage.breaker import ConsecutiveFailureBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_waits_then_allows_one_trial_that_closes_it() -> None:
    clock = Clock()
    breaker = ConsecutiveFailureBreaker(failure_threshold=2, reset_after=1.0, clock=clock)
    assert breaker.allow()
    breaker.record(ok=False)
    assert breaker.state == "closed"
    breaker.record(ok=False)
    assert breaker.state == "open"
    assert not breaker.allow()

    clock.now += 1.0
    assert breaker.allow()  # the one trial
    assert breaker.state == "half_open"
    assert not breaker.allow()  # and only one
    breaker.record(ok=True, duration=0.01)
    assert breaker.state == "closed"
    assert breaker.allow()


def test_a_failed_trial_doubles_the_wait_up_to_the_cap() -> None:
    clock = Clock()
    breaker = ConsecutiveFailureBreaker(reset_after=1.0, max_reset_after=3.0, clock=clock)
    breaker.record(ok=False)
    waits = []
    for _ in range(4):
        waits.append(breaker.retry_in)
        clock.now += breaker.retry_in
        assert breaker.allow()
        breaker.record(ok=False)
    assert waits == [1.0, 2.0, 3.0, 3.0]
    clock.now += 3.0
    assert breaker.allow()
    breaker.record(ok=True)
    breaker.record(ok=False)
    assert breaker.retry_in == 1.0  # a success resets the backoff


def test_a_slow_success_counts_as_a_failure() -> None:
    breaker = ConsecutiveFailureBreaker(slow_call=2.0, clock=Clock())
    breaker.record(ok=True, duration=2.5)
    assert breaker.state == "open"


def test_force_trial_skips_the_wait() -> None:
    breaker = ConsecutiveFailureBreaker(reset_after=60.0, clock=Clock())
    breaker.record(ok=False)
    assert not breaker.allow()
    breaker.force_trial()
    assert breaker.allow()
    assert breaker.state == "half_open"
    breaker.record(ok=True)
    assert breaker.state == "closed"


def test_a_trial_never_reported_is_granted_again_after_the_longest_wait() -> None:
    clock = Clock()
    breaker = ConsecutiveFailureBreaker(reset_after=1.0, max_reset_after=5.0, clock=clock)
    breaker.record(ok=False)
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 5.0
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
