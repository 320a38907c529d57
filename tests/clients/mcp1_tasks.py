"""MCP Tasks with a real client: the official Python SDK ``mcp==1.30.0`` over WebSocket.

Runs in its own virtual environment (.venv-clients/mcp1), driven by tests/test_tasks_clients.py
as a subprocess: ``python mcp1_tasks.py URL``. Through the SDK's experimental task API
(``session.experimental``): ``echo`` as a task, polled to its end with ``poll_task`` (which
honours our ``pollInterval``) and its result fetched as a ``CallToolResult``; the task listed;
a blocking tool as a task, cancelled. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.websocket import websocket_client
from mcp.types import CallToolResult


async def main(url: str) -> None:
    async with websocket_client(url) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        tasks_capability = init.capabilities.tasks
        tools = await session.list_tools()
        support = {
            tool.name: tool.execution.taskSupport if tool.execution else None
            for tool in tools.tools
        }
        created = await session.experimental.call_tool_as_task(
            "echo", {"text": "hello from a task"}, ttl=120_000
        )
        task_id = created.task.taskId
        statuses = [status.status async for status in session.experimental.poll_task(task_id)]
        result = await session.experimental.get_task_result(task_id, CallToolResult)
        listed = await session.experimental.list_tasks()

        blocked = await session.experimental.call_tool_as_task("exai_test_block", {})
        cancelled = await session.experimental.cancel_task(blocked.task.taskId)
        after = await session.experimental.get_task(blocked.task.taskId)
        report = {
            "protocol_version": init.protocolVersion,
            "tasks_capability": None
            if tasks_capability is None
            else tasks_capability.model_dump(exclude_none=True),
            "echo_task_support": support.get("echo"),
            "created_status": created.task.status,
            "created_ttl": created.task.ttl,
            "poll_interval": created.task.pollInterval,
            "statuses": statuses,
            "result_text": [c.text for c in result.content if c.type == "text"],
            "result_is_error": result.isError,
            "listed": [task.taskId for task in listed.tasks],
            "task_id": task_id,
            "cancelled_status": cancelled.status,
            "status_after_cancel": after.status,
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
