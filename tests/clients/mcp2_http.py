"""The official Python SDK ``mcp==2.3.0`` ``Client`` over its own Streamable HTTP transport.

Runs in .venv-clients/mcp2, driven by tests/test_streamable_http_clients.py: ``python
mcp2_http.py URL TOKEN``. The transport is the SDK's ``streamable_http_client`` (what
``Client(url)`` builds itself) given an ``httpx2.AsyncClient`` that carries the bearer token:
the SDK's documented way to add headers ("To configure headers, authentication, or other HTTP
settings, create an httpx2.AsyncClient and pass it here"). Two connections, one after the other:

* ``auto`` (the ``Client`` default): ``server/discover`` first, ``initialize`` only as the
  fallback. Lists tools, calls ``echo``, and ``exai_test_steps`` with a progress callback and
  the log opt-in (``log_level``), abandons a blocked call once its heartbeat arrived (the
  cancel), calls ``echo`` again.
* ``legacy``: the 2025 ``initialize`` handshake, the same calls, and DELETE on exit.

Prints one JSON line: per connection, what it negotiated, how long connecting took, the
results, and every HTTP exchange (tests/clients/wire_log.py).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.session import DISCOVER_TIMEOUT_SECONDS
from mcp.client.streamable_http import streamable_http_client
from wire_log import WireLog

STEPS = 3


async def scenario(url: str, token: str, mode: str) -> dict[str, Any]:
    wire = WireLog()
    progress: list[list[float | str | None]] = []
    logs: list[Any] = []
    all_steps_seen = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append([value, total, message])
        if sum(1 for *_, said in progress if said and said.startswith("step")) == STEPS:
            all_steps_seen.set()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    strays: list[str] = []

    async def on_message(message: Any) -> None:
        # What the SDK could not take (a response to nothing, a bad message) arrives here.
        if isinstance(message, Exception):
            strays.append(repr(message))

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30, read=300),
        event_hooks={"response": [wire]},
    )
    started = time.perf_counter()
    async with (
        http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,  # type: ignore[arg-type]
            client_info=types.Implementation(name=f"exai-mcp2-http-{mode}", version="0"),
            logging_callback=on_log,
            message_handler=on_message,
            log_level="info",
        ) as client,
    ):
        connect_seconds = time.perf_counter() - started
        session = client.session
        if session.initialize_result is not None:
            await client.set_logging_level("info")
        tools = await client.list_tools()
        echoed = await client.call_tool("echo", {"text": f"hello from mcp 2.3 ({mode})"})
        stepped = await client.call_tool(
            "exai_test_steps", {"steps": STEPS}, progress_callback=on_progress
        )
        # 2.x runs each progress callback as its own task: the last ones may still be pending
        # when the result is returned; the bound only turns a loss into a failure.
        with anyio.fail_after(30):
            await all_steps_seen.wait()
        # Cancel the 2.x way: abandon the call (cancel its scope) once its heartbeat shows the
        # server runs it. The SDK sends notifications/cancelled on a 2025 session and, at
        # 2026-07-28, closes the call's response stream instead (that era's cancellation).
        heartbeat = anyio.Event()
        blocked_answered = False

        async def on_heartbeat(value: float, total: float | None, message: str | None) -> None:
            heartbeat.set()

        async def call_block() -> None:
            nonlocal blocked_answered
            await client.call_tool("exai_test_block", {}, progress_callback=on_heartbeat)
            blocked_answered = True

        async with anyio.create_task_group() as waiting:
            waiting.start_soon(call_block)
            await heartbeat.wait()
            waiting.cancel_scope.cancel()
        after = await client.call_tool("echo", {"text": "after the cancel"})
        discovered = session.discover_result
        initialized = session.initialize_result
        meta = (discovered.meta if discovered else initialized.meta if initialized else None) or {}
        report = {
            "connect_seconds": connect_seconds,
            "discover_timeout_seconds": DISCOVER_TIMEOUT_SECONDS,
            "protocol_version": client.protocol_version,
            "adopted_discover": discovered is not None,
            "ran_initialize": initialized is not None,
            "supported_versions": discovered.supported_versions if discovered else None,
            "meta_session_id": meta.get("exai/sessionId"),
            "server_name": client.server_info.name if client.server_info else None,
            "tools": [tool.name for tool in tools.tools],
            "echo_text": [c.text for c in echoed.content if c.type == "text"],
            "echo_structured": echoed.structured_content,
            "steps_text": [c.text for c in stepped.content if c.type == "text"],
            "steps_progress": progress,
            "blocked_answered": blocked_answered,
            "echo_after_cancel": [c.text for c in after.content if c.type == "text"],
        }
    # After the exit: the DELETE (if any) is in the log now.
    report["logs"] = logs
    report["strays"] = strays
    report["wire"] = wire.exchanges
    return report


async def main(url: str, token: str) -> None:
    report = {mode: await scenario(url, token, mode) for mode in ("auto", "legacy")}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
