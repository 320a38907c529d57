"""One upstream call through the three gates of docs/providers.md, with its usage recorded.

provider (configured? breaker closed?) -> rate limiter (``acquire``) -> ``complete`` ->
``settle`` (or ``withdraw`` when nothing was sent). Every :class:`UsageRecord` that ``settle``
returns becomes one ``token_usage`` row, written in the background (never lost, never
awaited: the caller's critical write of its turn, later, covers it since the persistence
client is FIFO).
"""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

import pykka
import structlog

from actors.persistence import PersistenceClient
from actors.providers import (
    ChatProvider,
    ChatRequest,
    ChatResult,
    ModelNotOffered,
    OnText,
    ProviderError,
    Providers,
)
from actors.rate_limiter import RateLimiter, UsageRecord
from runtime import trace
from runtime.breaker import FailureRateBreaker
from storage.errors import ActorUnavailable, RetryLater
from storage.rows import TokenUsage, UsagePurpose
from storage.untrusted import NAME_CHARS, clip

log = structlog.get_logger("conversation")

_COST_QUANTUM = Decimal("0.000001")  # token_usage.cost is decimal(10, 6)


class UpstreamNotReady(RetryLater):
    """The providers or the rate limiter are (re)starting; nothing was sent."""

    limit = "upstream_starting"
    retry_after = 1.0


class Upstream:
    """The providers and the rate limiter as the node's root children currently run them.

    The providers' child sets them when it has started and clears them when it stops; a
    restarted child sets fresh ones. The rate limiter's client is set once: it reaches
    whichever incarnation of the actor runs (``ActorName``), and raises ``ActorUnavailable``
    while none does. Callers look them up per call, never keep them.
    """

    def __init__(self) -> None:
        self.providers: Providers | None = None
        self.limiter: RateLimiter | None = None

    def ready(self) -> tuple[Providers, RateLimiter]:
        if self.providers is None or self.limiter is None:
            raise UpstreamNotReady("the upstream providers are starting; retry in a moment")
        return self.providers, self.limiter

    def breakers(self) -> list[FailureRateBreaker]:
        """Every provider's circuit breaker, for the status command (none while stopped)."""
        providers = self.providers
        if providers is None:
            return []
        return [providers.get(name).breaker for name in providers.config.providers]

    async def session_ended(self, session_id: str) -> None:
        """A session is over: the limiter forgets it (its waiting calls are refused; its
        client identity's quotas stay as they are), and its final counters are logged if it
        ever called upstream. Never raises: a session's end must not fail because the limiter
        is going away with it."""
        limiter = self.limiter
        if limiter is None:
            return
        try:
            usage = await limiter.close_session(session_id)
        except (ActorUnavailable, pykka.ActorDeadError):
            return  # the limiter stopped first (shutdown): its ledger is gone anyway
        if usage is not None:
            log.info(
                "upstream.session_closed",
                session_id=session_id,
                requests=usage.requests,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=round(usage.cost_usd, 6),
                refused=usage.refused,
            )


def choose_provider(providers: Providers, model: str | None) -> ChatProvider:
    """The provider that serves ``model``: the first whose ``models`` lists it; the default
    provider when no model is named.

    Raises :class:`~actors.providers.ProviderNotConfigured` (no provider at all) or
    :class:`~actors.providers.ModelNotOffered` (none lists it): an unlisted model never goes
    upstream, where it would be called unpriced and slip past cost quotas.
    """
    if model is None or not providers.config.configured:
        return providers.get()
    for settings in providers.config.providers.values():
        if model in settings.models:
            return providers.get(settings.name)
    offered = sorted({m for s in providers.config.providers.values() for m in s.models})
    raise ModelNotOffered(
        f"model {clip(model, NAME_CHARS)!r} is not offered by this server; "
        f"the models offered are: {', '.join(offered)}"
    )


async def complete(
    provider: ChatProvider,
    limiter: RateLimiter,
    persistence: PersistenceClient,
    *,
    session_id: str,
    identity: str,
    request: ChatRequest,
    on_text: OnText | None = None,
    purpose: UsagePurpose = "chat",
    owner: UUID | None = None,
    thread_id: UUID | None = None,
    limiter_session: str | None = None,
) -> ChatResult:
    """Make the call, admitted by the limiter, and record its usage. ``identity``: the client
    identity whose limits it counts against (all its sessions share them).

    ``purpose``, ``owner`` (``threads.owner_id``) and ``thread_id`` go on the usage row.
    ``limiter_session``: the limiter's session key when it is not ``session_id`` (a summary
    runs after its turn, perhaps after its session ended: it is a limiter session of its
    own, which the caller closes); the usage row still names ``session_id``.

    Raises :class:`~actors.providers.ProviderError` (breaker open, upstream failures),
    :class:`~actors.rate_limiter.RateLimited` (a limit refused the call) and
    :class:`UpstreamNotReady` (the rate limiter is restarting, or died while the call waited:
    nothing was sent).
    """
    provider.check_available()  # no point queueing for an upstream that fails at once
    estimate = provider.estimate(request)
    try:
        lease = await limiter.acquire(
            limiter_session or session_id,
            provider.name,
            tokens=estimate.tokens,
            cost_usd=estimate.cost_usd,
            identity=identity,
        )
    except ActorUnavailable as exc:
        refusal = UpstreamNotReady(
            "the rate limiter is restarting; nothing was sent upstream, retry in a moment"
        )
        refusal.provider = provider.name  # the client is told which upstream it waited for
        raise refusal from exc
    try:
        with trace.handling(f"/root/providers/{provider.name}", "chat.completions"):
            result = await provider.complete(request, on_text=on_text)
    except ProviderError as exc:
        if exc.sent == 0:  # e.g. the breaker opened meanwhile: the call never left
            limiter.withdraw(lease)
        else:  # it reached the upstream: the request counts, its tokens are given back
            limiter.settle(lease, model=estimate.model, usage=None, cost_usd=None)
        raise
    except BaseException:
        # Cancelled mid-call: tokens may have been generated; the request counts.
        limiter.settle(lease, model=estimate.model, usage=None, cost_usd=None)
        raise
    record = limiter.settle(lease, model=result.model, usage=result.usage, cost_usd=result.cost_usd)
    if record is not None:
        row = usage_row(record).model_copy(
            update={
                "session_id": session_id,
                "purpose": purpose,
                "owner_id": owner,
                "thread_id": thread_id,
            }
        )
        persistence.write_soon(row)
    return result


def usage_row(record: UsageRecord) -> TokenUsage:
    cost = None
    if record.cost_usd is not None:
        cost = Decimal(str(record.cost_usd)).quantize(_COST_QUANTUM)
    return TokenUsage(
        usage_id=UUID(hex=record.call_id),
        session_id=record.session_id,
        task_id=None,
        provider=record.provider,
        model=record.model,
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        cost=cost,
        estimated=record.estimated,
        created_at=record.at,
    )
