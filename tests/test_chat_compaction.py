"""Compaction of long threads and calibrated token counts (docs/chat.md, Compaction), through a
real ``exai serve`` and the loopback OpenAI-compatible server, asserting what is sent upstream.

The fake upstream answers from what it is asked (``FakeOpenAI.respond``): a summary request
(its system message is the summariser's instructions) gets ``SUMMARY 1-<n>`` (the exchanges it
covers) or what the test queued for it; a turn gets ``answer <i>``. So a turn's request and the
summary that runs after it may reach the upstream in any order and still get their own answers.
A test that expects a summary waits for its row (or its failure in the log) before the next
turn: the next turn then certainly reads it.

Every exchange is 25 + 25 tokens (characters / 4) and the threshold is 300 tokens: a thread
first compacts after its 7th exchange (350 tokens), exchanges 1-4, keeping 5-7 verbatim; then
every 3 exchanges, so 30 turns compact 8 times.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from actors.conversation.compaction import INSTRUCTIONS, plan_compaction
from actors.conversation.history import HistoryBudget, Summary, Turn, compose
from actors.conversation.owners import owner_id
from actors.providers import ChatMessage
from runtime.config import ChatLimits
from tests.chat_support import (
    ALICE,
    Caller,
    error_text,
    provider_table,
    query,
    upstream_thread,
    write_config,
)
from tests.fake_openai import Behaviour, FakeOpenAI, Hang, Received, Reply, Status
from tests.harness import RawClient, ServerProcess, open_raw, start_server, wait_until

CHAT = (
    "compaction_threshold_tokens = 300\ncompaction_keep_turns = 3\nmax_messages = 200\n"
    "compaction_timeout_seconds = 5\n"
    "history_tokens = 50000\n"
)
SUMMARY_HEADER = (
    "Summary of exchanges {first}-{last} of this conversation (they are not repeated below):\n\n"
)


def prompt(i: int) -> str:
    return f"question {i:02d} " + "q" * 88  # 100 characters: 25 tokens


def answer(i: int) -> str:
    return f"answer {i:02d} " + "a" * 90  # 100 characters: 25 tokens


@dataclass
class Upstream:
    """Answers by kind of request, and keeps each kind apart."""

    fake: FakeOpenAI
    summaries: deque[Behaviour] = field(default_factory=deque)
    failing_prompts: dict[str, Behaviour] = field(default_factory=dict)
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)

    def respond(self, request: Received) -> Behaviour:
        messages = request.body["messages"]
        if messages[0] == {"role": "system", "content": INSTRUCTIONS}:
            if self.summaries:
                return self.summaries.popleft()
            # "Write the summary of exchanges 1-N now." -> "SUMMARY 1-N"
            covered = messages[1]["content"].rsplit(" ", 2)[-2]
            return Reply(f"SUMMARY {covered}", usage=None)
        last = messages[-1]["content"]
        for mark, behaviour in self.failing_prompts.items():
            if mark in last:
                return behaviour
        asked = re.search(r"^question (\d\d) ", last, re.MULTILINE)  # files come first
        return Reply(answer(int(asked[1])) if asked else "ok", usage=self.usage.get(last))

    def summary_requests(self, since: int = 0) -> list[str]:
        """The user message of every summary request from the ``since``-th request on."""
        return [
            r.body["messages"][1]["content"]
            for r in self.fake.received[since:]
            if r.body["messages"][0]["content"] == INSTRUCTIONS
        ]

    def turn_requests(self) -> list[list[dict[str, str]]]:
        return [
            r.body["messages"]
            for r in self.fake.received
            if r.body["messages"][0]["content"] != INSTRUCTIONS
        ]


class Node:
    """The module's server, which a test may restart on the same state and database."""

    def __init__(self, state: Path, database_url: str, config: Path) -> None:
        self.state, self.database_url, self.config = state, database_url, config
        self.handle = self._start()

    def _start(self) -> ServerProcess:
        return start_server(
            self.state,
            database_url=self.database_url,
            extra_env={"EXAI_CONFIG": str(self.config)},
        )

    def restart(self) -> None:
        assert self.handle.stop() == 0, self.handle.stderr_path.read_text()
        self.handle = self._start()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with upstream_thread() as fake:
        answers = Upstream(fake)
        fake.respond = answers.respond
        yield answers


