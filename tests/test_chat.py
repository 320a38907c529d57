"""``chat`` through a real ``exai serve`` talking to the loopback OpenAI-compatible server.

One server for the module, configured by a file: three providers on the same fake upstream
(``fake``, the default; ``flaky``, whose breaker opens after two failures; ``limited``, one
request a minute), clients alice and bob, and threads of at most three exchanges.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chat_support import (
    ALICE,
    Caller,
    error_text,
    provider_table,
    query,
    stored_messages,
    upstream_thread,
    write_config,
)
from tests.fake_openai import FakeOpenAI, Reply, Status, StreamReply
from tests.harness import RawClient, ServerProcess, open_raw, start_server, wait_until

BREAKER = (
    "[upstream.providers.flaky.breaker]\nwindow_size = 2\nminimum_calls = 2\n"
    "failure_rate_threshold = 0.5\nopen_seconds = 600\nhalf_open_calls = 1\n"
)
LIMITED = "[upstream.providers.limited.limits]\nrequests_per_minute = 1\n"

RETRY_ANSWER = (
    "Use full-jitter exponential backoff and honour Retry-After when the upstream sends it.\n"
    "Keep the number of attempts small, three is plenty, and never retry once streaming began.\n"
    "Wrap each attempt, not the whole call, in the circuit breaker so it can stop a retry loop."
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def chat_server(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("chat")
    base = upstream.base_url
    providers = "\n".join(
        [
            '[upstream]\ndefault_provider = "fake"\n',
            provider_table("fake", base, "fake-model"),
            provider_table("flaky", base, "flaky-model", BREAKER),
            provider_table("limited", base, "limited-model", LIMITED),
        ]
    )
    config = write_config(state / "exai.toml", chat="max_turns = 3", providers=providers)
    handle = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def _caller(ws: Any) -> tuple[Caller, str]:
    client = RawClient(ws)
    session_id: str = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
    return Caller(client), session_id


def _sent(upstream: FakeOpenAI) -> list[dict[str, str]]:
    """The messages of the last request the upstream received."""
    messages: list[dict[str, str]] = upstream.received[-1].body["messages"]
    return messages


async def test_a_thread_sends_its_history_and_counts_down_to_its_limit(
    chat_server: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    upstream.script(Reply("answer one"), Reply("answer two"), Reply("answer three"))
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        first = await caller.chat("What is GCRA?")
        thread = first["continuation_id"]
        assert (first["turn"], first["remaining_exchanges"], first["max_turns"]) == (1, 2, 3)
        assert first["content"] == "answer one"
        assert _sent(upstream) == [{"role": "user", "content": "What is GCRA?"}]

        second = await caller.chat("How does it refill?", continuation_id=thread)
        assert (second["turn"], second["remaining_exchanges"]) == (2, 1)
        assert second["history_turns"] == 1
        assert _sent(upstream) == [
            {"role": "user", "content": "What is GCRA?"},
            {"role": "assistant", "content": "answer one"},
            {"role": "user", "content": "How does it refill?"},
        ]

        third = await caller.chat("Thanks.", continuation_id=thread)
        assert third["remaining_exchanges"] == 0
        assert [m["content"] for m in _sent(upstream)] == [
            "What is GCRA?",
            "answer one",
            "How does it refill?",
            "answer two",
            "Thanks.",
        ]

        before = len(upstream.received)
        refused = await caller.call("chat", {"prompt": "One more?", "continuation_id": thread})
        assert "limit of 3 exchanges" in error_text(refused)
        assert len(upstream.received) == before  # refused before any upstream call
    assert [
        (turn, role, content) for turn, role, content, _, _ in stored_messages(database_url, thread)
    ] == [
        (0, "user", "What is GCRA?"),
        (0, "assistant", "answer one"),
        (1, "user", "How does it refill?"),
        (1, "assistant", "answer two"),
        (2, "user", "Thanks."),
        (2, "assistant", "answer three"),
    ]


async def test_history_embedded_in_a_prompt_is_stripped_before_it_is_stored_or_sent(
    chat_server: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    question = "How should the upstream client retry failed calls?"
    upstream.script(Reply(RETRY_ANSWER), Reply("Start with requests per minute."))
    # What an IDE agent sends when it re-embeds the conversation (the seed's 4.7 M-token bug).
    embedded = (
        "=== CONVERSATION HISTORY (CONTINUATION) ===\n"
        "Thread: earlier\nTurn 2/20\n"
        "You are continuing this conversation thread from where it left off.\n\n"
        f"--- Turn 1 (Agent) ---\n{question}\n\n"
        f"--- Turn 1 (fake using chat) ---\n{RETRY_ANSWER}\n\n"
        "=== END CONVERSATION HISTORY ===\n\n"
        "=== NEW USER INPUT ===\n"
        "Given that, which limit should I configure first?"
    )
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        first = await caller.chat(question)
        thread = first["continuation_id"]
        second = await caller.chat(embedded, continuation_id=thread)
    assert second["history_stripped_tokens"] > 100
    sent = _sent(upstream)
    assert sent[-1] == {
        "role": "user",
        "content": "Given that, which limit should I configure first?",
    }
    assert sum(m["content"].count("three is plenty") for m in sent) == 1  # history sent once
    stored = [content for _, role, content, _, _ in stored_messages(database_url, thread)]
    assert stored[2] == "Given that, which limit should I configure first?"
    assert sum(text.count("three is plenty") for text in stored) == 1  # and stored once


async def test_the_newest_copy_of_a_file_wins_in_the_history(
    chat_server: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        first = await caller.chat(
            "Review this.",
            files=[
                {"path": "limits.py", "content": "RATE = 1  # version one"},
                {"path": "README", "content": "read me"},
            ],
        )
        thread = first["continuation_id"]
        await caller.chat(
            "I changed it.",
            continuation_id=thread,
            files=[{"path": "limits.py", "content": "RATE = 2  # version two"}],
        )
        sent = "\n".join(m["content"] for m in _sent(upstream))
        assert "version one" not in sent  # the current turn's copy replaces it
        assert sent.count("File: limits.py") == 1
        assert "read me" in sent
        await caller.chat("And now?", continuation_id=thread)
        sent = "\n".join(m["content"] for m in _sent(upstream))
        assert "version two" in sent
        assert "version one" not in sent
        assert sent.count("File: limits.py") == 1
    files = [
        (turn, tool, paths) for turn, _, _, tool, paths in stored_messages(database_url, thread)
    ]
    assert (0, "file", ["limits.py"]) in files
    assert (1, "file", ["limits.py"]) in files
    assert (0, "chat", ["limits.py", "README"]) in files


async def test_streamed_text_arrives_as_progress(
    chat_server: ServerProcess, upstream: FakeOpenAI
) -> None:
    upstream.script(StreamReply(chunks=("Hel", "lo ", "there")))
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        reply = await caller.call("chat", {"prompt": "Say hello."}, progress=True)
    assert reply["result"]["structuredContent"]["content"] == "Hello there"
    assert [
        p["message"] for p in caller.progress if p.get("message") in ("Hel", "lo ", "there")
    ] == [
        "Hel",
        "lo ",
        "there",
    ]
    assert upstream.received[-1].body["stream"] is True


async def test_each_upstream_call_writes_exactly_one_usage_row(
    chat_server: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    upstream.script(Reply("a", usage=(40, 9)), Status(500), Reply("b", usage=(50, 11)))
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, session_id = await _caller(ws)
        first = await caller.chat("one")
        failed = await caller.call("chat", {"prompt": "two"})
        assert "failed (500)" in error_text(failed)
        await caller.chat("three", continuation_id=first["continuation_id"])
        # A turn's answer is returned after its critical write, which covers the usage row
        # written before it: no waiting needed.
        rows = query(
            database_url,
            "select provider, model, input_tokens, output_tokens, estimated from token_usage"
            " where session_id = %s order by created_at",
            (session_id,),
        )
    assert rows == [
        ("fake", "fake-model", 40, 9, False),
        ("fake", "fake-model", 50, 11, False),
    ]
    # At the session's end the limiter forgets it, reporting its totals (the failed call
    # counts as a request, with no tokens).
    await wait_until(
        lambda: any(
            e.get("event") == "upstream.session_closed" and e.get("session_id") == session_id
            for e in chat_server.log_events()
        ),
        what="the limiter to close the session",
    )
    (closed,) = [
        e
        for e in chat_server.log_events()
        if e.get("event") == "upstream.session_closed" and e.get("session_id") == session_id
    ]
    assert (closed["requests"], closed["input_tokens"], closed["output_tokens"]) == (3, 90, 20)


async def test_upstream_429_is_a_retry_later_error_with_its_retry_after(
    chat_server: ServerProcess, upstream: FakeOpenAI
) -> None:
    upstream.script(Status(429, retry_after="30"))
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        reply = await caller.call("chat", {"prompt": "hello"})
    error = reply["error"]
    assert error["code"] == -32004
    assert "429" in error["message"]
    assert error["data"]["limit"] == "upstream_rate_limit"
    assert error["data"]["retry_after"] == 30
    assert error["data"]["retryAfterMs"] == 30_000


async def test_an_open_breaker_fails_at_once_with_a_retry_later_error(
    chat_server: ServerProcess, upstream: FakeOpenAI
) -> None:
    upstream.script(Status(500), Status(503))
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        for _ in range(2):
            failed = await caller.call("chat", {"prompt": "hi", "model": "flaky-model"})
            assert "upstream 'flaky' failed" in error_text(failed)
        before = len(upstream.received)
        reply = await caller.call("chat", {"prompt": "hi", "model": "flaky-model"})
        assert len(upstream.received) == before  # not tried
        error = reply["error"]
        assert error["code"] == -32004
        assert "circuit breaker is open" in error["message"]
        assert error["data"]["limit"] == "provider_circuit_open"
        assert error["data"]["provider"] == "flaky"
        assert 0 < error["data"]["retry_after"] <= 600
        # The other providers are not affected.
        assert (await caller.chat("hi"))["provider"] == "fake"


async def test_the_rate_limiter_refuses_with_the_limit_named(
    chat_server: ServerProcess, upstream: FakeOpenAI
) -> None:
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        first = await caller.chat("hi", model="limited-model")
        assert first["provider"] == "limited"
        before = len(upstream.received)
        reply = await caller.call("chat", {"prompt": "again", "model": "limited-model"})
        assert len(upstream.received) == before
    error = reply["error"]
    assert error["code"] == -32004
    assert error["data"]["limit"] == "provider_requests_per_minute"
    assert 0 < error["data"]["retry_after"] <= 60
    assert "requests/min" in error["message"]


async def test_bad_continuations_are_refused_clearly(chat_server: ServerProcess) -> None:
    async with open_raw(chat_server.authed_url(ALICE)) as ws:
        caller, _ = await _caller(ws)
        unknown = await caller.call(
            "chat", {"prompt": "hi", "continuation_id": "0b5c8f6e-4a52-4c9e-9d0e-6f2b3a1c7d11"}
        )
        assert "unknown continuation_id" in error_text(unknown)
        malformed = await caller.call("chat", {"prompt": "hi", "continuation_id": "nope"})
        assert malformed["error"]["code"] == -32602
        assert "continuation_id" in malformed["error"]["message"]


async def test_without_a_provider_chat_says_how_to_configure_one_and_echo_works(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("no-provider")
    # An identity of its own: `threads` lists the caller's threads, and other tests' servers
    # on this database chat as `default`.
    identity, token = f"lonely_{secrets.token_hex(4)}", "test_" + secrets.token_urlsafe(24)
    server = start_server(
        state, database_url=database_url, extra_env={"EXAI_CLIENT_TOKENS": f"{identity}={token}"}
    )
    try:
        async with open_raw(server.authed_url(token)) as ws:
            caller, _ = await _caller(ws)
            text = error_text(await caller.call("chat", {"prompt": "hello"}))
            assert "no upstream LLM provider is configured" in text
            assert "EXAI_UPSTREAM_BASE_URL" in text
            echoed = await caller.call("echo", {"text": "still here"})
            assert echoed["result"]["content"][0]["text"] == "still here"
            listed = await caller.call("threads", {})
            assert listed["result"]["structuredContent"] == {"threads": [], "next_cursor": None}
    finally:
        assert server.stop() == 0, server.stderr_path.read_text()
