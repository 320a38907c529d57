"""Anchor: the official Python SDK 1.x (``mcp==1.30.0``) FastMCP server over WebSocket.

FastMCP's tool machinery behind ``mcp.server.websocket.websocket_server`` under uvicorn, as the
SDK documents it; per-request INFO logging off (FastMCP at WARNING, no uvicorn access log).
Runs in ``bench/.venv-anchors`` and is started by file path:

    bench/.venv-anchors/bin/python bench/servers/sdk_fastmcp.py --port 8765
"""

from __future__ import annotations

import argparse
import resource
import warnings
from typing import Any, TypedDict

import uvicorn
from mcp.server.fastmcp import FastMCP
from mcp.server.websocket import websocket_server

warnings.filterwarnings("ignore", category=DeprecationWarning)


class Echo(TypedDict):
    text: str


mcp = FastMCP("bench-sdk", log_level="WARNING")


@mcp.tool()
def echo(text: str) -> Echo:
    """Return the text unchanged."""
    return {"text": text}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Raw ASGI: the WebSocket at /mcp, lifespan acknowledged, anything else refused."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket" and scope["path"] == "/mcp":
        server = mcp._mcp_server
        async with websocket_server(scope, receive, send) as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", access_log=False, backlog=4096
    )


if __name__ == "__main__":
    main()
