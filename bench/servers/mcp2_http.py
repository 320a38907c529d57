"""Anchor of ``python -m bench http``: the ``mcp`` 2.x low-level ``Server`` behind the SDK's own
Streamable HTTP app (``Server.streamable_http_app()``: Starlette + the SDK's
``StreamableHTTPSessionManager``) under uvicorn, with one ``echo`` tool.

``--stateless`` builds it with ``stateless_http=True`` (a fresh transport per request, no
``Mcp-Session-Id``, no handshake needed: the SDK's stateless servers are "born ready");
without it the app keeps sessions. Everything else is the SDK's default, ``json_response``
included (False: every response to a POSTed request is an SSE stream). INFO logging off.
Runs in ``bench/.venv-mcp2`` and is started by file path:

    bench/.venv-mcp2/bin/python bench/servers/mcp2_http.py --port 8765 [--stateless]
"""

from __future__ import annotations

import argparse
import logging
import resource
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server

_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


async def _list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[types.Tool(name="echo", input_schema=_SCHEMA)])


async def _call_tool(ctx: Any, params: Any) -> types.CallToolResult:
    text = str((params.arguments or {}).get("text", ""))
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content={"text": text}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stateless", action="store_true")
    args = parser.parse_args()
    logging.getLogger("mcp").setLevel(logging.WARNING)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server: Server[Any] = Server(
        "bench-mcp2-http", on_list_tools=_list_tools, on_call_tool=_call_tool
    )
    app = server.streamable_http_app(stateless_http=args.stateless, host=args.host)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", access_log=False, backlog=4096
    )


if __name__ == "__main__":
    main()
