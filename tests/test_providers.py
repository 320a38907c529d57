"""The chat-completions client against a real HTTP server on loopback.

Time is trio's ``MockClock`` jumping whenever every task waits (``autojump_clock``): the fake
server and the client share one trio run and loopback I/O is ready as soon as it is written,
so "slow" answers, timeouts and Retry-After waits take virtual seconds, not real ones.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import MockClock

from actors.providers import (
    ChatMessage,
    ChatProvider,
    ChatRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    UpstreamConfig,
    UpstreamConfigError,
    load_upstream,
    open_providers,
)
from actors.providers.retry import parse_retry_after
from actors.providers.wire import SseDecoder
from runtime.breaker import BreakerState
from tests.fake_openai import (
    Drop,
    FakeOpenAI,
    Hang,
    Reply,
    Slow,
    Status,
    StreamReply,
    fake_openai,
)

KEY = "sk-fake-0123456789-" + "s3cr3t" * 5

HELLO = ChatRequest(messages=[ChatMessage(role="user", content="say hello" * 4)], max_tokens=50)


def _config(server: FakeOpenAI, **overrides: Any) -> UpstreamConfig:
    table: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": KEY,
        "default_model": "fake-model",
        "prices": {"fake-model": {"input_per_million": 1.0, "output_per_million": 4.0}},
        "timeout_seconds": 30.0,
        "retry": {"max_attempts": 3, "base_delay_seconds": 0.5, "max_retry_after_seconds": 10},
    }
    table.update(overrides)
    return UpstreamConfig.model_validate({"providers": {"fake": table}})


@asynccontextmanager
async def _provider(server: FakeOpenAI, **overrides: Any) -> AsyncIterator[ChatProvider]:
    async with open_providers(_config(server, **overrides), rng=random.Random(7)) as providers:
        yield providers.get()


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with fake_openai() as fake:
        yield fake


# -- answers ---------------------------------------------------------------------------------


async def test_an_answer_carries_text_usage_and_cost(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Reply(text="hi there", usage=(1000, 500)))
    async with _provider(server) as provider:
        result = await provider.complete(HELLO)
    assert result.text == "hi there"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (1000, 500)
    assert not result.usage.estimated
    assert result.cost_usd == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1e6)
    assert result.attempts == 1
    (request,) = server.received
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "fake-model"
    assert request.body["max_tokens"] == 50
    assert request.body["stream"] is False


async def test_a_model_without_a_price_is_answered_unpriced(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    async with _provider(server) as provider:
        request = HELLO.model_copy(update={"model": "other-model"})
        result = await provider.complete(request)
    assert result.model == "other-model"
    assert result.cost_usd is None


async def test_openai_preset_sends_max_completion_tokens_and_asks_for_stream_usage(
    autojump_clock: MockClock,
    server: FakeOpenAI,
) -> None:
    async with _provider(server, preset="openai", default_model="gpt-5-mini") as provider:
        await provider.complete(HELLO)
        pieces: list[str] = []

        async def on_text(text: str) -> None:
            pieces.append(text)

        result = await provider.complete(HELLO, on_text=on_text)
    plain, streamed = server.received
    assert plain.body["max_completion_tokens"] == 50
    assert "max_tokens" not in plain.body
    assert streamed.body["stream_options"] == {"include_usage": True}
    assert not result.usage.estimated
    assert result.cost_usd == pytest.approx((12 * 0.25 + 3 * 2.0) / 1e6)


# -- streaming -------------------------------------------------------------------------------


async def test_a_stream_hands_each_piece_to_the_callback_and_reports_usage(
    autojump_clock: MockClock,
    server: FakeOpenAI,
) -> None:
    server.script(StreamReply(chunks=("a", "bc", "def"), usage=(40, 6)))
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async with _provider(server) as provider:
        result = await provider.complete(HELLO, on_text=on_text)
    assert pieces == ["a", "bc", "def"]
    assert result.text == "abcdef"
    assert result.finish_reason == "stop"
    assert result.usage.model_dump() == {"input_tokens": 40, "output_tokens": 6, "estimated": False}
    assert server.received[0].body["stream"] is True


async def test_progress_arrives_while_the_stream_is_still_open(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    resume = trio.Event()
    server.script(StreamReply(chunks=("one ", "two ", "three"), pause_after=2, resume=resume))
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 2:
            # The server is paused until now: these pieces came before the answer ended.
            resume.set()

    async with _provider(server) as provider:
        result = await provider.complete(HELLO, on_text=on_text)
    assert pieces == ["one ", "two ", "three"]
    assert result.text == "one two three"


@pytest.mark.parametrize("usage_at", ["last_chunk", "choice"])
async def test_usage_is_found_where_glm_and_kimi_put_it(
    autojump_clock: MockClock, server: FakeOpenAI, usage_at: str
) -> None:
    server.script(StreamReply(usage=(21, 9), usage_at=usage_at))  # type: ignore[arg-type]

    async def on_text(text: str) -> None:
        pass

    async with _provider(server, stream_usage_option=False) as provider:
        result = await provider.complete(HELLO, on_text=on_text)
    assert "stream_options" not in server.received[0].body
    assert (result.usage.input_tokens, result.usage.output_tokens) == (21, 9)
    assert not result.usage.estimated


async def test_a_stream_without_usage_is_estimated_and_marked(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(StreamReply(chunks=("x" * 10, "y" * 11), usage=None))

    async def on_text(text: str) -> None:
        pass

    async with _provider(server) as provider:
        result = await provider.complete(HELLO, on_text=on_text)
    prompt_chars = len(HELLO.messages[0].content)
    assert result.usage.estimated
    assert result.usage.input_tokens == -(-prompt_chars // 4)
    assert result.usage.output_tokens == -(-21 // 4)
    assert result.cost_usd is not None


async def test_a_stream_dropped_after_text_is_not_retried(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(StreamReply(chunks=("partial ", "rest"), drop_after=1))
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async with _provider(server) as provider:
        with pytest.raises(ProviderConnectionError, match="'fake'"):
            await provider.complete(HELLO, on_text=on_text)
    assert pieces == ["partial "]  # never delivered twice
    assert len(server.received) == 1


# -- retries ---------------------------------------------------------------------------------


async def test_429_waits_as_long_as_retry_after_says(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Status(429, retry_after="4"), Reply(text="after the wait"))
    async with _provider(server) as provider:
        started = trio.current_time()
        result = await provider.complete(HELLO)
        waited = trio.current_time() - started
    assert result.text == "after the wait"
    assert result.attempts == 2
    assert 4.0 <= waited <= 4.0 * 1.1 + 1e-6  # Retry-After, plus at most 10 % of jitter


async def test_retry_after_ms_is_preferred(autojump_clock: MockClock, server: FakeOpenAI) -> None:
    server.script(Status(429, retry_after="9", headers=[("retry-after-ms", "1500")]), Reply())
    async with _provider(server) as provider:
        started = trio.current_time()
        await provider.complete(HELLO)
        waited = trio.current_time() - started
    assert 1.5 <= waited <= 1.65 + 1e-6


async def test_a_retry_after_beyond_patience_fails_at_once_with_it(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Status(429, retry_after="120", message="slow down"))
    async with _provider(server) as provider:
        started = trio.current_time()
        with pytest.raises(ProviderRateLimited, match="slow down") as caught:
            await provider.complete(HELLO)
    assert caught.value.retry_after == 120
    assert trio.current_time() == started
    assert len(server.received) == 1


async def test_5xx_is_retried_with_backoff_then_reported(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Status(500), Status(502), Status(503))
    async with _provider(server) as provider:
        with pytest.raises(ProviderServerError) as caught:
            await provider.complete(HELLO)
    assert caught.value.status == 503
    assert caught.value.sent == 3
    assert len(server.received) == 3


async def test_5xx_then_success_succeeds(autojump_clock: MockClock, server: FakeOpenAI) -> None:
    server.script(Status(500), Reply(text="recovered"))
    async with _provider(server) as provider:
        result = await provider.complete(HELLO)
    assert (result.text, result.attempts) == ("recovered", 2)


async def test_a_dropped_connection_is_retried(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Drop(), Reply(text="second time lucky"))
    async with _provider(server) as provider:
        result = await provider.complete(HELLO)
    assert (result.text, result.attempts) == ("second time lucky", 2)


async def test_connections_dropped_every_time_are_reported(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Drop(), Drop(), Drop())
    async with _provider(server) as provider:
        with pytest.raises(ProviderConnectionError, match="dropped the connection"):
            await provider.complete(HELLO)
    assert len(server.received) == 3


async def test_a_refused_request_is_not_retried(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Status(400, message="messages must not be empty"))
    async with _provider(server) as provider:
        with pytest.raises(ProviderRejected, match="messages must not be empty") as caught:
            await provider.complete(HELLO)
    assert caught.value.status == 400
    assert len(server.received) == 1


# -- timeouts --------------------------------------------------------------------------------


async def test_a_slow_answer_times_out_and_is_not_retried(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Slow(31, Reply()))
    async with _provider(server) as provider:
        started = trio.current_time()
        with pytest.raises(ProviderTimeout, match="30 s"):
            await provider.complete(HELLO)
    assert trio.current_time() - started == pytest.approx(30)
    assert len(server.received) == 1


async def test_a_hung_stream_times_out_waiting_for_its_first_chunk(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(Hang())

    async def on_text(text: str) -> None:
        pass

    async with _provider(server, timeout_seconds=5) as provider:
        with pytest.raises(ProviderTimeout):
            await provider.complete(HELLO, on_text=on_text)


async def test_a_long_stream_is_not_cut_by_the_first_chunk_timeout(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    resume = trio.Event()
    server.script(StreamReply(chunks=("a", "b"), pause_after=1, resume=resume))

    async def on_text(text: str) -> None:
        if text == "a":
            await trio.sleep(8)  # the answer goes on past timeout_seconds (5)
            resume.set()

    async with _provider(server, timeout_seconds=5, stream_idle_timeout_seconds=20) as provider:
        result = await provider.complete(HELLO, on_text=on_text)
    assert result.text == "ab"


# -- the circuit breaker ---------------------------------------------------------------------

BREAKER = {
    "window_size": 4,
    "minimum_calls": 4,
    "failure_rate_threshold": 0.5,
    "slow_call_seconds": 10,
    "open_seconds": 30,
    "half_open_calls": 2,
}


async def test_breaker_opens_fails_fast_then_recovers_through_half_open(
    autojump_clock: MockClock,
    server: FakeOpenAI,
) -> None:
    async with _provider(server, breaker=BREAKER, retry={"max_attempts": 1}) as provider:
        server.script(Reply(), Status(500), Status(500), Status(500))
        await provider.complete(HELLO)
        for _ in range(3):
            with pytest.raises(ProviderServerError):
                await provider.complete(HELLO)
        assert provider.breaker.snapshot().state is BreakerState.OPEN

        # Open: refused without a request, naming the upstream and when it tries again.
        with pytest.raises(ProviderUnavailable, match=r"tries again in 30\.0 s"):
            provider.check_available()
        sent = len(server.received)
        with pytest.raises(ProviderUnavailable, match=r"'fake'.*30\.0 s") as caught:
            await provider.complete(HELLO)
        assert caught.value.retry_after == pytest.approx(30)
        assert len(server.received) == sent

        await trio.sleep(30)
        assert provider.breaker.snapshot().state is BreakerState.HALF_OPEN
        server.script(Status(500), Reply())  # one of two trials fails: rate 0.5 reopens
        with pytest.raises(ProviderServerError):
            await provider.complete(HELLO)
        await provider.complete(HELLO)
        assert provider.breaker.snapshot().state is BreakerState.OPEN

        await trio.sleep(30)
        await provider.complete(HELLO)
        await provider.complete(HELLO)
        snapshot = provider.snapshot()
    assert snapshot.breaker.state is BreakerState.CLOSED
    assert snapshot.breaker.times_opened == 2
    assert snapshot.breaker.rejected == 1


async def test_a_breaker_opening_during_retries_stops_them(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    breaker = {**BREAKER, "window_size": 2, "minimum_calls": 2}
    server.script(Status(500), Status(500), Status(500))
    async with _provider(server, breaker=breaker) as provider:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.complete(HELLO)
        assert caught.value.sent == 2  # settle, don't withdraw: two requests went out
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.complete(HELLO)
        assert caught.value.sent == 0  # nothing went out: withdraw the lease
    assert len(server.received) == 2


async def test_slow_successes_count_as_failures(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(*[Slow(11, Reply()) for _ in range(4)])
    async with _provider(server, breaker=BREAKER) as provider:
        for _ in range(4):
            await provider.complete(HELLO)  # each one answers, but too late to be healthy
        snapshot = provider.snapshot().breaker
    assert snapshot.state is BreakerState.OPEN


async def test_rate_limits_and_refusals_do_not_open_the_breaker(
    autojump_clock: MockClock, server: FakeOpenAI
) -> None:
    server.script(*[Status(429, retry_after="200") for _ in range(4)])
    server.script(*[Status(401, message="bad key") for _ in range(4)])
    async with _provider(server, breaker=BREAKER) as provider:
        for _ in range(4):
            with pytest.raises(ProviderRateLimited):
                await provider.complete(HELLO)
        for _ in range(4):
            with pytest.raises(ProviderRejected):
                await provider.complete(HELLO)
        snapshot = provider.snapshot().breaker
    assert snapshot.state is BreakerState.CLOSED
    assert (snapshot.window_calls, snapshot.window_failures) == (4, 0)  # the 401s: answered


# -- the key never shows ---------------------------------------------------------------------


async def test_the_api_key_appears_in_no_log_error_repr_or_snapshot(
    autojump_clock: MockClock, server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at debug
    texts: list[str] = []
    server.script(
        Status(429, retry_after="1"),
        Reply(),
        Status(401, message=f"Incorrect API key provided: {KEY}"),  # some upstreams echo it
        Status(500),
        Status(500),
        Status(500),
        Drop(),
        Drop(),
        Drop(),
        Slow(100, Reply()),
    )
    with capture_logs() as events:
        async with _provider(server, breaker={**BREAKER, "open_seconds": 1000}) as provider:
            await provider.complete(HELLO)
            for _ in range(5):
                try:
                    await provider.complete(HELLO)
                except ProviderError as exc:
                    texts += [str(exc), repr(exc), exc.message]
            texts.append(provider.snapshot().model_dump_json())
            texts += [repr(provider.settings), provider.settings.model_dump_json(), str(provider)]
    texts += [repr(event) for event in events]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.__dict__) for record in caplog.records]
    assert any("provider.retry" in text for text in texts)  # logs were captured
    assert any("[redacted]" in text for text in texts)  # the echoed key was scrubbed
    leaks = [text for text in texts if KEY in text or KEY[8:] in text]
    assert leaks == []
    assert server.received[0].headers["authorization"] == f"Bearer {KEY}"


def test_a_misspelt_key_field_does_not_print_the_key(tmp_path: Path) -> None:
    path = tmp_path / "exai.toml"
    path.write_text(f'[upstream.providers.glm]\npreset = "glm"\napikey = "{KEY}"\n')
    with pytest.raises(UpstreamConfigError) as caught:
        load_upstream(path, env={})
    assert "apikey" in str(caught.value)
    assert KEY not in str(caught.value)
    assert caught.value.__cause__ is None


# -- configuration ---------------------------------------------------------------------------


def test_a_toml_file_with_presets_overrides_and_keys_from_the_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "exai.toml"
    path.write_text(
        """
