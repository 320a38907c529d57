"""Limits held across nodes through Postgres (storage/shared_limits.py, actors/rate_cluster.py).

Against a real database of its own per module (so the ``nodes`` rows, which decide the local
share, are only this test's): the shared GCRA bucket taken from several processes at once
never admits more than ``burst + rate * elapsed`` by the database's own timestamps; durable
quotas survive a restart of the rate limiter; a database that refuses connections turns the
limits into this node's share (``limit / live nodes``), never into no limit, with one log line,
and the shared limits come back with the database.

Time in the limiter is trio's ``MockClock`` moved by hand, as in tests/test_rate_limiter.py.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from structlog.testing import capture_logs
from trio.testing import MockClock

from actors.providers.usage import Usage
from actors.rate_cluster import Quotas
from actors.rate_ledger import ClientLimits, LimitName, ProviderLimits
from actors.rate_limiter import (
    LimitSpent,
    RateLimited,
    RateLimiter,
    RateLimiterActor,
    open_rate_limiter,
    supervised_rate_limiter,
)
from runtime.config import ConfigError, load_config_file, load_settings
from runtime.pykka_supervision import ActorName
from runtime.supervision import ChildSpec, Supervisor, run_root
from storage.migrations import apply_migrations
from storage.shared_limits import (
    BucketTake,
    PeriodQuota,
    SharedLimits,
    SharedLimitsUnavailable,
)
from tests.chat_support import ALICE, Caller, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import RawClient, open_raw, start_server, with_database
from tests.tcp_proxy import TcpProxy, libpq_target, libpq_via

PROCESSES = 3


@pytest.fixture(scope="module")
def shared_url(database_url: str) -> Iterator[str]:
    """A database of this module's own, migrated, on the suite's server."""
    name = f"exai_shared_{secrets.token_hex(4)}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = with_database(database_url, name)
    try:
        apply_migrations(url)
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(PROCESSES, mp_context=get_context("spawn")) as executor:
        yield executor


# -- the shared bucket, from several processes ---------------------------------------------


def _take_many(url: str, key: str, capacity: int, costs: list[int]) -> list[tuple[float, int]]:
    """In a worker process: take each cost from the bucket; the database time and cost of
    every one admitted."""
    store = SharedLimits(url)
    admitted = []
    try:
        for cost in costs:
            decision = store.take([BucketTake(key, capacity, cost)])
            if decision.taken:
                admitted.append((decision.at.timestamp(), cost))
    finally:
        store.close()
    return admitted


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    capacity=st.integers(1, 30),
    costs=st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=40), min_size=2, max_size=3),
)
def test_the_cluster_admits_no_more_than_burst_plus_rate_times_elapsed(
    shared_url: str, pool: ProcessPoolExecutor, capacity: int, costs: list[list[int]]
) -> None:
    key = f"test:{uuid.uuid4().hex}"
    futures = [pool.submit(_take_many, shared_url, key, capacity, c) for c in costs]
    admitted = sorted(item for future in futures for item in future.result())
    rate = capacity / 60.0
    # Every window [t_i, t_j] of admissions, by the database's clock.
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= capacity + rate * (end - start) + 1e-6, (i, total, end - start)
    demanded = sum(sum(c) for c in costs)
    taken = sum(cost for _, cost in admitted)
    if taken < demanded:  # something was refused: the bucket was (nearly) full, not stingy
        assert taken > capacity - 3
    else:
        assert taken == demanded


def test_a_refusal_neither_waits_for_nor_takes_the_buckets_lock(shared_url: str) -> None:
    """When a limit binds most checks are refusals: one is decided from an unlocked read, so
    it neither waits behind a node holding the bucket's row lock (here a transaction that
    keeps it) nor writes the row; an admission still waits for the lock."""
    key = f"test:{uuid.uuid4().hex}"
    store = SharedLimits(shared_url, statement_timeout=2.0, answer_within=30.0)
    try:
        assert store.take([BucketTake(key, 2, 2)]).taken  # the bucket is full
        with psycopg.connect(shared_url) as holder:
            (version,) = holder.execute(
                "select xmin::text from rate_buckets where key = %s for update", (key,)
            ).fetchone() or (None,)
            refused = store.take([BucketTake(key, 2, 1)])  # before: blocked until the timeout
            assert not refused.taken
            assert refused.wait_seconds
            assert refused.blocking_key == key
            fits = BucketTake(f"{key}:other", 2, 1), BucketTake(key, 2, 0)
            with pytest.raises(SharedLimitsUnavailable):
                store.take(fits)  # fits the unlocked read: it must lock, and the lock is held
            holder.rollback()
            after = holder.execute(
                "select xmin::text from rate_buckets where key = %s", (key,)
            ).fetchone()
            assert after == (version,), "a refusal wrote the bucket's row"
    finally:
        store.close()


# -- the actor over the shared limits --------------------------------------------------------


@asynccontextmanager
async def _limiter(
    url: str,
    providers: Mapping[str, ProviderLimits] | None = None,
    quotas: Quotas | None = None,
    client: ClientLimits | None = None,
) -> AsyncIterator[RateLimiter]:
    async with open_rate_limiter(
        providers or {},
        client or ClientLimits(),
        shared=lambda: SharedLimits(url, statement_timeout=5.0),
        quotas=quotas or {},
    ) as limiter:
        yield limiter


async def _call(
    limiter: RateLimiter, identity: str, *, provider: str = "p", tokens: int = 100, used: int = 10
) -> None:
    lease = await limiter.acquire(
        f"s-{uuid.uuid4().hex[:6]}", provider, tokens=tokens, cost_usd=0.5, identity=identity
    )
    limiter.settle(lease, model="m", usage=Usage(input_tokens=used, output_tokens=0), cost_usd=0.01)
    await limiter.snapshot()  # the settlement was handled (messages are handled in order)


async def test_two_limiters_share_one_providers_requests_per_minute(
    shared_url: str, mock_clock: MockClock
) -> None:
    """Two nodes' limiters, each configured with 3 requests/min: 3 in all, not 6."""
    provider = f"p{uuid.uuid4().hex[:8]}"
    limits = {provider: ProviderLimits(requests_per_minute=3)}
    async with _limiter(shared_url, limits) as one, _limiter(shared_url, limits) as two:
        for limiter in (one, two, one):
            await _call(limiter, "alice", provider=provider)
        for limiter in (one, two):
            with pytest.raises(RateLimited) as refused:
                await _call(limiter, "alice", provider=provider)
            assert refused.value.limit is LimitName.PROVIDER_REQUESTS
            assert "across the cluster" in str(refused.value)


