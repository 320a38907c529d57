"""One OpenAI-compatible chat-completions client, behind its provider's circuit breaker.

Each *attempt* passes through the breaker (resilience4j's order: retry around breaker), so a
breaker that opens during a retry loop stops it at once with :class:`ProviderUnavailable`.
How an attempt counts for the upstream's health:

* an answer, or a 4xx other than 429: a success (the upstream is up; the request was wrong);
* 5xx, timeout, connection refused or dropped, a malformed answer: a failure;
* 429 and cancellation: not counted (rate limits are the limiter's business, and a caller
  giving up says nothing about the upstream).

A success slower than the breaker's ``slow_call_seconds`` counts as a failure; for a stream
the time judged is the time to its first chunk, because a long answer streamed steadily is
healthy.

Retried: 429 and 5xx (honouring ``Retry-After``) and connection failures. Not retried: a
timeout (the caller already waited the provider's whole timeout) and anything after text has
been handed to ``on_text``, which would otherwise see the answer twice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import structlog
import trio
from pydantic import BaseModel, ConfigDict, ValidationError

from actors.providers.config import ProviderSettings
from actors.providers.errors import (
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    scrub,
)
from actors.providers.retry import backoff_delay, parse_retry_after
from actors.providers.usage import Usage, estimate_tokens
from actors.providers.wire import (
    DONE,
    ChatRequest,
    Chunk,
    Completion,
    ErrorBody,
    SseDecoder,
    WireUsage,
    request_body,
)
from runtime.breaker import (
    BreakerOpen,
    BreakerSnapshot,
    CallOutcome,
    FailureRateBreaker,
    Permit,
)
from storage.breaker import BreakerState

log = structlog.get_logger("provider")

OnText = Callable[[str], Awaitable[None]]
"""Called with each piece of streamed text, in order, as it arrives."""


class CallEstimate(BaseModel):
    """The worst case of one call, for the rate limiter to reserve before it is made."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    input_tokens: int
    max_output_tokens: int
    cost_usd: float

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.max_output_tokens


class ChatResult(BaseModel):
    """One completed call."""

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cost_usd: float | None  # None: the model has no configured price
    attempts: int


class ProviderSnapshot(BaseModel):
    """A provider as the status command shows it: never its key."""

    model_config = ConfigDict(frozen=True)

    name: str
    preset: str | None
    base_url: str
    default_model: str
    models: list[str]
    has_api_key: bool
    breaker: BreakerSnapshot


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str
    finish_reason: str | None
    usage: WireUsage | None  # None: the upstream did not report it


@dataclass(slots=True)
class _Stream:
    """What an attempt has received so far."""

    parts: list[str]
    delivered: bool = False  # text went to on_text: the call can no longer be retried
    first_chunk_after: float | None = None


