"""What the node records about a session is what happened (issue 12, item 14).

* A tool call that fails, whether by an error response or by an ``isError`` result, is an
  ``outcome=error`` event in its trace, never ``ok``.
* ``session.closed`` says how the session's connection closed (code and reason, RFC 6455
  section 7.4) and how long the session lived.
* When a session closes, its row is current: ``tool_calls`` / ``tool_errors`` as they are at
  the end (not as of the last periodic sync, 30 s apart), and ``input_tokens`` /
  ``output_tokens`` are the sums of its ``token_usage`` rows.

One real ``exai serve`` for the module, with the chat tool on the loopback fake upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from runtime.trace_view import read_events
from storage.rows import RECORD, SessionActivity
from tests.chat_support import (
    ALICE,
    Caller,
    error_text,
    provider_table,
    upstream_thread,
    write_config,
)
from tests.fake_openai import FakeOpenAI, Reply, Status
from tests.harness import RawClient, ServerProcess, open_raw, query, start_server, wait_until


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def node(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("truth")
    providers = '[upstream]\ndefault_provider = "fake"\n' + provider_table(
        "fake", upstream.base_url, "fake-model"
    )
    config = write_config(state / "exai.toml", providers=providers)
    handle = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    yield handle
    handle.stop()


def _log(server: ServerProcess) -> list[dict[str, Any]]:
    """Everything the server logged so far (its log file has the trace events too)."""
    return list(read_events([server.state_dir / "logs" / "exai.log"]))


def _closed(server: ServerProcess, session_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in _log(server)
        if e.get("event") == "session.closed" and e.get("session_id") == session_id
    ]


async def _session(ws: Any, version: str) -> tuple[Caller, str]:
    client = RawClient(ws)
    session_id: str = (await client.initialize(version))["result"]["_meta"]["exai/sessionId"]
    return Caller(client), session_id


async def test_a_failed_tool_call_is_an_error_in_its_trace(
    node: ServerProcess, upstream: FakeOpenAI
) -> None:
    upstream.script(Status(500))
    async with open_raw(node.authed_url(ALICE)) as ws:
        caller, session_id = await _session(ws, "2025-06-18")
        ok = await caller.call("echo", {"text": "fine"})  # id 1
        assert ok["result"]["isError"] is False
        unknown = await caller.call("no-such-tool", {})  # id 2: refused by the session actor
        assert unknown["error"]["code"] == -32602
        bad_input = await caller.call("echo", {"text": 5})  # id 3: refused by the tool's parse
        assert bad_input["error"]["code"] == -32602
        upstream_failed = await caller.call("chat", {"prompt": "hi"})  # id 4: isError result
        assert "failed (500)" in error_text(upstream_failed)

    def traced() -> dict[int, list[dict[str, Any]]]:
        by_call: dict[int, list[dict[str, Any]]] = {}
        for event in _log(node):
            if (
                event.get("event") == "actor.message"
                and event.get("session_id") == session_id
                and event.get("kind") == "tools/call"
            ):
                by_call.setdefault(event["rpc_id"], []).append(event)
        return by_call

    def outcome(events: list[dict[str, Any]]) -> dict[str, Any]:
        """The event that says how the call ended: its tool task's, if it got that far (the
        session actor's then says only that it took the request and started the task)."""
        tool = [e for e in events if "/tools/" in e["actor"]]
        return tool[0] if tool else events[0]

    # Each call's events are logged as their handling ends, before its reply is sent.
    await wait_until(lambda: set(traced()) == {1, 2, 3, 4}, what="the calls' trace events")
    by_call = traced()
    assert {e["outcome"] for e in by_call[1]} == {"ok"}
    assert [e["actor"] for e in by_call[2]] == [f"/root/sessions/{session_id}"]
    for rpc_id in (2, 3, 4):
        assert outcome(by_call[rpc_id])["outcome"] == "error", by_call[rpc_id]
    # The error says what failed, as the client was told.
    assert "no-such-tool" in outcome(by_call[2])["error"]
    assert "text" in outcome(by_call[3])["error"]
    assert "failed (500)" in outcome(by_call[4])["error"]


async def test_session_closed_says_how_and_its_row_is_current(
    node: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    upstream.script(Reply("one", usage=(40, 9)), Status(500), Reply("two", usage=(50, 11)))
    async with open_raw(node.authed_url(ALICE)) as ws:
        caller, session_id = await _session(ws, "2025-11-25")
        first = await caller.chat("one")
        assert "failed (500)" in error_text(await caller.call("chat", {"prompt": "x"}))
        await caller.chat("two", continuation_id=first["continuation_id"])
        assert (await caller.call("echo", {"text": "done"}))["result"]["isError"] is False
        await ws.aclose(1000, "done for today")

    def row() -> tuple[Any, ...]:
        (found,) = query(
            database_url,
            "select status, tool_calls, tool_errors, input_tokens, output_tokens from sessions"
            " where session_id = %s",
            (session_id,),
        )
        return found

    # The close is the session's last write: once the row says closed, it is all there.
    await wait_until(lambda: row()[0] == "closed", what="the session's row to close")
    assert row() == ("closed", 4, 1, 90, 20)

    await wait_until(lambda: bool(_closed(node, session_id)), what="session.closed")
    (closed,) = _closed(node, session_id)
    assert (closed["code"], closed["reason"]) == (1000, "done for today")
    assert isinstance(closed["duration_s"], float)
    assert closed["duration_s"] > 0


async def test_a_close_the_server_makes_is_logged_with_its_code(node: ServerProcess) -> None:
    async with open_raw(node.authed_url(ALICE)) as ws:
        _, session_id = await _session(ws, "2025-06-18")
        await ws.send_message(b"\x00binary")
        assert await RawClient(ws).receive_until_closed() == 1003
    await wait_until(lambda: bool(_closed(node, session_id)), what="session.closed")
    (closed,) = _closed(node, session_id)
    assert closed["code"] == 1003
    assert "binary frames are not supported" in closed["reason"]


async def test_parked_and_shut_down_sessions_say_so(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = start_server(
        tmp_path_factory.mktemp("shutdown"),
        database_url=database_url,
        extra_env={"EXAI_RESUME_GRACE": "0.5"},
    )
    try:
        # Left with 1001 and never resumed: parked, then over when its grace runs out.
        async with open_raw(server.authed_url()) as ws:
            _, parked_id = await _session(ws, "2025-06-18")
            await ws.aclose(1001)
        await wait_until(lambda: bool(_closed(server, parked_id)), what="the grace to expire")
        (parked,) = _closed(server, parked_id)
        assert (parked["code"], parked["reason"]) == (
            1001,
            "resume grace expired (detached: GOING_AWAY)",
        )

        async with open_raw(server.authed_url()) as ws:
            _, session_id = await _session(ws, "2025-06-18")
            # The client keeps running meanwhile, so it answers the server's close frame.
            assert await trio.to_thread.run_sync(server.stop) == 0
    finally:
        server.stop()
    (closed,) = _closed(server, session_id)
    assert (closed["code"], closed["reason"]) == (1001, "server shutting down")


def test_activity_journaled_before_token_totals_moved_still_reads() -> None:
    """A journal written by the previous build carries token totals in its activity records;
    replaying it after an upgrade must not reject them."""
    line = (
        '{"kind":"session_activity","session_id":"s","last_activity":"2026-11-30T10:00:00Z",'
        '"tool_calls":3,"tool_errors":1,"input_tokens":0,"output_tokens":0}'
    )
    record = RECORD.validate_json(line)
    assert isinstance(record, SessionActivity)
    assert (record.tool_calls, record.tool_errors) == (3, 1)
