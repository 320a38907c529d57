"""The rate-limiter actor: one pykka thread that every session asks before calling upstream.

One actor serialises the shared limits (requests and tokens per minute of each upstream key,
calls in flight per provider) and each client identity's own (requests per minute, token and
cost quotas, shared by all the identity's sessions and kept when they end, so reconnecting
resets nothing), so admission is exact under any number of concurrent sessions. The arithmetic is
:mod:`actors.rate_ledger`; this module is the actor around it: waiting, fairness, time, the trio
side.

It is a pykka service like persistence (:mod:`runtime.pykka_service`): typed messages, a trio
client (:class:`RateLimiter`) over a resolver, supervised through
:func:`~runtime.pykka_supervision.pykka_child` (:func:`supervised_rate_limiter`), woken by a
:class:`~runtime.pacer.Pacer`.

**Waiting without a parked thread.** A call that may wait is queued in the actor, which
answers the ``ask`` at once with a deferred reply: the :class:`~runtime.bridge.CallbackFuture`
that came with the request. When capacity frees, the actor sets that future and the bridge
wakes exactly that trio task (``TrioToken.run_sync_soon``). A trio task cancelled while it
waits, or after its grant was already on its way, sends a withdrawal, so neither its place nor
its reservation is lost. If the actor dies, every deferred reply fails with
:class:`~runtime.bridge.ActorUnavailable`: a waiting call never hangs.

**Time comes from trio.** Every message carries ``trio.current_time()``; the actor never reads
a clock, so tests drive it with ``MockClock``. Rate limits free capacity as time passes, not
when a message arrives, so the trio side runs a pacer: the actor tells it (through the trio
token) the earliest moment a waiter could go or must be refused, and the pacer sends a tick
then.

**A restart admits conservatively.** A crashed limiter's ledger is gone with it, and a fresh
one would admit a full burst at once: a crash loop would reset every limit. So every
incarnation after the first starts with each rate bucket spent at its start (providers'
requests and tokens, each client's requests: GCRA's full level, which takes the limit's window,
a minute, to drain), and each client's token and cost quotas at what its predecessor counted,
reservations of calls still in flight included as used (their settlements went to the dead
incarnation). Calls in flight at the crash are not counted against a provider's concurrency.

**Across nodes.** With shared limits (the node's default), a call this ledger admits is
then taken from the database's shared buckets and counted against its identity's durable
quotas by :class:`~actors.rate_cluster.ClusterLimits`, from this actor's thread with a
bounded wait; a database that does not answer leaves this node its share of each limit
(``limit / live nodes``), never none. Each incarnation opens its own connection; what the
cluster side must not lose in a crash (live nodes, quota usage counted locally) is kept in
a :class:`~actors.rate_cluster.ClusterMemory` across incarnations.

**Fairness.** Waiters queue per session, and capacity is handed out round-robin across
sessions: a session that gets a grant goes to the back of the rotation, so one session with a
hundred queued calls and another with one alternate instead of the second waiting behind the
hundred. Within a session, calls keep their order. A call held back by its own client's
limit does not hold back other sessions; a call held back by a provider's limit holds back the
later turns at that provider in the same round, so a large call is not starved by small ones
slipping past it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias, assert_never

import pykka
import structlog
import trio
from pydantic import BaseModel, ConfigDict

from actors.providers.usage import Usage
from actors.rate_cluster import ClusterLimits, ClusterMemory, Quotas
from actors.rate_ledger import (
    Blocked,
    ClientLimits,
    Consumed,
    Demand,
    Ledger,
    LimitName,
    ProviderLimits,
)
from runtime.bridge import CallbackFuture
from runtime.pacer import Pacer
from runtime.pykka_client import Resolve, ServiceClient
from runtime.pykka_service import ServiceActor
from runtime.pykka_supervision import ActorName, pykka_child
from runtime.status_model import ProviderLimitStatus
from runtime.supervision.spec import StartFunction
from storage.errors import LimitExhausted, Refused, RetryLater
from storage.membership import (
    SNAPSHOT_PROVIDERS_MAX,
    LimitsMode,
    NodeLimits,
    ProviderUsage,
)
from storage.shared_limits import SharedLimits

log = structlog.get_logger("rate_limiter")


# -- what callers see ------------------------------------------------------------------------


class Refusal(BaseModel):
    """Why a call was refused: the limit, a sentence for the client, and when to retry.

    ``retry_after`` is exact for rate limits; ``None`` when capacity returns only as other
    calls finish, or never (``permanent``: a quota is spent, or the call is too large).
    """

    model_config = ConfigDict(frozen=True)

    limit: LimitName
    message: str
    retry_after: float | None
    permanent: bool
    session_id: str
    provider: str


class RateLimited(Refused):
    """A call was refused by a limit (see :attr:`refusal`); ``str()`` is the refusal's
    sentence, :attr:`client_message` names the limit too. Raised as one of its two leaves
    (:meth:`of`): :class:`RateLimitedForNow` (a ``RetryLater``: -32004) or
    :class:`LimitSpent` (a ``LimitExhausted``: -32005)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.limit = refusal.limit
        self.retry_after = refusal.retry_after
        self.provider = refusal.provider

    @staticmethod
    def of(refusal: Refusal) -> RateLimited:
        """The refusal as the error that says what the caller can do: wait, or not."""
        if refusal.permanent:
            return LimitSpent(refusal)
        return RateLimitedForNow(refusal)

    @property
    def client_message(self) -> str:
        return f"rate limited ({self.refusal.limit.value}): {self.refusal.message}"


