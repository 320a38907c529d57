"""The rate limiter's cluster side: the limits every node of one database holds together.

The rate-limiter actor (:mod:`actors.rate_limiter`) owns one :class:`ClusterLimits` when
shared limits are on (``EXAI_SHARED_LIMITS``, the default) and asks it, from its own thread,
after its local :class:`~actors.rate_ledger.Ledger` let a call through:

* **rates**: the provider key's requests and tokens per minute and the client identity's
  requests per minute are taken from the shared buckets in Postgres, all or none, in one
  statement (:class:`storage.shared_limits.SharedLimits`: why one atomic update per call and
  not leases is said there). The cluster admits at most ``burst + rate * elapsed`` by the
  database's clock; a node's local buckets (full limits) still apply and only repeat it.
* **durable quotas** (``[clients.<name>.quota]``, per UTC day and month): the call's worst
  case is counted in ``client_quota_usage`` when it is admitted and corrected when it ends. A
  restarted limiter (or node) reads the counts back from there: nothing to reload by hand.

**The database stops answering.** The first failure switches the node to its *local share*
and logs ``rate_limiter.shared_limits_degraded`` once: every local rate bucket holds
``limit / live nodes`` (live: a fresh heartbeat in ``nodes`` when last read, at least 1),
starting spent so this node adds no burst to what the cluster already admitted; each quota
allows this node ``(quota - used) / live nodes`` on top of the usage last read, counted
locally. Never unlimited. Every ``retry_seconds`` (by the actor's trio time, at the next
call) one attempt is made to write the locally counted quota usage back; when it succeeds
the shared buckets hold the limits again and ``rate_limiter.shared_limits_restored`` is
logged once. Refunds of calls admitted through the database but settled while it is away
are lost (the cluster keeps them counted: conservative).

Each database statement is bounded (``statement_timeout``, and a reconnection by libpq's
``connect_timeout``), so the actor's thread pauses at most that long, and during an outage
once per ``retry_seconds``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from actors.rate_ledger import Blocked, Consumed, Demand, Ledger, LimitName, ProviderLimits
from storage.shared_limits import (
    BucketSpec,
    BucketTake,
    Period,
    PeriodQuota,
    PeriodUsage,
    QuotaRefused,
    SharedLimits,
    SharedLimitsUnavailable,
    period_start,
)

log = structlog.get_logger("rate_limiter")

#: Identity -> its quotas by period (``ConfigFile.client_quotas``).
Quotas = Mapping[str, Mapping[Period, PeriodQuota]]


@dataclass(frozen=True, slots=True)
class _Counted:
    """What an admitted call holds in the cluster's state: whether its rates were taken from
    the shared buckets, and the quota periods it was counted in."""

    shared_rates: bool
    periods: tuple[PeriodUsage, ...]


@dataclass(slots=True)
class _Pending:
    """Quota usage counted on this node and not yet written to the database."""

    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True)
class ClusterMemory:
    """What one incarnation of the limiter leaves the next (kept by
    :func:`~actors.rate_limiter.supervised_rate_limiter` across restarts): the live nodes as
    last read, so a successor that cannot reach the database still divides by them; quota
    usage as last read; quota usage counted locally and not yet written back, which a crash
    must not lose."""

    live_nodes: int = 1
    #: The database's clock as last read, and the trio time then: the UTC day and month of
    #: the local share follow the database's calendar, not this machine's clock.
    database_time: tuple[dt.datetime, float] | None = None
    known: dict[tuple[str, Period], PeriodUsage] = field(default_factory=dict)
    pending: dict[tuple[str, Period, dt.date], _Pending] = field(default_factory=dict)


class ClusterLimits:
    """The shared half of admission, used by one actor's thread (see the module doc).

    ``ledger``: the actor's ledger, whose rate buckets become the local share while the
    database is away. ``quotas``: each identity's durable quotas. ``memory``: the previous
    incarnation's (a fresh one by default). ``upstreams``: each
    provider's :func:`upstream_id`, so its buckets are the upstream key's whatever a node
    names the provider (a provider not in it is known by its name). ``now`` in every method
    is the actor's trio time.
    """

    def __init__(
        self,
        store: SharedLimits,
        ledger: Ledger,
        quotas: Quotas,
        *,
        upstreams: Mapping[str, str] | None = None,
        memory: ClusterMemory | None = None,
        retry_seconds: float = 5.0,
        nodes_refresh_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._quotas = quotas
        self._upstreams = dict(upstreams or {})
        self._retry_seconds = retry_seconds
        self._nodes_refresh_seconds = nodes_refresh_seconds
        self._memory = memory if memory is not None else ClusterMemory()
        self._nodes_read_at = -math.inf
        #: Set while degraded: the earliest time to try the database again.
        self._retry_at: float | None = None
        self._counted: dict[int, _Counted] = {}
        #: Each quota identity's usage per period as last read from the database.
        self._known = self._memory.known
        self._pending = self._memory.pending
        self._loaded = False

    @property
    def degraded(self) -> bool:
        return self._retry_at is not None

    @property
    def live_nodes(self) -> int:
        return self._memory.live_nodes

    def close(self) -> None:
        self._store.close()

    def refresh(self, now: float) -> None:
        """Keep what the local share is computed from fresh on a node that makes no call:
        the live nodes (re-read when older than ``nodes_refresh_seconds``) and, on this
        incarnation's first use, the quota usage; while degraded, try the database when due.
        Asked with each snapshot (the node's heartbeat asks one per interval), so a database
        that goes away before the node's first call still leaves it ``limit / live nodes``,
        not the whole limit."""
        self._reachable(now)

    # -- admission -----------------------------------------------------------------------

    def admit(self, ticket: int, demand: Demand, now: float) -> Blocked | None:
        """After the local ledger let ``demand`` through: ``None`` if the cluster admits it
        too (it is then counted, under ``ticket``), else what holds it. While degraded, the
        local ledger's buckets are the share and quotas are counted here."""
        takes = self._rate_takes(demand)
        quotas = self._quotas.get(demand.identity)
        if not takes and not quotas:
            return None  # nothing of this call is shared: no round trip
        if not self._reachable(now):
            return self._admit_locally(ticket, demand, now)
        rates_taken = False
        try:
            if takes:
                decision = self._store.take(takes)
                if not decision.taken:
                    return self._rate_block(demand, decision.blocking_key, decision.wait_seconds)
                rates_taken = True
            periods: tuple[PeriodUsage, ...] = ()
            if quotas:
                result = self._store.take_quota(
                    demand.identity, quotas, tokens=demand.tokens, cost_usd=demand.cost_usd
                )
                if isinstance(result, QuotaRefused):
                    self._remember(demand.identity, (result.usage,))
                    self._store.adjust([_negated(t) for t in takes])
                    return _quota_block(demand, result)
                periods = result.usages
                self._remember(demand.identity, periods)
        except SharedLimitsUnavailable as exc:
            # A rate taken before the failure stays taken in the database: conservative.
            self._degrade(now, exc)
            return self._ledger.check(demand, now) or self._admit_locally(ticket, demand, now)
        self._counted[ticket] = _Counted(shared_rates=rates_taken, periods=periods)
        return None

    def settle(self, ticket: int, demand: Demand, consumed: Consumed | None, now: float) -> None:
        """The call is over: correct the worst case it was counted as to what it used."""
        counted = self._counted.pop(ticket, None)
        if counted is None:
            return
        used = consumed.tokens if consumed else 0
        cost = consumed.cost_usd if consumed else 0.0
        tokens = self._ledger.provider(demand.provider).limits.tokens_per_minute
        refund = []
        if counted.shared_rates and tokens is not None and used != demand.tokens:
            refund = [BucketTake(self._key(demand, "tokens"), tokens, used - demand.tokens)]
        self._correct(
            demand,
            counted,
            refund,
            requests=0,
            tokens=used - demand.tokens,
            cost_usd=cost - demand.cost_usd,
            now=now,
        )

    def withdraw(self, ticket: int, demand: Demand, now: float) -> None:
        """The call never went upstream: give back everything it was counted as."""
        counted = self._counted.pop(ticket, None)
        if counted is None:
            return
        takes = [_negated(t) for t in self._rate_takes(demand)] if counted.shared_rates else []
        self._correct(
            demand,
            counted,
            takes,
            requests=-1,
            tokens=-demand.tokens,
            cost_usd=-demand.cost_usd,
            now=now,
        )

    def _correct(
        self,
        demand: Demand,
        counted: _Counted,
        takes: list[BucketTake],
        *,
        requests: int,
        tokens: int,
        cost_usd: float,
        now: float,
    ) -> None:
        if not counted.periods and not takes:
            return
        if self._reachable(now):
            try:
                self._store.adjust(takes)
                self._store.adjust_quota(
                    demand.identity,
                    counted.periods,
                    requests=requests,
                    tokens=tokens,
                    cost_usd=cost_usd,
                )
            except SharedLimitsUnavailable as exc:
                self._degrade(now, exc)
            else:
                return
        # Rate refunds are dropped (the shared bucket keeps them: conservative); quota
        # corrections are written once the database is back.
        for usage in counted.periods:
            pending = self._pending_of(demand.identity, usage.period, usage.start)
            pending.requests += requests
            pending.tokens += tokens
            pending.cost_usd += cost_usd

    # -- the database, or the local share ------------------------------------------------

    def _reachable(self, now: float) -> bool:
        """Whether to use the database now; while degraded, tries it again when due."""
        if not self._loaded:  # this incarnation's first call
            self._loaded = True
            try:
                self._sync(now)
            except SharedLimitsUnavailable as exc:
                self._degrade(now, exc)
                return False
        if self._retry_at is None:
            if now - self._nodes_read_at >= self._nodes_refresh_seconds:
                try:
                    self._memory.live_nodes = self._store.live_nodes()
                    self._nodes_read_at = now
                except SharedLimitsUnavailable as exc:
                    self._degrade(now, exc)
                    return False
            return True
        if now < self._retry_at:
            return False
        try:
            self._sync(now)
        except SharedLimitsUnavailable:
            self._retry_at = now + self._retry_seconds
            return False
        self._retry_at = None
        self._ledger.set_share(1, now)
        log.warning("rate_limiter.shared_limits_restored", live_nodes=self._memory.live_nodes)
        return True

    def _sync(self, now: float) -> None:
        """Write back the quota usage counted locally (a predecessor's too), then read the
        live nodes and the quota usage. Raises :class:`SharedLimitsUnavailable`; what was
        written before it is no longer pending."""
        for (identity, period, start), pending in list(self._pending.items()):
            self._store.adjust_quota(
                identity,
                (PeriodUsage(period, start),),
                requests=pending.requests,
                tokens=pending.tokens,
                cost_usd=pending.cost_usd,
            )
            del self._pending[(identity, period, start)]
        self._memory.live_nodes = self._store.live_nodes()
        self._nodes_read_at = now
        self._memory.database_time = (self._store.clock(), now)
        for identity in self._quotas:
            self._remember(identity, tuple(self._store.usage(identity)))

    def _degrade(self, now: float, error: SharedLimitsUnavailable) -> None:
        """Switch to the local share and say so, once per outage."""
        was_degraded = self._retry_at is not None
        self._retry_at = now + self._retry_seconds
        if was_degraded:
            return
        self._ledger.set_share(self._memory.live_nodes, now)
        log.warning(
            "rate_limiter.shared_limits_degraded",
            error=str(error),
            live_nodes=self._memory.live_nodes,
            share=f"1/{self._memory.live_nodes} of each rate limit and of each quota's remainder",
            retry_seconds=self._retry_seconds,
        )

    def _admit_locally(self, ticket: int, demand: Demand, now: float) -> Blocked | None:
        """Degraded: the ledger already applied the rates' share; quotas on the share of
        their remainder, counted here until they can be written back."""
        quotas = self._quotas.get(demand.identity)
        counted: list[PeriodUsage] = []
        if quotas:
            today = self._today(now)
            for period, quota in sorted(quotas.items()):
                start = period_start(period, today)
                known = self._known.get((demand.identity, period))
                if known is None or known.start != start:
                    known = PeriodUsage(period, start)
                pending = self._pending.get((demand.identity, period, start), _Pending())
                refused = _share_over(known, pending, quota, demand, self._memory.live_nodes)
                if refused is not None:
                    return Blocked(
                        LimitName.CLIENT_QUOTA,
                        f"client {demand.identity!r} may use {refused} while the limits "
                        "database is away (its share of what is left of the "
                        f"{period}'s quota across {self._memory.live_nodes} node(s)); retry later",
                        retry_after=self._retry_seconds,
                    )
                counted.append(known)
            for usage in counted:
                pending = self._pending_of(demand.identity, usage.period, usage.start)
                pending.requests += 1
                pending.tokens += demand.tokens
                pending.cost_usd += demand.cost_usd
        self._counted[ticket] = _Counted(shared_rates=False, periods=tuple(counted))
        return None

    # -- helpers ---------------------------------------------------------------------------

    def _today(self, now: float) -> dt.date:
        """Today in UTC by the database's clock as last read, moved on by the trio time
        since (a monotonic duration): a node whose own clock is off does not count its share
        in another day's row. This machine's clock only if the database was never read."""
        if self._memory.database_time is None:
            return dt.datetime.now(dt.UTC).date()
        at, read_at = self._memory.database_time
        return (at + dt.timedelta(seconds=max(0.0, now - read_at))).astimezone(dt.UTC).date()

    def _key(self, demand: Demand, what: str) -> str:
        upstream = self._upstreams.get(demand.provider, f"provider:{demand.provider}")
        return f"{upstream}:{what}"

    def _pending_of(self, identity: str, period: Period, start: dt.date) -> _Pending:
        key = (identity, period, start)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        return pending

    def _remember(self, identity: str, usages: tuple[PeriodUsage, ...]) -> None:
        for usage in usages:
            self._known[(identity, usage.period)] = usage

    def _rate_takes(self, demand: Demand) -> list[BucketTake]:
        provider = self._ledger.provider(demand.provider).limits
        client_rpm = self._ledger.client_limits.requests_per_minute
        takes = []
        if provider.requests_per_minute is not None:
            takes.append(BucketTake(self._key(demand, "requests"), provider.requests_per_minute, 1))
        if provider.tokens_per_minute is not None:
            takes.append(
                BucketTake(self._key(demand, "tokens"), provider.tokens_per_minute, demand.tokens)
            )
        if client_rpm is not None:
            takes.append(BucketTake(f"client:{demand.identity}:requests", client_rpm, 1))
        return takes

    def _rate_block(self, demand: Demand, key: str | None, wait: float | None) -> Blocked:
        provider = self._ledger.provider(demand.provider)
        limits = provider.limits
        cluster = "across the cluster"
        if key == self._key(demand, "tokens"):
            return Blocked(
                LimitName.PROVIDER_TOKENS,
                f"upstream {provider.name!r} allows {limits.tokens_per_minute} tokens/min "
                f"{cluster} and this call reserves {demand.tokens}"
                + ("" if wait is None else f"; retry in {wait:.1f} s"),
                retry_after=wait,
                permanent=wait is None,
            )
        if key == self._key(demand, "requests"):
            return Blocked(
                LimitName.PROVIDER_REQUESTS,
                f"upstream {provider.name!r} allows {limits.requests_per_minute} requests/min "
                f"{cluster}; retry in {wait or 0:.1f} s",
                retry_after=wait,
            )
        return Blocked(
            LimitName.CLIENT_REQUESTS,
            f"this client may make {self._ledger.client_limits.requests_per_minute} "
            f"requests/min (client {demand.identity!r}, all its sessions on every node); "
            f"retry in {wait or 0:.1f} s",
            retry_after=wait,
        )


def upstream_id(base_url: str, api_key: str | None) -> str:
    """What identifies an upstream key across nodes: a digest of its URL and key (the key
    itself never reaches the database). Two nodes that configure one upstream key, under any
    provider name, share its buckets; two different keys never do."""
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\0{api_key or ''}".encode()).hexdigest()
    return f"upstream:{digest[:32]}"


def shared_buckets(
    providers: Mapping[str, ProviderLimits],
    upstreams: Mapping[str, str],
    client_requests_per_minute: int | None,
    identities: Sequence[str],
) -> list[BucketSpec]:
    """The shared buckets a node with this configuration takes from (the keys
    :class:`ClusterLimits` uses), named for ``status --cluster``: each provider's requests and
    tokens per minute, and each configured identity's requests per minute."""
    specs = []
    for name, limits in providers.items():
        upstream = upstreams.get(name, f"provider:{name}")
        if limits.requests_per_minute is not None:
            specs.append(
                BucketSpec(
                    f"{upstream}:requests", f"{name} requests/min", limits.requests_per_minute, name
                )
            )
        if limits.tokens_per_minute is not None:
            specs.append(
                BucketSpec(
                    f"{upstream}:tokens", f"{name} tokens/min", limits.tokens_per_minute, name
                )
            )
    if client_requests_per_minute is not None:
        specs += [
            BucketSpec(
                f"client:{identity}:requests",
                f"client {identity} requests/min",
                client_requests_per_minute,
            )
            for identity in identities
        ]
    return specs


def _negated(take: BucketTake) -> BucketTake:
    return BucketTake(take.key, take.capacity, -take.amount)


def _quota_block(demand: Demand, refused: QuotaRefused) -> Blocked:
    usage = refused.usage
    used = {"requests": usage.requests, "tokens": usage.tokens, "cost_usd": usage.cost_usd}
    asks = {"requests": 1, "tokens": demand.tokens, "cost_usd": demand.cost_usd}
    return Blocked(
        LimitName.CLIENT_QUOTA,
        f"client {demand.identity!r} may use {refused.limit:g} {refused.what} per UTC "
        f"{usage.period}: {used[refused.what]:g} are counted (calls in flight at their worst "
        f"case) and this call needs {asks[refused.what]:g}; the quota resets at "
        f"{refused.resets_at:%Y-%m-%dT%H:%M}Z",
        permanent=True,
    )


def _share_over(
    known: PeriodUsage, pending: _Pending, quota: PeriodQuota, demand: Demand, nodes: int
) -> str | None:
    """The first quota this node's degraded share of it would pass, described; else None."""
    checks: list[tuple[str, float | None, float, float, float]] = [
        ("requests", quota.requests, known.requests, pending.requests, 1),
        ("tokens", quota.tokens, known.tokens, pending.tokens, demand.tokens),
        ("cost_usd", quota.cost_usd, known.cost_usd, pending.cost_usd, demand.cost_usd),
    ]
    for what, limit, used, local, asks in checks:
        if limit is None:
            continue
        share = max(0.0, limit - used) / nodes
        if local + asks > share:
            return f"{share:g} {what} (has used {local:g})"
    return None
