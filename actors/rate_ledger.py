"""The rate limiter's ledger: what it enforces, and the arithmetic of admitting one upstream
call (the limits, the buckets, the quotas, the refunds). The actor around it, which waits,
orders and wakes calls, is :mod:`actors.rate_limiter`; this module was ``actors/limits.py``.

No threads and no trio here: the rate-limiter actor owns one :class:`Ledger` and feeds it the
time with every message, so this arithmetic is exact and testable on its own.

Rates are GCRA (the generic cell rate algorithm of ITU-T I.371; see brandur.org/rate-limiting),
kept as the bucket's *level* rather than as a theoretical arrival time: the two are the same
algorithm (level = (tat - now) / interval), but a level adds integer costs exactly, so "capacity
60, sixty calls at the same instant" admits exactly sixty instead of fifty-nine and a rounding
error.

Quotas and per-client rates belong to the client *identity* (the name its token gives it,
``default`` for the node's own token), not to a connection: every session of an identity draws
on one :class:`ClientLedger`, which outlives them, so reconnecting resets nothing. Per-session
counters (:class:`SessionLedger`) are only what ``exai status`` reports of each session.

Across nodes, :mod:`actors.rate_cluster` repeats the rate limits in shared buckets in the
database; while it cannot reach them, this ledger's buckets hold the node's share
(:meth:`Ledger.set_share`).

Tokens are reserved up front as the worst case (prompt estimate + ``max_tokens``; OpenAI's
rate-limit guide counts a request as the larger of the two) and the difference is refunded when
the real usage is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class LimitName(StrEnum):
    """Every limit that can refuse a call; it is named in the refusal."""

    PROVIDER_REQUESTS = "provider_requests_per_minute"
    PROVIDER_TOKENS = "provider_tokens_per_minute"
    PROVIDER_CONCURRENCY = "provider_concurrency"
    CLIENT_REQUESTS = "client_requests_per_minute"
    CLIENT_TOKENS = "client_token_quota"
    CLIENT_COST = "client_cost_quota"
    CLIENT_QUOTA = "client_quota"
    SESSION_CLOSED = "session_closed"

    @property
    def own(self) -> bool:
        """A limit of the caller itself (its client identity or its session), not of a shared
        upstream: holding it back must not hold back other callers."""
        return not self.value.startswith("provider_")


class ProviderLimits(BaseModel):
    """Limits of one upstream key, shared by every session. ``None`` means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="Reserved as prompt estimate + max_tokens per call."
    )
    max_concurrency: int | None = Field(default=None, gt=0, description="Calls in flight.")


class ClientLimits(BaseModel):
    """Limits of each client identity, all its sessions together, whatever upstream they call.
    ``None`` means unlimited. ``requests_per_minute`` holds across the nodes of a database
    when limits are shared (:mod:`actors.rate_cluster`); the token and cost quotas here are
    kept for the node's life (durable ones: ``[clients.<name>.quota]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, gt=0)
    token_quota: int | None = Field(
        default=None,
        gt=0,
        description="Input + output tokens of all the identity's sessions, for the node's life.",
    )
    cost_quota_usd: float | None = Field(
        default=None,
        gt=0,
        description="Estimated spend of all the identity's sessions, for the node's life, in USD.",
    )
    max_wait_seconds: float = Field(
        default=0.0,
        ge=0,
        description="How long a call may wait for capacity before it is refused; 0 refuses "
        "at once.",
    )


@dataclass(frozen=True, slots=True)
class Demand:
    """What one call asks for: the worst case it may consume. ``identity``: the client whose
    quotas it counts against."""

    session_id: str
    provider: str
    tokens: int
    cost_usd: float
    identity: str


@dataclass(frozen=True, slots=True)
class Consumed:
    """What one call really consumed, once the upstream said so (or it was estimated)."""

    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated: bool = False

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a demand cannot be admitted now.

    ``retry_after`` is exact for rate limits (when the bucket will hold enough) and ``None``
    when capacity comes back only as another call finishes. ``permanent``: waiting cannot help.
    """

    limit: LimitName
    message: str
    retry_after: float | None = None
    permanent: bool = False