class RateLimitedForNow(RateLimited, RetryLater):
    """A rate limit (or capacity in use) refused the call: it may go after ``retry_after``."""


class LimitSpent(RateLimited, LimitExhausted):
    """A quota is spent, or the call is larger than a limit allows: waiting will not help."""


@dataclass(slots=True)
class Lease:
    """A granted call. Settle it once the call is over, or withdraw it if never made."""

    ticket: int
    session_id: str
    provider: str
    tokens: int
    cost_usd: float
    closed: bool = False


class UsageRecord(BaseModel):
    """One upstream call's consumption, for the ``token_usage`` table (one row per call)."""

    model_config = ConfigDict(frozen=True)

    call_id: str
    session_id: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    estimated: bool
    cost_usd: float | None
    at: datetime


class SessionUsage(BaseModel):
    """One session's counters and what it holds right now."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated_calls: int
    in_flight: int
    waiting: int
    refused: int
    tokens_reserved: int
    cost_reserved_usd: float


class LimiterBrief(BaseModel):
    """The providers' load and how the limits are held (:meth:`RateLimiter.brief`)."""

    model_config = ConfigDict(frozen=True)

    providers: list[ProviderLimitStatus]
    mode: LimitsMode
    live_nodes: int


class LimiterSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    #: Each provider's load, as ``exai status`` shows it (the public model, filled in here).
    providers: list[ProviderLimitStatus]
    sessions: list[SessionUsage]
    #: How the limits are held: across the cluster through the database (``shared``), on
    #: this node's share while the database does not answer (``local_share``), or by this
    #: node alone (``off``: no shared limits); ``live_nodes``: the share's divisor.
    mode: LimitsMode = "off"
    live_nodes: int = 1


# -- messages (the actor accepts exactly these) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Granted:
    pass


_GRANTED = _Granted()
_Decision: TypeAlias = _Granted | Refusal


@dataclass(frozen=True, slots=True)
class _Acquire:
    ticket: int
    demand: Demand
    now: float
    deadline: float
    reply: CallbackFuture[_Decision]


@dataclass(frozen=True, slots=True)
class _Settle:
    ticket: int
    consumed: Consumed | None
    now: float


@dataclass(frozen=True, slots=True)
class _Withdraw:
    ticket: int
    now: float


@dataclass(frozen=True, slots=True)
class _Tick:
    now: float


@dataclass(frozen=True, slots=True)
class _Snapshot:
    now: float


@dataclass(frozen=True, slots=True)
class _Brief:
    now: float


