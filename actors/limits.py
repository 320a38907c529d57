"""What the rate limiter enforces, and the arithmetic of admitting one upstream call.

No threads and no trio here: the rate-limiter actor (:mod:`actors.rate_limiter`) owns one
:class:`Ledger` and feeds it the time with every message, so this arithmetic is exact and
testable on its own.

Rates are GCRA (the generic cell rate algorithm of ITU-T I.371; see brandur.org/rate-limiting),
kept as the bucket's *level* rather than as a theoretical arrival time: the two are the same
algorithm (level = (tat - now) / interval), but a level adds integer costs exactly, so "capacity
60, sixty calls at the same instant" admits exactly sixty instead of fifty-nine and a rounding
error.

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
    SESSION_REQUESTS = "session_requests_per_minute"
    SESSION_TOKENS = "session_token_quota"
    SESSION_COST = "session_cost_quota"
    SESSION_CLOSED = "session_closed"

    @property
    def per_session(self) -> bool:
        return self.value.startswith("session_")


class ProviderLimits(BaseModel):
    """Limits of one upstream key, shared by every session. ``None`` means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="Reserved as prompt estimate + max_tokens per call."
    )
    max_concurrency: int | None = Field(default=None, gt=0, description="Calls in flight.")


class SessionLimits(BaseModel):
    """Limits of each session, whatever upstream it calls. ``None`` means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, gt=0)
    token_quota: int | None = Field(
        default=None, gt=0, description="Input + output tokens over the session's life."
    )
    cost_quota_usd: float | None = Field(
        default=None, gt=0, description="Estimated spend over the session's life, in USD."
    )
    max_wait_seconds: float = Field(
        default=0.0,
        ge=0,
        description="How long a call may wait for capacity before it is refused; 0 refuses "
        "at once.",
    )


@dataclass(frozen=True, slots=True)
class Demand:
    """What one call asks for: the worst case it may consume."""

    session_id: str
    provider: str
    tokens: int
    cost_usd: float


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
    """GCRA for ``capacity`` units per minute, bursting up to ``capacity`` at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = float(capacity)
        self._per_second = capacity / 60.0
        self._level = 0.0
        self._updated = -math.inf

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
    def create(cls, name: str, limits: ProviderLimits) -> ProviderLedger:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        return cls(
            name=name,
            limits=limits,
            requests=Bucket(rpm) if rpm else None,
            tokens=Bucket(tpm) if tpm else None,
        )


