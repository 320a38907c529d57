"""``threads`` with ``query``: finding the caller's own threads (storage/thread_search.py).

One server for the module, with two clients of its own (searcher, stranger: names no other
module uses, since the database is shared by the whole run and a name owns its threads on
every server). Threads are made through ``chat`` against the loopback OpenAI server, except
where a test needs a message no client could send in one call (inserted with SQL, as the
persistence actor would write it).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from actors.conversation.owners import owner_id
from storage.thread_search import QUERY_BYTES, QUERY_CHARS, SEARCH_CHARS
from tests.chat_support import Caller, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import RawClient, ServerProcess, open_raw, start_server

SEARCHER = "searcher-token-0123456789abcd"
STRANGER = "stranger-token-0123456789abcd"
CJK_USER = "cjk-user-token-0123456789abcde"
LONG_USER = "long-user-token-0123456789abcd"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("search")
    config = write_config(
        Path(state) / "exai.toml",
        clients={
            "searcher": SEARCHER,
            "stranger": STRANGER,
            "cjk-user": CJK_USER,
            "long-user": LONG_USER,
        },
        providers=provider_table("fake", upstream.base_url, "fake-model"),
    )
    handle = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def _caller(ws: Any) -> Caller:
    caller = Caller(RawClient(ws))
    await caller.client.initialize()
    return caller


async def _search(caller: Caller, query: str, **arguments: Any) -> dict[str, Any]:
    reply = await caller.call("threads", {"query": query, **arguments})
    assert "result" in reply, reply
    assert reply["result"]["isError"] is False, reply
    page: dict[str, Any] = reply["result"]["structuredContent"]
    return page


async def _all_pages(caller: Caller, query: str, limit: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        arguments: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            arguments["cursor"] = cursor
        page = await _search(caller, query, **arguments)
        assert len(page["threads"]) <= limit
        found.extend(page["threads"])
        cursor = page["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("paging did not end")


def _ids(threads: list[dict[str, Any]]) -> list[str]:
    return [t["continuation_id"] for t in threads]


async def _refused(caller: Caller, arguments: dict[str, Any]) -> str:
    """The -32602 message of a refused call (the harness speaks a protocol version in which
    invalid input is a JSON-RPC error)."""
    reply = await caller.call("threads", arguments)
    assert "error" in reply, reply
    assert reply["error"]["code"] == -32602, reply
    return str(reply["error"]["message"])


async def test_search_finds_only_the_caller_s_threads_newest_first_each_once(
    server: ServerProcess, upstream: FakeOpenAI
) -> None:
    async with (
        open_raw(server.authed_url(SEARCHER)) as mine,
        open_raw(server.authed_url(STRANGER)) as theirs,
    ):
        searcher = await _caller(mine)
        stranger = await _caller(theirs)
        # The stranger's thread matches every query below, and is the newest of all.
        made = [
            (await searcher.chat(f"Zebra crossing number {n}\nstriped details"))["continuation_id"]
            for n in range(5)
        ]
        other = (await searcher.chat("nothing striped here, only horses"))["continuation_id"]
        upstream.script(Reply("A quagga was a half-striped zebra relative."))
        by_answer = (await searcher.chat("tell me about extinct equids"))["continuation_id"]
        await searcher.chat("and the zebra's stripes?", continuation_id=made[1])  # now newest
        foreign = (await stranger.chat("zebra quagga striped"))["continuation_id"]

        newest_first = [made[1], made[4], made[3], made[2], made[0]]
        assert _ids(await _all_pages(searcher, "zebra", limit=2)) == [
            made[1],
            by_answer,
            *newest_first[1:],
        ]
        for limit in (1, 3, 100):
            assert _ids(await _all_pages(searcher, "zebra -quagga", limit=limit)) == newest_first
        assert _ids(await _all_pages(searcher, "QUAGGA", limit=5)) == [by_answer]
        assert _ids(await _all_pages(searcher, '"crossing number 3"', limit=5)) == [made[3]]
        assert _ids(await _all_pages(searcher, "horses or quagga", limit=5)) == [
            by_answer,
            other,
        ]
        assert _ids(await _all_pages(stranger, "zebra", limit=5)) == [foreign]

        page = await _search(searcher, "zebra", limit=1)
        (top,) = page["threads"]
        assert top["continuation_id"] == made[1]
        # The newest matching message of the thread, marked; the title is its first prompt.
        assert "«zebra»'s stripes" in top["snippet"]
        assert (top["title"], top["turns"], top["remaining_exchanges"]) == (
            "Zebra crossing number 1",
            2,
            198,  # max_turns is 200 with compaction on (the default)
        )
        text = (await searcher.call("threads", {"query": "zebra", "limit": 1}))["result"]
        shown = text["content"][0]["text"]
        for part in (made[1], "\n    ", "«zebra»", "next_cursor: "):
            assert part in shown

        # A listing without query is as it was: no snippet.
        listed = (await searcher.call("threads", {"limit": 1}))["result"]["structuredContent"]
        assert listed["threads"][0]["snippet"] is None
        assert (await _search(searcher, "unicorn"))["threads"] == []


async def test_cjk_queries_match_substrings_of_the_caller_s_messages(
    server: ServerProcess, upstream: FakeOpenAI
) -> None:
    async with open_raw(server.authed_url(CJK_USER)) as ws:
        user = await _caller(ws)
        chinese = (await user.chat("我喜欢机器学习和自然语言处理。"))["continuation_id"]
        upstream.script(Reply("東京タワーに行きました。"))
        japanese = (await user.chat("週末は何をしましたか"))["continuation_id"]
        korean = (await user.chat("내일 서울에서 만나요"))["continuation_id"]
        mixed = (await user.chat("GLM-4 模型 的 上下文 长度 100% 够用"))["continuation_id"]

        # simple's parser reads "我喜欢机器学习和自然语言处理" as one word: a CJK query is
        # matched as substrings instead, each space-separated term somewhere in one message.
        (hit,) = (await _search(user, "机器学习"))["threads"]
        assert hit["continuation_id"] == chinese
        assert "«机器学习»" in hit["snippet"]
        assert _ids((await _search(user, "タワー"))["threads"]) == [japanese]
        assert _ids((await _search(user, "서울"))["threads"]) == [korean]
        assert _ids((await _search(user, "glm 模型"))["threads"]) == [mixed]
        assert _ids((await _search(user, "模型 机器"))["threads"]) == []  # not in one message
        # LIKE's wildcards are literal: "%" is only a percent sign, "_" an underscore.
        assert _ids((await _search(user, "100% 模型"))["threads"]) == [mixed]
        assert _ids((await _search(user, "机_学习"))["threads"]) == []
        assert _ids((await _search(user, "%机%"))["threads"]) == []
        # Without a CJK character it is word search again: "GLM-4" is a word of that thread.
        assert _ids((await _search(user, "glm-4"))["threads"]) == [mixed]


async def test_hostile_queries_and_cursors_are_refused_or_harmless(
    server: ServerProcess, database_url: str
) -> None:
    async with open_raw(server.authed_url(SEARCHER)) as ws:
        searcher = await _caller(ws)
        thread = (await searcher.chat("robust o'brien; select * from messages --"))[
            "continuation_id"
        ]
        for query in (
            "'; drop table messages; --",
            "o'brien",
            "!!zebra & | <-> :* (( ))",
            '"unbalanced',
            "zebra:* | !!!x",
            "\\x00 %% _ \\",
            "select * from messages",
        ):
            page = await _search(searcher, query)  # a result, whatever it holds
            assert isinstance(page["threads"], list)
        assert thread in _ids((await _search(searcher, "o'brien"))["threads"])
        assert query_rows(database_url, "select count(*) from messages")[0][0] > 0

        too_many_chars = await _refused(searcher, {"query": "z" * 100_000})
        assert f"at most {QUERY_CHARS} characters" in too_many_chars
        assert len(too_many_chars) < 300
        too_many_bytes = await _refused(searcher, {"query": "字" * QUERY_CHARS})
        assert f"{3 * QUERY_CHARS} bytes in UTF-8, at most {QUERY_BYTES}" in too_many_bytes
        assert "no letter or digit" in await _refused(searcher, {"query": "!!! &&& "})
        assert "no letter or digit" in await _refused(searcher, {"query": ""})
        assert "U+0000" in await _refused(searcher, {"query": "zebra\x00"})
        assert "has 9 terms" in await _refused(
            searcher, {"query": "字 " + " ".join(f"t{i}" for i in range(8))}
        )

        bad_cursor = await _refused(searcher, {"query": "zebra", "cursor": "x" * 100_000})
        assert "invalid cursor" in bad_cursor
        assert "truncated, 100000 chars" in bad_cursor
        assert len(bad_cursor) < 300
        listing_bad_cursor = await _refused(searcher, {"cursor": "y" * 100_000})
        assert len(listing_bad_cursor) < 300


def query_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


async def test_long_messages_are_stored_and_searched_in_their_first_characters(
    server: ServerProcess, database_url: str
) -> None:
    """The index bounds each message to SEARCH_CHARS characters, so a message whose whole
    text would overflow a tsvector (1 MiB of lexemes) is still stored; the words after the
    bound are not found (a documented limit). The planner can use the index. Expired threads
    are found only with include_expired."""
    # Distinct hyphenated words (each indexed whole and in parts): about 1.2 million
    # characters of them hold more than the 1 MiB of lexemes a whole tsvector may.
    worst = "".join(f"{i:x}q-{i:x}r " for i in range(90_000))
    head = "firstpart " + worst[:SEARCH_CHARS]
    content = head + " afterthebound " + worst
    thread_id = uuid4()
    now = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("select to_tsvector('simple', %s)", (content,))
        conn.rollback()
        conn.execute(
            "insert into threads (id, owner_id, tool_name, title, turn_count, created_at,"
            " updated_at, expires_at) values (%s, %s, 'chat', 'long', 1, %s, %s, %s)",
            (thread_id, owner_id("long-user"), now, now, now + timedelta(hours=1)),
        )
        conn.execute(
            "insert into messages (id, thread_id, turn_index, role, content, tool_name)"
            " values (%s, %s, 0, 'user', %s, 'chat')",
            (uuid4(), thread_id, content),
        )
        expired = uuid4()
        conn.execute(
            "insert into threads (id, owner_id, tool_name, title, turn_count, created_at,"
            " updated_at, expires_at) values (%s, %s, 'chat', 'old', 1, %s, %s, %s)",
            (expired, owner_id("long-user"), now, now, now - timedelta(seconds=1)),
        )
        conn.execute(
            "insert into messages (id, thread_id, turn_index, role, content, tool_name)"
            " values (%s, %s, 0, 'assistant', 'an expiredword answer', 'chat')",
            (uuid4(), expired),
        )
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "explain select 1 from messages m where m.role in ('user', 'assistant')"
                " and m.tool_name is distinct from 'file' and to_tsvector('simple',"
                f" left(m.content, {SEARCH_CHARS})) @@ websearch_to_tsquery('simple', 'x')"
            )
        )
        assert "messages_search_idx" in plan, plan
    async with open_raw(server.authed_url(LONG_USER)) as ws:
        user = await _caller(ws)
        (hit,) = (await _search(user, "firstpart"))["threads"]
        assert hit["continuation_id"] == str(thread_id)
        assert len(hit["snippet"]) <= 240
        assert (await _search(user, "afterthebound"))["threads"] == []
        # Expired threads only when asked for, as in the listing.
        assert (await _search(user, "expiredword"))["threads"] == []
        (old,) = (await _search(user, "expiredword", include_expired=True))["threads"]
        assert (old["continuation_id"], old["expired"]) == (str(expired), True)