async def test_quotas_survive_a_restart_of_the_rate_limiter(
    shared_url: str, mock_clock: MockClock
) -> None:
    identity = f"alice-{uuid.uuid4().hex[:8]}"
    quotas = {identity: {"day": PeriodQuota(requests=2), "month": PeriodQuota(tokens=1000)}}
    async with _limiter(shared_url, quotas=quotas) as limiter:
        await _call(limiter, identity, tokens=100, used=10)
    store = SharedLimits(shared_url)
    try:
        day, month = store.usage(identity)
        # Counted at its worst case when admitted, corrected to its use when settled.
        assert (day.period, day.requests, day.tokens) == ("day", 1, 10)
        assert (month.period, month.requests, month.tokens) == ("month", 1, 10)
    finally:
        store.close()
    async with _limiter(shared_url, quotas=quotas) as limiter:  # a new limiter, as on restart
        await _call(limiter, identity)
        with pytest.raises(LimitSpent) as refused:
            await _call(limiter, identity)
    assert refused.value.limit is LimitName.CLIENT_QUOTA
    assert "2 requests per UTC day" in str(refused.value)
    assert "resets at" in str(refused.value)


async def test_a_withdrawn_call_gives_its_quota_back(
    shared_url: str, mock_clock: MockClock
) -> None:
    identity = f"bob-{uuid.uuid4().hex[:8]}"
    quotas = {identity: {"day": PeriodQuota(requests=1)}}
    async with _limiter(shared_url, quotas=quotas) as limiter:
        lease = await limiter.acquire("s", "p", tokens=10, identity=identity)
        limiter.withdraw(lease)
        await limiter.snapshot()
        await _call(limiter, identity)  # the withdrawn call's request came back


# -- the database goes away ------------------------------------------------------------------


def _connections(url: str, *, allowed: bool) -> None:
    """Let the test database take connections, or refuse every new one and end the live ones
    (a database that is down, as far as the limiter can tell)."""
    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(f'alter database "{name}" allow_connections {str(allowed).lower()}')
        if not allowed:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = %s and pid <> pg_backend_pid()",
                (name,),
            )