class Bucket:
    """GCRA for ``capacity`` units per minute, bursting up to ``capacity`` at once.

    ``spent_at``: the bucket starts full at that time (nothing available then, all of it a
    minute later), as if a burst had just spent it; by default it starts empty.
    """

    def __init__(self, capacity: int, *, spent_at: float | None = None) -> None:
        self.capacity = float(capacity)
        self._per_second = capacity / 60.0
        self._level = 0.0 if spent_at is None else self.capacity
        self._updated = -math.inf if spent_at is None else spent_at

    def _drain(self, now: float) -> None:
        if now > self._updated:
            if self._level > 0:
                self._level = max(0.0, self._level - (now - self._updated) * self._per_second)
            self._updated = now

    def available(self, now: float) -> float:
        self._drain(now)
        return self.capacity - self._level

    def wait_for(self, cost: float, now: float) -> float | None:
        """Seconds until ``cost`` fits (0: now); ``None`` if it never fits."""
        if cost > self.capacity:
            return None
        self._drain(now)
        excess = self._level + cost - self.capacity
        return 0.0 if excess <= 0 else excess / self._per_second

    def take(self, cost: float, now: float) -> None:
        """Consume without checking: also how a call that used more than it reserved pays."""
        self._drain(now)
        self._level += cost

    def give_back(self, cost: float, now: float) -> None:
        self._drain(now)
        self._level = max(0.0, self._level - cost)


@dataclass(slots=True)
class ProviderLedger:
    name: str
    limits: ProviderLimits
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0

    @classmethod
    def create(
        cls, name: str, limits: ProviderLimits, *, spent_at: float | None = None, share: int = 1
    ) -> ProviderLedger:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        return cls(
            name=name,
            limits=limits,
            requests=_bucket(rpm, spent_at, share),
            tokens=_bucket(tpm, spent_at, share),
        )


