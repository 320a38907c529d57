"""Optional anchor: the ``mcp`` 2.x low-level ``Server`` behind a small WebSocket adapter.

``mcp`` 2.x has no WebSocket transport; this adapter (the shape of 1.x's ``websocket_server``)
turns a Starlette WebSocket into the (read, write) stream pair ``Server.run`` takes.
Runs in ``bench/.venv-mcp2`` and is started by file path:

    bench/.venv-mcp2/bin/python bench/servers/mcp2_lowlevel.py --port 8765
"""

from __future__ import annotations

import argparse
import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


async def _list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[types.Tool(name="echo", input_schema=_SCHEMA)])


async def _call_tool(ctx: Any, params: Any) -> types.CallToolResult:
    text = str((params.arguments or {}).get("text", ""))
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content={"text": text}
    )


server: Server[Any] = Server("bench-mcp2", on_list_tools=_list_tools, on_call_tool=_call_tool)


@asynccontextmanager
async def _websocket_streams(ws: WebSocket) -> AsyncIterator[tuple[Any, Any]]:
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)

    async def reader() -> None:
        async with read_writer:
            try:
                async for text in ws.iter_text():
                    try:
                        msg = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
                    except ValidationError as exc:
                        await read_writer.send(exc)
                        continue
                    await read_writer.send(SessionMessage(msg))
            except (WebSocketDisconnect, anyio.ClosedResourceError):
                pass

    async def writer() -> None:
        async with write_reader:
            async for session_message in write_reader:
                await ws.send_text(
                    session_message.message.model_dump_json(by_alias=True, exclude_unset=True)
                )

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        yield read_stream, write_stream
        tg.cancel_scope.cancel()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket" and scope["path"] == "/mcp":
        ws = WebSocket(scope, receive, send)
        await ws.accept(subprotocol="mcp")
        async with _websocket_streams(ws) as (read, write):
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
    logging.getLogger("mcp").setLevel(logging.WARNING)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", access_log=False, backlog=4096
    )


if __name__ == "__main__":
    main()
