"""A real MCP client session: the official Python SDK ``mcp==1.30.0`` over WebSocket.

Runs in its own virtual environment (.venv-clients/mcp1), driven by the tests as a subprocess:
``python mcp1_session.py URL``. It initializes, lists tools, calls ``echo``, prints one JSON
line with what it saw, then keeps the session open until a line arrives on stdin, so the test
can look at the database while the session is live.
"""

from __future__ import annotations

import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.websocket import websocket_client


async def main(url: str) -> None:
    async with websocket_client(url) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        tools = await session.list_tools()
        echoed = await session.call_tool("echo", {"text": "hello from mcp 1.30"})
        await session.send_ping()
        report = {
            "protocol_version": init.protocolVersion,
            "server_name": init.serverInfo.name,
            "session_id": (init.meta or {}).get("exai/sessionId"),
            "tools": [tool.name for tool in tools.tools],
            "echo_text": [c.text for c in echoed.content if c.type == "text"],
            "echo_structured": echoed.structuredContent,
            "echo_is_error": echoed.isError,
        }
        print(json.dumps(report), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