def _bucket(limit: int | None, spent_at: float | None, share: int) -> Bucket | None:
    """The bucket of ``limit`` per minute, or this node's ``1/share`` of it (at least 1)."""
    if limit is None:
        return None
    return Bucket(max(1, limit // share), spent_at=spent_at)


@dataclass(slots=True)
class ClientLedger:
    """One client identity's quota state, shared by its sessions and kept when they end."""

    identity: str
    requests: Bucket | None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tokens_reserved: int = 0
    cost_reserved: float = 0.0

    @property
    def tokens_used(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class SessionLedger:
    """One session's counters, for reporting; its limits are its identity's."""

    session_id: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tokens_reserved: int = 0
    cost_reserved: float = 0.0
    in_flight: int = 0
    refused: int = 0
    estimated_calls: int = 0
    closing: bool = False

    @property
    def tokens_used(self) -> int:
        return self.input_tokens + self.output_tokens


class Ledger:
    """Every limit's state; :meth:`check`, then :meth:`reserve`, then :meth:`settle`.

    ``spent_at``: every rate bucket, those made later included, starts spent at that time
    (see :meth:`successor`); ``None``: they start empty.

    :attr:`share`: each rate bucket holds ``1/share`` of its limit (at least 1): this node's
    share of a limit held across ``share`` nodes, used while the shared buckets in the
    database cannot be reached (:meth:`set_share`, :mod:`actors.rate_cluster`).
    """

    def __init__(
        self,
        providers: Mapping[str, ProviderLimits],
        client: ClientLimits,
        *,
        spent_at: float | None = None,
    ) -> None:
        self.client_limits = client
        self.spent_at = spent_at
        self.share = 1
        self.providers = {
            name: ProviderLedger.create(name, limits, spent_at=spent_at)
            for name, limits in providers.items()
        }
        self.sessions: dict[str, SessionLedger] = {}
        # Never forgotten while the node runs: identities are the configured tokens' names,
        # so this is bounded by the configuration, and a reconnect finds its quota spent.
        self.clients: dict[str, ClientLedger] = {}

    def successor(self, now: float) -> Ledger:
        """A conservative ledger for the incarnation after a crash, which lost this one's
        calls in flight: every rate bucket spent at ``now`` (no burst admitted for one
        window), each client's quotas and each session's counters at what it used plus what
        it had reserved (the settlements of those calls will not reach the successor; a
        session's usage shown by ``exai status`` must not fall back to zero), nothing in
        flight."""
        limits = {name: p.limits for name, p in self.providers.items()}
        successor = Ledger(limits, self.client_limits, spent_at=now)
        for identity, old in self.clients.items():
            new = successor.client(identity)
            new.input_tokens = old.input_tokens + old.tokens_reserved
            new.output_tokens = old.output_tokens
            new.cost_usd = old.cost_usd + old.cost_reserved
        for session_id, was in self.sessions.items():
            kept = successor.session(session_id)
            kept.calls = was.calls
            kept.input_tokens = was.input_tokens + was.tokens_reserved
            kept.output_tokens = was.output_tokens
            kept.cost_usd = was.cost_usd + was.cost_reserved
            kept.refused = was.refused
            kept.estimated_calls = was.estimated_calls
            kept.closing = was.closing
        return successor

    def provider(self, name: str) -> ProviderLedger:
        # An upstream without configured limits is unlimited, but still counted.
        ledger = self.providers.get(name)
        if ledger is None:
            ledger = self.providers[name] = ProviderLedger.create(
                name, ProviderLimits(), spent_at=self.spent_at, share=self.share
            )
        return ledger

    def set_share(self, share: int, now: float) -> None:
        """Make every rate bucket (providers' requests and tokens, clients' requests) hold
        ``1/share`` of its limit from ``now`` on; ``share > 1`` starts them spent at ``now``
        (this node's share must not add a burst to what the cluster already admitted), 1
        starts them empty (the shared buckets hold the limit again; these only repeat it)."""
        self.share = share
        self.spent_at = now if share > 1 else None
        for provider in self.providers.values():
            limits = provider.limits
            provider.requests = _bucket(limits.requests_per_minute, self.spent_at, share)
            provider.tokens = _bucket(limits.tokens_per_minute, self.spent_at, share)
        rpm = self.client_limits.requests_per_minute
        for client in self.clients.values():
            client.requests = _bucket(rpm, self.spent_at, share)

    def _share_note(self) -> str:
        """What a refusal adds while this node holds only its share of each rate limit."""
        if self.share <= 1:
            return ""
        return f" (this node holds 1/{self.share} of it while the limits database does not answer)"

    def session(self, session_id: str) -> SessionLedger:
        ledger = self.sessions.get(session_id)
        if ledger is None:
            ledger = self.sessions[session_id] = SessionLedger(session_id=session_id)
        return ledger

    def client(self, identity: str) -> ClientLedger:
        ledger = self.clients.get(identity)
        if ledger is None:
            ledger = self.clients[identity] = ClientLedger(
                identity=identity,
                requests=_bucket(self.client_limits.requests_per_minute, self.spent_at, self.share),
            )
        return ledger

    # -- admission ---------------------------------------------------------------------------

    def check(self, demand: Demand, now: float) -> Blocked | None:
        """``None`` if ``demand`` may go now; else the limit that holds it.

        The caller's own limit wins over a provider's: a call its client cannot make anyway
        must not hold back other callers' calls to the same provider.
        """
        return self._own_block(demand, now) or self._provider_block(demand, now)

    def reserve(self, demand: Demand, now: float) -> None:
        session = self.session(demand.session_id)
        client = self.client(demand.identity)
        provider = self.provider(demand.provider)
        if client.requests is not None:
            client.requests.take(1, now)
        if provider.requests is not None:
            provider.requests.take(1, now)
        if provider.tokens is not None:
            provider.tokens.take(demand.tokens, now)
        session.tokens_reserved += demand.tokens
        session.cost_reserved += demand.cost_usd
        client.tokens_reserved += demand.tokens
        client.cost_reserved += demand.cost_usd
        session.in_flight += 1
        provider.in_flight += 1

    def settle(self, demand: Demand, consumed: Consumed | None, now: float) -> None:
        """The call went upstream and is over. ``consumed=None``: it consumed no tokens.

        The request itself stays counted: the upstream counted it too, even if it failed.
        """
        session = self.session(demand.session_id)
        client = self.client(demand.identity)
        provider = self.provider(demand.provider)
        self._unreserve(session, client, provider, demand)
        session.calls += 1
        used = consumed.tokens if consumed else 0
        if provider.tokens is not None:
            if used <= demand.tokens:
                provider.tokens.give_back(demand.tokens - used, now)
            else:  # the prompt estimate was low: the upstream counted the real figure
                provider.tokens.take(used - demand.tokens, now)
        if consumed is not None:
            session.input_tokens += consumed.input_tokens
            session.output_tokens += consumed.output_tokens
            session.cost_usd += consumed.cost_usd
            session.estimated_calls += consumed.estimated
            client.input_tokens += consumed.input_tokens
            client.output_tokens += consumed.output_tokens
            client.cost_usd += consumed.cost_usd

    def withdraw(self, demand: Demand, now: float) -> None:
        """The call was admitted but never went upstream: undo all of its reservation."""
        session = self.session(demand.session_id)
        client = self.client(demand.identity)
        provider = self.provider(demand.provider)
        self._unreserve(session, client, provider, demand)
        if client.requests is not None:
            client.requests.give_back(1, now)
        if provider.requests is not None:
            provider.requests.give_back(1, now)
        if provider.tokens is not None:
            provider.tokens.give_back(demand.tokens, now)

    @staticmethod
    def _unreserve(
        session: SessionLedger, client: ClientLedger, provider: ProviderLedger, demand: Demand
    ) -> None:
        session.tokens_reserved -= demand.tokens
        session.cost_reserved -= demand.cost_usd
        client.tokens_reserved -= demand.tokens
        client.cost_reserved -= demand.cost_usd
        session.in_flight -= 1
        provider.in_flight -= 1

    # -- the limits, one by one --------------------------------------------------------------

    def _own_block(self, demand: Demand, now: float) -> Blocked | None:
        limits = self.client_limits
        if self.session(demand.session_id).closing:
            return Blocked(LimitName.SESSION_CLOSED, "the session is closing", permanent=True)
        client = self.client(demand.identity)
        whose = f" (client {demand.identity!r}, all its sessions together)"
        if limits.token_quota is not None:
            quota = limits.token_quota
            if client.tokens_used + demand.tokens > quota:
                return Blocked(
                    LimitName.CLIENT_TOKENS,
                    f"this client's token quota is {quota}: {client.tokens_used} are used and "
                    f"this call reserves {demand.tokens} (prompt estimate + max_tokens){whose}",
                    permanent=True,
                )
            if client.tokens_used + client.tokens_reserved + demand.tokens > quota:
                return Blocked(
                    LimitName.CLIENT_TOKENS,
                    f"this client's token quota is {quota}: {client.tokens_used} are used and "
                    f"{client.tokens_reserved} reserved by calls in flight{whose}; retry when "
                    "one finishes",
                )
        if limits.cost_quota_usd is not None:
            quota_usd = limits.cost_quota_usd
            if client.cost_usd + demand.cost_usd > quota_usd:
                return Blocked(
                    LimitName.CLIENT_COST,
                    f"this client's cost quota is ${quota_usd:.4f}: ${client.cost_usd:.4f} is "
                    f"spent and this call may cost ${demand.cost_usd:.4f}{whose}",
                    permanent=True,
                )
            if client.cost_usd + client.cost_reserved + demand.cost_usd > quota_usd:
                return Blocked(
                    LimitName.CLIENT_COST,
                    f"this client's cost quota is ${quota_usd:.4f}: ${client.cost_usd:.4f} is "
                    f"spent and ${client.cost_reserved:.4f} reserved by calls in flight{whose}; "
                    "retry when one finishes",
                )
        if client.requests is not None:
            wait = client.requests.wait_for(1, now)
            if wait:
                return Blocked(
                    LimitName.CLIENT_REQUESTS,
                    f"this client may make {limits.requests_per_minute} requests/min{whose}"
                    f"{self._share_note()}; retry in {wait:.1f} s",
                    retry_after=wait,
                )
        return None

    def _provider_block(self, demand: Demand, now: float) -> Blocked | None:
        provider = self.provider(demand.provider)
        limits = provider.limits
        blocks: list[Blocked] = []
        if provider.tokens is not None:
            wait = provider.tokens.wait_for(demand.tokens, now)
            if wait is None:
                if self.share > 1:
                    # Larger than this node's share only: not for good, the database may
                    # come back (and with it the whole limit).
                    return Blocked(
                        LimitName.PROVIDER_TOKENS,
                        f"this call reserves {demand.tokens} tokens (prompt estimate + "
                        f"max_tokens), more than this node's share of upstream "
                        f"{provider.name!r}'s {limits.tokens_per_minute} tokens/min"
                        f"{self._share_note()}; retry later",
                    )
                return Blocked(
                    LimitName.PROVIDER_TOKENS,
                    f"this call reserves {demand.tokens} tokens (prompt estimate + "
                    f"max_tokens), more than upstream {provider.name!r} allows in a minute "
                    f"({limits.tokens_per_minute})",
                    permanent=True,
                )
            if wait:
                blocks.append(
                    Blocked(
                        LimitName.PROVIDER_TOKENS,
                        f"upstream {provider.name!r} allows {limits.tokens_per_minute} "
                        f"tokens/min{self._share_note()} and this call reserves "
                        f"{demand.tokens}; retry in {wait:.1f} s",
                        retry_after=wait,
                    )
                )
        if provider.requests is not None:
            wait = provider.requests.wait_for(1, now)
            if wait:
                blocks.append(
                    Blocked(
                        LimitName.PROVIDER_REQUESTS,
                        f"upstream {provider.name!r} allows {limits.requests_per_minute} "
                        f"requests/min{self._share_note()}; retry in {wait:.1f} s",
                        retry_after=wait,
                    )
                )
        if blocks:  # the longest wait is the honest retry-after
            return max(blocks, key=lambda b: b.retry_after or 0.0)
        if limits.max_concurrency is not None and provider.in_flight >= limits.max_concurrency:
            return Blocked(
                LimitName.PROVIDER_CONCURRENCY,
                f"upstream {provider.name!r} allows {limits.max_concurrency} calls at once and "
                f"{provider.in_flight} are in flight; retry when one finishes",
            )
        return None
