"""The rate-limiter actor: exact admission, refunds, waiting, fairness, quotas.

Time is trio's ``MockClock`` moved by hand (``mock_clock``), never autojumped: the actor runs
on its own thread, and an autojump while a trio task waits for its reply would fire deadlines
that were never reached. Synchronisation is by events and ``wait_all_tasks_blocked`` (once
every task is blocked, every ``ask`` they made is already in the actor's inbox, ahead of any
message sent after), never by sleeping.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from trio.testing import MockClock, wait_all_tasks_blocked

from actors.providers.usage import Usage
from actors.rate_ledger import ClientLimits, LimitName, ProviderLimits
from actors.rate_limiter import (
    Lease,
    RateLimited,
    RateLimiter,
    RateLimiterActor,
    open_rate_limiter,
    supervised_rate_limiter,
)
from actors.status import LiveSession, NodeStatusSource
from runtime.pykka_supervision import ActorName
from runtime.server import Sessions
from runtime.session_registry import SessionRegistry
from runtime.supervision import ChildSpec, Supervisor, run_root
from storage.errors import ActorUnavailable


@asynccontextmanager
async def _limiter(
    providers: Mapping[str, ProviderLimits] | None = None,
    session: ClientLimits | None = None,
) -> AsyncIterator[RateLimiter]:
    async with open_rate_limiter(providers or {}, session or ClientLimits()) as limiter:
        yield limiter


def _done(limiter: RateLimiter, lease: Lease, tokens: int = 0) -> None:
    limiter.settle(
        lease, model="m", usage=Usage(input_tokens=tokens, output_tokens=0), cost_usd=0.0
    )


# -- exact admission -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rpm=st.none() | st.integers(1, 40),
    tpm=st.none() | st.integers(1, 400),
    concurrency=st.none() | st.integers(1, 30),
    session_rpm=st.none() | st.integers(1, 8),
    tokens=st.integers(1, 60),
    demands=st.lists(st.integers(0, 10), min_size=1, max_size=8),
)
def test_exact_admitted_counts_under_many_concurrent_sessions(
    *,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
    session_rpm: int | None,
    tokens: int,
    demands: list[int],
) -> None:
    limits = ProviderLimits(
        requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrency=concurrency
    )
    admitted: Counter[str] = Counter()
    refused: Counter[LimitName] = Counter()

    async def scenario() -> None:
        async with _limiter({"glm": limits}, ClientLimits(requests_per_minute=session_rpm)) as lim:

            async def call(session_id: str) -> None:
                try:
                    await lim.acquire(session_id, "glm", tokens=tokens, wait=0)
                except RateLimited as exc:
                    refused[exc.limit] += 1
                else:
                    admitted[session_id] += 1

            async with trio.open_nursery() as nursery:
                for index, count in enumerate(demands):
                    for _ in range(count):
                        nursery.start_soon(call, f"session-{index}")

    trio.run(scenario, clock=MockClock())  # frozen: no capacity comes back during the test

    shared = min(
        rpm if rpm is not None else math.inf,
        tpm // tokens if tpm is not None else math.inf,
        concurrency if concurrency is not None else math.inf,
    )
    per_session = [min(count, session_rpm or count) for count in demands]
    assert sum(admitted.values()) == min(shared, sum(per_session))
    for index, allowed in enumerate(per_session):
        assert admitted[f"session-{index}"] <= allowed
    assert sum(admitted.values()) + sum(refused.values()) == sum(demands)


# -- reservations and refunds ----------------------------------------------------------------


async def test_unused_reserved_tokens_are_refunded(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(tokens_per_minute=1000)}) as limiter:
        first = await limiter.acquire("a", "glm", tokens=600)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("b", "glm", tokens=600)
        assert caught.value.limit is LimitName.PROVIDER_TOKENS
        assert caught.value.retry_after == pytest.approx(200 / (1000 / 60))  # 12 s of refill
        assert "'glm'" in str(caught.value)
        assert "1000 tokens/min" in str(caught.value)

        _done(limiter, first, tokens=100)  # used 100 of the 600 reserved: 500 come back
        await limiter.acquire("b", "glm", tokens=600)
        (load,) = (await limiter.snapshot()).providers
    assert load.tokens_available == pytest.approx(300)


async def test_a_call_that_used_more_than_it_reserved_pays_the_difference(
    mock_clock: MockClock,
) -> None:
    async with _limiter({"glm": ProviderLimits(tokens_per_minute=1000)}) as limiter:
        lease = await limiter.acquire("a", "glm", tokens=100)
        _done(limiter, lease, tokens=400)  # the prompt estimate was low
        (load,) = (await limiter.snapshot()).providers
    assert load.tokens_available == pytest.approx(600)


async def test_a_withdrawn_call_gives_back_its_request_too(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(requests_per_minute=1)}) as limiter:
        lease = await limiter.acquire("a", "glm", tokens=1)
        with pytest.raises(RateLimited, match="1 requests/min"):
            await limiter.acquire("a", "glm", tokens=1)
        limiter.withdraw(lease)  # never sent upstream
        limiter.withdraw(lease)  # idempotent
        await limiter.acquire("a", "glm", tokens=1)


async def test_a_failed_call_keeps_its_request_but_not_its_tokens(mock_clock: MockClock) -> None:
    limits = ProviderLimits(requests_per_minute=2, tokens_per_minute=100)
    async with _limiter({"glm": limits}) as limiter:
        lease = await limiter.acquire("a", "glm", tokens=80)
        assert limiter.settle(lease, model="m", usage=None, cost_usd=None) is None
        (load,) = (await limiter.snapshot()).providers
    assert load.tokens_available == pytest.approx(100)
    assert load.requests_available == pytest.approx(1)


async def test_a_call_larger_than_a_minute_of_tokens_is_refused_at_once(
    mock_clock: MockClock,
) -> None:
    async with _limiter({"glm": ProviderLimits(tokens_per_minute=1000)}) as limiter:
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("a", "glm", tokens=1001, wait=math.inf)  # waiting cannot help
    assert caught.value.refusal.permanent
    assert caught.value.retry_after is None


# -- waiting ---------------------------------------------------------------------------------


async def test_a_waiting_call_is_granted_when_a_call_finishes(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter:
        held = await limiter.acquire("a", "glm", tokens=1)
        granted: list[Lease] = []

        async def wait_for_it() -> None:
            granted.append(await limiter.acquire("b", "glm", tokens=1, wait=10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await wait_all_tasks_blocked()
            (load,) = (await limiter.snapshot()).providers
            assert (load.in_flight, load.waiting) == (1, 1)
            assert granted == []
            _done(limiter, held)
    assert granted[0].session_id == "b"


async def test_a_waiting_call_is_granted_when_the_rate_refills(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(requests_per_minute=60)}) as limiter:
        for _ in range(60):
            await limiter.acquire("a", "glm", tokens=1, wait=0)
        started = trio.current_time()
        granted: list[float] = []

        async def wait_for_it() -> None:
            await limiter.acquire("a", "glm", tokens=1, wait=30)
            granted.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await wait_all_tasks_blocked()
            mock_clock.jump(0.5)
            await wait_all_tasks_blocked()
            assert granted == []
            mock_clock.jump(0.5)  # one request a second comes back
    assert granted[0] - started == pytest.approx(1.0)


async def test_a_call_waits_no_longer_than_its_deadline(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter:
        await limiter.acquire("a", "glm", tokens=1)
        async with trio.open_nursery() as nursery:

            async def give_up_later() -> None:
                await wait_all_tasks_blocked()
                mock_clock.jump(5)

            nursery.start_soon(give_up_later)
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("b", "glm", tokens=1, wait=5)
    refusal = caught.value.refusal
    assert refusal.limit is LimitName.PROVIDER_CONCURRENCY
    assert "1 calls at once" in refusal.message
    assert "waited 5.0 s" in refusal.message


async def test_the_configured_wait_is_the_default(mock_clock: MockClock) -> None:
    session = ClientLimits(max_wait_seconds=3)
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}, session) as limiter:
        held = await limiter.acquire("a", "glm", tokens=1)
        async with trio.open_nursery() as nursery:

            async def finish_later() -> None:
                await wait_all_tasks_blocked()
                _done(limiter, held)

            nursery.start_soon(finish_later)
            await limiter.acquire("b", "glm", tokens=1)  # waits (3 s allowed), no refusal


async def test_a_cancelled_waiter_gives_up_its_place(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter:
        held = await limiter.acquire("a", "glm", tokens=1)
        async with trio.open_nursery() as nursery:

            async def wait_then_be_cancelled(
                task_status: trio.TaskStatus[trio.CancelScope],
            ) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await limiter.acquire("b", "glm", tokens=1, wait=math.inf)
                    pytest.fail("granted after being cancelled")

            scope = await nursery.start(wait_then_be_cancelled)
            await wait_all_tasks_blocked()
            scope.cancel()
        _done(limiter, held)
        await limiter.acquire("c", "glm", tokens=1, wait=0)  # the slot was not handed to "b"
        (load,) = (await limiter.snapshot()).providers
    assert (load.in_flight, load.waiting) == (1, 0)


async def test_a_grant_racing_a_cancellation_is_not_lost(mock_clock: MockClock) -> None:
    limits = ProviderLimits(max_concurrency=1, requests_per_minute=5)
    async with _limiter({"glm": limits}) as limiter:
        held = await limiter.acquire("a", "glm", tokens=1)
        async with trio.open_nursery() as nursery:

            async def waiter(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await limiter.acquire("b", "glm", tokens=1, wait=math.inf)

            scope = await nursery.start(waiter)
            await wait_all_tasks_blocked()
            _done(limiter, held)  # the actor grants "b" on its thread...
            scope.cancel()  # ...while "b" is cancelled here; either may happen first
        (load,) = (await limiter.snapshot()).providers
    assert (load.in_flight, load.waiting) == (0, 0)
    assert load.requests_available == pytest.approx(4)  # only "a" counts


async def test_waiters_get_an_error_when_the_limiter_stops(mock_clock: MockClock) -> None:
    errors: list[BaseException] = []
    async with (
        trio.open_nursery() as nursery,
        _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter,
    ):
        await limiter.acquire("a", "glm", tokens=1)

        async def waiter() -> None:
            try:
                await limiter.acquire("b", "glm", tokens=1, wait=math.inf)
            except ActorUnavailable as exc:
                errors.append(exc)

        nursery.start_soon(waiter)
        await wait_all_tasks_blocked()
    assert len(errors) == 1


# -- fairness --------------------------------------------------------------------------------


async def test_a_flooding_session_does_not_starve_a_quiet_one(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter:
        held = await limiter.acquire("flood", "glm", tokens=1)
        order: list[str] = []

        async def call(session_id: str) -> None:
            lease = await limiter.acquire(session_id, "glm", tokens=1, wait=math.inf)
            order.append(session_id)
            _done(limiter, lease)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(call, "flood")
            await wait_all_tasks_blocked()  # the flood is queued first...
            for _ in range(2):
                nursery.start_soon(call, "quiet")
            await wait_all_tasks_blocked()  # ...then the quiet session's two calls
            _done(limiter, held)
    # First come, first served would put "quiet" 21st and 22nd.
    assert order[:4] == ["flood", "quiet", "flood", "quiet"]
    assert Counter(order) == {"flood": 20, "quiet": 2}


async def test_a_session_held_by_its_own_limit_does_not_hold_back_others(
    mock_clock: MockClock,
) -> None:
    session = ClientLimits(requests_per_minute=1)
    async with _limiter({"glm": ProviderLimits(max_concurrency=5)}, session) as limiter:
        await limiter.acquire("flood", "glm", tokens=1)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(partial(limiter.acquire, "flood", "glm", tokens=1, wait=60))
            await wait_all_tasks_blocked()
            await limiter.acquire("quiet", "glm", tokens=1, wait=0)  # not queued behind
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("flood", "glm", tokens=1, wait=0)
            assert caught.value.limit is LimitName.CLIENT_REQUESTS
            assert caught.value.retry_after == pytest.approx(60)
            nursery.cancel_scope.cancel()


async def test_a_large_call_is_not_overtaken_by_small_ones(mock_clock: MockClock) -> None:
    async with _limiter({"glm": ProviderLimits(tokens_per_minute=100)}) as limiter:
        await limiter.acquire("a", "glm", tokens=90)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(limiter.acquire, "big", "glm", tokens=50, wait=60))
            await wait_all_tasks_blocked()
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("small", "glm", tokens=5, wait=0)  # 10 are free, but...
            assert caught.value.limit is LimitName.PROVIDER_TOKENS
            nursery.cancel_scope.cancel()


# -- session quotas and counters -------------------------------------------------------------


async def test_the_token_quota_counts_reservations_then_usage(mock_clock: MockClock) -> None:
    async with _limiter(session=ClientLimits(token_quota=1000)) as limiter:
        first = await limiter.acquire("a", "glm", tokens=600)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("a", "glm", tokens=600)
        assert caught.value.limit is LimitName.CLIENT_TOKENS
        assert not caught.value.refusal.permanent  # the reservation may yet come back
        _done(limiter, first, tokens=500)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("a", "glm", tokens=600, wait=math.inf)
        assert caught.value.refusal.permanent
        assert "quota is 1000: 500 are used" in str(caught.value)
        await limiter.acquire("b", "glm", tokens=600)  # quotas are per session


async def test_the_cost_quota_refuses_a_call_that_could_exceed_it(mock_clock: MockClock) -> None:
    async with _limiter(session=ClientLimits(cost_quota_usd=0.01)) as limiter:
        lease = await limiter.acquire("a", "glm", tokens=10, cost_usd=0.006)
        limiter.settle(
            lease, model="m", usage=Usage(input_tokens=5, output_tokens=5), cost_usd=0.006
        )
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("a", "glm", tokens=10, cost_usd=0.005)
    assert caught.value.limit is LimitName.CLIENT_COST
    assert "$0.0100" in str(caught.value)


async def test_usage_counters_and_the_records_to_persist(mock_clock: MockClock) -> None:
    async with _limiter() as limiter:
        lease = await limiter.acquire("s1", "kimi", tokens=500, cost_usd=0.01)
        record = limiter.settle(
            lease,
            model="kimi-k2-thinking",
            usage=Usage(input_tokens=120, output_tokens=30, estimated=True),
            cost_usd=0.0002,
        )
        with pytest.raises(RuntimeError, match="already settled"):
            limiter.settle(lease, model="kimi-k2-thinking", usage=None, cost_usd=None)
        failed = await limiter.acquire("s1", "kimi", tokens=500)
        limiter.settle(failed, model="kimi-k2-thinking", usage=None, cost_usd=None)
        usage = await limiter.session_usage("s1")
    assert record is not None
    assert record.model_dump(exclude={"call_id", "at"}) == {
        "session_id": "s1",
        "provider": "kimi",
        "model": "kimi-k2-thinking",
        "input_tokens": 120,
        "output_tokens": 30,
        "estimated": True,
        "cost_usd": 0.0002,
    }
    assert usage is not None
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (2, 120, 30)
    assert usage.cost_usd == pytest.approx(0.0002)
    assert (usage.estimated_calls, usage.in_flight, usage.tokens_reserved) == (1, 0, 0)


async def test_closing_a_session_refuses_its_waiters_and_returns_its_counters(
    mock_clock: MockClock,
) -> None:
    async with _limiter({"glm": ProviderLimits(max_concurrency=1)}) as limiter:
        held = await limiter.acquire("s", "glm", tokens=1)
        async with trio.open_nursery() as nursery:

            async def close_later() -> None:
                await wait_all_tasks_blocked()
                final = await limiter.close_session("s")
                assert final is not None
                assert (final.in_flight, final.waiting, final.refused) == (1, 0, 1)

            nursery.start_soon(close_later)
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("s", "glm", tokens=1, wait=math.inf)
        assert caught.value.limit is LimitName.SESSION_CLOSED
        _done(limiter, held)
        snapshot = await limiter.snapshot()
    assert snapshot.sessions == []
    assert snapshot.providers[0].in_flight == 0


# -- supervised: a crash heals, and a restart admits conservatively --------------------------


@asynccontextmanager
async def _supervised(
    providers: Mapping[str, ProviderLimits], client: ClientLimits
) -> AsyncIterator[tuple[RateLimiter, ActorName[RateLimiterActor], Supervisor]]:
    """The limiter as the node runs it: a child of a one_for_one root, through its name."""
    name: ActorName[RateLimiterActor] = ActorName("/root/rate_limiter")
    limiter, child = supervised_rate_limiter(name, providers, client)
    root = Supervisor([ChildSpec("rate_limiter", child, shutdown=10)], max_restarts=3, period=60)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_root, root, stop_requested=stop))
        yield limiter, name, root
        stop.set()


async def test_killing_the_limiter_under_load_heals_like_persistence() -> None:
    """Callers waiting at the crash get ActorUnavailable (none hangs), later calls reach the
    next incarnation, the supervisor logs the restart and the status shows it."""
    callers, after_crash = 24, 5
    granted = 0
    enough = trio.Event()
    failed: list[ActorUnavailable] = []
    limits = {"glm": ProviderLimits(max_concurrency=4)}  # most callers wait at any moment
    with capture_logs() as logs, trio.fail_after(60):  # a guard against a hang, not a timing
        async with _supervised(limits, ClientLimits()) as (limiter, name, root):

            async def caller(index: int) -> None:
                nonlocal granted
                reached_next = 0
                while reached_next < after_crash:
                    try:
                        lease = await limiter.acquire(f"s{index}", "glm", tokens=1, wait=math.inf)
                    except ActorUnavailable as exc:
                        failed.append(exc)
                        await name.running(2)  # the supervisor brings the next incarnation
                        continue
                    granted += 1
                    if granted >= 200:
                        enough.set()
                    if name.incarnations == 2:
                        reached_next += 1
                    await trio.lowlevel.checkpoint()  # hold the slot across a scheduling round
                    _done(limiter, lease)

            async with trio.open_nursery() as load:
                for index in range(callers):
                    load.start_soon(caller, index)
                await enough.wait()
                limiter.crash_for_test()

            registry: SessionRegistry[LiveSession] = SessionRegistry(0.0)
            status = await NodeStatusSource(
                node_id="test",
                sessions=Sessions(registry, max_sessions=1),
                url=lambda: None,
                registry=registry,
                limiter=lambda: limiter,
                supervisors=[root],
                pykka_actors={"/root/rate_limiter": name},
            ).status()

    # Only calls made before the next incarnation ran failed, at most one per caller.
    assert 0 < len(failed) <= callers
    # Each says what happened: the actor died with the call, or the call came while the
    # supervisor was bringing the next one.
    unclear = [
        str(e) for e in failed if "stopped before" not in str(e) and "not running" not in str(e)
    ]
    assert unclear == []
    assert name.incarnations == 2
    crashed = [e for e in logs if e["event"] == "child.crashed"]
    assert [(e["path"], e["child"]) for e in crashed] == [("/root/rate_limiter", "rate_limiter")]
    assert "ActorCrashed" in crashed[0]["reason"]
    assert [e["child"] for e in logs if e["event"] == "child.restarting"] == ["rate_limiter"]
    actor = {a.path: a for a in status.actors}["/root/rate_limiter"]
    assert (actor.kind, actor.state, actor.restarts) == ("pykka", "running", 1)
    assert status.limits is not None
    assert status.problems == []


async def test_a_restarted_limiter_admits_as_if_its_buckets_were_still_spent(
    mock_clock: MockClock,
) -> None:
    providers = {"glm": ProviderLimits(tokens_per_minute=600)}
    client = ClientLimits(requests_per_minute=1, token_quota=1000)
    with capture_logs() as logs:
        async with _supervised(providers, client) as (limiter, name, _):
            alice = await limiter.acquire("a", "glm", tokens=100, wait=0, identity="alice")
            _done(limiter, alice, tokens=100)  # alice's one request a minute is spent
            await limiter.acquire("c", "glm", tokens=300, wait=0, identity="carol")  # in flight
            mock_clock.jump(30)  # half alice's window has passed
            limiter.crash_for_test()
            await name.running(2)
            restarted = trio.current_time()

            # Not a fresh ledger (which would admit alice at once), nor the dead one's 30 s
            # left: spent at the restart, for one window.
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("a2", "glm", tokens=1, wait=0, identity="alice")
            assert caught.value.limit is LimitName.CLIENT_REQUESTS
            assert caught.value.retry_after == pytest.approx(60)
            # Every bucket: bob's own (he may have called before the crash, nobody knows)
            # and the provider's, whose whole minute of tokens is spent.
            with pytest.raises(RateLimited) as caught:
                await limiter.acquire("b", "glm", tokens=100, wait=0, identity="bob")
            assert caught.value.limit is LimitName.CLIENT_REQUESTS
            (load,) = (await limiter.snapshot()).providers
            assert load.tokens_available == pytest.approx(0)
            # Quotas are kept, and carol's reservation in flight at the crash counts as used.
            with pytest.raises(RateLimited, match="quota is 1000: 100 are used"):
                await limiter.acquire("a3", "glm", tokens=950, wait=0, identity="alice")
            with pytest.raises(RateLimited, match="quota is 1000: 300 are used"):
                await limiter.acquire("c2", "glm", tokens=701, wait=0, identity="carol")
            # So are the sessions' counters that `exai status` shows.
            usage = {u.session_id: u for u in (await limiter.snapshot()).sessions}
            assert (usage["a"].requests, usage["a"].input_tokens) == (1, 100)
            assert (usage["c"].input_tokens, usage["c"].in_flight) == (300, 0)

            # Queued, alice's next call goes exactly one window after the restart.
            granted: list[float] = []

            async def wait_for_it() -> None:
                await limiter.acquire("a4", "glm", tokens=1, wait=120, identity="alice")
                granted.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_it)
                await wait_all_tasks_blocked()
                mock_clock.jump(59)
                await wait_all_tasks_blocked()
                assert granted == []
                mock_clock.jump(1)
            assert granted[0] - restarted == pytest.approx(60)
    assert [e["event"] for e in logs].count("rate_limiter.restarted_spent") == 1
