"""Every MCP method a session answers, per era, driven in memory (no socket).

Each test runs a whole session (its row, reader, mailbox, supervised actor, tool calls, task
rows, its end) over ``runtime.memory_transport`` with ``actors.session.memory``, against the
real test database through a real persistence actor. What only the in-memory transport can
show is checked too: the request each message relates to (``related_request_id``), which
Streamable HTTP will use to pick the stream a message goes on.

Waiting is on events: a reply, or ``trio.testing.wait_all_tasks_blocked`` (every task of the
session idle: a call admitted, a request queued), never on time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from actors.persistence import PersistenceClient
from actors.session import SessionServices
from actors.session.memory import memory_session
from actors.session.methods import CRASH_METHOD
from actors.tools.echo import Echo
from actors.tools.testing import BlockUntilCancelled, ReportSteps
from runtime.mcp import versions
from runtime.mcp.errors import LimitExceeded
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from runtime.memory_transport import Delivery, MemoryClient, MemoryClosed
from tests.harness import call, cancel, query
from tests.memory_support import migrated_database, running_persistence, session_services

MODERN = versions.MODERN_VERSIONS[0]
PAGE = 2


class _NoArgs(BaseModel):
    pass


class Refuses(Tool[_NoArgs]):
    """Answers with an ``isError`` result: the tool ran and could not do what was asked."""

    name = "refuses"
    description = "Test only: an isError result."
    Args = _NoArgs

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        return ToolOutput(text="cannot do that", is_error=True)


class Breaks(Tool[_NoArgs]):
    """Raises: a bug in a tool, answered -32603 without harming the session."""

    name = "breaks"
    description = "Test only: raises."
    Args = _NoArgs

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        raise RuntimeError("tool bug")


class Limited(Tool[_NoArgs]):
    """Refuses with a meaning (an RpcError), answered as that error."""

    name = "limited"
    description = "Test only: a limit."
    Args = _NoArgs

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        raise LimitExceeded("limit reached")


TOOLS = [Echo(), BlockUntilCancelled(), ReportSteps(), Refuses(), Breaks(), Limited()]


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with migrated_database(database_url) as url:
        yield url


@pytest.fixture
async def persistence(db: str, tmp_path: Path) -> AsyncIterator[PersistenceClient]:
    async with running_persistence(db, tmp_path / "journal") as client:
        yield client


def _services(persistence: PersistenceClient, *, max_inflight: int = 4) -> SessionServices:
    return session_services(
        persistence,
        TOOLS,
        node_id="mem-test",
        max_inflight=max_inflight,
        test_faults=True,
        page_size=PAGE,
    )


@pytest.fixture
def services(persistence: PersistenceClient) -> SessionServices:
    return _services(persistence)


def request(request_id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def modern(params: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    """Params of a 2026-07-28 request: its version (and whatever else) in ``_meta``."""
    body = dict(params or {})
    body["_meta"] = {versions.PROTOCOL_VERSION_META: MODERN, **meta}
    return body


async def initialize(client: MemoryClient, version: str = "2025-06-18") -> dict[str, Any]:
    reply = await client.request(
        "init",
        "initialize",
        {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "memory-test", "version": "1.0"},
        },
    )
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return reply  # type: ignore[no-any-return]


async def exchange(client: MemoryClient, message: dict[str, Any]) -> Delivery:
    """Send a request; its response as delivered (with what it relates to)."""
    await client.send(message)
    delivery, _ = await client.response(message["id"])
    return delivery


async def nothing_more(client: MemoryClient) -> None:
    """Everything the session will send unprompted has been sent, and nothing was."""
    await trio.testing.wait_all_tasks_blocked()
    assert client.receive_nowait() is None


async def stored(persistence: PersistenceClient, db: str, sql: str, *args: Any) -> list[Any]:
    """Rows of ``sql`` once everything sent to persistence so far is written."""
    await persistence.flush()
    return query(db, sql, args)


async def task_statuses(persistence: PersistenceClient, db: str, session_id: str) -> dict[Any, str]:
    """Each task of the session: its request id (as the client sent it) -> its status."""
    rows = await stored(
        persistence, db, "select request_id, status from tasks where session_id = %s", session_id
    )
    return {json.loads(request_id): status for request_id, status in rows}


async def row(persistence: PersistenceClient, db: str, sql: str, *args: Any) -> tuple[Any, ...]:
    rows = await stored(persistence, db, sql, *args)
    assert len(rows) == 1, rows
    return rows[0]


# --- the handshake era ----------------------------------------------------------------------


async def test_initialize_negotiates_once_and_records_the_client(
    services: SessionServices, db: str
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await client.send(request(1, "initialize", {
            "protocolVersion": "2025-03-26",
            "capabilities": {},
            "clientInfo": {"name": "memory-test", "version": "1.0"},
        }))  # fmt: skip
        delivery, _ = await client.response(1)
        result = delivery.message["result"]
        assert result["protocolVersion"] == "2025-03-26"
        assert result["serverInfo"]["name"] == "exai-runtime"
        assert result["_meta"]["exai/sessionId"] == session.session_id
        assert "resultType" not in result  # a handshake era result is not tagged
        assert delivery.related_request_id == 1

        again = await exchange(client, request(2, "initialize", {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "x", "version": "1"},
        }))  # fmt: skip
        assert again.message["error"]["code"] == -32600
        assert "may be sent once" in again.message["error"]["message"]
        assert session.state.protocol_version == "2025-03-26"

        await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await exchange(client, request(3, "tools/list"))  # handled after the notification
        assert session.state.initialized
    assert await row(
        services.persistence,
        db,
        "select client_name, protocol_version, remote_addr, status from sessions "
        "where session_id = %s",
        session.session_id,
    ) == ("memory-test", "2025-03-26", "memory", "closed")


async def test_initialize_with_an_unknown_version_gets_the_latest_handshake_one(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        reply = await initialize(session.client, "1999-01-01")
        assert reply["result"]["protocolVersion"] == versions.LATEST_HANDSHAKE_VERSION


async def test_a_request_before_initialize_is_refused_but_ping_and_discover_are_answered(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        client = session.client
        refused = await exchange(client, request(1, "tools/list"))
        assert refused.message["error"]["code"] == -32600
        assert "not initialized" in refused.message["error"]["message"]
        assert (await exchange(client, request(2, "ping"))).message["result"] == {}
        discover = await exchange(client, request(3, "server/discover"))
        assert discover.message["result"]["supportedVersions"] == list(versions.SUPPORTED_VERSIONS)
        assert session.state.protocol_version is None  # a probe negotiates nothing


async def test_ping_is_answered_relating_to_its_request(services: SessionServices) -> None:
    async with memory_session(services) as session:
        await initialize(session.client)
        pong = await exchange(session.client, request("p", "ping"))
        assert pong.message == {"jsonrpc": "2.0", "id": "p", "result": {}}
        assert pong.related_request_id == "p"


async def test_tools_list_pages_through_every_tool(services: SessionServices) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        names: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = {"cursor": cursor} if cursor else {}
            reply = (await exchange(client, request(f"l{pages}", "tools/list", params))).message
            page = reply["result"]
            assert len(page["tools"]) <= PAGE
            names += [tool["name"] for tool in page["tools"]]
            pages += 1
            cursor = page.get("nextCursor")
            if cursor is None:
                break
        assert names == [tool.name for tool in TOOLS]
        assert pages == -(-len(TOOLS) // PAGE)
        bad = await exchange(client, request("bad", "tools/list", {"cursor": "not-a-cursor"}))
        assert bad.message["error"]["code"] == -32602


async def test_logging_set_level_filters_the_messages_a_tool_logs(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        # No level set: a tool's log messages are not sent.
        _, before = await _steps(client, "quiet", steps=2)
        assert not [d for d in before if d.message.get("method") == "notifications/message"]
        set_level = await exchange(client, request("lvl", "logging/setLevel", {"level": "info"}))
        assert set_level.message["result"] == {}
        assert session.state.log_level == "info"
        _, before = await _steps(client, "loud", steps=2)
        logged = [d for d in before if d.message.get("method") == "notifications/message"]
        assert [d.message["params"]["data"] for d in logged] == [{"step": 1}, {"step": 2}]
        assert all(d.message["params"]["level"] == "info" for d in logged)
        assert {d.related_request_id for d in logged} == {"loud"}  # the call's stream
        await exchange(client, request("lvl2", "logging/setLevel", {"level": "warning"}))
        _, before = await _steps(client, "filtered", steps=1)
        assert not [d for d in before if d.message.get("method") == "notifications/message"]
        invalid = await exchange(client, request("lvl3", "logging/setLevel", {"level": "loud"}))
        assert invalid.message["error"]["code"] == -32602


async def test_an_unknown_method_is_not_found_naming_the_version(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        await initialize(session.client, "2025-11-25")
        reply = await exchange(session.client, request(7, "resources/list"))
        assert reply.message["error"]["code"] == -32601
        assert "'resources/list'" in reply.message["error"]["message"]
        assert "2025-11-25" in reply.message["error"]["message"]


# --- tools/call -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "structured"),
    [("2024-11-05", False), ("2025-06-18", True), ("2025-11-25", True)],
)
async def test_tools_call_answers_in_the_sessions_era_and_records_the_task(
    services: SessionServices, db: str, version: str, structured: bool
) -> None:
    async with memory_session(services) as session:
        await initialize(session.client, version)
        reply = await exchange(session.client, call("c1", "echo", text="hello"))
        result = reply.message["result"]
        assert result["content"] == [{"type": "text", "text": "hello"}]
        assert result["isError"] is False
        assert ("structuredContent" in result) is structured
        assert "resultType" not in result
        assert reply.related_request_id == "c1"
        # Its final state was accepted (committed, or durably journaled) before the reply.
        assert await row(
            services.persistence,
            db,
            "select status, tool_name from tasks where session_id = %s and request_id = %s",
            session.session_id,
            json.dumps("c1"),  # the id as the client sent it, JSON
        ) == ("completed", "echo")
        assert session.state.tool_calls == 1


async def test_a_modern_request_names_its_version_and_client_in_meta(
    services: SessionServices, db: str
) -> None:
    client_info = {"name": "modern-client", "version": "2.0"}
    async with memory_session(services) as session:
        client = session.client
        listed = await exchange(
            client,
            request(1, "tools/list", modern(**{versions.CLIENT_INFO_META: client_info})),
        )
        result = listed.message["result"]
        assert result["resultType"] == "complete"
        assert result["ttlMs"] == 0
        assert result["cacheScope"] == "private"
        assert session.state.protocol_version == MODERN
        assert session.state.client is not None
        assert session.state.client.name == "modern-client"

        echoed = await exchange(client, call(2, "echo", text="hi") | {"params": modern(
            {"name": "echo", "arguments": {"text": "hi"}}
        )})  # fmt: skip
        assert echoed.message["result"]["resultType"] == "complete"
        assert echoed.message["result"]["structuredContent"] == {"text": "hi"}

        # 2026-07-28 has no ping, no logging/setLevel, no initialize.
        ping = await exchange(client, request(3, "ping", modern()))
        assert ping.message["error"]["code"] == -32601
        level = await exchange(client, request(4, "logging/setLevel", modern({"level": "info"})))
        assert level.message["error"]["code"] == -32601
        init = await exchange(client, request(5, "initialize", {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "x", "version": "1"},
        }))  # fmt: skip
        assert init.message["error"]["code"] == -32022
        assert init.message["error"]["data"]["supported"] == list(versions.MODERN_VERSIONS)
        # A version in _meta that is not a modern one.
        wrong = await exchange(
            client,
            request(6, "tools/list", {"_meta": {versions.PROTOCOL_VERSION_META: "2025-06-18"}}),
        )
        assert wrong.message["error"]["code"] == -32022
        # A tools/call whose params are bad too: the version is refused first, as for any
        # other request, and its params are parsed once (only after it).
        both = await exchange(
            client,
            request(7, "tools/call", {"_meta": {versions.PROTOCOL_VERSION_META: "2025-06-18"}}),
        )
        assert both.message["error"]["code"] == -32022
        bad = await exchange(client, request(8, "tools/call", modern({"arguments": {}})))
        assert bad.message["error"]["code"] == -32602
    await session.client.aclose()
    assert await row(
        services.persistence,
        db, "select client_name, protocol_version from sessions where session_id = %s",
        session.session_id,
    ) == ("modern-client", MODERN)  # fmt: skip


@pytest.mark.parametrize(
    ("version", "as_result"),
    [("2025-06-18", False), ("2025-11-25", True), (MODERN, True)],
)
async def test_invalid_tool_input_is_an_error_or_a_tool_result_by_era(
    services: SessionServices, db: str, version: str, as_result: bool
) -> None:
    async with memory_session(services) as session:
        if version == MODERN:
            params = modern({"name": "echo", "arguments": {}})
        else:
            await initialize(session.client, version)
            params = {"name": "echo", "arguments": {}}
        reply = (await exchange(session.client, request("bad", "tools/call", params))).message
        if as_result:
            assert reply["result"]["isError"] is True
            assert "text" in reply["result"]["content"][0]["text"]
            assert ("resultType" in reply["result"]) is (version == MODERN)
        else:
            assert reply["error"]["code"] == -32602
            assert "text" in reply["error"]["message"]
        assert await row(
            services.persistence,
            db,
            "select status from tasks where session_id = %s and request_id = %s",
            session.session_id,
            json.dumps("bad"),
        ) == ("failed",)


async def test_tool_errors_unknown_tools_and_broken_tools_each_get_their_answer(
    services: SessionServices, db: str
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client, "2025-11-25")
        refused = (await exchange(client, call("r", "refuses"))).message
        assert refused["result"]["isError"] is True
        assert refused["result"]["content"][0]["text"] == "cannot do that"
        unknown = (await exchange(client, call("u", "no-such-tool"))).message
        assert unknown["error"]["code"] == -32602
        assert "unknown tool: 'no-such-tool'" in unknown["error"]["message"]
        broken = (await exchange(client, call("b", "breaks"))).message
        assert broken["error"]["code"] == -32603
        assert "'breaks' failed" in broken["error"]["message"]
        limited = (await exchange(client, call("l", "limited"))).message
        assert limited["error"]["code"] == LimitExceeded.code
        # The session carries on after each.
        assert (await exchange(client, call("ok", "echo", text="still here"))).message["result"][
            "content"
        ][0]["text"] == "still here"
        statuses = await task_statuses(services.persistence, db, session.session_id)
        # An unknown tool is refused before any task exists.
        assert statuses == {
            "r": "failed",
            "b": "failed",
            "l": "failed",
            "ok": "completed",
        }
        assert (session.state.tool_calls, session.state.tool_errors) == (4, 3)


async def test_progress_is_strictly_increasing_and_relates_to_its_call(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        await initialize(session.client)
        reply, before = await _steps(session.client, "steps", steps=3, token="tok")
        progress = [d for d in before if d.message.get("method") == "notifications/progress"]
        assert [d.message["params"]["progress"] for d in progress] == [1, 2, 3]
        assert {d.message["params"]["progressToken"] for d in progress} == {"tok"}
        assert {d.related_request_id for d in progress} == {"steps"}
        assert reply.message["result"]["content"][0]["text"] == "3 steps"
        # Without a token, no progress at all.
        _, before = await _steps(session.client, "no-token", steps=2)
        assert not [d for d in before if d.message.get("method") == "notifications/progress"]


async def test_a_running_call_cancelled_gets_no_response_and_is_recorded_cancelled(
    services: SessionServices, db: str
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        await client.send(call("long", "exai_test_block"))
        await trio.testing.wait_all_tasks_blocked()
        assert session.state.in_flight == 1
        assert session.state.in_use("long")
        await client.send(cancel("long"))
        await trio.testing.wait_all_tasks_blocked()
        assert session.state.in_flight == 0
        assert not session.state.in_use("long")  # the id is free again
        await nothing_more(client)  # the cancelled call gets no response
        assert (await exchange(client, call("long", "echo", text="reused"))).message["result"]
        assert await row(
            services.persistence,
            db,
            "select status from tasks where session_id = %s and tool_name = %s",
            session.session_id,
            "exai_test_block",
        ) == ("cancelled",)


async def test_calls_cancelled_while_waiting_for_a_slot_and_in_the_mailbox_never_run(
    persistence: PersistenceClient, db: str
) -> None:
    services = _services(persistence, max_inflight=1)
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        await client.send(call("running", "exai_test_block"))
        await client.send(call("waiting", "echo", text="never"))  # waits for the one slot
        await client.send(call("queued", "echo", text="never"))  # the actor is busy: queued
        await trio.testing.wait_all_tasks_blocked()
        state = session.state
        assert state.in_flight == 2  # one running, one waiting for its slot
        assert all(state.in_use(i) for i in ("running", "waiting", "queued"))
        for request_id in ("queued", "waiting", "running"):
            await client.send(cancel(request_id))
        after = await exchange(client, call("after", "echo", text="answered"))
        assert after.message["result"]["content"][0]["text"] == "answered"
        await nothing_more(client)
        assert not state.has_pending()
    statuses = await task_statuses(services.persistence, db, session.session_id)
    # Only the running call ever became a task; the other two never ran.
    assert statuses == {"running": "cancelled", "after": "completed"}


async def test_a_request_id_in_use_is_refused_without_disturbing_the_first(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        await client.send(call("same", "exai_test_block"))
        refused = await exchange(client, request("same", "tools/list"))
        assert refused.message["error"]["code"] == -32600
        assert "already in use" in refused.message["error"]["message"]
        assert refused.related_request_id == "same"
        assert session.state.in_flight == 1  # the first still runs
        await client.send(cancel("same"))
        await trio.testing.wait_all_tasks_blocked()
        assert not session.state.in_use("same")


async def test_a_batch_is_answered_as_one_in_2025_03_26_only(services: SessionServices) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client, "2025-03-26")
        await client.send(
            [
                call("b1", "echo", text="one"),
                request("b2", "tools/list"),
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                call("b1", "echo", text="same id"),
                {"jsonrpc": "2.0", "id": "b3"},
            ]
        )
        delivery = await client.receive()
        replies = delivery.message
        assert isinstance(replies, list)
        assert [r.get("id") for r in replies] == ["b1", "b2", "b1", "b3"]
        assert replies[0]["result"]["content"][0]["text"] == "one"
        assert "tools" in replies[1]["result"]
        assert "already in use" in replies[2]["error"]["message"]
        assert replies[3]["error"]["code"] == -32600  # a member that is no message
        assert delivery.related_request_id == "b1"  # the batch's first request
        assert not session.state.has_pending()

        init = await client.request("x", "tools/list")
        assert "result" in init
        await client.send([request("i", "initialize", {})])
        refused = (await client.receive()).message
        assert refused[0]["error"]["code"] == -32600
        assert "must not be batched" in refused[0]["error"]["message"]
        await client.send([])
        empty = await client.receive()
        assert empty.message["error"]["code"] == -32600
        assert empty.related_request_id is None


async def test_a_batch_outside_2025_03_26_is_refused_whole(services: SessionServices) -> None:
    async with memory_session(services) as session:
        await initialize(session.client, "2025-06-18")
        await session.client.send([request(1, "tools/list"), request(2, "tools/list")])
        refused = await session.client.receive()
        assert refused.message["id"] is None
        assert (
            "batches are not part of protocol version 2025-06-18"
            in (refused.message["error"]["message"])
        )
        assert refused.related_request_id is None


async def test_a_crashed_actor_answers_32001_and_the_session_heals(
    services: SessionServices,
) -> None:
    async with memory_session(services) as session:
        client = session.client
        await initialize(client)
        crashed = await exchange(client, request("boom", CRASH_METHOD))
        assert crashed.message["error"]["code"] == -32001
        assert crashed.related_request_id == "boom"
        # The next incarnation reads the same mailbox over the same state.
        listed = await exchange(client, request("after", "tools/list"))
        assert "tools" in listed.message["result"]
        assert session.state.protocol_version == "2025-06-18"
        entry = services.registry.get(session.session_id)
        assert entry is not None
        live = entry.session
        assert live.restarts == 1
        assert "SessionCrashRequested" in (live.last_error or "")


async def test_an_actor_that_keeps_crashing_gives_up_and_closes_1011(
    persistence: PersistenceClient, db: str
) -> None:
    services = _services(persistence)
    async with memory_session(services) as session:
        client = session.client
        for n in range(services.max_restarts + 1):
            await client.send(request(n, CRASH_METHOD))
        codes = [
            (await client.receive()).message["error"]["code"]
            for _ in range(services.max_restarts + 1)
        ]
        with pytest.raises(MemoryClosed) as closed:
            await client.receive()
        assert closed.value.code == 1011
        assert codes == [-32001] * (services.max_restarts + 1)
        await session.ended.wait()
    assert await row(
        services.persistence,
        db,
        "select status from sessions where session_id = %s",
        session.session_id,
    ) == ("closed",)


@pytest.mark.parametrize(("frame", "code"), [(b"\x00binary", 1003), ("x" * (64 * 1024 + 1), 1009)])
async def test_a_frame_the_session_refuses_closes_it(
    services: SessionServices, frame: str | bytes, code: int
) -> None:
    async with memory_session(services) as session:
        await session.client.send(frame)
        with pytest.raises(MemoryClosed) as closed:
            await session.client.receive()
        assert closed.value.code == code
        await session.ended.wait()


async def test_the_session_row_is_opened_and_closed_with_its_totals(
    services: SessionServices, db: str
) -> None:
    async with memory_session(services) as session:
        await initialize(session.client)
        assert await row(
            services.persistence,
            db, "select status, closed_at from sessions where session_id = %s",
            session.session_id,
        ) == ("active", None)  # fmt: skip
        await exchange(session.client, call(1, "echo", text="a"))
        await exchange(session.client, call(2, "refuses"))
    assert session.ended.is_set()
    assert services.registry.get(session.session_id) is None
    status, closed_at = await row(
        services.persistence,
        db,
        "select status, closed_at from sessions where session_id = %s",
        session.session_id,
    )
    assert status == "closed"
    assert closed_at is not None
    assert (session.state.tool_calls, session.state.tool_errors) == (2, 1)


async def _steps(
    client: MemoryClient, request_id: str, *, steps: int, token: str | None = None
) -> tuple[Delivery, list[Delivery]]:
    message = call(request_id, "exai_test_steps", steps=steps)
    if token is not None:
        message["params"]["_meta"] = {"progressToken": token}
    await client.send(message)
    return await client.response(request_id)
