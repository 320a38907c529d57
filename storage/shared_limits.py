"""Limits shared by every node of one database: rate buckets and durable quotas.

The rate limiter's actor (:mod:`actors.rate_limiter`) holds one :class:`SharedLimits` and
calls it from its own thread, one short statement at a time. Each statement runs on the
helper's one worker thread while the actor's thread waits for it *at most*
``answer_within`` seconds: a database that stops answering (even one whose packets vanish, or
a middlebox that takes them and never answers, where neither ``statement_timeout`` nor TCP
keepalives help) costs the actor a bounded pause, then the socket is shut down under the
stuck statement (:meth:`storage.connection.Connector.abort`) so the worker is free again.

**Design: one atomic statement per admission, not leases.** A call's rate buckets (its
provider's requests and tokens per minute, its client identity's requests per minute) are
rows of ``rate_buckets``, taken all or none by ``exai_rate_take`` (the migration
``20261201000300_rate_buckets.sql``): GCRA kept as each bucket's level, drained with the
database's clock (``clock_timestamp()`` read once the rows are locked), so the cluster never
admits more than ``capacity + rate * elapsed`` whatever the nodes' clocks say. A refusal is
decided from an unlocked read and writes nothing (migration ``20261201000500``). Measured
(``python -m bench.shared_limits``, docs/benchmarks.md): 4 processes on one bucket ~6,000
checks/s on a busy 2-core machine, far above any upstream's requests per minute, and one
local round trip (~1 ms with its commit) per admitted upstream call that itself takes
seconds. Leases (each node takes a slice of the capacity for a while) would
save those round trips but strand capacity on idle nodes, need a refill protocol and still
need the database to hand slices out; an exact shared bucket is simpler and admits exactly.

:class:`SharedLimitsUnavailable` tells the caller to fall back on its local share
(``limit / live nodes``).

**Quotas** are rows of ``client_quota_usage`` per (identity, ``day``/``month``, period start
in UTC); :meth:`SharedLimits.take_quota` counts a call's worst case in one transaction when
the period's row has room, and :meth:`SharedLimits.adjust_quota` corrects it at settlement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.rows import tuple_row

from storage.connection import Connector, is_transaction_pooler
from storage.membership import LIVE_NODES_SQL, NODE_TIMEOUT

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
T = TypeVar("T")


class SharedLimitsUnavailable(Exception):
    """The database did not answer (in time): use the local share instead."""


@dataclass(frozen=True, slots=True)
class BucketTake:
    """``amount`` units of the bucket ``key``, which holds ``capacity`` units per minute."""

    key: str
    capacity: float
    amount: float


@dataclass(frozen=True, slots=True)
class RateDecision:
    """``wait_seconds``: 0 if taken, else nothing was taken and this is how long until it
    fits (``None``: never; the cost exceeds the capacity). ``blocking_key``: the bucket that
    waits longest. ``at``: the database's time of the decision."""

    at: dt.datetime
    wait_seconds: float | None
    blocking_key: str | None

    @property
    def taken(self) -> bool:
        return self.wait_seconds == 0


@dataclass(frozen=True, slots=True)
class PeriodQuota:
    """The limits of one period kind; ``None``: unlimited."""

    requests: int | None = None
    tokens: int | None = None
    cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """What an identity used in one period (admitted calls at their worst case until settled)."""

    period: Period
    start: dt.date
    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class QuotaRefused:
    """The call would pass ``what`` (``requests``, ``tokens`` or ``cost_usd``) of ``usage``'s
    period, whose quota is ``limit``; the period ends at ``resets_at`` (UTC)."""

    usage: PeriodUsage
    what: str
    limit: float
    resets_at: dt.datetime


@dataclass(frozen=True, slots=True)
class QuotaTaken:
    """The call is counted in these periods (settle it against the same ones)."""

    usages: tuple[PeriodUsage, ...]


def period_start(period: Period, day: dt.date) -> dt.date:
    return day if period == "day" else day.replace(day=1)


def period_end(period: Period, start: dt.date) -> dt.datetime:
    """The first instant (UTC) after the period that began on ``start``."""
    if period == "day":
        end = start + dt.timedelta(days=1)
    else:
        end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return dt.datetime.combine(end, dt.time(), tzinfo=dt.UTC)


