"""MCP Tasks (2025-11-25, basic/utilities/tasks; docs/tasks.md), end to end: real ``exai
serve`` processes, a real PostgreSQL, raw WebSocket clients.

A task-augmented ``tools/call`` is answered with ``CreateTaskResult`` once its row is in the
database; its tool runs on in the node's task host, detached from the session, so a client
that disconnects fetches its result from a new connection. Tasks belong to the identity of
the token that created them. Tools are held in flight with the test-only ``exai_test_block``
(blocks until cancelled) or with ``chat`` against the loopback upstream holding its request.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from storage.task_queries import TaskStore
from tests.chat_support import ALICE, BOB, provider_table, write_config
from tests.fake_openai import Hold, Received, fake_openai
from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    query,
    session_row,
    start_server,
    wait_for_status,
    wait_until,
)
from tests.tcp_proxy import TcpProxy, libpq_target, libpq_via

TASKS_VERSION = "2025-11-25"
MAX_TASKS = 2
MAX_WAITERS = 2


@pytest.fixture(scope="module")
def tasks_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """alice and bob (EXAI_CLIENT_TOKENS), at most MAX_TASKS tasks each."""
    handle = start_server(
        tmp_path_factory.mktemp("tasks"),
        database_url=database_url,
        extra_env={
            "EXAI_CLIENT_TOKENS": f"alice={ALICE},bob={BOB}",
            "EXAI_MAX_TASKS_PER_IDENTITY": str(MAX_TASKS),
            "EXAI_PAGE_SIZE": "2",  # so that tasks/list pages
            "EXAI_MAX_TASK_RESULT_WAITERS": str(MAX_WAITERS),
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@asynccontextmanager
async def session(
    server: ServerProcess, token: str, version: str = TASKS_VERSION
) -> AsyncIterator[tuple[RawClient, dict[str, Any]]]:
    """An initialised client of ``server`` with ``token``, and its ``initialize`` result."""
    async with open_raw(server.authed_url(token)) as ws:
        client = RawClient(ws)
        reply = await client.initialize(version)
        assert "result" in reply, reply
        yield client, reply["result"]


async def all_tools(client: RawClient) -> list[dict[str, Any]]:
    """Every page of ``tools/list``."""
    tools: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await client.request("tools/list", {"cursor": cursor} if cursor else {})
        tools += page["result"]["tools"]
        cursor = page["result"].get("nextCursor")
        if cursor is None:
            return tools


def as_task(tool: str, ttl: int | None = None, **arguments: Any) -> dict[str, Any]:
    """``tools/call`` params of a task-augmented call."""
    return {"name": tool, "arguments": arguments, "task": {} if ttl is None else {"ttl": ttl}}


async def create(client: RawClient, tool: str, **arguments: Any) -> dict[str, Any]:
    """Start a task; its ``Task`` from ``CreateTaskResult``."""
    reply = await client.request("tools/call", as_task(tool, **arguments))
    assert "result" in reply, reply
    task: dict[str, Any] = reply["result"]["task"]
    assert task["status"] == "working", task
    return task


def task_row(database_url: str, task_id: str) -> dict[str, Any] | None:
    rows = query(
        database_url,
        "select status, identity, augmented, ttl_ms, expires_at, poll_interval_ms, session_id,"
        " result, rpc_error, error_message, result_cleared_at, created_at from tasks where id = %s",
        (uuid.UUID(task_id),),
    )
    if not rows:
        return None
    names = [
        "status",
        "identity",
        "augmented",
        "ttl_ms",
        "expires_at",
        "poll_interval_ms",
        "session_id",
        "result",
        "rpc_error",
        "error_message",
        "result_cleared_at",
        "created_at",
    ]
    return dict(zip(names, rows[0], strict=True))


# -- negotiation ------------------------------------------------------------------------------


async def test_only_2025_11_25_sessions_see_tasks(tasks_server: ServerProcess) -> None:
    async with session(tasks_server, ALICE, "2025-06-18") as (old, init):
        assert "tasks" not in init["capabilities"]
        listed = await all_tools(old)
        assert all("execution" not in tool for tool in listed)
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            reply = await old.request(method, {"taskId": str(uuid.uuid4())})
            assert reply["error"]["code"] == -32601, reply
        assert (await old.request("tasks/list"))["error"]["code"] == -32601
        # MCP: a receiver without the capability processes the request normally.
        reply = await old.request("tools/call", as_task("echo", text="plain"))
        assert reply["result"]["content"][0]["text"] == "plain", reply
        assert "task" not in reply["result"]

    async with session(tasks_server, ALICE) as (client, init):
        assert init["capabilities"]["tasks"] == {
            "list": {},
            "cancel": {},
            "requests": {"tools": {"call": {}}},
        }
        listed = {t["name"]: t for t in await all_tools(client)}
        assert listed["echo"]["execution"] == {"taskSupport": "optional"}
        assert "execution" not in listed["exai_test_steps"]  # forbidden: not listed


async def test_a_tool_that_forbids_tasks_is_method_not_found(tasks_server: ServerProcess) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        reply = await client.request("tools/call", as_task("exai_test_steps", steps=1))
        assert reply["error"]["code"] == -32601, reply
        assert "taskSupport" in reply["error"]["message"]


# -- lifecycle --------------------------------------------------------------------------------


async def test_the_row_is_in_the_database_before_create_task_result(
    tasks_server: ServerProcess, database_url: str
) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        task = await create(client, "echo", ttl=60_000, text="hi")
        # Read at once, from another connection: write_through put it there before the answer.
        row = task_row(database_url, task["taskId"])
        assert row is not None
        assert (row["identity"], row["augmented"], row["ttl_ms"]) == ("alice", True, 60_000)
        assert row["expires_at"] == row["created_at"] + timedelta(milliseconds=60_000)
        assert task["ttl"] == 60_000
        assert task["pollInterval"] == row["poll_interval_ms"]

        result = await client.request("tasks/result", {"taskId": task["taskId"]})
        assert result["result"]["content"] == [{"type": "text", "text": "hi"}], result
        assert result["result"]["structuredContent"] == {"text": "hi"}
        assert result["result"]["_meta"] == {
            "io.modelcontextprotocol/related-task": {"taskId": task["taskId"]}
        }
        got = (await client.request("tasks/get", {"taskId": task["taskId"]}))["result"]
        assert got["status"] == "completed"
        assert got["taskId"] == task["taskId"]
        assert got["createdAt"].endswith("Z")
        created, updated = (datetime.fromisoformat(got[k]) for k in ("createdAt", "lastUpdatedAt"))
        assert created.tzinfo is not None
        assert updated >= created
        listed = (await client.request("tasks/list"))["result"]["tasks"]
        assert listed[0]["taskId"] == task["taskId"]  # newest first


async def test_a_longer_ttl_than_the_retention_is_capped(tasks_server: ServerProcess) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        task = await create(client, "echo", ttl=10**12, text="x")
        assert task["ttl"] == 86_400_000  # EXAI_TASK_RETENTION's default, 24 h
        await client.request("tasks/result", {"taskId": task["taskId"]})


async def test_cancel_a_running_task(tasks_server: ServerProcess, database_url: str) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        task = await create(client, "exai_test_block")
        cancelled = await client.request("tasks/cancel", {"taskId": task["taskId"]})
        assert cancelled["result"]["status"] == "cancelled", cancelled
        assert "cancelled by request" in cancelled["result"]["statusMessage"]
        row = task_row(database_url, task["taskId"])
        assert row is not None
        assert row["status"] == "cancelled"

        got = (await client.request("tasks/get", {"taskId": task["taskId"]}))["result"]
        assert got["status"] == "cancelled"
        result = await client.request("tasks/result", {"taskId": task["taskId"]})
        assert result["error"]["code"] == -32603, result
        assert result["error"]["data"] == {"taskStatus": "cancelled"}
        again = await client.request("tasks/cancel", {"taskId": task["taskId"]})
        assert again["error"]["code"] == -32602, again
        assert "already in terminal status 'cancelled'" in again["error"]["message"]


async def test_a_waiting_tasks_result_does_not_hold_the_session(
    tasks_server: ServerProcess,
) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        task = await create(client, "exai_test_block")
        await client.send(
            {"jsonrpc": "2.0", "id": "wait", "method": "tasks/result", "params": task}
        )
        # The session answers on while tasks/result waits; the cancel ends the wait.
        await client.barrier()
        cancel = {"jsonrpc": "2.0", "id": "cancel", "method": "tasks/cancel", "params": task}
        await client.send(cancel)
        replies = {}
        for _ in range(2):
            reply = await client.receive()
            replies[reply["id"]] = reply
        assert replies["cancel"]["result"]["status"] == "cancelled"
        assert replies["wait"]["error"]["data"] == {"taskStatus": "cancelled"}


async def test_the_per_session_bound_of_waiting_results_refuses_precisely(
    tasks_server: ServerProcess,
) -> None:
    async with session(tasks_server, ALICE) as (client, _):
        task = await create(client, "exai_test_block")
        for n in range(MAX_WAITERS):
            await client.send(
                {"jsonrpc": "2.0", "id": f"wait{n}", "method": "tasks/result", "params": task}
            )
        refused = await client.request("tasks/result", task)
        assert refused["error"]["code"] == -32005, refused
        assert refused["error"]["data"] == {"limit": "task_result_waiters", "max": MAX_WAITERS}
        assert "EXAI_MAX_TASK_RESULT_WAITERS" in refused["error"]["message"]
        await client.send(
            {"jsonrpc": "2.0", "id": "cancel", "method": "tasks/cancel", "params": task}
        )
        replies = {}
        for _ in range(MAX_WAITERS + 1):
            reply = await client.receive()
            replies[reply["id"]] = reply
        assert replies["cancel"]["result"]["status"] == "cancelled"
        for n in range(MAX_WAITERS):
            assert replies[f"wait{n}"]["error"]["data"] == {"taskStatus": "cancelled"}
        # Room again.
        done = await client.request("tasks/result", task)
        assert done["error"]["data"] == {"taskStatus": "cancelled"}


async def test_another_identity_cannot_see_or_touch_a_task(tasks_server: ServerProcess) -> None:
    async with (
        session(tasks_server, ALICE) as (alice, _),
        session(tasks_server, BOB) as (bob, _),
    ):
        task = await create(alice, "exai_test_block")
        unknown = str(uuid.uuid4())
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            theirs = await bob.request(method, {"taskId": task["taskId"]})
            nobody = await bob.request(method, {"taskId": unknown})
            assert theirs["error"]["code"] == nobody["error"]["code"] == -32602, (theirs, method)
            assert theirs["error"]["message"] == nobody["error"]["message"].replace(
                unknown, task["taskId"]
            )
        listed = (await bob.request("tasks/list"))["result"]["tasks"]
        assert task["taskId"] not in [t["taskId"] for t in listed]
        # Still alice's, still running.
        got = (await alice.request("tasks/get", {"taskId": task["taskId"]}))["result"]
        assert got["status"] == "working"
        await alice.request("tasks/cancel", {"taskId": task["taskId"]})


async def test_tasks_list_pages_newest_first(tasks_server: ServerProcess) -> None:
    async with session(tasks_server, BOB) as (client, _):
        made = [(await create(client, "echo", text=str(n)))["taskId"] for n in range(3)]
        for task_id in made:
            await client.request("tasks/result", {"taskId": task_id})
        seen: list[str] = []
        cursor = None
        while True:
            page = (await client.request("tasks/list", {"cursor": cursor} if cursor else {}))[
                "result"
            ]
            seen += [t["taskId"] for t in page["tasks"]]
            cursor = page.get("nextCursor")
            if cursor is None:
                break
        assert seen[:3] == made[::-1]
        bad = await client.request("tasks/list", {"cursor": "not-ours"})
        assert bad["error"]["code"] == -32602


async def test_the_per_identity_bound_refuses_precisely(tasks_server: ServerProcess) -> None:
    async with (
        session(tasks_server, ALICE) as (alice, _),
        session(tasks_server, BOB) as (bob, _),
    ):
        held = [await create(alice, "exai_test_block") for _ in range(MAX_TASKS)]
        refused = await alice.request("tools/call", as_task("exai_test_block"))
        assert refused["error"]["code"] == -32005, refused
        assert refused["error"]["data"] == {"limit": "tasks_per_identity", "max": MAX_TASKS}
        assert "EXAI_MAX_TASKS_PER_IDENTITY" in refused["error"]["message"]
        # Another identity is not bound by alice's tasks; a plain call is not a task.
        bobs = await create(bob, "exai_test_block")
        assert (await alice.request("tools/call", {"name": "echo", "arguments": {"text": "a"}}))[
            "result"
        ]
        for task in [*held]:
            await alice.request("tasks/cancel", {"taskId": task["taskId"]})
        await bob.request("tasks/cancel", {"taskId": bobs["taskId"]})
        # Room again once they ended.
        again = await create(alice, "echo", text="room")
        await alice.request("tasks/result", {"taskId": again["taskId"]})


# -- detached from the session, durable across nodes -----------------------------------------


async def test_a_task_survives_its_client_and_is_fetched_from_a_new_connection(
    database_url: str, tmp_path: Path
) -> None:
    """``chat`` as a task; the upstream holds its request while the client disconnects and
    its session ends; released, the task completes, and a new connection gets its result.
    Then retention clears the result and keeps the row and its token usage."""
    async with fake_openai() as upstream:
        state = tmp_path / "state"
        state.mkdir()
        providers = '[upstream]\ndefault_provider = "fake"\n' + provider_table(
            "fake", upstream.base_url, "fake-model"
        )
        config = write_config(state / "exai.toml", providers=providers)
        server = await trio.to_thread.run_sync(
            partial(
                start_server,
                state,
                database_url=database_url,
                extra_env={"EXAI_CONFIG": str(config)},
            )
        )
        try:
            arrived = trio.Event()
            release = trio.Event()

            def on_arrival(request: Received) -> None:
                arrived.set()

            upstream.script(Hold(release=release, arrived=on_arrival))
            async with session(server, ALICE) as (client, init):
                session_id = init["_meta"]["exai/sessionId"]
                task = await create(client, "chat", prompt="hold on")
                await arrived.wait()  # the tool runs: its request is upstream
            await wait_until(
                lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
                what="the session's end",
            )
            release.set()
            async with session(server, ALICE) as (client, _):
                result = await client.request("tasks/result", {"taskId": task["taskId"]})
                assert result["result"]["isError"] is False, result
                assert "hello from the fake upstream" in result["result"]["content"][0]["text"]
                got = (await client.request("tasks/get", {"taskId": task["taskId"]}))["result"]
                assert got["status"] == "completed"
            row = task_row(database_url, task["taskId"])
            assert row is not None
            assert row["session_id"] == session_id
            await _retention_clears_the_result_only(server, database_url, task["taskId"])
        finally:
            assert await trio.to_thread.run_sync(server.stop) == 0


def _usage_rows(database_url: str, task_id: str) -> int:
    """token_usage rows of the task's session (chat's usage rows name the session)."""
    rows = query(
        database_url,
        "select count(*) from token_usage u join tasks t on t.session_id = u.session_id"
        " where t.id = %s",
        (uuid.UUID(task_id),),
    )
    return int(rows[0][0])


async def _retention_clears_the_result_only(
    server: ServerProcess, database_url: str, task_id: str
) -> None:
    """The sweep, as if a day and more had passed: the result goes, the row and the token
    usage stay; tasks/get still answers, tasks/result says the task expired."""
    usage = _usage_rows(database_url, task_id)
    assert usage >= 1
    store = TaskStore(database_url)
    store.open()
    try:
        later = datetime.now(UTC) + timedelta(days=2)
        cleared = await trio.to_thread.run_sync(store.clear_expired, later)
    finally:
        store.close()
    assert cleared >= 1
    row = task_row(database_url, task_id)
    assert row is not None
    assert row["result"] is None
    assert row["result_cleared_at"] is not None
    assert row["status"] == "completed"
    assert _usage_rows(database_url, task_id) == usage
    async with session(server, ALICE) as (client, _):
        got = (await client.request("tasks/get", {"taskId": task_id}))["result"]
        assert got["status"] == "completed"
        gone = await client.request("tasks/result", {"taskId": task_id})
        assert gone["error"]["code"] == -32602, gone
        assert "expired" in gone["error"]["message"]


async def test_a_task_of_a_killed_node_is_failed_never_working(
    database_url: str, tmp_path: Path
) -> None:
    """Node A is killed under a task. Seen from node B, the task is ``failed`` once A counts
    as dead (its heartbeat older than recovery's node ttl), before anything marked its row;
    A restarted on its state dir marks the row ``interrupted`` (recovery): ``failed`` too."""
    env = {"EXAI_CLIENT_TOKENS": f"alice={ALICE}"}
    start_a = partial(start_server, tmp_path / "a", database_url=database_url, extra_env=env)
    a = await trio.to_thread.run_sync(start_a)
    b = await trio.to_thread.run_sync(
        partial(start_server, tmp_path / "b", database_url=database_url, extra_env=env)
    )
    try:
        async with session(a, ALICE) as (client, _):
            task = await create(client, "exai_test_block")
            a.process.send_signal(signal.SIGKILL)
            assert await trio.to_thread.run_sync(a.process.wait) == -signal.SIGKILL
        row = task_row(database_url, task["taskId"])
        assert row is not None
        assert row["status"] in ("pending", "running")  # its start was written behind
        # A's last heartbeat, aged past the node ttl (300 s) instead of waiting for it.
        query(
            database_url,
            "update nodes set heartbeat_at = now() - interval '1 hour'"
            " where node_id = (select node_id from tasks where id = %s) returning node_id",
            (uuid.UUID(task["taskId"]),),
        )
        async with session(b, ALICE) as (client, _):
            got = (await client.request("tasks/get", {"taskId": task["taskId"]}))["result"]
            assert got["status"] == "failed", got
            assert "stopped before it finished" in got["statusMessage"]
            result = await client.request("tasks/result", {"taskId": task["taskId"]})
            assert result["error"]["code"] == -32603, result
            assert result["error"]["data"] == {"taskStatus": "failed"}
            refused = await client.request("tasks/cancel", {"taskId": task["taskId"]})
            assert "already in terminal status 'failed'" in refused["error"]["message"]
        assert task_row(database_url, task["taskId"])["status"] in ("pending", "running")  # type: ignore[index]

        # A again (same state dir): recovery marks the dead node's rows.
        a = await trio.to_thread.run_sync(start_a)
        assert task_row(database_url, task["taskId"])["status"] == "interrupted"  # type: ignore[index]
        async with session(a, ALICE) as (client, _):
            got = (await client.request("tasks/get", {"taskId": task["taskId"]}))["result"]
            assert got["status"] == "failed", got
    finally:
        for server in (a, b):
            if server.process.poll() is None:  # not the killed one
                assert await trio.to_thread.run_sync(server.stop) == 0


async def test_a_stopping_node_records_its_running_tasks(database_url: str, tmp_path: Path) -> None:
    env = {"EXAI_CLIENT_TOKENS": f"alice={ALICE}", "EXAI_DRAIN_TIMEOUT": "0.1"}
    start = partial(start_server, tmp_path / "state", database_url=database_url, extra_env=env)
    server = await trio.to_thread.run_sync(start)
    async with session(server, ALICE) as (client, _):
        task = await create(client, "exai_test_block")
    assert await trio.to_thread.run_sync(server.stop) == 0
    row = task_row(database_url, task["taskId"])
    assert row is not None
    assert row["status"] == "failed", row
    assert "stopped before it finished" in row["error_message"]


async def test_a_drain_does_not_wait_for_a_waiting_tasks_result(
    database_url: str, tmp_path: Path
) -> None:
    """A drain that waited for it would take EXAI_DRAIN_TIMEOUT (600 s here, past the
    harness's bound on a stop): the session is closed with 1001 unanswered instead, and the
    task, still running when the task host stops, is recorded failed."""
    env = {"EXAI_CLIENT_TOKENS": f"alice={ALICE}", "EXAI_DRAIN_TIMEOUT": "600"}
    start = partial(start_server, tmp_path / "state", database_url=database_url, extra_env=env)
    server = await trio.to_thread.run_sync(start)
    async with session(server, ALICE) as (client, _):
        task = await create(client, "exai_test_block")
        await client.send(
            {"jsonrpc": "2.0", "id": "wait", "method": "tasks/result", "params": task}
        )
        await client.barrier()  # the actor took it: it waits, in its own task
        async with trio.open_nursery() as nursery:
            stopped: list[int] = []

            async def stop() -> None:
                stopped.append(await trio.to_thread.run_sync(server.stop))

            nursery.start_soon(stop)
            assert await client.receive_until_closed() == 1001
        assert stopped == [0]
    row = task_row(database_url, task["taskId"])
    assert row is not None
    assert row["status"] == "failed"
    assert (
        row["error_message"] == "interrupted: the node running the task stopped before it finished"
    )


async def test_cancel_from_another_node(database_url: str, tmp_path: Path) -> None:
    """Two nodes on one database: a cancel on B marks the row, A stops the tool."""
    env = {"EXAI_CLIENT_TOKENS": f"alice={ALICE}"}
    a, b = [
        await trio.to_thread.run_sync(
            partial(start_server, tmp_path / name, database_url=database_url, extra_env=env)
        )
        for name in ("a", "b")
    ]
    try:
        async with session(a, ALICE) as (on_a, _), session(b, ALICE) as (on_b, _):
            task = await create(on_a, "exai_test_block")
            # B sees A's task in the database.
            got = (await on_b.request("tasks/get", {"taskId": task["taskId"]}))["result"]
            assert got["status"] == "working"
            cancelled = await on_b.request("tasks/cancel", {"taskId": task["taskId"]})
            assert cancelled["result"]["status"] == "cancelled", cancelled
            # A acts on it: its tool is stopped, the row stays cancelled.
            await wait_until(
                lambda: any(
                    e.get("event") == "task.ended" and e.get("task_id") == task["taskId"]
                    for e in a.log_events()
                ),
                what="node A to stop the task",
            )
            result = await on_a.request("tasks/result", {"taskId": task["taskId"]})
            assert result["error"]["data"] == {"taskStatus": "cancelled"}, result
            assert task_row(database_url, task["taskId"])["status"] == "cancelled"  # type: ignore[index]
    finally:
        for server in (a, b):
            assert await trio.to_thread.run_sync(server.stop) == 0


def test_task_creation_and_end_are_logged(tasks_server: ServerProcess) -> None:
    """The server's log names every task it created and ended (MCP: SHOULD log task
    creation and completion for audit)."""
    events = [e for e in tasks_server.log_events() if e.get("event", "").startswith("task.")]
    assert {e["event"] for e in events} >= {"task.created", "task.ended"}
    assert all(json.dumps(e) for e in events)


async def test_a_task_whose_row_cannot_be_written_is_refused_and_never_runs(
    database_url: str, tmp_path: Path
) -> None:
    """The database is unreachable (the node knows it: its breaker is open): a task-augmented
    call is refused with -32004, at once; no task was created, nothing ran."""
    port, unix = libpq_target(database_url)
    proxy = TcpProxy(port, target_unix=unix)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        server = await trio.to_thread.run_sync(
            partial(
                start_server,
                tmp_path / "state",
                database_url=libpq_via(database_url, proxy.port),
                extra_env={"EXAI_CLIENT_TOKENS": f"alice={ALICE}"},
            )
        )
        try:
            async with session(server, ALICE) as (client, _):
                proxy.close()  # the database is gone from the node's view
                # A plain call's records find the database gone: the breaker opens.
                plain = await client.request(
                    "tools/call", {"name": "echo", "arguments": {"text": "x"}}
                )
                assert "result" in plain, plain
                await wait_for_status(
                    server,
                    lambda s: s.persistence is not None and s.persistence.database == "down",
                    what="the node to see the database down",
                )
                refused = await client.request("tools/call", as_task("echo", text="never"))
                assert refused["error"]["code"] == -32004, refused
                assert "could not be recorded" in refused["error"]["message"]
            assert not [e for e in server.log_events() if e.get("event") == "task.created"]
        finally:
            server.process.send_signal(signal.SIGKILL)  # its database is gone: no clean stop
            await trio.to_thread.run_sync(server.process.wait)
            nursery.cancel_scope.cancel()
