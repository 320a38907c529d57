"""The ``fastmcp`` 4.x ``Client`` over Streamable HTTP, with a bearer token.

Runs in .venv-clients/fastmcp, driven by tests/test_streamable_http_clients.py: ``python
fastmcp_http.py URL TOKEN``. ``Client(url, auth=BearerAuth(token))`` (fastmcp's documented way)
infers a ``StreamableHttpTransport(url, auth=...)``; the script checks that inference, then builds
the same transport itself with one addition, an ``httpx_client_factory`` (a documented
parameter) whose client records each exchange (tests/clients/wire_log.py), and connects:

* in fastmcp's default ``mode="auto"``: ``server/discover`` first, ``initialize`` only as the
  fallback; list tools, call ``echo``, call ``exai_test_steps`` with a progress handler and the
  client's log handler (fastmcp opts in to every log level on 2026-07-28 requests);
* in ``mode="legacy"``: the 2025 ``initialize`` handshake, ``logging/setLevel``, the same calls,
  and DELETE on exit.

Prints one JSON line: per connection, the version negotiated, how long connecting took, the
session id the transport adopted, the results, and every HTTP exchange.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import httpx2
import mcp_types
from fastmcp import Client
from fastmcp.client.auth import BearerAuth
from fastmcp.client.logging import LogMessage
from fastmcp.client.transports import StreamableHttpTransport
from mcp.shared._httpx_utils import create_mcp_http_client
from wire_log import WireLog

STEPS = 3


def recording_factory(wire: WireLog) -> Any:
    """An ``httpx_client_factory`` that makes the client fastmcp would, plus the wire log."""

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
        **_: Any,  # follow_redirects: the MCP transport follows same-origin redirects itself
    ) -> httpx2.AsyncClient:
        client = create_mcp_http_client(headers=headers, timeout=timeout, auth=auth)
        client.event_hooks["response"].append(wire)
        return client

    return factory


async def scenario(url: str, token: str, mode: str) -> dict[str, Any]:
    inferred = Client(url, auth=BearerAuth(token)).transport
    assert isinstance(inferred, StreamableHttpTransport), inferred
    assert isinstance(inferred.auth, BearerAuth), inferred.auth
    assert inferred.url == url, inferred

    wire = WireLog()
    progress: list[list[float | str | None]] = []
    logs: list[Any] = []
    all_steps_seen = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append([value, total, message])
        if sum(1 for *_, said in progress if said and said.startswith("step")) == STEPS:
            all_steps_seen.set()

    async def on_log(message: LogMessage) -> None:
        logs.append(message.data)

    strays: list[str] = []

    async def on_message(message: Any) -> None:
        # What the SDK could not take (a response to nothing, a bad message) arrives here.
        if isinstance(message, Exception):
            strays.append(repr(message))

    transport = StreamableHttpTransport(
        url, auth=BearerAuth(token), httpx_client_factory=recording_factory(wire)
    )
    client = Client(
        transport,
        mode=mode,  # type: ignore[arg-type]
        log_handler=on_log,
        message_handler=on_message,
        client_info=mcp_types.Implementation(name=f"exai-fastmcp-{mode}", version="0"),
    )
    started = time.perf_counter()
    async with client:
        connect_seconds = time.perf_counter() - started
        session_id = transport.get_session_id()
        if client.initialize_result is not None:
            await client.set_logging_level("info")
        tools = await client.list_tools()
        echoed = await client.call_tool("echo", {"text": f"hello from fastmcp ({mode})"})
        stepped = await client.call_tool(
            "exai_test_steps", {"steps": STEPS}, progress_handler=on_progress
        )
        # The SDK under fastmcp (mcp 2.x) runs each progress callback as its own task: the last
        # ones may still be pending when the result is returned.
        with anyio.fail_after(30):
            await all_steps_seen.wait()
        server = client.server_info
        report: dict[str, Any] = {
            "connect_seconds": connect_seconds,
            "protocol_version": client.protocol_version,
            "ran_initialize": client.initialize_result is not None,
            "session_id": session_id,
            "server_name": server.name if server else None,
            "tools": [tool.name for tool in tools],
            "echo_text": [c.text for c in echoed.content if c.type == "text"],
            "echo_structured": echoed.structured_content,
            "echo_data": repr(echoed.data),
            "steps_text": [c.text for c in stepped.content if c.type == "text"],
            "steps_progress": progress,
        }
    report["logs"] = logs
    report["strays"] = strays
    report["wire"] = wire.exchanges
    return report


async def main(url: str, token: str) -> None:
    report = {mode: await scenario(url, token, mode) for mode in ("auto", "legacy")}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
