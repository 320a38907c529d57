"""Issue 15 (c): the 2026-07-28 Tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663)
on the wire, over Streamable HTTP (sessionless) and WebSocket.

Real sockets, a real ``exai serve``, real Postgres. Two servers: one that answers every
task-capable call with its task at once (``EXAI_TASK_AFTER=0``), one that waits for it as
long as a test could (600 s), so that neither path depends on timing. SEP-2663's rules
asserted here: the extension is advertised in ``server/discover``; a task is returned only
to a request that declares the extension, and only once its row is in the database;
``tasks/get`` inlines the result or the JSON-RPC error; ``tasks/cancel`` and ``tasks/update``
acknowledge; a request that does not declare the extension gets -32021 for ``tasks/*``; the
methods the extension dropped are -32601 (404 over HTTP); ``Mcp-Name`` mirrors the task id
(a missing one is let through on ``tasks/*``: its reference client omits it);
another identity's task is -32602, as an unknown one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.harness import RawClient, ServerProcess, open_raw, query, start_server, wait_until
from tests.test_streamable_http import ACCEPT, BOB, error_of, http_url

MODERN = "2026-07-28"
EXTENSION = "io.modelcontextprotocol/tasks"
CAROL = "carol-token-for-the-tasks-extension-tests"


def _server(tmp: Path, database_url: str, task_after: str) -> ServerProcess:
    return start_server(
        tmp,
        database_url=database_url,
        extra_env={"EXAI_CLIENT_TOKENS": f"bob={BOB},carol={CAROL}", "EXAI_TASK_AFTER": task_after},
    )


@pytest.fixture(scope="module")
def eager(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Every task-capable call of a declaring request is answered with its task at once."""
    handle = _server(tmp_path_factory.mktemp("tasks-ext-eager"), database_url, "0")
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@pytest.fixture(scope="module")
def patient(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A task-capable call is answered as a plain call unless it runs for 10 minutes."""
    handle = _server(tmp_path_factory.mktemp("tasks-ext-patient"), database_url, "600")
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def request(
    request_id: Any, method: str, params: dict[str, Any] | None = None, *, declares: bool = True
) -> dict[str, Any]:
    """A 2026-07-28 request; ``declares``: its client capabilities name the extension."""
    body = dict(params or {})
    capabilities: dict[str, Any] = {"extensions": {EXTENSION: {}}} if declares else {}
    body["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "tasks-ext-test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": capabilities,
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": body}


def call(request_id: Any, tool: str, *, declares: bool = True, **arguments: Any) -> dict[str, Any]:
    return request(
        request_id, "tools/call", {"name": tool, "arguments": arguments}, declares=declares
    )


async def post(
    client: httpx.AsyncClient,
    server: ServerProcess,
    message: dict[str, Any],
    *,
    token: str | None = None,
    name: str | None = None,
) -> httpx.Response:
    """POST with the mirrored headers a 2026-07-28 client sends: ``Mcp-Name`` is the tool's
    name or (SEP-2663) the task id, unless ``name`` says otherwise ("" for none)."""
    params = message["params"]
    headers = {
        "Authorization": f"Bearer {token or server.token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": message["method"],
    }
    target = params.get("name") if message["method"] == "tools/call" else params.get("taskId")
    if name is not None:
        target = name or None
    if target is not None:
        headers["Mcp-Name"] = str(target)
    return await client.post(http_url(server), content=json.dumps(message), headers=headers)


def result_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert "result" in body, body
    result: dict[str, Any] = body["result"]
    return result


def row_of(database_url: str, task_id: str) -> tuple[Any, ...]:
    rows = query(
        database_url, "select status, identity, augmented from tasks where id = %s", (task_id,)
    )
    assert len(rows) == 1, rows
    return rows[0]


def assert_task_shape(task: dict[str, Any], result_type: str) -> None:
    """SEP-2663's ``Task``: milliseconds, ISO 8601 times, a ``ttlMs`` always present."""
    assert task["resultType"] == result_type
    assert {"taskId", "status", "createdAt", "lastUpdatedAt", "ttlMs", "pollIntervalMs"} <= set(
        task
    ), task
    assert isinstance(task["ttlMs"], int)
    assert task["ttlMs"] > 0
    assert task["createdAt"].endswith("Z")
    # The 2025-11-25 names are not used in this era.
    assert not {"ttl", "pollInterval", "task"} & set(task), task


async def poll_until_terminal(
    client: httpx.AsyncClient, server: ServerProcess, task_id: str
) -> dict[str, Any]:
    """``tasks/get`` until the task is terminal, as a client polls (the row is written by
    the server process: there is no event here to wait on)."""
    seen: dict[str, Any] = {}

    async def terminal() -> bool:
        seen.update(
            result_of(await post(client, server, request("g", "tasks/get", {"taskId": task_id})))
        )
        return seen["status"] in ("completed", "failed", "cancelled")

    with trio.fail_after(30):
        while not await terminal():  # noqa: ASYNC110 - the state is another process's
            await trio.sleep(0.05)
    return seen


async def test_discover_advertises_the_extension_and_the_handshake_era_does_not(
    eager: ServerProcess,
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        discovered = result_of(await post(client, eager, request(1, "server/discover")))
        assert discovered["capabilities"]["extensions"] == {EXTENSION: {}}
        assert "tasks" not in discovered["capabilities"]  # the 2025-11-25 capability is not
        assert "exai/sessionId" not in discovered["_meta"]  # a sessionless session is nobody's
        listed = result_of(await post(client, eager, request(2, "tools/list")))
        # Tool-level negotiation (execution.taskSupport) is not part of the extension.
        assert all("execution" not in tool for tool in listed["tools"]), listed
    async with open_raw(eager.authed_url()) as ws:
        raw = RawClient(ws)
        init = await raw.initialize("2025-11-25")
        capabilities = init["result"]["capabilities"]
        assert "tasks" in capabilities
        assert "extensions" not in capabilities


async def test_a_declaring_call_is_answered_with_its_task_then_polled_to_its_result(
    eager: ServerProcess, database_url: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await post(client, eager, call(1, "exai_test_sleep", seconds=0.2))
        created = result_of(answer)
        assert_task_shape(created, "task")
        assert created["status"] == "working"
        task_id = created["taskId"]
        # SEP-2663: not returned until a tasks/get would resolve: the row is in Postgres.
        status, identity, augmented = row_of(database_url, task_id)
        assert (identity, augmented) == ("default", True)
        assert status in ("pending", "running", "completed")

        done = await poll_until_terminal(client, eager, task_id)
        assert_task_shape(done, "complete")
        assert done["status"] == "completed"
        # "The structure matches the result type of the original request."
        assert done["result"]["content"] == [{"type": "text", "text": "slept 0.2 s"}]
        assert done["result"]["isError"] is False
        assert "error" not in done
        assert row_of(database_url, task_id)[0] == "completed"


async def test_a_tool_error_is_completed(eager: ServerProcess, database_url: str) -> None:
    """SEP-2663: ``failed`` "MUST NOT be used for non-JSON-RPC errors": a tool's ``isError``
    result is ``completed``, with the result (2025-11-25 called it ``failed``)."""
    async with httpx.AsyncClient(timeout=30) as client:
        # Invalid arguments are an isError result from 2025-11-25 on.
        bad_args = result_of(await post(client, eager, call(1, "exai_test_sleep", seconds=-1)))
        done = await poll_until_terminal(client, eager, bad_args["taskId"])
        assert done["status"] == "completed"
        assert done["result"]["isError"] is True
        assert "error" not in done
        assert row_of(database_url, bad_args["taskId"])[0] == "failed"  # the row's own terms


async def test_a_request_that_does_not_declare_the_extension_never_gets_a_task(
    eager: ServerProcess, database_url: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        plain = result_of(await post(client, eager, call(1, "echo", declares=False, text="p")))
        assert plain["resultType"] == "complete"
        assert plain["content"][0]["text"] == "p"
        # The 2025-11-25 opt-in is ignored in this era ("MUST ignore").
        legacy_opt_in = call(2, "echo", declares=False, text="q")
        legacy_opt_in["params"]["task"] = {"ttl": 1000}
        ignored = result_of(await post(client, eager, legacy_opt_in))
        assert ignored["content"][0]["text"] == "q"

        created = result_of(await post(client, eager, call(3, "exai_test_sleep", seconds=0)))
        task_id = created["taskId"]
        for method, params in (
            ("tasks/get", {"taskId": task_id}),
            ("tasks/cancel", {"taskId": task_id}),
            ("tasks/update", {"taskId": task_id, "inputResponses": {}}),
        ):
            refused = await post(client, eager, request(4, method, params, declares=False))
            assert refused.status_code == 200, refused.text
            error = error_of(refused)
            assert error["code"] == -32021, (method, error)
            assert error["data"] == {"requiredCapabilities": {"extensions": {EXTENSION: {}}}}


async def test_methods_the_extension_dropped_are_not_found(eager: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        created = result_of(await post(client, eager, call(1, "exai_test_sleep", seconds=0)))
        for method, params in (
            ("tasks/result", {"taskId": created["taskId"]}),
            ("tasks/list", {}),
        ):
            refused = await post(client, eager, request(2, method, params))
            assert refused.status_code == 404, (method, refused.text)
            assert error_of(refused)["code"] == -32601


async def test_cancel_and_update_acknowledge_and_unknown_tasks_are_invalid_params(
    eager: ServerProcess, database_url: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        created = result_of(await post(client, eager, call(1, "exai_test_block")))
        task_id = created["taskId"]
        updated = result_of(
            await post(
                client,
                eager,
                request(2, "tasks/update", {"taskId": task_id, "inputResponses": {"k": {}}}),
            )
        )
        assert updated == {"resultType": "complete"}  # nothing outstanding: ignored, acked
        assert (
            result_of(await post(client, eager, request(3, "tasks/get", {"taskId": task_id})))[
                "status"
            ]
            == "working"
        )

        cancelled = result_of(
            await post(client, eager, request(4, "tasks/cancel", {"taskId": task_id}))
        )
        assert cancelled == {"resultType": "complete"}
        # A task running on this node is recorded cancelled before the acknowledgement.
        got = result_of(await post(client, eager, request(5, "tasks/get", {"taskId": task_id})))
        assert got["status"] == "cancelled"
        assert not {"result", "error"} & set(got)
        assert row_of(database_url, task_id)[0] == "cancelled"
        # Cancelling a terminal task is still acknowledged ("cooperative").
        again = await post(client, eager, request(6, "tasks/cancel", {"taskId": task_id}))
        assert result_of(again) == {"resultType": "complete"}

        unknown = "00000000-0000-4000-8000-000000000000"
        for method, params in (
            ("tasks/get", {"taskId": unknown}),
            ("tasks/cancel", {"taskId": unknown}),
            ("tasks/update", {"taskId": unknown, "inputResponses": {}}),
            ("tasks/get", {"taskId": "not-a-uuid"}),
        ):
            refused = await post(client, eager, request(7, method, params))
            assert error_of(refused)["code"] == -32602, (method, params)
        missing = await post(client, eager, request(8, "tasks/update", {"taskId": task_id}))
        assert error_of(missing)["code"] == -32602  # inputResponses is required


async def test_another_identity_cannot_see_or_cancel_a_task(eager: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        created = result_of(await post(client, eager, call(1, "exai_test_block")))
        task_id = created["taskId"]
        for method in ("tasks/get", "tasks/cancel"):
            hidden = await post(client, eager, request(2, method, {"taskId": task_id}), token=BOB)
            assert error_of(hidden)["code"] == -32602, method
        still = result_of(await post(client, eager, request(3, "tasks/get", {"taskId": task_id})))
        assert still["status"] == "working"
        await post(client, eager, request(4, "tasks/cancel", {"taskId": task_id}))


async def test_mcp_name_mirrors_the_task_id(eager: ServerProcess) -> None:
    """A different ``Mcp-Name`` is refused; a missing one is let through on ``tasks/*`` (the
    extension's own reference client omits it: runtime/streamable_http/headers.py)."""
    async with httpx.AsyncClient(timeout=30) as client:
        created = result_of(await post(client, eager, call(1, "exai_test_sleep", seconds=0)))
        get = request(2, "tasks/get", {"taskId": created["taskId"]})
        for bad in ("another-task", "=?base64?not base64!?="):
            refused = await post(client, eager, get, name=bad)
            assert refused.status_code == 400, bad
            error = error_of(refused)
            assert error["code"] == -32020, error
        missing = await post(client, eager, get, name="")
        assert result_of(missing)["taskId"] == created["taskId"]
        # On tools/call it stays required (the 2026-07-28 transport: MUST reject).
        refused = await post(client, eager, call(3, "echo", text="x"), name="")
        assert refused.status_code == 400
        assert error_of(refused)["code"] == -32020


async def test_listen_for_task_ids_needs_the_extension(eager: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        listen = request(
            1, "subscriptions/listen", {"notifications": {"taskIds": ["x"]}}, declares=False
        )
        refused = await post(client, eager, listen)
        assert refused.status_code == 400
        assert error_of(refused)["code"] == -32021


async def test_a_quick_call_is_answered_as_a_plain_call(
    patient: ServerProcess, database_url: str
) -> None:
    """The server decides (SEP-2663): a call that ends within EXAI_TASK_AFTER is answered
    with its own result, though it ran as a task (its row is one, for the identity)."""
    async with httpx.AsyncClient(timeout=30) as client:
        quick = call(1, "exai_test_sleep", seconds=0.1)
        answered = result_of(await post(client, patient, quick, token=BOB))
        assert answered["resultType"] == "complete"
        assert answered["content"] == [{"type": "text", "text": "slept 0.1 s"}]
        rows = query(
            database_url,
            "select status from tasks where identity = 'bob' and augmented"
            " and tool_name = 'exai_test_sleep'",
        )
        assert rows == [("completed",)]


async def test_closing_the_stream_before_the_answer_cancels_the_task(
    patient: ServerProcess, database_url: str
) -> None:
    """Nobody was told of the task, so nobody could ever ask for it: closing the response
    stream cancels it (2026-07-28 transport, "Cancellation")."""

    def statuses() -> list[str]:
        rows = query(
            database_url,
            "select status from tasks where identity = 'carol' and tool_name = 'exai_test_block'",
        )
        return [row[0] for row in rows]

    async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
        nursery.start_soon(partial(post, client, patient, call(1, "exai_test_block"), token=CAROL))
        await wait_until(lambda: statuses() == ["running"], what="carol's blocked task to run")
        nursery.cancel_scope.cancel()  # the client gives up: its connection closes
    await wait_until(lambda: statuses() == ["cancelled"], what="carol's task to be cancelled")


async def test_the_extension_over_websocket(eager: ServerProcess, database_url: str) -> None:
    async with open_raw(eager.authed_url()) as ws:
        raw = RawClient(ws)
        await raw.send(call(1, "exai_test_block"))
        created = (await raw.receive())["result"]
        assert_task_shape(created, "task")
        task_id = created["taskId"]
        await raw.send(request(2, "tasks/cancel", {"taskId": task_id}))
        assert (await raw.receive())["result"] == {"resultType": "complete"}
        await raw.send(request(3, "tasks/get", {"taskId": task_id}))
        got = (await raw.receive())["result"]
        assert got["status"] == "cancelled"
        assert row_of(database_url, task_id)[0] == "cancelled"


async def test_a_huge_task_id_or_cursor_is_not_echoed_whole(eager: ServerProcess) -> None:
    """The error names the client's text clipped: it is bounded only by the body limit."""
    async with httpx.AsyncClient(timeout=30) as client:
        huge = "x" * 100_000
        refused = await post(client, eager, request(1, "tasks/get", {"taskId": huge}), name="")
        error = error_of(refused)
        assert error["code"] == -32602
        assert len(error["message"]) < 300
        listed = await post(client, eager, request(2, "tools/list", {"cursor": huge}))
        assert error_of(listed)["code"] == -32602
        assert len(error_of(listed)["message"]) < 300