@dataclass(slots=True)
class SessionLedger:
    session_id: str
    requests: Bucket | None
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
    """Every limit's state; :meth:`check`, then :meth:`reserve`, then :meth:`settle`."""

    def __init__(self, providers: Mapping[str, ProviderLimits], session: SessionLimits) -> None:
        self.session_limits = session
        self.providers = {
            name: ProviderLedger.create(name, limits) for name, limits in providers.items()
        }
        self.sessions: dict[str, SessionLedger] = {}

    def provider(self, name: str) -> ProviderLedger:
        # An upstream without configured limits is unlimited, but still counted.
        ledger = self.providers.get(name)
        if ledger is None:
            ledger = self.providers[name] = ProviderLedger.create(name, ProviderLimits())
        return ledger

    def session(self, session_id: str) -> SessionLedger:
        ledger = self.sessions.get(session_id)
        if ledger is None:
            rpm = self.session_limits.requests_per_minute
            ledger = self.sessions[session_id] = SessionLedger(
                session_id=session_id, requests=Bucket(rpm) if rpm else None
            )
        return ledger

    # -- admission ---------------------------------------------------------------------------

    def check(self, demand: Demand, now: float) -> Blocked | None:
        """``None`` if ``demand`` may go now; else the limit that holds it.

        A session's own limit wins over a provider's: a call its session cannot make anyway
        must not hold back other sessions' calls to the same provider.
        """
        return self._session_block(demand, now) or self._provider_block(demand, now)

    def reserve(self, demand: Demand, now: float) -> None:
        session = self.session(demand.session_id)
        provider = self.provider(demand.provider)
        if session.requests is not None:
            session.requests.take(1, now)
        if provider.requests is not None:
            provider.requests.take(1, now)
        if provider.tokens is not None:
            provider.tokens.take(demand.tokens, now)
        session.tokens_reserved += demand.tokens
        session.cost_reserved += demand.cost_usd
        session.in_flight += 1
        provider.in_flight += 1

    def settle(self, demand: Demand, consumed: Consumed | None, now: float) -> None:
        """The call went upstream and is over. ``consumed=None``: it consumed no tokens.

        The request itself stays counted: the upstream counted it too, even if it failed.
        """
        session = self.session(demand.session_id)
        provider = self.provider(demand.provider)
        self._unreserve(session, provider, demand)
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

    def withdraw(self, demand: Demand, now: float) -> None:
        """The call was admitted but never went upstream: undo all of its reservation."""
        session = self.session(demand.session_id)
        provider = self.provider(demand.provider)
        self._unreserve(session, provider, demand)
        if session.requests is not None:
            session.requests.give_back(1, now)
        if provider.requests is not None:
            provider.requests.give_back(1, now)
        if provider.tokens is not None:
            provider.tokens.give_back(demand.tokens, now)

    @staticmethod
    def _unreserve(session: SessionLedger, provider: ProviderLedger, demand: Demand) -> None:
        session.tokens_reserved -= demand.tokens
        session.cost_reserved -= demand.cost_usd
        session.in_flight -= 1
        provider.in_flight -= 1

    # -- the limits, one by one --------------------------------------------------------------

    def _session_block(self, demand: Demand, now: float) -> Blocked | None:
        limits = self.session_limits
        session = self.session(demand.session_id)
        if session.closing:
            return Blocked(LimitName.SESSION_CLOSED, "the session is closing", permanent=True)
        if limits.token_quota is not None:
            quota = limits.token_quota
            if session.tokens_used + demand.tokens > quota:
                return Blocked(
                    LimitName.SESSION_TOKENS,
                    f"this session's token quota is {quota}: {session.tokens_used} are used "
                    f"and this call reserves {demand.tokens} (prompt estimate + max_tokens)",
                    permanent=True,
                )
            if session.tokens_used + session.tokens_reserved + demand.tokens > quota:
                return Blocked(
                    LimitName.SESSION_TOKENS,
                    f"this session's token quota is {quota}: {session.tokens_used} are used "
                    f"and {session.tokens_reserved} reserved by calls in flight; retry when "
                    "one finishes",
                )
        if limits.cost_quota_usd is not None:
            quota_usd = limits.cost_quota_usd
            if session.cost_usd + demand.cost_usd > quota_usd:
                return Blocked(
                    LimitName.SESSION_COST,
                    f"this session's cost quota is ${quota_usd:.4f}: ${session.cost_usd:.4f} "
                    f"is spent and this call may cost ${demand.cost_usd:.4f}",
                    permanent=True,
                )
            if session.cost_usd + session.cost_reserved + demand.cost_usd > quota_usd:
                return Blocked(
                    LimitName.SESSION_COST,
                    f"this session's cost quota is ${quota_usd:.4f}: ${session.cost_usd:.4f} "
                    f"is spent and ${session.cost_reserved:.4f} reserved by calls in flight; "
                    "retry when one finishes",
                )
        if session.requests is not None:
            wait = session.requests.wait_for(1, now)
            if wait:
                return Blocked(
                    LimitName.SESSION_REQUESTS,
                    f"this session may make {limits.requests_per_minute} requests/min; "
                    f"retry in {wait:.1f} s",
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
                        f"tokens/min and this call reserves {demand.tokens}; retry in "
                        f"{wait:.1f} s",
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
                        f"requests/min; retry in {wait:.1f} s",
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
