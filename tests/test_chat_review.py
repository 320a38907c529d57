"""Review of issue #19 (compaction, token counts, thread search) as a hostile client or a
careless operator would use it, through a real ``exai serve`` and the loopback upstream.

The upstream and its helpers are those of ``tests/test_chat_compaction.py``: every exchange is
25 + 25 tokens and the threshold 300, so a thread first compacts after its 7th exchange.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chat_support import ALICE, Caller, provider_table, query, upstream_thread, write_config
from tests.fake_openai import Hang, Reply, Slow, Status
from tests.harness import open_raw, reachable_tempdir, start_server, wait_until
from tests.test_chat_compaction import (
    CHAT,
    Node,
    Upstream,
    _caller,
    _summaries,
    _wait_summary,
    prompt,
)
from tests.test_threads_search import _ids, _refused, _search

SHALOM = "\u05e9\u05dc\u05d5\u05dd"  # Hebrew, written by code point (ruff RUF001)
MOSCOW = "\u043c\u043e\u0441\u043a\u0432\u0430"  # Cyrillic, by code point (RUF001)
SEARCHER = "rev19-searcher-token-0123456789"
STRANGER = "rev19-stranger-token-0123456789"

#: A summary of at most 100 tokens is asked for: a compliant upstream answers at most that.
SUMMARY_TOKENS = 100


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
    state = tmp_path_factory.mktemp("review19")
    providers = '[upstream]\ndefault_provider = "fake"\n\n' + provider_table(
        "fake", upstream.fake.base_url, "fake-model"
    )
    chat = CHAT.replace("compaction_timeout_seconds = 5", "compaction_timeout_seconds = 3600")
    config = write_config(
        state / "exai.toml",
        chat=chat + f"summary_tokens = {SUMMARY_TOKENS}\n",
        providers=providers,
        clients={"alice": ALICE, "rev19-a": SEARCHER, "rev19-b": STRANGER},
    )
    server = Node(state, database_url, config)
    yield server
    assert server.handle.stop() == 0, server.handle.stderr_path.read_text()


async def test_a_summariser_that_ignores_max_tokens_stores_a_bounded_summary(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    # An upstream that ignores max_tokens: 1 MB of summary. Stored whole, it would be read
    # back with every turn, counted into the thread's compactable size (so the thread would
    # compact at every turn) and sent whole to the next summary call as "the summary so far".
    huge = "HUGE SUMMARY " + "s" * 1_000_000
    upstream.summaries.append(Reply(huge, usage=None))
    since = len(upstream.fake.received)
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        thread = (await caller.chat(prompt(0)))["continuation_id"]
        for i in range(1, 7):
            out = await caller.chat(prompt(i), continuation_id=thread)
        assert out["compacting"] is True
        await _wait_summary(database_url, thread, 3)
        [(first, last, content)] = _summaries(database_url, thread)
        assert (first, last) == (0, 3)
        assert content.startswith("HUGE SUMMARY ")
        # At most summary_tokens upstream tokens; a token is never fewer than a quarter of an
        # estimated one (the calibration's floor): 4 x 4 characters per token asked.
        assert len(content) <= 16 * SUMMARY_TOKENS + 100
        [(token_count,)] = query(
            database_url, "select token_count from thread_summaries where thread_id = %s", (thread,)
        )
        assert token_count <= 4 * SUMMARY_TOKENS + 25
        # The next summary extends the bounded one.
        out = await caller.chat(prompt(7), continuation_id=thread)
        assert out["compacting"] is True
        await _wait_summary(database_url, thread, 4)
    requests = upstream.summary_requests(since)
    assert len(requests) == 2
    assert len(requests[1]) < 16 * SUMMARY_TOKENS + 2_000


async def test_concurrent_turns_while_summaries_run_leave_no_gap_and_no_overlap(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    # Every summary is slow, so that turns from three sessions (taking the thread's lock in
    # any order) keep arriving while one runs, and find it busy.
    upstream.summaries.extend(Slow(0.5, Reply(f"SLOW SUMMARY {n}", usage=None)) for n in range(20))
    since = len(upstream.fake.received)
    async with (
        open_raw(node.handle.authed_url(ALICE)) as a,
        open_raw(node.handle.authed_url(ALICE)) as b,
        open_raw(node.handle.authed_url(ALICE)) as c,
    ):
        callers = [await _caller(ws) for ws in (a, b, c)]
        thread = (await callers[0].chat(prompt(0)))["continuation_id"]
        turns: list[dict[str, Any]] = []

        async def continue_with(caller: Caller, numbers: range) -> None:
            for i in numbers:
                turns.append(await caller.chat(prompt(i), continuation_id=thread))

        for first in range(1, 25, 6):
            async with trio.open_nursery() as nursery:
                for k, caller in enumerate(callers):
                    nursery.start_soon(
                        continue_with, caller, range(first + 2 * k, first + 2 * k + 2)
                    )
    assert sorted(t["turn"] for t in turns) == list(range(2, 26))
    upstream.summaries.clear()  # the replies not used: none for the next test
    # Every compaction a turn started (``compacting``) ends stored: none fails here.
    started = sum(1 for t in turns if t["compacting"])
    await wait_until(
        lambda: len(_summaries(database_url, thread)) == started,
        what="every summary started to be stored",
    )
    stored = _summaries(database_url, thread)
    assert stored, "no summary"
    # One range, extended each time: the same first turn, a later last turn.
    assert all(first == 0 for first, _, _ in stored)
    lasts = [last for _, last, _ in stored]
    assert lasts == sorted(set(lasts))
    # Each request extended the summary before it with exactly the exchanges after it.
    requests = upstream.summary_requests(since)
    previous = -1
    for request, last in zip(requests, lasts, strict=True):
        if previous < 0:
            assert request.startswith(f"Summarise exchanges 1-{last + 1}:")
        else:
            assert f"of exchanges 1-{previous + 1}:" in request
            assert f"Extend it with exchanges {previous + 2}-{last + 1}, which" in request
        blocks = [int(n) - 1 for n in re.findall(r"^### Exchange (\d+)$", request, re.M)]
        assert blocks == list(range(previous + 1, last + 1))
        previous = last


async def test_a_thread_of_long_prompts_catches_up_after_a_failed_summary(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    # Prompts of 25,000 tokens: what the summariser is given of each is cut to message_tokens
    # (10,000), so 4 exchanges fit one call's compaction_input_tokens (50,000). Budgeted on
    # their uncut size, every call took one exchange: a thread that missed one compaction
    # (here a 500) never caught up, one new exchange a turn, one summarised.
    upstream.summaries.append(Status(500, "summariser broke"))
    long = "x" * 100_000
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        thread = (await caller.chat(prompt(0) + long))["continuation_id"]
        for i in range(1, 4):
            out = await caller.chat(prompt(i) + long, continuation_id=thread)
        assert out["compacting"] is True  # exchange 1 of 4: it fails

        def failed() -> bool:
            return any(
                e.get("event") == "chat.compaction_failed" and e.get("thread_id") == thread
                for e in node.handle.log_events()
            )

        await wait_until(failed, what="the failed compaction")
        out = await caller.chat(prompt(4) + long, continuation_id=thread)
        assert out["compacting"] is True
        await wait_until(lambda: bool(_summaries(database_url, thread)), what="a summary")
    # Both exchanges the thread owes go in one call.
    assert [(s[0], s[1]) for s in _summaries(database_url, thread)] == [(0, 1)]


async def test_odd_unicode_limits_and_foreign_cursors_in_search(node: Node) -> None:
    async with (
        open_raw(node.handle.authed_url(SEARCHER)) as mine,
        open_raw(node.handle.authed_url(STRANGER)) as theirs,
    ):
        me, stranger = await _caller(mine), await _caller(theirs)
        # Letters whose lower case is longer than they are (U+0130 lowers to "i" + U+0307)
        # before the match: the snippet must still mark the match itself.
        turkish = (await me.chat("İSTANBUL İZMİR İNEGÖL rev19 模型 partner"))["continuation_id"]
        hebrew = (await me.chat(f"rev19 shalom \u200f{SHALOM}\u200f 🎉party zero\u200bwidth"))[
            "continuation_id"
        ]
        theirs_id = (await stranger.chat(f"rev19 模型 {SHALOM} party stranger"))["continuation_id"]

        (hit,) = (await _search(me, "模型"))["threads"]
        assert hit["continuation_id"] == turkish
        assert "«模型»" in hit["snippet"], hit["snippet"]
        # Format characters (RTL marks, zero-width spaces) in a message or a query never fail
        # a search; whether they split words is the database's text parser's call (the
        # report of the #19 review: a mark attached to a word keeps the word from matching).
        assert (await _search(me, "\u200f" + SHALOM))["threads"] is not None
        assert _ids((await _search(me, "🎉 party"))["threads"]) == [hebrew]
        assert _ids((await _search(me, "rev19 模型"))["threads"]) == [turkish]
        for harmless in ("zero\u200bwidth", "e\u0301tude", "\u202eevil\u202c", "a" * 256):
            page = await _search(me, harmless)
            assert theirs_id not in _ids(page["threads"])
        for nothing in ("\u200b\u200f", "🎉🎉", "\u0301", " \u3000 "):
            assert "no letter or digit" in await _refused(me, {"query": nothing})
        assert "at most 256 characters" in await _refused(me, {"query": "a" * 257})
        for limit in (0, -1, 10**9):
            await _refused(me, {"query": "rev19", "limit": limit})

        # A cursor from the stranger's search is only a position: it shows none of theirs.
        (their_hit,) = (await _search(stranger, "rev19", limit=1))["threads"]
        assert their_hit["continuation_id"] == theirs_id
        their_page = await _search(stranger, "party", limit=1)
        assert their_page["next_cursor"] is None
        mine_page = await _search(me, "rev19", limit=1)
        after = await _search(me, "rev19", cursor=mine_page["next_cursor"])
        assert theirs_id not in _ids(mine_page["threads"]) + _ids(after["threads"])
        assert sorted(_ids(mine_page["threads"]) + _ids(after["threads"])) == sorted(
            [turkish, hebrew]
        )


async def test_the_embedded_database_searches_unicode_words_whatever_the_server_s_locale(
    upstream: Upstream,
) -> None:
    # A service manager starts exai with no LANG (the C locale). The embedded cluster's
    # initdb inherited it, and a C-locale PostgreSQL neither lowers non-ASCII letters nor
    # tells punctuation from letters: "ZÜRICH" was the word 'zÜrich' and “hello” (curly
    # quotes) the word '“hello”', so a search for zürich or hello found nothing.
    with reachable_tempdir("exai-review19-") as state:
        await _search_embedded(upstream, state)


async def _search_embedded(upstream: Upstream, state: Path) -> None:
    config = write_config(
        state / "exai.toml",
        providers='[upstream]\ndefault_provider = "fake"\n\n'
        + provider_table("fake", upstream.fake.base_url, "fake-model"),
        clients={"rev19-a": SEARCHER},
    )
    env = {"EXAI_CONFIG": str(config), "LC_ALL": "C", "LANG": "C"}
    handle = start_server(state, database_url=None, extra_env=env)
    try:
        async with open_raw(handle.authed_url(SEARCHER)) as ws:
            me = await _caller(ws)
            thread = (await me.chat(f"ZÜRICH {MOSCOW.upper()}: he said “hello”."))[
                "continuation_id"
            ]
            for word in ("zürich", MOSCOW, "hello"):
                assert _ids((await _search(me, word))["threads"]) == [thread], word
    finally:
        assert handle.stop() == 0, handle.stderr_path.read_text()


async def test_stopping_the_node_abandons_a_summary_call_that_hangs(
    node: Node, upstream: Upstream, database_url: str
) -> None:
    # compaction_timeout_seconds is an hour here: only the stop can end the call.
    upstream.summaries.append(Hang())
    since = len(upstream.fake.received)
    async with open_raw(node.handle.authed_url(ALICE)) as ws:
        caller = await _caller(ws)
        thread = (await caller.chat(prompt(0)))["continuation_id"]
        for i in range(1, 7):
            out = await caller.chat(prompt(i), continuation_id=thread)
        assert out["compacting"] is True
        await wait_until(
            lambda: len(upstream.summary_requests(since)) == 1, what="the summary call"
        )
    # SIGTERM: the node stops (exit 0) well before the hour is up, storing no summary.
    assert node.handle.stop() == 0, node.handle.stderr_path.read_text()
    events = [e.get("event") for e in node.handle.log_events()]
    assert "chat.compactions_cancelled" in events
    assert _summaries(database_url, thread) == []
