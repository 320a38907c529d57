"""The floor: a bare trio-websocket server answering each JSON-RPC request with a canned result.

No sessions, no validation, no auth, no persistence: the cost of the transport stack alone
(trio + trio-websocket + one ``json.loads``/``json.dumps`` per message). ``tools/call``
answers with the same shape as the runtime's ``echo`` tool, echoing the caller's text.

    python -m bench.servers.floor --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

_INITIALIZE: dict[str, Any] = {
    "protocolVersion": "2025-06-18",
    "capabilities": {"tools": {}},
    "serverInfo": {"name": "bench-floor", "version": "0"},
}
_TOOLS: dict[str, Any] = {
    "tools": [
        {
            "name": "echo",
            "inputSchema": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            },
        }
    ]
}


def _result(method: str, params: Any) -> dict[str, Any]:
    if method == "tools/call":
        text = str(params.get("arguments", {}).get("text", "")) if isinstance(params, dict) else ""
        return {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {"text": text},
            "isError": False,
        }
    if method == "initialize":
        return _INITIALIZE
    if method == "tools/list":
        return _TOOLS
    return {}


async def _handler(request: WebSocketRequest) -> None:
    ws = await request.accept(subprotocol="mcp")
    try:
        while True:
            raw = await ws.get_message()
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict) or "id" not in msg or "method" not in msg:
                continue  # notifications get no answer
            reply = {
                "jsonrpc": "2.0",
                "id": msg["id"],
                "result": _result(msg["method"], msg.get("params")),
            }
            await ws.send_message(json.dumps(reply))
    except ConnectionClosed:
        pass
    except Exception as exc:  # one broken session must not take the server down
        print(f"floor: session error {exc!r}", file=sys.stderr)


async def _serve(host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_websocket, _handler, host, port, None)
        print(f"floor listening on ws://{host}:{port}/mcp", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers.floor")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve, args.host, args.port)


if __name__ == "__main__":
    main()
