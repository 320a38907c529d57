"""Upstream LLM providers: configuration, the chat-completions client, and their owner.

:func:`open_providers` owns one ``httpx.AsyncClient`` per provider (its own timeouts and
connection pool) and closes them on exit; :class:`Providers` hands out the
:class:`ChatProvider` a call needs, or raises :class:`ProviderNotConfigured` with a message
saying how to configure one, so everything else keeps working without an upstream.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

from actors.providers.client import (
    CallEstimate,
    ChatProvider,
    ChatResult,
    OnText,
    ProviderSnapshot,
)
from actors.providers.config import (
    HOW_TO_CONFIGURE,
    ProviderSettings,
    RetryPolicy,
    UpstreamConfig,
    UpstreamConfigError,
    load_upstream,
)
from actors.providers.errors import (
    ModelNotOffered,
    ProviderConnectionError,
    ProviderError,
    ProviderNotConfigured,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
)
from actors.providers.usage import Price, Usage
from actors.providers.wire import ChatMessage, ChatRequest

__all__ = [
    "HOW_TO_CONFIGURE",
    "CallEstimate",
    "ChatMessage",
    "ChatProvider",
    "ChatRequest",
    "ChatResult",
    "ModelNotOffered",
    "OnText",
    "Price",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderNotConfigured",
    "ProviderProtocolError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderServerError",
    "ProviderSettings",
    "ProviderSnapshot",
    "ProviderTimeout",
    "ProviderUnavailable",
    "Providers",
    "RetryPolicy",
    "UpstreamConfig",
    "UpstreamConfigError",
    "Usage",
    "load_upstream",
    "open_providers",
]


class Providers:
    """The configured upstreams, by name."""

    def __init__(self, config: UpstreamConfig, clients: dict[str, ChatProvider]) -> None:
        self.config = config
        self._clients = clients

    @property
    def configured(self) -> bool:
        return bool(self._clients)

    def get(self, name: str | None = None) -> ChatProvider:
        """The named provider or the default; :class:`ProviderNotConfigured` otherwise."""
        return self._clients[self.config.provider(name).name]

    def snapshot(self) -> list[ProviderSnapshot]:
        return [client.snapshot() for client in self._clients.values()]


@asynccontextmanager
async def open_providers(
    config: UpstreamConfig, *, rng: random.Random | None = None
) -> AsyncIterator[Providers]:
    """Open every provider's HTTP client; close them all on exit."""
    async with AsyncExitStack() as stack:
        clients: dict[str, ChatProvider] = {}
        for name, settings in config.providers.items():
            http = await stack.enter_async_context(_http_client(settings))
            clients[name] = ChatProvider(settings, http, rng=rng)
        yield Providers(config, clients)


def _http_client(settings: ProviderSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_seconds,
        # Between bytes; the whole answer is bounded by the client's own deadline.
        read=settings.stream_idle_timeout,
        write=settings.timeout_seconds,
        pool=settings.timeout_seconds,
    )
    connections = settings.limits.max_concurrency
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
