"""``fastmcp-tasks`` 4.1.4, the client half of the MCP Tasks extension
(``io.modelcontextprotocol/tasks``, SEP-2663), over Streamable HTTP with a bearer token.

Runs in .venv-clients/fastmcp-tasks, driven by tests/test_tasks_extension_clients.py:
``python fastmcp_tasks_http.py URL TOKEN OTHER_TOKEN PART``. Importing ``fastmcp_tasks``
registers its client extension on every FastMCP ``Client``: each ``tools/call`` declares the
extension, a ``resultType: "task"`` answer is resolved by polling ``tasks/get``, and
``call_tool_task`` returns a ``ToolTask`` handle instead. Every client connects in fastmcp's
default ``mode="auto"`` (``server/discover``, so 2026-07-28), through a transport whose HTTP
client records each exchange (tests/clients/wire_log.py, plus what this extension adds: the
``Mcp-Method`` and ``Mcp-Name`` headers, ``params.taskId``, and a JSON answer's
``resultType``, its keys, task id and status, and error code).

``PART`` is ``directed`` (a server answering every task-capable call with its task handle,
``EXAI_TASK_AFTER=0``):

* ``transparent``: ``call_tool`` of ``exai_test_sleep`` (0.5 s) returns its result; the
  client polled ``tasks/get`` for it;
* ``resume``: ``call_tool_task`` of ``exai_test_sleep`` (1.5 s); the client closes; a new
  client (a new connection) drives the same task id to its result;
* ``cancel``: ``call_tool_task`` of ``exai_test_block``, ``cancel()``, then ``wait()`` and
  ``status()`` until ``cancelled``; ``result()`` raises;
* ``foreign``: a client with ``OTHER_TOKEN`` (another identity) asks ``tasks/get`` for the
  first identity's two tasks: refused.

or ``inline`` (a server that answers inline while a call runs under ``EXAI_TASK_AFTER``):
``call_tool`` of ``echo``, answered with its result, no task, no ``tasks/get``.

Prints one JSON line: per scenario, the results, task ids and statuses, and the wire.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import fastmcp_tasks
import httpx2
import mcp_types
from fastmcp import Client
from fastmcp.client.auth import BearerAuth
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError
from fastmcp_tasks import ToolTask, call_tool_task
from fastmcp_tasks.client_models import (
    CancelTaskRequest,
    ClientCreateTaskResult,
    ClientGetTaskResult,
    GetTaskRequest,
    UpdateTaskRequest,
)
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from wire_log import Response, WireLog, body

#: Bounds waits that only end on a server's answer: a hang becomes a failure, not a stall.
WAIT_SECONDS = 60


class ReadableResponse(Response, Protocol):
    async def aread(self) -> bytes: ...


class TaskWireLog(WireLog):
    """The wire, with what the tasks extension puts on it: the ``Mcp-Method`` and ``Mcp-Name``
    headers (SEP-2663: ``Mcp-Name`` MUST equal ``params.taskId`` on ``tasks/*``),
    ``params.taskId`` and ``params.name``, and of a JSON answer its ``resultType`` and keys,
    task id and status, and JSON-RPC error code."""

    async def __call__(self, response: ReadableResponse) -> None:  # type: ignore[override]
        await super().__call__(response)
        entry = self.exchanges[-1]
        request = response.request
        params: dict[str, Any] = {}
        if request.method == "POST":
            try:
                message = json.loads(body(request))
            except ValueError:
                message = None
            if isinstance(message, dict) and isinstance(message.get("params"), dict):
                params = message["params"]
        entry["mcp_method"] = request.headers.get("mcp-method")
        entry["mcp_name"] = request.headers.get("mcp-name")
        entry["task_id"] = params.get("taskId")
        entry["tool"] = params.get("name")
        entry["result_type"] = entry["task_status"] = entry["error_code"] = None
        entry["result_keys"] = []
        entry["answered_task_id"] = None
        if entry["content_type"] == "application/json":
            # A whole JSON body, read here once: the transport's own read gets it from the
            # response's cache. (An SSE stream is left alone: reading it here would wait for
            # its end.)
            answer = json.loads(await response.aread())
            result = answer.get("result") if isinstance(answer, dict) else None
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(result, dict):
                entry["result_keys"] = sorted(result)
                entry["result_type"] = result.get("resultType")
                entry["task_status"] = result.get("status")
                entry["answered_task_id"] = result.get("taskId")
            if isinstance(error, dict):
                entry["error_code"] = error.get("code")


def recording_factory(wire: WireLog) -> Any:
    """An ``httpx_client_factory`` that makes the client fastmcp would, plus the wire log."""

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
        **_: Any,
    ) -> httpx2.AsyncClient:
        client = create_mcp_http_client(headers=headers, timeout=timeout, auth=auth)
        client.event_hooks["response"].append(wire)
        return client

    return factory


@asynccontextmanager
async def connected(url: str, token: str, name: str, wire: WireLog) -> AsyncIterator[Client]:
    transport = StreamableHttpTransport(
        url, auth=BearerAuth(token), httpx_client_factory=recording_factory(wire)
    )
    client = Client(transport, client_info=mcp_types.Implementation(name=name, version="0"))
    async with client:
        assert client.protocol_version == "2026-07-28", client.protocol_version
        yield client


def texts(result: Any) -> list[str]:
    return [c.text for c in result.content if c.type == "text"]


def task_state(task: ClientGetTaskResult) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "status": task.status,
        "status_message": task.status_message,
        "result": task.result,
        "error": task.error,
    }


def send_mcp_name() -> None:
    """Send what a fastmcp-tasks 4.1.4 bug leaves out (exai serves it anyway, so that the
    library works as shipped; with the header set, its check is exercised too): its
    ``tasks/get``, ``tasks/cancel`` and ``tasks/update`` request models leave the SDK's
    ``name_param`` unset, so no ``Mcp-Name`` header goes with them, though SEP-2663
    ("Streamable HTTP: Routing Headers") says the client MUST set it to ``params.taskId``
    (mcp_types documents ``name_param`` as the hook: "SEP-2663 requires it for tasks/*").
    Setting the class attribute the SDK reads makes the library's own requests carry it."""
    for request_type in (GetTaskRequest, CancelTaskRequest, UpdateTaskRequest):
        request_type.name_param = "taskId"


async def probe(url: str, token: str) -> dict[str, Any]:
    """The library as it ships: a ``tasks/get`` of a real task, without ``Mcp-Name``
    (:func:`send_mcp_name`), served or refused."""
    wire = TaskWireLog()
    async with connected(url, token, "exai-fastmcp-tasks-probe", wire) as client:
        handle = await call_tool_task(client, "exai_test_sleep", {"seconds": 0})
        try:
            answered: Any = task_state(await handle.status())
            refused = None
        except MCPError as error:
            answered, refused = None, {"code": error.code, "message": error.error.message}
    return {
        "task_id": handle.task_id,
        "answered": answered,
        "refused": refused,
        "wire": wire.exchanges,
    }


async def transparent(url: str, token: str) -> dict[str, Any]:
    wire = TaskWireLog()
    async with connected(url, token, "exai-fastmcp-tasks-transparent", wire) as client:
        slept = await client.call_tool("exai_test_sleep", {"seconds": 0.5})
    return {"text": texts(slept), "is_error": slept.is_error, "wire": wire.exchanges}


async def resume(url: str, token: str) -> dict[str, Any]:
    first_wire, second_wire = TaskWireLog(), TaskWireLog()
    async with connected(url, token, "exai-fastmcp-tasks-submit", first_wire) as client:
        handle = await call_tool_task(client, "exai_test_sleep", {"seconds": 1.5})
        # What a client keeps to come back later (SEP-2663: clients SHOULD persist task
        # ids to durable storage): the CreateTaskResult as the wire had it.
        kept = json.dumps(handle.create_result.model_dump(mode="json", by_alias=True))
        created_status = handle.create_result.status
    # The first client is closed: its connection is gone. A new one picks the task up.
    # fastmcp-tasks has no public "handle from a task id": ``ToolTask(client, tool, created)``
    # is its own constructor (exported, not underscored, but documented only as what
    # ``call_tool_task`` returns), fed the kept CreateTaskResult through the library's own
    # wire model.
    async with connected(url, token, "exai-fastmcp-tasks-resume", second_wire) as client:
        created = ClientCreateTaskResult.model_validate(json.loads(kept))
        resumed = ToolTask(client, "exai_test_sleep", created)
        with anyio.fail_after(WAIT_SECONDS):
            result = await resumed.result()
        final = await resumed.status()
    return {
        "task_id": handle.task_id,
        "created_status": created_status,
        "text": texts(result),
        "is_error": result.is_error,
        "final": task_state(final),
        "submit_wire": first_wire.exchanges,
        "resume_wire": second_wire.exchanges,
    }


async def cancel(url: str, token: str) -> dict[str, Any]:
    wire = TaskWireLog()
    async with connected(url, token, "exai-fastmcp-tasks-cancel", wire) as client:
        blocked = await call_tool_task(client, "exai_test_block", {})
        before = await blocked.status()
        await blocked.cancel()
        # SEP-2663: cancellation is eventually consistent; wait() polls to a terminal state.
        waited = await blocked.wait(timeout=WAIT_SECONDS)
        after = await blocked.status()
        try:
            await blocked.result()
            raised = None
        except ToolError as error:
            raised = str(error)
    return {
        "task_id": blocked.task_id,
        "before": task_state(before),
        "waited": task_state(waited),
        "after": task_state(after),
        "result_raised": raised,
        "wire": wire.exchanges,
    }


async def foreign(url: str, other_token: str, task_ids: list[str]) -> dict[str, Any]:
    """Another identity names the first identity's tasks: each ``tasks/get`` and
    ``tasks/cancel`` is refused as the library raises it."""
    wire = TaskWireLog()
    refusals: list[dict[str, Any]] = []
    async with connected(url, other_token, "exai-fastmcp-tasks-foreign", wire) as client:
        for task_id in task_ids:
            # A handle for an id this client only heard of: the library's model wants a whole
            # CreateTaskResult, but only ``taskId`` goes on the wire (the rest is placeholder).
            created = ClientCreateTaskResult(
                task_id=task_id,
                status="working",
                created_at="1970-01-01T00:00:00Z",
                last_updated_at="1970-01-01T00:00:00Z",
                result_type="task",
            )
            handle = ToolTask(client, "exai_test_sleep", created)
            for method, attempt in (("tasks/get", handle.status), ("tasks/cancel", handle.cancel)):
                try:
                    answered: Any = await attempt()
                    refusals.append(
                        {"method": method, "task_id": task_id, "answered": repr(answered)}
                    )
                except MCPError as error:
                    refusals.append(
                        {
                            "method": method,
                            "task_id": task_id,
                            "code": error.code,
                            "message": error.error.message,
                        }
                    )
    return {"refusals": refusals, "wire": wire.exchanges}


async def inline(url: str, token: str) -> dict[str, Any]:
    wire = TaskWireLog()
    async with connected(url, token, "exai-fastmcp-tasks-inline", wire) as client:
        echoed = await client.call_tool("echo", {"text": "answered inline"})
        try:
            await call_tool_task(client, "exai_test_sleep", {"seconds": 0})
            handle_raised = None
        except ToolError as error:
            handle_raised = str(error)
    return {
        "text": texts(echoed),
        "structured": echoed.structured_content,
        "handle_raised": handle_raised,
        "wire": wire.exchanges,
    }


async def main(url: str, token: str, other_token: str, part: str) -> None:
    assert fastmcp_tasks.__version__ == "4.1.4", fastmcp_tasks.__version__
    report: dict[str, Any] = {}
    if part == "directed":
        report["probe"] = await probe(url, token)
        send_mcp_name()
        report["transparent"] = await transparent(url, token)
        report["resume"] = await resume(url, token)
        report["cancel"] = await cancel(url, token)
        task_ids = [report["resume"]["task_id"], report["cancel"]["task_id"]]
        report["foreign"] = await foreign(url, other_token, task_ids)
    elif part == "inline":
        send_mcp_name()
        report["inline"] = await inline(url, token)
    else:
        raise SystemExit(f"unknown part {part!r}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, token, other_token, part = sys.argv[1:5]
    anyio.run(main, url, token, other_token, part)