def _live_nodes(url: str, count: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("delete from nodes")
        for n in range(count):
            conn.execute(
                "insert into nodes (node_id, hostname, pid) values (%s, 'test', %s)",
                (f"node-{n}", n + 1),
            )


async def test_a_database_that_is_away_leaves_each_node_its_share_never_no_limit(
    shared_url: str, mock_clock: MockClock
) -> None:
    _live_nodes(shared_url, 3)
    provider = f"p{uuid.uuid4().hex[:8]}"
    identity = f"carol-{uuid.uuid4().hex[:8]}"
    limits = {provider: ProviderLimits(requests_per_minute=60)}
    quotas = {identity: {"day": PeriodQuota(requests=31)}}
    async with _limiter(shared_url, limits, quotas) as limiter:
        await _call(limiter, identity, provider=provider)  # shared: 3 live nodes read
        try:
            _connections(shared_url, allowed=False)
            with capture_logs() as events:
                # The share: 60 / 3 = 20 requests/min, starting spent: one every 3 s.
                with pytest.raises(RateLimited) as refused:
                    await _call(limiter, identity, provider=provider)
                assert refused.value.limit is LimitName.PROVIDER_REQUESTS
                assert refused.value.retry_after == pytest.approx(3.0)
                mock_clock.jump(3.0)
                await _call(limiter, identity, provider=provider)
                with pytest.raises(RateLimited):
                    await _call(limiter, identity, provider=provider)
                # The quota: this node may use (31 - 1) / 3 = 10 of what is left; 1 is used.
                for _ in range(9):
                    mock_clock.jump(3.0)
                    await _call(limiter, identity, provider=provider)
                mock_clock.jump(3.0)
                with pytest.raises(RateLimited) as refused:
                    await _call(limiter, identity, provider=provider)
                assert refused.value.limit is LimitName.CLIENT_QUOTA
                assert "while the limits database is away" in str(refused.value)
            degraded = [e for e in events if e["event"] == "rate_limiter.shared_limits_degraded"]
            assert len(degraded) == 1, events
            assert degraded[0]["live_nodes"] == 3
        finally:
            _connections(shared_url, allowed=True)
        with capture_logs() as events:
            mock_clock.jump(5.0)  # the next call after retry_seconds tries the database again
            await _call(limiter, identity, provider=provider)
        assert [e["event"] for e in events].count("rate_limiter.shared_limits_restored") == 1
    store = SharedLimits(shared_url)
    try:
        day = store.usage(identity)[0]
        # The one before, the ten counted locally while away (written back), the one after.
        assert day.requests == 12
    finally:
        store.close()


@pytest.mark.parametrize("back_at_once", [False, True])
async def test_a_limiter_that_crashes_while_the_database_is_away_keeps_what_it_counted(
    shared_url: str, mock_clock: MockClock, back_at_once: bool
) -> None:
    """The next incarnation still divides by the live nodes last read, and the quota usage
    counted locally before the crash is neither forgotten nor lost for the database: written
    back when the database returns, also when it is back before the next incarnation's
    first call (``back_at_once``)."""
    _live_nodes(shared_url, 2)
    identity = f"erin-{uuid.uuid4().hex[:8]}"
    quotas = {identity: {"day": PeriodQuota(requests=21)}}
    # Before the crash 1 + 4; then 1 (back at once) or 6 + 1 after the outage.
    expected = 6 if back_at_once else 12
    name: ActorName[RateLimiterActor] = ActorName("/root/rate_limiter")
    limiter, child = supervised_rate_limiter(
        name,
        {},
        ClientLimits(),
        shared=lambda: SharedLimits(shared_url, statement_timeout=5.0),
        quotas=quotas,
    )
    root = Supervisor([ChildSpec("rate_limiter", child, shutdown=10)], max_restarts=3, period=60)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_root, root, stop_requested=stop))
        await _call(limiter, identity)  # 2 live nodes read; 1 request counted
        try:
            _connections(shared_url, allowed=False)
            for _ in range(4):  # of this node's share: (21 - 1) / 2 = 10
                await _call(limiter, identity)
            limiter.crash_for_test()
            await name.running(2)
            if back_at_once:
                _connections(shared_url, allowed=True)
                await _call(limiter, identity)  # the first call writes the 4 back
                stop.set()
            for _ in range(0 if back_at_once else 6):
                await _call(limiter, identity)
            if not back_at_once:
                with pytest.raises(RateLimited) as refused:
                    await _call(limiter, identity)
                assert refused.value.limit is LimitName.CLIENT_QUOTA
                assert "across 2 node(s)" in str(refused.value)
        finally:
            _connections(shared_url, allowed=True)
        if not back_at_once:
            mock_clock.jump(5.0)
            await _call(limiter, identity)  # written back, then counted in the database
            stop.set()
    store = SharedLimits(shared_url)
    try:
        assert store.usage(identity)[0].requests == expected
    finally:
        store.close()


