"""Limits refuse with exact errors and codes, never a silent hang."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected

from runtime.config import load_settings
from tests.harness import RawClient, ServerProcess, call, cancel, open_raw, start_server

MAILBOX = 4
INFLIGHT = 2


@pytest.fixture(scope="module")
def tight_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("tight"),
        database_url=database_url,
        extra_env={
            "EXAI_SESSION_MAILBOX": str(MAILBOX),
            "EXAI_MAX_INFLIGHT_PER_SESSION": str(INFLIGHT),
        },
    )
    yield handle
    assert handle.stop() == 0


async def test_full_mailbox_gets_server_busy_and_queued_requests_still_complete(
    tight_server: ServerProcess,
) -> None:
    async with open_raw(tight_server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        # Occupy every in-flight slot. A barrier behind them proves both calls are running:
        # the actor answers it only after it has started them.
        for n in range(INFLIGHT):
            await client.send(call(f"block-{n}", "exai_test_block"))
        await client.barrier()
        # The actor now waits for a slot at the next call; MAILBOX more requests queue.
        await client.send(call("waits-for-slot", "echo", text="slot"))
        for n in range(MAILBOX):
            await client.send(call(f"queued-{n}", "echo", text=f"q{n}"))
        await client.send(call("one-too-many", "echo", text="no room"))
        busy = await client.receive()
        assert busy["id"] == "one-too-many"
        assert busy["error"]["code"] == -32000
        assert "server busy" in busy["error"]["message"]
        assert busy["error"]["data"]["retryAfterMs"] > 0

        # Cancelling the blockers (control jumps the queue) frees the slots; every queued
        # request is then answered, and the cancelled ones get no response at all.
        for n in range(INFLIGHT):
            await client.send(cancel(f"block-{n}"))
        answered = {(await client.receive())["id"] for _ in range(1 + MAILBOX)}
        assert answered == {"waits-for-slot"} | {f"queued-{n}" for n in range(MAILBOX)}
        assert (await client.request("ping"))["result"] == {}


async def test_cancel_of_unknown_or_finished_request_is_harmless(
    tight_server: ServerProcess,
) -> None:
    async with open_raw(tight_server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        reply = await client.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        await client.send(cancel(reply["id"]))
        await client.send(cancel("never-existed"))
        assert (await client.request("ping"))["result"] == {}


async def test_sessions_over_the_limit_are_refused_with_503_and_retry_after(
    database_url: str, state_dir: Path
) -> None:
    # Its own server: sessions of other tests may still be closing on a shared one.
    server = start_server(
        state_dir, database_url=database_url, extra_env={"EXAI_MAX_SESSIONS": "3"}
    )
    try:
        await _refuses_the_fourth_session(server.authed_url())
        await _a_burst_stays_within_the_limit(server.authed_url(), limit=3, attempts=12)
    finally:
        assert server.stop() == 0


async def _refuses_the_fourth_session(url: str) -> None:
    async with open_raw(url) as a, open_raw(url) as b, open_raw(url) as c:
        for ws in (a, b, c):
            await RawClient(ws).initialize()
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_raw(url):
                pass
        assert rejected.value.status_code == 503
        headers = dict(rejected.value.headers or [])
        assert headers[b"retry-after"] == b"1"
    # Capacity comes back once the server has seen those sessions end: retry as told.
    with trio.fail_after(30):
        while True:
            try:
                async with open_raw(url) as ws:
                    assert "result" in await RawClient(ws).initialize()
                    break
            except ConnectionRejected as refused:
                if refused.status_code != 503:
                    raise
                await trio.sleep(0.05)


def test_limits_come_from_config() -> None:
    settings = load_settings(max_sessions="5", session_mailbox="7")
    assert (settings.max_sessions, settings.session_mailbox) == (5, 7)


async def test_sessions_may_use_the_same_request_ids_at_once(tight_server: ServerProcess) -> None:
    # Request ids are per session: the node-wide limit must not confuse two sessions' "1".
    url = tight_server.authed_url()
    async with open_raw(url) as a_ws, open_raw(url) as b_ws:
        a, b = RawClient(a_ws), RawClient(b_ws)
        for client in (a, b):
            await client.initialize()
            await client.send(call(1, "exai_test_block"))
            await client.barrier()  # its call 1 is running
        for client in (a, b):
            await client.send(cancel(1))
            reply = await client.request(
                "tools/call", {"name": "echo", "arguments": {"text": "ok"}}
            )
            assert reply["result"]["content"][0]["text"] == "ok"
    restarts = [e for e in tight_server.log_events() if e["event"] == "session.actor_restarted"]
    assert restarts == []


async def test_notifications_that_find_the_mailbox_full_become_counted_dead_letters(
    tight_server: ServerProcess,
) -> None:
    async with open_raw(tight_server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        for n in range(INFLIGHT):
            await client.send(call(f"hold-{n}", "exai_test_block"))
        await client.barrier()
        await client.send(call("waits", "echo", text="w"))
        for n in range(MAILBOX):
            await client.send(call(f"fill-{n}", "echo", text=f"f{n}"))
        # The mailbox is full: a notification cannot be queued, and nobody awaits it.
        await client.send({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"})
        # A request after it proves the reader handled the notification (it answers busy).
        await client.send(call("probe", "echo", text="p"))
        assert (await client.receive())["id"] == "probe"
        for n in range(INFLIGHT):
            await client.send(cancel(f"hold-{n}"))
        for _ in range(1 + MAILBOX):
            await client.receive()
    letters = [e for e in tight_server.log_events() if e["event"] == "dead_letter"]
    mine = [e for e in letters if e["target"] == f"/root/sessions/{session_id}"]
    assert len(mine) == 1
    assert mine[0]["reason"] == "mailbox full"
    assert mine[0]["kind"] == "Notification"
    assert mine[0]["sender"] == f"/root/sessions/{session_id}/reader"


async def _a_burst_stays_within_the_limit(url: str, *, limit: int, attempts: int) -> None:
    """Handshakes that arrive together cannot all pass one free place: the capacity check
    and taking the place are one step, so at most ``limit`` are accepted (fewer while the
    sessions of the step before are still ending) and every other one gets 503."""
    accepted = 0
    refused: list[int] = []
    resolved = trio.Event()
    hold = trio.Event()

    async def attempt() -> None:
        nonlocal accepted
        try:
            async with open_raw(url):
                accepted += 1
                if accepted + len(refused) == attempts:
                    resolved.set()
                await hold.wait()  # keep the session, and its place, until all have tried
        except ConnectionRejected as rejected:
            refused.append(rejected.status_code)
            if accepted + len(refused) == attempts:
                resolved.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(attempts):
                nursery.start_soon(attempt)
            await resolved.wait()
            hold.set()
    assert 1 <= accepted <= limit
    assert refused == [503] * (attempts - accepted)
