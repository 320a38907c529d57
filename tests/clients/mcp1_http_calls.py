"""Tool calls in one 2025-era Streamable HTTP session of ``mcp==1.30.0``, as the test names them.

Runs in .venv-clients/mcp1, driven by tests/test_streamable_http_clients.py: ``python
mcp1_http_calls.py URL TOKEN CALLS`` where CALLS is a JSON list of ``[tool, arguments]``. The
same client as mcp1_http.py (``streamable_http_client`` with the bearer token on an
``httpx.AsyncClient``): initialize, the calls in order, DELETE on exit. Prints one JSON line: the
session id adopted and each call's text content, structured content and error flag.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, token: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    client = httpx.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(30, read=300)
    )
    results: list[dict[str, Any]] = []
    async with (
        client,
        streamable_http_client(url, http_client=client) as (read, write, session_id),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for tool, arguments in calls:
            result = await session.call_tool(tool, arguments)
            results.append(
                {
                    "text": [c.text for c in result.content if c.type == "text"],
                    "structured": result.structuredContent,
                    "is_error": result.isError,
                }
            )
        adopted = session_id()
    print(json.dumps({"session_id": adopted, "results": results}), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