async def test_a_database_that_stops_answering_costs_one_bounded_pause(
    shared_url: str, mock_clock: MockClock
) -> None:
    """Through a proxy that takes every packet and never answers (neither statement_timeout
    nor keepalives can tell): the call that meets it waits ``answer_within`` (real time, on
    the helper's thread), then the node is on its share; later calls do not ask the database
    until ``retry_seconds`` have passed."""
    _live_nodes(shared_url, 2)
    port, unix = libpq_target(shared_url)
    proxy = TcpProxy(port, target_unix=unix)
    provider = f"p{uuid.uuid4().hex[:8]}"
    limits = {provider: ProviderLimits(requests_per_minute=60)}
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = libpq_via(shared_url, proxy.port)
        async with open_rate_limiter(
            limits,
            ClientLimits(),
            shared=lambda: SharedLimits(url, statement_timeout=5.0, answer_within=0.5),
        ) as limiter:
            await _call(limiter, "dave", provider=provider)
            proxy.black_hole()
            with capture_logs() as events:
                with pytest.raises(RateLimited) as refused:
                    await _call(limiter, "dave", provider=provider)
                # 60 / 2 nodes = 30 requests/min, starting spent: one every 2 s.
                assert refused.value.retry_after == pytest.approx(2.0)
                connections = proxy.connections
                mock_clock.jump(2.0)
                await _call(limiter, "dave", provider=provider)  # locally, on the share
                assert proxy.connections == connections  # not asked before retry_seconds
            degraded = [e for e in events if e["event"] == "rate_limiter.shared_limits_degraded"]
            assert len(degraded) == 1, events
            assert "did not answer within 0.5 s" in degraded[0]["error"]
        proxy.close()
        nursery.cancel_scope.cancel()


# -- a node restart --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


async def test_a_quota_spent_before_a_node_restart_stays_spent_after_it(
    shared_url: str, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """``[clients.alice.quota] requests_per_day = 1``: alice's one chat call of the day is
    made on a node that then stops; the node started again (same database) refuses her next
    call as -32005 ``client_quota``, and nothing goes upstream."""
    config = write_config(
        tmp_path / "exai.toml",
        providers=provider_table("fake", upstream.base_url, "fake-model"),
        clients={},
    )
    config.write_text(
        f'[clients.alice]\ntoken = "{ALICE}"\n[clients.alice.quota]\nrequests_per_day = 1\n\n'
        + config.read_text()
    )
    env = {"EXAI_CONFIG": str(config)}
    for attempt in range(2):
        server = await trio.to_thread.run_sync(
            partial(start_server, tmp_path / "state", database_url=shared_url, extra_env=env)
        )
        try:
            async with open_raw(server.authed_url(ALICE)) as ws:
                client = RawClient(ws)
                await client.initialize("2025-06-18")
                alice = Caller(client)
                before = len(upstream.received)
                if attempt == 0:
                    upstream.script(Reply("the day's answer", usage=(10, 20)))
                    assert (await alice.chat("hi"))["content"] == "the day's answer"
                else:
                    refused = await alice.call("chat", {"prompt": "hi again"})
                    error = refused["error"]
                    assert error["code"] == -32005, refused
                    assert error["data"]["limit"] == "client_quota"
                    assert "1 requests per UTC day" in error["message"]
                    assert len(upstream.received) == before  # nothing went upstream
        finally:
            stopped = await trio.to_thread.run_sync(server.stop)
            assert stopped == 0, server.stderr_path.read_text()[-3000:]


# -- configuration ---------------------------------------------------------------------------


def test_client_quotas_are_read_from_the_clients_table(tmp_path: Path) -> None:
    path = tmp_path / "exai.toml"
    path.write_text(
        '[clients.alice]\ntoken_sha256 = "' + "0" * 64 + '"\n'
        "[clients.alice.quota]\nrequests_per_day = 5\ncost_usd_per_month = 2.5\n"
        '[clients.bob]\ntoken_env = "BOB"\n'
    )
    file = load_config_file(path)
    assert file.client_quotas() == {
        "alice": {"day": PeriodQuota(requests=5), "month": PeriodQuota(cost_usd=2.5)}
    }
    path.write_text(
        '[clients.alice]\ntoken_sha256 = "' + "0" * 64 + '"\n'
        "[clients.alice.quota]\nrequests_per_week = 5\n"
    )
    with pytest.raises(ConfigError, match=r"quota\.requests_per_week: Extra inputs"):
        load_config_file(path)


def test_shared_limits_are_on_unless_turned_off() -> None:
    assert load_settings().shared_limits is True
    assert load_settings(shared_limits=False).shared_limits is False
