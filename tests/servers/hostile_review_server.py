"""A stdio MCP server that misbehaves on purpose, for the review's hostile-server tests
(tests/test_proxied_review.py). Standard library only. Its first argument says how:

``names``
    lists tools whose names MCP does not allow beside two it does (``ok``, 100 ``v``): a name
    with a newline, one of 10,000 characters, one with a space, one empty; and tools whose
    input or output schema is not an object schema (MCP requires ``"type": "object"``).
``pages``
    pages ``tools/list`` without end: 400 tools a page, always a ``nextCursor``; and answers
    ``pages`` (a tool on the first page) with how many pages it was asked for.
``requests``
    its tool ``beg`` sends 5,000 ``sampling/createMessage`` requests at once, reading nothing
    meanwhile (as a single-threaded server does), then answers ``begged``.
``chaos``
    its tool ``chaos`` writes, before its answer: lines that are not JSON, a batch, answers
    to ids it was never sent (a number, a string, null), 2,000 ``notifications/progress``
    for tokens it was never given and 2,000 ``notifications/message``; then ``survived``.
``invalid``
    answers its tool ``bad_result`` with a result that is not an object, ``bad_error`` with
    an error object without a message, and ``fine`` with ``fine``.
``stderr``
    its tool ``shout`` writes a 100 KiB line to stderr, then 512 KiB of ordinary lines, then
    answers ``shouted``: a server whose stderr is not read blocks on the write.
"""

from __future__ import annotations

import json
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "names"
#: tools/list requests received (the ``pages`` mode's answer).
asked = [0]


def send(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def tool(name: str) -> dict[str, object]:
    return {"name": name, "description": "a tool", "inputSchema": {"type": "object"}}


def listing(params: dict[str, object]) -> dict[str, object]:
    if MODE == "names":
        names = ["ok", "v" * 100, "bad\nname", "x" * 10_000, "sp ace", ""]
        not_objects = [
            {"name": "stringly", "inputSchema": {"type": "string"}},
            {"name": "untyped", "inputSchema": {"properties": {}}},
            {"name": "listy", "inputSchema": {"type": "object"}, "outputSchema": {"type": "array"}},
        ]
        return {"tools": [tool(name) for name in names] + not_objects}
    if MODE == "pages":
        asked[0] += 1
        page = int(str(params.get("cursor") or "0"))
        tools = [tool(f"t{page}_{index}") for index in range(400)]
        if page == 0:
            tools[0] = tool("pages")
        return {"tools": tools, "nextCursor": str(page + 1)}
    if MODE == "invalid":
        return {"tools": [tool("bad_result"), tool("bad_error"), tool("fine")]}
    if MODE == "chaos":
        return {"tools": [tool("chaos")]}
    if MODE == "requests":
        return {"tools": [tool("beg")]}
    return {"tools": [tool("shout")]}


def call(name: object) -> str:
    if name == "shout":
        sys.stderr.write("y" * 100 * 1024 + "\n")
        for _ in range(512):
            sys.stderr.write("z" * 1023 + "\n")
        sys.stderr.flush()
        return "shouted"
    if name == "chaos":
        sys.stdout.write('not json\n{"half": \n\x00\xff garbage\n[]\n')
        send({"jsonrpc": "2.0", "id": 99_999, "result": {}})
        send({"jsonrpc": "2.0", "id": "exai-1", "result": {}})
        send({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "x"}})
        sys.stdout.write(json.dumps([{"jsonrpc": "2.0", "method": "ping", "id": 7}]) + "\n")
        for index in range(2000):
            note = {"progressToken": f"not-ours-{index}", "progress": index, "total": 2000}
            send({"jsonrpc": "2.0", "method": "notifications/progress", "params": note})
            data = {"level": "error", "data": "z" * 200}
            send({"jsonrpc": "2.0", "method": "notifications/message", "params": data})
        return "survived"
    if name == "beg":
        for index in range(5000):
            send({"jsonrpc": "2.0", "id": f"s{index}", "method": "sampling/createMessage"})
        return "begged"
    if name == "fine":
        return "fine"
    if name == "pages":
        return str(asked[0])
    return "ok"


for line in sys.stdin:
    request = json.loads(line)
    method, request_id = request.get("method"), request.get("id")
    if request_id is None or "method" not in request:
        continue  # a notification, or the answer to one of its own requests
    params = request.get("params") or {}
    if method == "initialize":
        result: dict[str, object] = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": f"hostile-{MODE}", "version": "0"},
        }
    elif method == "tools/list":
        result = listing(params)
    elif method == "tools/call" and params.get("name") == "bad_result":
        send({"jsonrpc": "2.0", "id": request_id, "result": "oops"})
        continue
    elif method == "tools/call" and params.get("name") == "bad_error":
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": "x"}})
        continue
    elif method == "tools/call":
        text = call(params.get("name"))
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": method}})
        continue
    send({"jsonrpc": "2.0", "id": request_id, "result": result})
