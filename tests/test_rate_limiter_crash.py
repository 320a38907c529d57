"""The rate limiter's actor killed under load, through ``exai serve``: it heals as persistence
does (tests/test_durability.py). Calls waiting in it at the crash are answered at once with a
clear "retry in a moment", later calls reach the next incarnation, the supervisor logs the
restart and ``exai status`` shows it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.status_model import NodeStatus
from tests.chat_support import ALICE, Caller, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI
from tests.harness import RawClient, open_raw, start_server, wait_for_status

WAITERS = 8
# One request a minute: after the first call, every other waits in the limiter (up to 300 s).
LIMITED = "[upstream.providers.limited.limits]\nrequests_per_minute = 1\n"
PATIENT = "[upstream.client_limits]\nmax_wait_seconds = 300\n"


async def _caller(ws: Any) -> Caller:
    client = RawClient(ws)
    await client.initialize()
    return Caller(client)


def _limited_waiting(status: NodeStatus) -> int:
    if status.limits is None:
        return 0
    return sum(p.waiting for p in status.limits.providers if p.name == "limited")


def _limiter_actor(status: NodeStatus) -> tuple[str, str, int] | None:
    actor = next((a for a in status.actors if a.path == "/root/rate_limiter"), None)
    return None if actor is None else (actor.kind, actor.state, actor.restarts)


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


async def test_killing_the_rate_limiter_under_load_heals_like_persistence(
    database_url: str, tmp_path: Path, upstream: FakeOpenAI
) -> None:
    base = upstream.base_url
    providers = "\n".join(
        [
            '[upstream]\ndefault_provider = "fake"\n',
            provider_table("fake", base, "fake-model"),
            provider_table("limited", base, "limited-model", LIMITED),
            PATIENT,
        ]
    )
    config = write_config(tmp_path / "exai.toml", providers=providers)
    server = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    try:
        replies: list[dict[str, Any]] = []
        url = server.authed_url(ALICE)

        async def wait_in_the_limiter() -> None:
            async with open_raw(url) as ws:
                caller = await _caller(ws)
                replies.append(
                    await caller.call("chat", {"prompt": "hi", "model": "limited-model"})
                )

        with trio.fail_after(120):  # a guard against a hang, not a timing
            async with open_raw(url) as ws:
                caller = await _caller(ws)
                await caller.chat("spend the minute", model="limited-model")
                async with trio.open_nursery() as nursery:
                    for _ in range(WAITERS):
                        nursery.start_soon(wait_in_the_limiter)
                    await wait_for_status(
                        server,
                        lambda s: _limited_waiting(s) == WAITERS,
                        what="every waiter queued in the limiter",
                    )
                    crashed = await caller.call("exai_test_crash_rate_limiter", {})
                    assert crashed["result"]["isError"] is False, crashed
                # Every call waiting at the crash was answered, with a clear retry-later.
                assert len(replies) == WAITERS
                for reply in replies:
                    error = reply["error"]
                    assert error["code"] == -32004, reply
                    assert error["data"]["limit"] == "upstream_starting", reply
                    assert error["data"]["provider"] == "limited", reply
                    assert "rate limiter is restarting" in error["message"], reply
                status = await wait_for_status(
                    server,
                    lambda s: _limiter_actor(s) == ("pykka", "running", 1),
                    what="the rate limiter restarted once",
                )
                assert status.problems == []
                # A later call reaches the next incarnation.
                answered = await caller.chat("after the crash")
                assert answered["provider"] == "fake"
    finally:
        assert server.stop() == 0, server.stderr_path.read_text()
    events = server.log_events()
    crashed_children = [e["child"] for e in events if e["event"] == "child.crashed"]
    assert crashed_children == ["rate_limiter"]
    restarting = [e["child"] for e in events if e["event"] == "child.restarting"]
    assert restarting == ["rate_limiter"]
    assert [e["event"] for e in events].count("rate_limiter.restarted_spent") == 1
