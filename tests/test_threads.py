"""The ``threads`` tool, threads surviving a restart, and threads expiring.

Each server here has clients of its own (carol, dave, erin): the database is shared by the
whole run, and a client's threads are found by its identity on every server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chat_support import Caller, error_text, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import RawClient, ServerProcess, open_raw, start_server

CAROL = "carol-token-0123456789abcd"
DAVE = "dave-token-0123456789abcde"
ERIN = "erin-token-0123456789abcde"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


def _config(state: Path, upstream: FakeOpenAI, *, chat: str = "") -> dict[str, str]:
    config = write_config(
        state / "exai.toml",
        chat=chat,
        clients={"carol": CAROL, "dave": DAVE, "erin": ERIN},
        providers=provider_table("fake", upstream.base_url, "fake-model"),
    )
    return {"EXAI_CONFIG": str(config)}


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("threads")
    handle = start_server(state, database_url=database_url, extra_env=_config(state, upstream))
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def _caller(ws: Any) -> Caller:
    caller = Caller(RawClient(ws))
    await caller.client.initialize()
    return caller


async def _page(caller: Caller, **arguments: Any) -> dict[str, Any]:
    reply = await caller.call("threads", arguments)
    assert reply["result"]["isError"] is False, reply
    page: dict[str, Any] = reply["result"]["structuredContent"]
    return page


async def test_threads_lists_the_caller_s_threads_newest_first_in_pages(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url(CAROL)) as ws:
        carol = await _caller(ws)
        made = [(await carol.chat(f"topic {n}\nwith details"))["continuation_id"] for n in range(3)]
        await carol.chat("more on topic 0", continuation_id=made[0])  # now the most recent

        first = await _page(carol, limit=2)
        assert [t["continuation_id"] for t in first["threads"]] == [made[0], made[2]]
        assert first["next_cursor"] is not None
        second = await _page(carol, limit=2, cursor=first["next_cursor"])
        assert [t["continuation_id"] for t in second["threads"]] == [made[1]]
        assert second["next_cursor"] is None

        top = first["threads"][0]
        assert top["title"] == "topic 0"
        assert (top["turns"], top["remaining_exchanges"], top["expired"]) == (2, 198, False)
        assert top["last_activity"] < top["expires_at"]

        text = (await carol.call("threads", {"limit": 1}))["result"]["content"][0]["text"]
        assert made[0] in text
        assert "2/200 exchanges (198 left)" in text
        assert "next_cursor: " in text

        bad = await carol.call("threads", {"cursor": "not-one-of-ours"})
        assert bad["error"]["code"] == -32602
        assert "cursor" in bad["error"]["message"]


async def test_threads_survive_a_restart(
    database_url: str, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = _config(tmp_path, upstream)
    upstream.script(Reply("remembered one"), Reply("remembered two"), Reply("still here"))
    first = start_server(state, database_url=database_url, extra_env=env)
    try:
        async with open_raw(first.authed_url(DAVE)) as ws:
            dave = await _caller(ws)
            thread = (await dave.chat("remember one"))["continuation_id"]
            await dave.chat("remember two", continuation_id=thread)
    finally:
        assert first.stop() == 0, first.stderr_path.read_text()

    second = start_server(state, database_url=database_url, extra_env=env)
    try:
        async with open_raw(second.authed_url(DAVE)) as ws:
            dave = await _caller(ws)
            third = await dave.chat("what did I ask?", continuation_id=thread)
            assert (third["turn"], third["history_turns"]) == (3, 2)
            assert [m["content"] for m in upstream.received[-1].body["messages"]] == [
                "remember one",
                "remembered one",
                "remember two",
                "remembered two",
                "what did I ask?",
            ]
            (listed,) = [
                t for t in (await _page(dave))["threads"] if t["continuation_id"] == thread
            ]
            assert listed["turns"] == 3
    finally:
        assert second.stop() == 0, second.stderr_path.read_text()


async def test_a_thread_expires_after_its_time_to_live(
    database_url: str, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    env = _config(tmp_path, upstream, chat="thread_ttl_seconds = 0.5")
    server = start_server(tmp_path / "state", database_url=database_url, extra_env=env)
    try:
        async with open_raw(server.authed_url(ERIN)) as ws:
            erin = await _caller(ws)
            thread = (await erin.chat("short-lived"))["continuation_id"]
            # The server's clock decides; poll its view until the thread has expired.
            with trio.fail_after(30):
                while True:
                    page = await _page(erin, include_expired=True)
                    (entry,) = [t for t in page["threads"] if t["continuation_id"] == thread]
                    if entry["expired"]:
                        break
                    await trio.sleep(0.05)
            refused = await erin.call("chat", {"prompt": "still there?", "continuation_id": thread})
            assert f"thread {thread} expired at" in error_text(refused)
            live = await _page(erin)
            assert thread not in [t["continuation_id"] for t in live["threads"]]
    finally:
        assert server.stop() == 0, server.stderr_path.read_text()
