"""The official Python SDK ``mcp==2.3.0`` ``Client``, in its default ``auto`` mode, over WebSocket.

mcp 2.x has no WebSocket transport, but its ``Client`` takes any transport: an async context
manager yielding a (read stream, write stream) pair of ``SessionMessage``
(``mcp.client.Transport``).
:func:`websocket_transport` is that adapter, shaped like the 1.x ``websocket_client``: subprotocol
``mcp``, one JSON-RPC message per text frame.

Runs in .venv-clients/mcp2, driven by tests/test_real_clients.py: ``python mcp2_session.py
URL``. It connects (``auto``: ``server/discover`` first, ``initialize`` only as the fallback),
lists tools, calls ``echo`` and ``exai_test_steps`` with a progress callback, prints one JSON
line with what it saw and how long connecting took, and exits.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import Client
from mcp.client.session import DISCOVER_TIMEOUT_SECONDS
from mcp.shared.message import SessionMessage
from mcp_types import Implementation, jsonrpc_message_adapter
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol


@asynccontextmanager
async def websocket_transport(
    url: str,
) -> AsyncIterator[
    tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]
]:
    """A ``mcp.client.Transport`` over a WebSocket."""
    to_client, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, from_client = anyio.create_memory_object_stream[SessionMessage](0)

    async with connect(url, subprotocols=[Subprotocol("mcp")]) as ws:

        async def read_frames() -> None:
            async with to_client:
                async for frame in ws:
                    try:
                        message = jsonrpc_message_adapter.validate_json(frame, by_name=False)
                    except ValidationError as exc:
                        # The session reports a bad frame instead of dying (as the SDK's own
                        # transports do).
                        await to_client.send(exc)
                        continue
                    await to_client.send(SessionMessage(message))

        async def write_frames() -> None:
            async with from_client:
                async for outgoing in from_client:
                    # exclude_unset, as the SDK's stdio transport: what the client did not
                    # set stays off the wire.
                    await ws.send(
                        outgoing.message.model_dump_json(by_alias=True, exclude_unset=True)
                    )

        async with anyio.create_task_group() as pumps:
            pumps.start_soon(read_frames)
            pumps.start_soon(write_frames)
            try:
                yield read_stream, write_stream
            finally:
                pumps.cancel_scope.cancel()


async def main(url: str) -> None:
    steps = 3
    progress: list[list[float | str | None]] = []
    all_steps_seen = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append([value, total, message])
        if sum(1 for *_, said in progress if said and said.startswith("step")) == steps:
            all_steps_seen.set()

    started = time.perf_counter()
    async with Client(
        websocket_transport(url), client_info=Implementation(name="exai-mcp2-test", version="0")
    ) as client:
        connect_seconds = time.perf_counter() - started
        session = client.session
        tools = await client.list_tools()
        echoed = await client.call_tool("echo", {"text": "hello from mcp 2.3"})
        stepped = await client.call_tool(
            "exai_test_steps", {"steps": steps}, progress_callback=on_progress
        )
        # 2.x runs each progress callback as its own task, so the last ones may still be
        # pending when the result is returned; the bound only turns a loss into a failure.
        with anyio.fail_after(30):
            await all_steps_seen.wait()
        server = client.server_info
        discovered = session.discover_result
        report = {
            "connect_seconds": connect_seconds,
            "discover_timeout_seconds": DISCOVER_TIMEOUT_SECONDS,
            "protocol_version": client.protocol_version,
            "adopted_discover": session.discover_result is not None,
            "ran_initialize": session.initialize_result is not None,
            "supported_versions": discovered.supported_versions if discovered else None,
            "session_id": (discovered.meta or {}).get("exai/sessionId") if discovered else None,
            "server_name": server.name if server else None,
            "tools": [tool.name for tool in tools.tools],
            "echo_text": [c.text for c in echoed.content if c.type == "text"],
            "echo_structured": echoed.structured_content,
            "echo_is_error": echoed.is_error,
            "steps_text": [c.text for c in stepped.content if c.type == "text"],
            "steps_progress": progress,
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