class SharedLimits:
    """The shared state over one connection, reconnected on demand, used by one thread.

    ``statement_timeout`` (seconds) bounds each statement in the server; ``answer_within``
    (default: twice that, at least 1 s) bounds how long a caller waits for an answer,
    reconnection included (``connect_timeout``; libpq's minimum is 2 s, so a reconnection to
    a peer that drops packets outlasts one call: that call fails, a later one finds the
    connection made). Every method raises :class:`SharedLimitsUnavailable` when the database
    fails or does not answer in time; the connection is then dropped and the next call
    reconnects. :meth:`close` joins the worker thread.
    """

    def __init__(
        self,
        url: str,
        *,
        statement_timeout: float = 0.5,
        answer_within: float | None = None,
        connect_timeout: float = 2.0,
        node_timeout: float = NODE_TIMEOUT,
    ) -> None:
        self._node_timeout = node_timeout
        self._connector = Connector(url, connect_timeout=connect_timeout)
        self._timeout_ms = max(1, round(statement_timeout * 1000))
        self._answer_within = (
            answer_within if answer_within is not None else max(1.0, 2 * statement_timeout)
        )
        self._pooled = is_transaction_pooler(url)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="shared-limits")

    def close(self) -> None:
        self._connector.abort()  # a statement still stuck fails now
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._connector.close()

    def _bounded(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work`` on the worker thread, with the connection; its result within
        ``answer_within`` seconds, else :class:`SharedLimitsUnavailable`."""
        try:
            future = self._worker.submit(self._attempt, work)
        except RuntimeError as exc:  # closed
            raise SharedLimitsUnavailable("the shared limits are closed") from exc
        try:
            return future.result(timeout=self._answer_within)
        except FutureTimeout:
            self._connector.abort()
            raise SharedLimitsUnavailable(
                f"the database did not answer within {self._answer_within:g} s"
            ) from None

    def _attempt(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        try:
            fresh = not self._connector.is_open
            conn = self._connector.connection()
            if fresh and not self._pooled:
                # Session-level: every statement of this connection is bounded. Not through
                # a transaction pooler, whose server sessions other clients share: there
                # answer_within alone bounds the wait.
                conn.execute(f"set statement_timeout = {self._timeout_ms}")
            return work(conn)
        except psycopg.Error as exc:
            self._connector.discard()
            raise SharedLimitsUnavailable(str(exc).strip() or type(exc).__name__) from exc

    def _run(self, sql: str, params: Sequence[object] | Mapping[str, object]) -> list[Any]:
        def work(conn: psycopg.Connection[Any]) -> list[Any]:
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []

        return self._bounded(work)

    # -- rate buckets ----------------------------------------------------------------------

    def take(self, takes: Sequence[BucketTake]) -> RateDecision:
        """Take every bucket's amount, or none of them (see :class:`RateDecision`)."""
        rows = self._run(
            "select at, wait_seconds, blocking_key from exai_rate_take(%s, %s, %s)",
            _columns(takes),
        )
        at, wait, key = rows[0]
        return RateDecision(at=at, wait_seconds=wait, blocking_key=key)

    def adjust(self, takes: Sequence[BucketTake]) -> None:
        """Add each amount (negative: give back), unchecked."""
        if takes:
            self._run("select exai_rate_adjust(%s, %s, %s)", _columns(takes))

    def live_nodes(self) -> int:
        """Nodes alive by :mod:`storage.membership`'s definition (not stopped, a heartbeat
        fresher than ``node_timeout`` by the database's clock); at least 1 (this node counts
        even before its first beat)."""
        rows = self._run(LIVE_NODES_SQL, (self._node_timeout,))
        return max(1, int(rows[0][0]))

    # -- quotas ----------------------------------------------------------------------------

    def usage(self, identity: str) -> list[PeriodUsage]:
        """The identity's usage in the current UTC day and month (zeros if none)."""
        rows = self._run(
            """
            with today as (select (now() at time zone 'UTC')::date as d)
            select p.period, p.start, coalesce(u.requests, 0), coalesce(u.tokens, 0),
                   coalesce(u.cost_usd, 0)
            from today,
                 lateral (values ('day', today.d),
                                 ('month', date_trunc('month', today.d)::date)) as p (period, start)
                 left join client_quota_usage u
                   on u.identity = %s and u.period = p.period and u.period_start = p.start
            order by p.period
            """,
            (identity,),
        )
        return [_usage(row) for row in rows]

    def take_quota(
        self,
        identity: str,
        quotas: Mapping[Period, PeriodQuota],
        *,
        tokens: int,
        cost_usd: float,
    ) -> QuotaTaken | QuotaRefused:
        """Count one request of ``tokens`` and ``cost_usd`` in each period of ``quotas`` if
        none would pass its quota; one transaction, the periods' rows locked."""
        periods = sorted(quotas)

        def work(conn: psycopg.Connection[Any]) -> QuotaTaken | QuotaRefused:
            with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
                cur.execute("select (now() at time zone 'UTC')::date")
                row = cur.fetchone()
                assert row is not None
                today: dt.date = row[0]
                starts = [period_start(p, today) for p in periods]
                cur.execute(
                    "insert into client_quota_usage (identity, period, period_start)"
                    " select %s, p, s from unnest(%s::text[], %s::date[]) as x (p, s)"
                    " order by p on conflict do nothing",
                    (identity, periods, starts),
                )
                cur.execute(
                    "select period, period_start, requests, tokens, cost_usd"
                    " from client_quota_usage where identity = %s"
                    " and (period, period_start) in (select * from unnest(%s::text[], %s::date[]))"
                    " order by period for update",
                    (identity, periods, starts),
                )
                usages = [_usage(r) for r in cur.fetchall()]
                for usage in usages:
                    refused = _over(usage, quotas[usage.period], tokens, cost_usd)
                    if refused is not None:
                        return refused
                cur.execute(
                    "update client_quota_usage set requests = requests + 1,"
                    " tokens = tokens + %s, cost_usd = cost_usd + %s, updated_at = now()"
                    " where identity = %s"
                    " and (period, period_start) in (select * from unnest(%s::text[], %s::date[]))"
                    " returning period, period_start, requests, tokens, cost_usd",
                    (tokens, cost_usd, identity, periods, starts),
                )
                taken = sorted((_usage(r) for r in cur.fetchall()), key=lambda u: u.period)
                return QuotaTaken(tuple(taken))

        return self._bounded(work)

    def adjust_quota(
        self,
        identity: str,
        usages: Sequence[PeriodUsage],
        *,
        requests: int,
        tokens: int,
        cost_usd: float,
    ) -> None:
        """Add these deltas to the rows of ``usages``' periods (made if missing): a settled
        call's correction, a withdrawn call, or usage counted locally while the database was
        away. Never below zero."""
        if not usages:
            return
        self._run(
            """
            insert into client_quota_usage as u
                (identity, period, period_start, requests, tokens, cost_usd)
            select %(identity)s, p, s, greatest(0, %(requests)s), greatest(0, %(tokens)s),
                   greatest(0, %(cost)s)
            from unnest(%(periods)s::text[], %(starts)s::date[]) as x (p, s)
            order by p
            on conflict (identity, period, period_start) do update
                set requests = greatest(0, u.requests + %(requests)s),
                    tokens = greatest(0, u.tokens + %(tokens)s),
                    cost_usd = greatest(0, u.cost_usd + %(cost)s),
                    updated_at = now()
            """,
            {
                "identity": identity,
                "requests": requests,
                "tokens": tokens,
                "cost": cost_usd,
                "periods": [u.period for u in usages],
                "starts": [u.start for u in usages],
            },
        )


def _columns(takes: Sequence[BucketTake]) -> tuple[list[str], list[float], list[float]]:
    return (
        [t.key for t in takes],
        [float(t.capacity) for t in takes],
        [float(t.amount) for t in takes],
    )


def _usage(row: Sequence[Any]) -> PeriodUsage:
    period, start, requests, tokens, cost = row
    assert period in PERIODS
    return PeriodUsage(period, start, int(requests), int(tokens), float(cost))


def _over(
    usage: PeriodUsage, quota: PeriodQuota, tokens: int, cost_usd: float
) -> QuotaRefused | None:
    resets_at = period_end(usage.period, usage.start)
    if quota.requests is not None and usage.requests + 1 > quota.requests:
        return QuotaRefused(usage, "requests", quota.requests, resets_at)
    if quota.tokens is not None and usage.tokens + tokens > quota.tokens:
        return QuotaRefused(usage, "tokens", quota.tokens, resets_at)
    if quota.cost_usd is not None and usage.cost_usd + cost_usd > quota.cost_usd:
        return QuotaRefused(usage, "cost_usd", quota.cost_usd, resets_at)
    return None