@dataclass(frozen=True, slots=True)
class _CloseSession:
    session_id: str
    now: float


_Message: TypeAlias = _Acquire | _Settle | _Withdraw | _Tick | _Snapshot | _Brief | _CloseSession


# -- the actor -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Waiter:
    ticket: int
    demand: Demand
    since: float
    deadline: float
    reply: CallbackFuture[_Decision]
    block: Blocked | None = None
    immediate: bool = True  # still inside its own Acquire: answer through the ask itself
    decision: _Decision | None = field(default=None)


class RateLimiterActor(ServiceActor[_Message]):
    """Owns the :class:`~actors.rate_ledger.Ledger` and the queues of waiting calls.

    ``wake(at)`` asks the pacer for a tick (from this thread). ``ledger``: the ledger to
    start from (:meth:`~actors.rate_ledger.Ledger.successor` of a crashed incarnation's); a fresh
    one by default. ``cluster``: makes the :class:`~actors.rate_cluster.ClusterLimits` over
    that ledger when limits are shared across nodes (closed when the actor stops).
    """

    def __init__(
        self,
        providers: Mapping[str, ProviderLimits],
        client: ClientLimits,
        wake: Callable[[float], None],
        *,
        ledger: Ledger | None = None,
        cluster: Callable[[Ledger], ClusterLimits] | None = None,
    ) -> None:
        super().__init__()
        self._ledger = ledger if ledger is not None else Ledger(providers, client)
        self._cluster = cluster(self._ledger) if cluster is not None else None
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._waiters: dict[int, _Waiter] = {}
        self._leases: dict[int, Demand] = {}
        self._now = self._ledger.spent_at if self._ledger.spent_at is not None else -math.inf
        self._wake = wake
        self._announced: float | None = None  # the earliest tick the pacer was told of

    def _loop_ended(self) -> None:
        # Stopped or crashed alike: the incarnation's database connection goes with it.
        try:
            if self._cluster is not None:
                self._cluster.close()
        finally:
            super()._loop_ended()

    def handle(self, message: _Message) -> Any:
        now = self._now = max(self._now, message.now)  # messages may overtake each other
        match message:
            case _Acquire():
                reply: Any = self._acquire(message, now)
            case _Settle(ticket=ticket, consumed=consumed):
                self._release(ticket, consumed, now, used=True)
                reply = None
            case _Withdraw(ticket=ticket):
                self._withdraw(ticket, now)
                reply = None
            case _Tick():
                self._schedule(now)
                self._announced = self._next_wake(now)
                return self._announced
            case _Snapshot():
                reply = self._snapshot(now)
            case _Brief():
                reply = self._brief(now)
            case _CloseSession(session_id=session_id):
                reply = self._close_session(session_id, now)
            case _:
                assert_never(message)
        self._announce(now)
        return reply

    # -- handlers ----------------------------------------------------------------------------

    def _acquire(self, message: _Acquire, now: float) -> _Decision | CallbackFuture[_Decision]:
        demand = message.demand
        waiter = _Waiter(message.ticket, demand, now, message.deadline, message.reply)
        self._ledger.session(demand.session_id)
        self._waiters[waiter.ticket] = waiter
        queue = self._queues.get(demand.session_id)
        if queue is None:
            queue = self._queues[demand.session_id] = deque()
        queue.append(waiter)
        self._schedule(now)
        waiter.immediate = False
        if waiter.decision is not None:
            return waiter.decision
        return self.defer(waiter.reply)  # answered when capacity frees, or at the deadline

    def _release(self, ticket: int, consumed: Consumed | None, now: float, *, used: bool) -> None:
        demand = self._leases.pop(ticket, None)
        if demand is None:
            return  # settled already: the client guards against it, this is belt and braces
        if used:
            self._ledger.settle(demand, consumed, now)
            if self._cluster is not None:
                self._cluster.settle(ticket, demand, consumed, now)
        else:
            self._ledger.withdraw(demand, now)
            if self._cluster is not None:
                self._cluster.withdraw(ticket, demand, now)
        session = self._ledger.sessions[demand.session_id]
        if session.closing and session.in_flight == 0:
            del self._ledger.sessions[demand.session_id]
        self._schedule(now)

    def _withdraw(self, ticket: int, now: float) -> None:
        waiter = self._waiters.get(ticket)
        if waiter is not None:
            self._remove(waiter)  # its task is gone: no answer
            self.drop(waiter.reply)
            self._schedule(now)
        else:
            self._release(ticket, None, now, used=False)

    def _close_session(self, session_id: str, now: float) -> SessionUsage | None:
        ledger = self._ledger.sessions.get(session_id)
        if ledger is None:
            return None
        ledger.closing = True
        for waiter in list(self._queues.get(session_id, ())):
            self._refuse(waiter, Blocked(LimitName.SESSION_CLOSED, "the session closed"), now)
        usage = self._session_usage(session_id)
        if ledger.in_flight == 0:
            del self._ledger.sessions[session_id]
        return usage

    # -- scheduling --------------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        """Grant what can go now, round-robin over sessions; refuse what has waited enough."""
        while True:
            self._grant_round_robin(now)
            expired = [w for w in self._waiters.values() if w.deadline <= now]
            for waiter in expired:
                self._refuse(waiter, self._reason(waiter), now)
            if not expired:  # removing a head may have let another call be considered
                return

    def _grant_round_robin(self, now: float) -> None:
        held: dict[str, Blocked] = {}  # providers that refused a turn in this pass
        progress = True
        while progress:
            progress = False
            for session_id in list(self._queues):
                queue = self._queues.get(session_id)
                if not queue:
                    continue
                head = queue[0]
                provider = head.demand.provider
                block = self._ledger.check(head.demand, now)
                if (block is None or not block.limit.own) and provider in held:
                    block = held[provider]  # an earlier turn at this provider goes first
                if block is None and self._cluster is not None:
                    # Last: the database is asked only for a call this node would admit.
                    block = self._cluster.admit(head.ticket, head.demand, now)
                if block is None:
                    self._ledger.reserve(head.demand, now)
                    self._leases[head.ticket] = head.demand
                    self._decide(head, _GRANTED)
                    if session_id in self._queues:
                        self._queues.move_to_end(session_id)
                    progress = True
                elif block.permanent:
                    self._refuse(head, block, now)
                    progress = True
                else:
                    head.block = block
                    if not block.limit.own:
                        held[provider] = block

    def _reason(self, waiter: _Waiter) -> Blocked:
        queue = self._queues.get(waiter.demand.session_id)
        head = queue[0] if queue else None
        # A call behind its session's first waiting call is held by what holds that one.
        reason = waiter.block or (head.block if head is not None else None)
        return (
            reason
            or self._ledger.check(waiter.demand, self._now)
            or Blocked(
                LimitName.CLIENT_REQUESTS, "the call waited behind this session's earlier calls"
            )
        )

    def _next_wake(self, now: float) -> float | None:
        """When the pacer must tick: a waiter's deadline, or a rate limit refilling for it."""
        times = [w.deadline for w in self._waiters.values() if math.isfinite(w.deadline)]
        for queue in self._queues.values():
            block = queue[0].block if queue else None
            if block is not None and block.retry_after is not None:
                times.append(now + block.retry_after)
        if not times:
            return None
        # Strictly later than now: a frozen test clock must not make the pacer spin.
        return max(min(times), math.nextafter(now, math.inf))

    def _announce(self, now: float) -> None:
        due = self._next_wake(now)
        if due is not None and (self._announced is None or due < self._announced):
            self._announced = due
            self._wake(due)

    # -- answering waiters -------------------------------------------------------------------

    def _decide(self, waiter: _Waiter, decision: _Decision) -> None:
        self._remove(waiter)
        if waiter.immediate:
            waiter.decision = decision
        else:
            self.answer(waiter.reply, decision)

    def _refuse(self, waiter: _Waiter, block: Blocked, now: float) -> None:
        demand = waiter.demand
        session = self._ledger.sessions.get(demand.session_id)
        if session is not None:
            session.refused += 1
        waited = now - waiter.since
        message = block.message if waited <= 0 else f"{block.message} (waited {waited:.1f} s)"
        self._decide(
            waiter,
            Refusal(
                limit=block.limit,
                message=message,
                retry_after=block.retry_after,
                permanent=block.permanent,
                session_id=demand.session_id,
                provider=demand.provider,
            ),
        )

    def _remove(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter.ticket, None)
        queue = self._queues.get(waiter.demand.session_id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._queues[waiter.demand.session_id]

    # -- snapshots ---------------------------------------------------------------------------

    def _session_usage(self, session_id: str) -> SessionUsage:
        s = self._ledger.sessions[session_id]
        return SessionUsage(
            session_id=session_id,
            requests=s.calls,
            input_tokens=s.input_tokens,
            output_tokens=s.output_tokens,
            cost_usd=s.cost_usd,
            estimated_calls=s.estimated_calls,
            in_flight=s.in_flight,
            waiting=len(self._queues.get(session_id, ())),
            refused=s.refused,
            tokens_reserved=s.tokens_reserved,
            cost_reserved_usd=s.cost_reserved,
        )

    def _snapshot(self, now: float) -> LimiterSnapshot:
        brief = self._brief(now)
        sessions = [self._session_usage(sid) for sid in self._ledger.sessions]
        return LimiterSnapshot(
            providers=brief.providers,
            sessions=sessions,
            mode=brief.mode,
            live_nodes=brief.live_nodes,
        )

    def _brief(self, now: float) -> LimiterBrief:
        """The providers' load and how the limits are held, without the per-session counters
        (what the heartbeat publishes: cheap whatever the number of sessions)."""
        if self._cluster is not None:
            self._cluster.refresh(now)
        waiting: dict[str, int] = {}
        for waiter in self._waiters.values():
            waiting[waiter.demand.provider] = waiting.get(waiter.demand.provider, 0) + 1
        providers = [
            ProviderLimitStatus(
                name=p.name,
                requests_per_minute=p.limits.requests_per_minute,
                tokens_per_minute=p.limits.tokens_per_minute,
                max_concurrency=p.limits.max_concurrency,
                in_flight=p.in_flight,
                waiting=waiting.get(p.name, 0),
                requests_available=p.requests.available(now) if p.requests else None,
                tokens_available=p.tokens.available(now) if p.tokens else None,
            )
            for p in self._ledger.providers.values()
        ]
        cluster = self._cluster
        return LimiterBrief(
            providers=providers,
            mode="off" if cluster is None else "local_share" if cluster.degraded else "shared",
            live_nodes=1 if cluster is None else cluster.live_nodes,
        )


# -- the trio side ---------------------------------------------------------------------------


class RateLimiter(ServiceClient):
    """How trio code asks the rate-limiter actor. Made by :func:`supervised_rate_limiter` (the
    node) or :func:`open_rate_limiter` (one unsupervised actor).

    ``resolve`` returns the current actor (an ``ActorName.resolve``); :attr:`pacer` ticks it
    when it asks, and must run while it runs.

    ::

        lease = await limiter.acquire(session_id, "glm", tokens=estimate.tokens,
                                      cost_usd=estimate.cost_usd)
        try:
            result = await provider.complete(request)
        except ProviderError:
            limiter.settle(lease, model=model, usage=None, cost_usd=None)
            raise
        record = limiter.settle(lease, model=result.model, usage=result.usage,
                                cost_usd=result.cost_usd)
    """

    def __init__(self, resolve: Resolve, *, default_wait: float) -> None:
        super().__init__(resolve)
        self._default_wait = default_wait
        self._tickets = itertools.count(1)  # across incarnations: a ticket is never reused
        self.pacer = Pacer(self._tick)

    async def acquire(
        self,
        session_id: str,
        provider: str,
        *,
        tokens: int,
        cost_usd: float = 0.0,
        wait: float | None = None,
        identity: str | None = None,
    ) -> Lease:
        """Admit one call, waiting up to ``wait`` seconds (the configured default if None).

        ``tokens`` is the worst case (prompt estimate + ``max_tokens``); ``cost_usd`` its
        price. ``identity``: the client identity whose limits the call counts against, shared
        by all its sessions (``None``: the session is a client of its own). Raises
        :class:`RateLimited` if a limit refuses it, at once or at the deadline, and
        :class:`~runtime.bridge.ActorUnavailable` if the actor is restarting or dies first
        (nothing was reserved that outlives it: retry).
        """
        now = trio.current_time()
        patience = self._default_wait if wait is None else wait
        ticket = next(self._tickets)
        demand = Demand(session_id, provider, tokens, cost_usd, identity or session_id)
        reply: CallbackFuture[_Decision] = CallbackFuture()
        message = _Acquire(ticket, demand, now, now + patience, reply)
        try:
            decision = await self.ask(message)  # follows the deferred reply while queued
        except BaseException:
            # Cancelled (or failed) while queued, or with a grant already on its way: give
            # the place or the reservation back, or the capacity would be lost for good.
            self.send(_Withdraw(ticket, trio.current_time()))
            raise
        match decision:
            case _Granted():
                return Lease(ticket, session_id, provider, tokens, cost_usd)
            case Refusal():
                raise RateLimited.of(decision)
        raise TypeError(f"rate limiter answered {decision!r}")

    def settle(
        self, lease: Lease, *, model: str, usage: Usage | None, cost_usd: float | None
    ) -> UsageRecord | None:
        """The call went upstream and is over: refund what it reserved beyond its usage.

        ``usage=None``: it failed and consumed no tokens (the request still counts). Returns
        the record to persist, or ``None`` if there is nothing to persist. Synchronous, so it
        works in cleanup paths and cancelled scopes.
        """
        self._close(lease)
        consumed = None
        if usage is not None:
            consumed = Consumed(
                usage.input_tokens, usage.output_tokens, cost_usd or 0.0, usage.estimated
            )
        self.send(_Settle(lease.ticket, consumed, trio.current_time()))
        if usage is None:
            return None
        return UsageRecord(
            call_id=uuid.uuid4().hex,
            session_id=lease.session_id,
            provider=lease.provider,
            model=model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            estimated=usage.estimated,
            cost_usd=cost_usd,
            at=datetime.now(UTC),
        )

    def withdraw(self, lease: Lease) -> None:
        """The call was never made: give back everything, the request included. Idempotent."""
        if lease.closed:
            return
        lease.closed = True
        self.send(_Withdraw(lease.ticket, trio.current_time()))

    async def snapshot(self) -> LimiterSnapshot:
        result = await self.ask(_Snapshot(trio.current_time()))
        assert isinstance(result, LimiterSnapshot)
        return result

    async def brief(self) -> LimiterBrief:
        """:meth:`snapshot` without the sessions: what the node's heartbeat publishes."""
        result = await self.ask(_Brief(trio.current_time()))
        assert isinstance(result, LimiterBrief)
        return result

    async def session_usage(self, session_id: str) -> SessionUsage | None:
        snapshot = await self.snapshot()
        return next((s for s in snapshot.sessions if s.session_id == session_id), None)

    async def close_session(self, session_id: str) -> SessionUsage | None:
        """Forget a session (its waiting calls are refused); returns its final counters. Its
        client identity's quotas are not touched: they are the identity's, not the session's."""
        result = await self.ask(_CloseSession(session_id, trio.current_time()))
        assert result is None or isinstance(result, SessionUsage)
        return result

    def _close(self, lease: Lease) -> None:
        if lease.closed:
            raise RuntimeError(f"lease {lease.ticket} was already settled or withdrawn")
        lease.closed = True

    async def _tick(self, now: float) -> float | None:
        """The pacer's tick: the actor grants and refuses what is due, and says when next."""
        due = await self.ask(_Tick(now))
        assert due is None or isinstance(due, float)
        return due


def supervised_rate_limiter(
    name: ActorName[RateLimiterActor],
    providers: Mapping[str, ProviderLimits],
    client: ClientLimits,
    *,
    shared: Callable[[], SharedLimits] | None = None,
    quotas: Quotas | None = None,
    upstreams: Mapping[str, str] | None = None,
) -> tuple[RateLimiter, StartFunction]:
    """The limiter as a supervisor's child reached through ``name``: its client (valid for
    the node's life, across restarts) and the child's start function (``pykka_child`` with
    the client's pacer). Every incarnation after the first starts from the
    :meth:`~actors.rate_ledger.Ledger.successor` of the last one's ledger (see the module doc).

    ``shared``: opens the database's shared limits (each incarnation its own connection):
    rates held across the cluster and ``quotas`` (durable, per identity) counted there
    (:mod:`actors.rate_cluster`); ``upstreams``: each provider's
    :func:`~actors.rate_cluster.upstream_id`. ``None``: this node's limits only, and no
    durable quotas."""
    limiter = RateLimiter(name.resolve, default_wait=client.max_wait_seconds)
    cluster = _cluster_factory(shared, quotas, upstreams)
    ledgers: list[Ledger] = []  # the current incarnation's, read only once it is dead

    def start() -> pykka.ActorRef[RateLimiterActor]:
        if ledgers:
            successor = ledgers[-1].successor(trio.current_time())
            log.warning(
                "rate_limiter.restarted_spent",
                clients=len(successor.clients),
                providers=len(successor.providers),
            )
        else:
            successor = Ledger(providers, client)
        ledgers[:] = [successor]
        ref: pykka.ActorRef[RateLimiterActor] = RateLimiterActor.start(
            providers, client, limiter.pacer.alarm(), ledger=successor, cluster=cluster
        )
        return ref

    return limiter, pykka_child(name, start, pacer=limiter.pacer)


def _cluster_factory(
    shared: Callable[[], SharedLimits] | None,
    quotas: Quotas | None,
    upstreams: Mapping[str, str] | None = None,
) -> Callable[[Ledger], ClusterLimits] | None:
    if shared is None:
        return None
    memory = ClusterMemory()  # one per limiter client: kept by every incarnation
    return lambda ledger: ClusterLimits(
        shared(), ledger, quotas or {}, upstreams=upstreams, memory=memory
    )


@asynccontextmanager
async def open_rate_limiter(
    providers: Mapping[str, ProviderLimits],
    client: ClientLimits,
    *,
    shared: Callable[[], SharedLimits] | None = None,
    quotas: Quotas | None = None,
) -> AsyncIterator[RateLimiter]:
    """One unsupervised actor and its pacer; on exit the actor stops and whoever still waits
    gets :class:`~runtime.bridge.ActorUnavailable`. ``shared``, ``quotas``: as for
    :func:`supervised_rate_limiter`."""
    holder: list[pykka.ActorRef[RateLimiterActor]] = []
    limiter = RateLimiter(lambda: holder[0], default_wait=client.max_wait_seconds)
    ref = RateLimiterActor.start(
        providers, client, limiter.pacer.alarm(), cluster=_cluster_factory(shared, quotas)
    )
    holder.append(ref)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limiter.pacer.run)
            yield limiter
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ref.stop)


def node_limits(brief: LimiterBrief) -> NodeLimits:
    """The limiter's view as the node publishes it with its heartbeat (``nodes.snapshot``):
    its mode and each provider's load, at most
    :data:`~storage.membership.SNAPSHOT_PROVIDERS_MAX` providers."""
    providers = brief.providers[:SNAPSHOT_PROVIDERS_MAX]
    return NodeLimits(
        mode=brief.mode,
        live_nodes=max(1, brief.live_nodes),
        providers=[
            ProviderUsage(
                name=p.name[:256],
                requests_per_minute=p.requests_per_minute,
                tokens_per_minute=p.tokens_per_minute,
                in_flight=p.in_flight,
                waiting=p.waiting,
                requests_available=(
                    None if p.requests_available is None else round(p.requests_available, 3)
                ),
                tokens_available=(
                    None if p.tokens_available is None else round(p.tokens_available, 3)
                ),
            )
            for p in providers
        ],
        providers_omitted=len(brief.providers) - len(providers),
    )
