"""A stdio MCP server that misbehaves on purpose, for the proxy's hostile-server tests.

No real server floods its client; this one does what it is told by the tool called:
``flood`` sends ``notifications/tools/list_changed`` N times before answering; ``count``
answers how many ``tools/list`` requests it has received. Standard library only.
"""

from __future__ import annotations

import json
import sys

lists = 0


def send(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def tool(name: str) -> dict[str, object]:
    return {"name": name, "description": name, "inputSchema": {"type": "object"}}


for line in sys.stdin:
    request = json.loads(line)
    method, request_id = request.get("method"), request.get("id")
    if request_id is None:
        continue  # a notification
    if method == "initialize":
        result: dict[str, object] = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "hostile", "version": "0"},
        }
    elif method == "tools/list":
        lists += 1
        result = {"tools": [tool("flood"), tool("count")]}
    elif method == "tools/call":
        params = request.get("params") or {}
        if params.get("name") == "flood":
            times = int((params.get("arguments") or {}).get("times", 1000))
            for _ in range(times):
                send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            text = f"flooded {times}"
        else:
            text = str(lists)
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": method}})
        continue
    send({"jsonrpc": "2.0", "id": request_id, "result": result})
