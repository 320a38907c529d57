"""Upstream failures as a hierarchy (httpx's style): catch the meaning you can act on.

::

    ProviderError                a ToolFailed of the node's tree (storage.errors)
    ├── ProviderNotConfigured    no upstream is configured (the message says how to add one)
    ├── ModelNotOffered          no configured upstream lists the model asked for (``models``);
    │                            also an InvalidInput
    ├── ProviderUnavailable      its circuit breaker is open: failed at once, not tried; also
    │                            a RetryLater (``limit`` ``provider_circuit_open``)
    ├── ProviderTimeout          no answer in time
    ├── ProviderConnectionError  could not connect, or the connection dropped mid-answer
    ├── ProviderRateLimited      429 after the retries allowed (``retry_after`` if known); also
    │                            a RetryLater (``limit`` ``upstream_rate_limit``)
    ├── ProviderRejected         4xx: the upstream refused this request (``status``)
    ├── ProviderServerError      5xx after the retries allowed (``status``)
    └── ProviderProtocolError    an answer that is not the chat-completions API

Messages are written for the MCP client and never contain an API key: text that comes from
the upstream is scrubbed of the key before it is put into an error (:func:`scrub`). What a
client is told is :attr:`ProviderError.client_message`: for a failure of the upstream itself,
that nothing was stored and the turn may be retried.
"""

from __future__ import annotations

from pydantic import SecretStr

from storage.errors import InvalidInput, RetryLater, ToolFailed

_MAX_UPSTREAM_TEXT = 500


class ProviderError(ToolFailed):
    """Base of every upstream failure. ``provider`` names the upstream, when there is one."""

    def __init__(
        self, message: str, *, provider: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.retry_after = retry_after
        # Requests that reached the upstream before this error (set by the client): 0 means
        # the call can be withdrawn from the rate limiter rather than settled.
        self.sent = 0

    @property
    def client_message(self) -> str:
        """The upstream failed this turn: the client may retry it, as nothing was kept."""
        return f"{self.message}. Nothing was stored; the turn may be retried."


class ProviderNotConfigured(ProviderError):
    """No upstream (or not the one asked for) is configured."""

    @property
    def client_message(self) -> str:
        return self.message  # it says how to configure one; there is no turn to retry


class ModelNotOffered(ProviderError, InvalidInput):
    """The model asked for is in no configured provider's ``models``: nothing was sent."""

    @property
    def client_message(self) -> str:
        return f"invalid arguments: {self.message}"


class ProviderUnavailable(ProviderError, RetryLater):
    """The provider's circuit breaker is open; ``retry_after`` says when it tries again."""

    limit = "provider_circuit_open"

    @property
    def client_message(self) -> str:
        return self.message


class ProviderTimeout(ProviderError):
    """The upstream did not answer (or stopped streaming) within its timeout."""


class ProviderConnectionError(ProviderError):
    """The upstream could not be reached, or dropped the connection before the answer ended."""


class ProviderRateLimited(ProviderError, RetryLater):
    """The upstream answered 429 on every attempt allowed."""

    limit = "upstream_rate_limit"

    @property
    def client_message(self) -> str:
        return self.message


class ProviderRejected(ProviderError):
    """The upstream refused the request (4xx other than 429): retrying will not help."""

    def __init__(self, message: str, *, provider: str, status: int) -> None:
        super().__init__(message, provider=provider)
        self.status = status


class ProviderServerError(ProviderError):
    """The upstream failed (5xx) on every attempt allowed."""

    def __init__(self, message: str, *, provider: str, status: int) -> None:
        super().__init__(message, provider=provider)
        self.status = status


class ProviderProtocolError(ProviderError):
    """The upstream answered something that is not an OpenAI-compatible chat completion."""


def scrub(text: str, secret: SecretStr | None) -> str:
    """Upstream text made safe to show: the key removed (some upstreams echo it), bounded."""
    if secret is not None:
        value = secret.get_secret_value()
        if value:
            text = text.replace(value, "[redacted]")
    if len(text) > _MAX_UPSTREAM_TEXT:
        text = text[:_MAX_UPSTREAM_TEXT] + "..."
    return text
