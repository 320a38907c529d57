"""A 2025-era Streamable HTTP session with the official Python SDK ``mcp==1.30.0``.

Runs in .venv-clients/mcp1, driven by tests/test_streamable_http_clients.py: ``python
mcp1_http.py URL TOKEN``. ``streamable_http_client`` with an ``httpx.AsyncClient`` carrying
the bearer token (the SDK's documented way to add headers): initialize (the server's
``Mcp-Session-Id`` adopted), the GET stream the SDK opens after it, tools, a call, progress
and log notifications on the call's SSE stream, a cancel, ping, and DELETE when the context
exits (``terminate_on_close``). Prints one JSON line with what it saw, every HTTP exchange
included (tests/clients/wire_log.py), and exits.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import httpx
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.session import RequestResponder
from wire_log import WireLog

Incoming = RequestResponder[types.ServerRequest, types.ClientResult] | types.ServerNotification


class Observer:
    """Everything the SDK hands the application besides results."""

    def __init__(self) -> None:
        self.progress_tokens: list[str | int] = []
        self.progress_seen = anyio.Event()
        self.logs: list[Any] = []
        self.strays: list[str] = []

    async def on_message(self, message: Incoming | Exception) -> None:
        if isinstance(message, Exception):
            self.strays.append(repr(message))
        elif isinstance(message, types.ServerNotification) and isinstance(
            message.root, types.ProgressNotification
        ):
            self.progress_tokens.append(message.root.params.progressToken)
            self.progress_seen.set()

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)


async def main(url: str, token: str) -> None:
    seen = Observer()
    wire = WireLog()
    client = httpx.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(30, read=300),
        event_hooks={"response": [wire]},
    )
    async with (
        client,
        streamable_http_client(url, http_client=client) as (read, write, session_id),
        ClientSession(
            read, write, logging_callback=seen.on_log, message_handler=seen.on_message
        ) as session,
    ):
        init = await session.initialize()
        tools = await session.list_tools()
        echoed = await session.call_tool("echo", {"text": "hello over HTTP"})
        await session.set_logging_level("info")
        steps: list[list[float | str | None]] = []

        async def on_steps(progress: float, total: float | None, message: str | None) -> None:
            steps.append([progress, total, message])

        stepped = await session.call_tool(
            "exai_test_steps", {"steps": 3}, progress_callback=on_steps
        )

        seen.progress_tokens.clear()
        seen.progress_seen = anyio.Event()
        blocked_answered = False

        async def on_block(progress: float, total: float | None, message: str | None) -> None:
            pass  # a callback is what makes 1.30 send a progress token (heartbeats)

        async def call_block() -> None:
            nonlocal blocked_answered
            await session.call_tool("exai_test_block", {}, progress_callback=on_block)
            blocked_answered = True

        async with anyio.create_task_group() as waiting:
            waiting.start_soon(call_block)
            await seen.progress_seen.wait()  # the server runs the call: its heartbeat came
            request_id = seen.progress_tokens[0]
            await session.send_notification(
                types.ClientNotification(
                    types.CancelledNotification(
                        params=types.CancelledNotificationParams(
                            requestId=request_id, reason="test: cancelled by the client"
                        )
                    )
                )
            )
            waiting.cancel_scope.cancel()

        after = await session.call_tool("echo", {"text": "after the cancel"})
        await session.send_ping()
        report = {
            "protocol_version": init.protocolVersion,
            "session_id": session_id(),
            "meta_session_id": (init.meta or {}).get("exai/sessionId"),
            "tools": [tool.name for tool in tools.tools],
            "echo_text": [c.text for c in echoed.content if c.type == "text"],
            "steps_result": [c.text for c in stepped.content if c.type == "text"],
            "steps_progress": steps,
            "logs": seen.logs,
            "cancelled_request_id": request_id,
            "blocked_answered": blocked_answered,
            "echo_after_cancel": [c.text for c in after.content if c.type == "text"],
            "strays": seen.strays,
        }
    # After the exit: the DELETE is in the log now.
    report["wire"] = wire.exchanges
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