[server]
port = 1234   # other sections belong to other settings

[upstream]
default_provider = "kimi"

[upstream.session_limits]
requests_per_minute = 30
token_quota = 1000000
max_wait_seconds = 15

[upstream.providers.glm]
preset = "glm"
[upstream.providers.glm.limits]
requests_per_minute = 60

[upstream.providers.kimi]
preset = "kimi"
api_key = "kimi-key-from-the-file"
default_model = "kimi-k2-turbo-preview"
timeout_seconds = 50
[upstream.providers.kimi.prices.my-kimi-finetune]
input_per_million = 1.0
output_per_million = 3.0
"""
    )
    config = load_upstream(path, env={"GLM_API_KEY": "glm-key-from-env"})
    glm, kimi = config.providers["glm"], config.providers["kimi"]
    assert config.provider().name == "kimi"
    assert glm.base_url == "https://api.z.ai/api/paas/v4"
    assert glm.api_key is not None
    assert glm.api_key.get_secret_value() == "glm-key-from-env"
    assert glm.limits.requests_per_minute == 60
    assert glm.limits.max_concurrency == 4  # kept from the preset
    assert glm.timeout_seconds == 30
    assert kimi.timeout_seconds == 50
    assert kimi.default_model == "kimi-k2-turbo-preview"
    assert {"kimi-k2-thinking", "my-kimi-finetune"} <= set(kimi.models)
    assert config.client_limits.requests_per_minute == 30
    assert config.client_limits.max_wait_seconds == 15
    assert "glm-key-from-env" not in repr(config)


def test_one_provider_from_the_environment_alone() -> None:
    config = load_upstream(
        None,
        env={
            "EXAI_UPSTREAM_BASE_URL": "https://api.moonshot.ai/v1/",
            "EXAI_UPSTREAM_API_KEY": KEY,
            "EXAI_UPSTREAM_MODEL": "kimi-k2-turbo-preview",
        },
    )
    provider = config.provider()
    assert (provider.name, provider.preset) == ("kimi", "kimi")
    assert provider.base_url == "https://api.moonshot.ai/v1"
    assert provider.default_model == "kimi-k2-turbo-preview"
    assert provider.price("kimi-k2-turbo-preview") is not None
    assert provider.limits.max_concurrency == 6


def test_an_unknown_upstream_from_the_environment_needs_a_model() -> None:
    env = {"EXAI_UPSTREAM_BASE_URL": "http://127.0.0.1:8000/v1"}
    with pytest.raises(UpstreamConfigError, match="EXAI_UPSTREAM_MODEL"):
        load_upstream(None, env=env)
    config = load_upstream(None, env={**env, "EXAI_UPSTREAM_MODEL": "local"})
    assert config.provider().name == "upstream"
    assert config.provider().api_key is None  # a local server may need none


def test_a_preset_without_its_key_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "exai.toml"
    path.write_text('[upstream.providers.openai]\npreset = "openai"\n')
    with pytest.raises(UpstreamConfigError, match="OPENAI_API_KEY"):
        load_upstream(path, env={})


def test_no_provider_says_how_to_configure_one() -> None:
    config = load_upstream(None, env={})
    assert not config.configured
    with pytest.raises(ProviderNotConfigured, match=r"EXAI_UPSTREAM_BASE_URL.*docs/providers\.md"):
        config.provider()


def test_an_unknown_default_provider_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "exai.toml"
    path.write_text('[upstream]\ndefault_provider = "nope"\n')
    with pytest.raises(UpstreamConfigError, match="'nope'"):
        load_upstream(path, env={})


async def test_open_providers_without_any_raises_not_configured(
    autojump_clock: MockClock,
) -> None:
    async with open_providers(UpstreamConfig()) as providers:
        assert not providers.configured
        with pytest.raises(ProviderNotConfigured):
            providers.get()


# -- wire details ----------------------------------------------------------------------------


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after({"retry-after": later}, now=now) == 90
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SseDecoder()
    lines = [": ping", "event: x", "data: {", "data: }", "", "data: [DONE]"]
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert events == ["{\n}"]
    assert decoder.flush() == "[DONE]"