@pytest.fixture(scope="module")
def node(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    state = tmp_path_factory.mktemp("compaction")
    base = upstream.fake.base_url
    providers = "\n".join(
        [
            '[upstream]\ndefault_provider = "fake"\n',
            provider_table("fake", base, "fake-model"),
            provider_table("other", base, "other-model"),
        ]
    )
    config = write_config(state / "exai.toml", chat=CHAT, providers=providers)
    server = Node(state, database_url, config)
    yield server
    assert server.handle.stop() == 0, server.handle.stderr_path.read_text()


async def _caller(ws: Any) -> Caller:
    client = RawClient(ws)
    await client.initialize()
    return Caller(client)


def _summaries(url: str, thread: str) -> list[tuple[int, int, str]]:
    rows = query(
        url,
        "select first_turn, last_turn, content from thread_summaries where thread_id = %s"
        " order by last_turn",
        (thread,),
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def _wait_summary(url: str, thread: str, last_turn: int) -> None:
    await wait_until(
        lambda: any(s[1] == last_turn for s in _summaries(url, thread)),
        what=f"the summary through turn {last_turn}",
    )


def _exchange_block(i: int) -> str:
    return f"### Exchange {i + 1}\nUser:\n{prompt(i)}\n\nAssistant:\n{answer(i)}"


def _verbatim(turns: range) -> list[dict[str, str]]:
    out = []
    for i in turns:
        out += [{"role": "user", "content": prompt(i)}, {"role": "assistant", "content": answer(i)}]
    return out


def _assert_incremental(requests: list[str], compactions: list[int]) -> None:
    """The first summary request holds the exchanges it covers; each later one the summary
    before it and only the exchanges since; none a tool result, an error or a file."""
    assert len(requests) == len(compactions)
    assert requests[0] == (
        "Summarise exchanges 1-4:\n\n"
        + "\n\n".join(_exchange_block(i) for i in range(4))
        + "\n\nWrite the summary of exchanges 1-4 now."
    )
    for n, (request, through) in enumerate(zip(requests[1:], compactions[1:], strict=True), 2):
        before = compactions[n - 2]
        assert request == (
            f"The summary so far, of exchanges 1-{before + 1}:\n\nSUMMARY 1-{before + 1}\n\n"
            f"Extend it with exchanges {before + 2}-{through + 1}, which follow it:\n\n"
            + "\n\n".join(_exchange_block(i) for i in range(before + 1, through + 1))
            + f"\n\nWrite the summary of exchanges 1-{through + 1} now."
        )
    for request in requests:
        for mark in ("UPSTREAM-ERROR-MARK", "TOOL-RESULT-MARK", "FILE-MARK", "fails upstream"):
            assert mark not in request


async def test_a_30_turn_thread_compacts_incrementally_and_survives_a_restart(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    upstream.failing_prompts["fails upstream"] = Status(500, "UPSTREAM-ERROR-MARK")
    notes = "FILE-MARK: the design notes\n"
    since = len(upstream.fake.received)
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        first = await caller.chat(prompt(0))
        thread = first["continuation_id"]
        assert first["max_turns"] == 200  # compaction on, max_turns not set: 200
        # A turn that fails stores nothing: its error can reach no summary.
        failed = await caller.call(
            "chat", {"prompt": "this one fails upstream", "continuation_id": thread}
        )
        assert "UPSTREAM-ERROR-MARK" in error_text(failed)
        await caller.chat(
            prompt(1), continuation_id=thread, files=[{"path": "notes.md", "content": notes}]
        )
        # A tool result recorded in the thread (role 'tool'): never summarised either.
        query(
            database_url,
            "insert into messages (id, thread_id, turn_index, role, content, tool_name)"
            " values (gen_random_uuid(), %s, 1, 'tool', 'TOOL-RESULT-MARK', 'search')"
            " returning id",
            (thread,),
        )
        compactions: list[int] = []
        for i in range(2, 30):
            out = await caller.chat(prompt(i), continuation_id=thread)
            if out["compacting"]:
                # Everything but the newest 3 exchanges: through turn i - 3.
                compactions.append(i - 3)
                await _wait_summary(database_url, thread, i - 3)
            if i == 6:
                # 7 exchanges = 350 tokens > 300: compacts after the 7th, not before.
                assert compactions == [3]
            if i == 7:
                # The summary, then the turns after it verbatim (their files with them),
                # then the prompt; the summarised turn's file rides in the summary.
                sent = upstream.turn_requests()[-1]
                assert sent == [
                    {
                        "role": "system",
                        "content": SUMMARY_HEADER.format(first=1, last=4)
                        + "SUMMARY 1-4\n\nFiles attached in those exchanges (newest copy of each):"
                        + "\n\nFile: notes.md\n```\n"
                        + notes
                        + "\n```",
                    },
                    *_verbatim(range(4, 7)),
                    {"role": "user", "content": prompt(7)},
                ]
                assert out["history_summarised_turns"] == 4
                assert out["history_turns"] == 3
        last = out
    # Compacted again and again, each time extending the summary before it.
    assert compactions == [3, 6, 9, 12, 15, 18, 21, 24]
    _assert_incremental(upstream.summary_requests(since), compactions)
    stored = _summaries(database_url, thread)
    assert [(s[0], s[1]) for s in stored] == [(0, t) for t in compactions]

    # The 30th turn: summary, then every exchange after it verbatim (at least the last 3).
    through = compactions[-1]
    assert last["turn"] == 30
    final = upstream.turn_requests()[-1]
    assert final[0]["content"].startswith(
        SUMMARY_HEADER.format(first=1, last=through + 1) + f"SUMMARY 1-{through + 1}\n\n"
    )
    assert final[1:] == [
        *_verbatim(range(through + 1, 29)),
        {"role": "user", "content": prompt(29)},
    ]
    assert 29 - (through + 1) >= 3

    # Usage: one row per summary, purpose 'compaction', with the thread and its owner.
    rows = query(
        database_url,
        "select purpose, owner_id, count(*) from token_usage where thread_id = %s"
        " group by 1, 2 order by 1",
        (thread,),
    )
    owner = owner_id("alice")
    assert rows == [("chat", owner, 30), ("compaction", owner, len(compactions))]

    # A restart: the summary is read back from Postgres.
    node.restart()
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        out = await caller.chat(prompt(30), continuation_id=thread)
        # Exchanges 26-31 pass the threshold again: wait for that summary, so that it takes
        # no answer meant for the next test.
        assert out["compacting"] is True
        await _wait_summary(database_url, thread, 27)
    assert out["history_summarised_turns"] == through + 1
    sent = upstream.turn_requests()[-1]
    assert sent[0] == final[0]
    assert sent[1:] == [*_verbatim(range(through + 1, 30)), {"role": "user", "content": prompt(30)}]


async def test_a_failing_summariser_never_fails_a_turn_and_is_retried_later(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    upstream.summaries.extend([Status(429, "slow down"), Status(500, "summariser broke"), Hang()])
    since = len(upstream.fake.received)
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        first = await caller.chat(prompt(0), model="other-model")
        thread = first["continuation_id"]
        for i in range(1, 7):
            out = await caller.chat(prompt(i), continuation_id=thread, model="other-model")
            assert out["compacting"] is (i == 6)  # after the 7th: the summary gets the 429

        def failures() -> list[str]:
            return [
                e["error"]
                for e in node.handle.log_events()
                if e.get("event") == "chat.compaction_failed" and e.get("thread_id") == thread
            ]

        await wait_until(lambda: len(failures()) == 1, what="the first failed compaction")
        # The next turn goes through on today's truncation (no summary), and tries again.
        out = await caller.chat(prompt(7), continuation_id=thread, model="other-model")
        assert out["compacting"] is True
        assert out["history_summarised_turns"] == 0
        assert upstream.turn_requests()[-1] == [
            *_verbatim(range(7)),
            {"role": "user", "content": prompt(7)},
        ]
        await wait_until(lambda: len(failures()) == 2, what="the second failed compaction")
        out = await caller.chat(prompt(8), continuation_id=thread, model="other-model")
        assert out["compacting"] is True  # third try: the upstream never answers
        await wait_until(lambda: len(failures()) == 3, what="the compaction's timeout")
        assert failures() == ["ProviderRateLimited", "ProviderServerError", "timeout"]
        out = await caller.chat(prompt(9), continuation_id=thread, model="other-model")
        assert out["compacting"] is True  # fourth try: the upstream answers
        await _wait_summary(database_url, thread, 6)
        out = await caller.chat(prompt(10), continuation_id=thread, model="other-model")
        assert out["history_summarised_turns"] == 7
        assert upstream.turn_requests()[-1][1:] == [
            *_verbatim(range(7, 10)),
            {"role": "user", "content": prompt(10)},
        ]
    # Each try asked for everything but the newest 3 exchanges at the time.
    assert upstream.summary_requests(since) == [
        f"Summarise exchanges 1-{n}:\n\n"
        + "\n\n".join(_exchange_block(i) for i in range(n))
        + f"\n\nWrite the summary of exchanges 1-{n} now."
        for n in (4, 5, 6, 7)
    ]
    rows = query(
        database_url,
        "select provider, model, purpose from token_usage where thread_id = %s and"
        " purpose = 'compaction'",
        (thread,),
    )
    assert rows == [("other", "other-model", "compaction")]  # failed calls used no tokens


async def test_token_counts_are_calibrated_from_the_reported_prompt_tokens(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    first_prompt = "calibrate " + "c" * 390  # 400 characters: 100 tokens estimated
    second_prompt = "calibrate again " + "d" * 384
    # The upstream counts twice the estimate, then three times it.
    upstream.usage[first_prompt] = (200, 5)
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        first = await caller.chat(first_prompt)
        assert first["prompt_tokens"] == {
            "estimated": 100,
            "calibrated": 100,  # nothing measured yet
            "reported": 200,
            "ratio": 2.0,
        }
        thread = first["continuation_id"]
        # Sent second: the first prompt, its answer ("ok", 1 token) and this one = 201.
        upstream.usage[second_prompt] = (603, 5)
        second = await caller.chat(second_prompt, continuation_id=thread)
        assert second["prompt_tokens"] == {
            "estimated": 201,
            "calibrated": 402,  # 201 x 2.0
            "reported": 603,
            "ratio": 2.5,  # 2.0 and 3.0, equally weighted
        }
    row = query(
        database_url,
        "select token_ratio, token_ratio_model, prompt_tokens_estimated, prompt_tokens_reported"
        " from threads where id = %s",
        (thread,),
    )
    assert row == [(2.5, "fake-model", 201, 603)]
    # The thread's metadata in `threads` shows estimate and actual beside each other.
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        listed = await (await _caller(ws)).call("threads", {})
    (info,) = [
        t
        for t in listed["result"]["structuredContent"]["threads"]
        if t["continuation_id"] == thread
    ]
    assert (info["prompt_tokens_estimated"], info["prompt_tokens_reported"]) == (201, 603)
    assert info["token_ratio"] == 2.5


def test_max_turns_defaults_to_200_with_compaction_and_explicit_config_wins() -> None:
    assert ChatLimits().max_turns == 200
    assert ChatLimits(compaction=False).max_turns == 20
    assert ChatLimits(max_turns=7).max_turns == 7
    assert ChatLimits(compaction=False, max_turns=300).max_turns == 300


def test_compaction_starts_when_the_next_history_would_lose_an_exchange() -> None:
    """``max_messages`` reached long before the token threshold: the thread compacts as soon
    as the next turn's history would leave an exchange out (it would be neither sent nor
    summarised), and its summary then takes one message of the budget."""
    limits = ChatLimits(max_messages=8)  # 4 exchanges; the 40,000-token threshold is far
    budget = HistoryBudget(
        tokens=limits.history_tokens, max_messages=8, message_tokens=limits.message_tokens
    )
    turns = [Turn(i, prompt(i), answer(i)) for i in range(5)]
    assert compose(turns[:4], budget, summary=None).omitted_turns == 0
    upcoming = compose(turns, budget, summary=None)
    assert upcoming.omitted_turns == 1
    assert plan_compaction(turns, None, limits, 1.0) is None  # by size alone: no
    plan = plan_compaction(turns, None, limits, 1.0, truncated=True)
    assert plan is not None
    assert (plan.first_turn, plan.last_turn) == (0, 1)  # all but the newest 3
    # The summary of exchanges 1-2 and exchanges 3-5 verbatim: 7 messages, nothing lost.
    history = compose(turns, budget, summary=Summary(0, 1, "SUMMARY 1-2"))
    assert (history.summarised_turns, history.turns, history.omitted_turns) == (2, 3, 0)
    assert history.messages[1:] == [
        ChatMessage(role=m["role"], content=m["content"]) for m in _verbatim(range(2, 5))
    ]