class ChatProvider:
    """Calls one upstream. Owned by :func:`actors.providers.open_providers`."""

    def __init__(
        self,
        settings: ProviderSettings,
        http: httpx.AsyncClient,
        *,
        breaker: FailureRateBreaker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.breaker = breaker or FailureRateBreaker(settings.name, settings.breaker)
        self._http = http
        self._rng = rng or random.Random()
        self._url = f"{settings.base_url}/chat/completions"

    @property
    def name(self) -> str:
        return self.settings.name

    def model_for(self, request: ChatRequest) -> str:
        return request.model or self.settings.default_model

    def estimate(self, request: ChatRequest) -> CallEstimate:
        model = self.model_for(request)
        input_tokens = estimate_tokens(m.content for m in request.messages)
        return CallEstimate(
            provider=self.name,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=request.max_tokens,
            cost_usd=self.cost(model, input_tokens, request.max_tokens) or 0.0,
        )

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        price = self.settings.price(model)
        return price.cost(input_tokens, output_tokens) if price else None

    def snapshot(self) -> ProviderSnapshot:
        s = self.settings
        return ProviderSnapshot(
            name=s.name,
            preset=s.preset,
            base_url=s.base_url,
            default_model=s.default_model,
            models=s.models,
            has_api_key=s.api_key is not None,
            breaker=self.breaker.snapshot(),
        )

    def check_available(self) -> None:
        """Raise :class:`ProviderUnavailable` now if the breaker is open.

        For callers about to wait for rate-limit capacity: no point queueing for an upstream
        whose calls would fail at once. Takes no trial slot; ``complete`` still decides.
        """
        snapshot = self.breaker.snapshot()
        if snapshot.state is BreakerState.OPEN:
            raise ProviderUnavailable(
                f"upstream {self.name!r} is unavailable: its circuit breaker is open and "
                f"tries again in {snapshot.retry_after_s or 0:.1f} s",
                provider=self.name,
                retry_after=snapshot.retry_after_s,
            )

    async def complete(self, request: ChatRequest, *, on_text: OnText | None = None) -> ChatResult:
        """Call the upstream; stream when ``on_text`` is given. Raises :class:`ProviderError`."""
        model = self.model_for(request)
        body = request_body(
            request,
            model,
            stream=on_text is not None,
            max_tokens_field=self.settings.max_tokens_field,
            stream_usage_option=self.settings.stream_usage_option,
        )
        attempt = 0
        while True:
            attempt += 1
            stream = _Stream(parts=[])
            try:
                permit = self.breaker.acquire()
            except BreakerOpen as exc:
                unavailable = ProviderUnavailable(
                    f"upstream {self.name!r} is unavailable: {exc}",
                    provider=self.name,
                    retry_after=exc.retry_after,
                )
                unavailable.sent = attempt - 1
                raise unavailable from None
            try:
                if on_text is None:
                    answer = await self._plain(body)
                else:
                    answer = await self._stream(body, on_text, stream)
            except ProviderError as exc:
                permit.finish(_health(exc))
                exc.sent = attempt
                delay = None if stream.delivered else self._retry_delay(exc, attempt)
                if delay is None:
                    raise
                log.info(
                    "provider.retry",
                    provider=self.name,
                    attempt=attempt,
                    error=type(exc).__name__,
                    delay=round(delay, 3),
                )
                await trio.sleep(delay)
                continue
            except BaseException:
                permit.finish(CallOutcome.IGNORED)  # cancelled: not the upstream's doing
                raise
            _finish_success(permit, stream)
            return self._result(request, model, answer, attempt)

    def _retry_delay(self, error: ProviderError, attempt: int) -> float | None:
        if not isinstance(
            error, ProviderRateLimited | ProviderServerError | ProviderConnectionError
        ):
            return None
        return backoff_delay(self.settings.retry, attempt, error.retry_after, self._rng)

    def _result(
        self, request: ChatRequest, model: str, answer: _Answer, attempts: int
    ) -> ChatResult:
        reported = answer.usage
        if reported is not None:
            usage = Usage(
                input_tokens=reported.prompt_tokens, output_tokens=reported.completion_tokens
            )
        else:  # a stream (or a lax server) that reported none: estimate, and say so
            usage = Usage(
                input_tokens=estimate_tokens(m.content for m in request.messages),
                output_tokens=estimate_tokens([answer.text]),
                estimated=True,
            )
        log.info(
            "provider.completed",
            provider=self.name,
            model=model,
            attempts=attempts,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            estimated=usage.estimated,
        )
        return ChatResult(
            provider=self.name,
            model=model,
            text=answer.text,
            finish_reason=answer.finish_reason,
            usage=usage,
            cost_usd=self.cost(model, usage.input_tokens, usage.output_tokens),
            attempts=attempts,
        )

    # -- one attempt -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        if key is None:
            return {}
        return {"Authorization": f"Bearer {key.get_secret_value()}"}

    async def _plain(self, body: dict[str, object]) -> _Answer:
        with trio.move_on_after(self.settings.timeout_seconds) as scope, self._transport_errors():
            response = await self._http.post(self._url, json=body, headers=self._headers())
        if scope.cancelled_caught:
            raise self._timeout()
        self._raise_for_status(response.status_code, response.headers, response.text)
        try:
            completion = Completion.model_validate_json(response.content)
        except ValidationError:
            raise ProviderProtocolError(
                f"upstream {self.name!r} answered with something that is not a chat completion",
                provider=self.name,
            ) from None
        return _Answer(completion.text, completion.choices[0].finish_reason, completion.usage)

    async def _stream(self, body: dict[str, object], on_text: OnText, stream: _Stream) -> _Answer:
        started = trio.current_time()
        finish: str | None = None
        usage: WireUsage | None = None
        done = False
        # The provider's timeout bounds the wait for the first chunk; after it, only the gap
        # between chunks is bounded (httpx's read timeout), so long answers are not cut.
        with (
            trio.CancelScope(deadline=started + self.settings.timeout_seconds) as first_chunk,
            self._transport_errors(),
        ):
            async with self._http.stream(
                "POST", self._url, json=body, headers=self._headers()
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_for_status(response.status_code, response.headers, response.text)
                decoder = SseDecoder()
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    if stream.first_chunk_after is None:
                        stream.first_chunk_after = trio.current_time() - started
                        first_chunk.deadline = math.inf
                    if data.strip() == DONE:
                        done = True
                        break
                    chunk = self._chunk(data)
                    finish = chunk.finish_reason or finish
                    usage = chunk.reported_usage or usage
                    if chunk.text:
                        stream.parts.append(chunk.text)
                        stream.delivered = True
                        await on_text(chunk.text)
        if first_chunk.cancelled_caught:
            raise self._timeout()
        if not done and finish is None:
            raise ProviderConnectionError(
                f"upstream {self.name!r} ended its stream before the answer was complete",
                provider=self.name,
            )
        return _Answer("".join(stream.parts), finish, usage)

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx's transport failures as this provider's errors: a timeout, or a connection
        that failed (both attempts, plain and streamed, map them the same way)."""
        try:
            yield
        except httpx.TimeoutException:
            raise self._timeout() from None
        except httpx.TransportError as exc:
            raise self._connection_error(exc) from None

    def _chunk(self, data: str) -> Chunk:
        try:
            return Chunk.model_validate_json(data)
        except ValidationError:
            raise ProviderProtocolError(
                f"upstream {self.name!r} streamed an event that is not a chat-completion chunk",
                provider=self.name,
            ) from None

    def _raise_for_status(self, status: int, headers: httpx.Headers, text: str) -> None:
        if status == 200:
            return
        detail = scrub(_error_message(text), self.settings.api_key)
        if status == 429:
            retry_after = parse_retry_after(headers)
            hint = f"; retry after {retry_after:.1f} s" if retry_after is not None else ""
            raise ProviderRateLimited(
                f"upstream {self.name!r} is rate limiting this key (429): {detail}{hint}",
                provider=self.name,
                retry_after=retry_after,
            )
        if status >= 500:
            error = ProviderServerError(
                f"upstream {self.name!r} failed ({status}): {detail}",
                provider=self.name,
                status=status,
            )
            error.retry_after = parse_retry_after(headers)
            raise error
        if 400 <= status < 500:
            raise ProviderRejected(
                f"upstream {self.name!r} refused the request ({status}): {detail}",
                provider=self.name,
                status=status,
            )
        raise ProviderProtocolError(
            f"upstream {self.name!r} answered with unexpected status {status}",
            provider=self.name,
        )

    def _timeout(self) -> ProviderTimeout:
        return ProviderTimeout(
            f"upstream {self.name!r} did not answer within {self.settings.timeout_seconds:g} s",
            provider=self.name,
        )

    def _connection_error(self, exc: httpx.TransportError) -> ProviderConnectionError:
        # httpx's message names the failure ("peer closed connection...") and never a header.
        return ProviderConnectionError(
            f"upstream {self.name!r} could not be reached or dropped the connection: "
            f"{type(exc).__name__}: {scrub(str(exc), self.settings.api_key)}",
            provider=self.name,
        )


def _health(error: ProviderError) -> CallOutcome:
    if isinstance(error, ProviderRateLimited):
        return CallOutcome.IGNORED
    if isinstance(error, ProviderRejected):
        return CallOutcome.SUCCESS
    return CallOutcome.FAILURE


def _finish_success(permit: Permit, stream: _Stream) -> None:
    permit.finish(CallOutcome.SUCCESS, elapsed=stream.first_chunk_after)


def _error_message(text: str) -> str:
    try:
        message = ErrorBody.model_validate_json(text).message
    except ValidationError:
        message = None
    return message or text.strip() or "no details"
