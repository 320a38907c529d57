"""The Streamable HTTP client's resumption (``runtime/mcp/http_client.py``), against a raw
HTTP server on loopback that plays the 2025-11-25 spec's "polling" server: it answers a
request's POST with an SSE stream holding only a priming event (an ``id`` and a ``retry``,
no data) and closes it; the answer comes on the ``GET`` the client resumes with
``Last-Event-ID`` (spec ``basic/transports``, "Resumability and Redelivery")."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from runtime.mcp.http_client import HttpStream, open_http_stream

REQUEST = json.dumps(
    {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow", "arguments": {}}}
)
ANSWER = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": [], "isError": False}})


@dataclass
class Head:
    method: str
    headers: dict[str, str]


@dataclass
class PollingServer:
    """``on_get(n, last_event_id)`` gives the n-th (from 1) GET's status and SSE body."""

    on_get: Callable[[int, str | None], tuple[int, bytes]]
    heads: list[Head] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        first, *lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        need = int(headers.get("content-length", "0"))
        while len(body) < need:
            body += await stream.receive_some(65536)
        method = first.split(" ", 1)[0]
        self.heads.append(Head(method, headers))
        if method == "POST":
            status, sse = 200, b"id: e1\nretry: 5\ndata:\n\n"
        elif method == "GET":
            gets = sum(h.method == "GET" for h in self.heads)
            status, sse = self.on_get(gets, headers.get("last-event-id"))
        else:
            status, sse = 405, b""
        kind = "text/event-stream" if status == 200 else "text/plain"
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nConnection: close\r\n"
            f"{'' if status == 200 else 'Content-Length: 0' + chr(13) + chr(10)}\r\n".encode()
            + sse
        )
        await stream.aclose()


@asynccontextmanager
async def served(server: PollingServer) -> AsyncIterator[HttpStream]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_http_stream(
            f"http://127.0.0.1:{port}/mcp", {}, name="t", max_message_bytes=1 << 20, listen=False
        ) as stream:
            yield stream
        nursery.cancel_scope.cancel()


async def test_a_request_whose_stream_ends_early_is_resumed_with_its_last_event_id() -> None:
    server = PollingServer(lambda n, last: (200, f"id: e2\ndata: {ANSWER}\n\n".encode()))
    async with served(server) as stream:
        await stream.send(REQUEST)
        with trio.fail_after(30):
            answer = await stream.receive()
    assert answer is not None
    assert json.loads(answer) == json.loads(ANSWER)
    gets = [h for h in server.heads if h.method == "GET"]
    assert len(gets) == 1
    assert gets[0].headers["last-event-id"] == "e1"
    assert gets[0].headers["accept"] == "text/event-stream"


async def test_resuming_follows_the_newest_event_id() -> None:
    """A resumed stream that ends again, after a newer event, is resumed from that one."""

    def on_get(n: int, last: str | None) -> tuple[int, bytes]:
        if n == 1:
            return 200, b"id: e2\nretry: 5\ndata:\n\n"
        return 200, f"id: e3\ndata: {ANSWER}\n\n".encode()

    server = PollingServer(on_get)
    async with served(server) as stream:
        await stream.send(REQUEST)
        with trio.fail_after(30):
            answer = await stream.receive()
    assert answer is not None
    assert json.loads(answer)["id"] == 7
    assert [h.headers["last-event-id"] for h in server.heads if h.method == "GET"] == ["e1", "e2"]


async def test_a_server_that_refuses_to_resume_fails_that_request_only() -> None:
    server = PollingServer(lambda n, last: (405, b""))
    async with served(server) as stream:
        await stream.send(REQUEST)
        with trio.fail_after(30):
            answer = await stream.receive()
        assert answer is not None
        error = json.loads(answer)
        assert error["id"] == 7
        assert error["error"]["code"] == -32603
        assert "closed its stream before answering" in error["error"]["message"]
        # The stream itself is not broken: the next request is sent.
        await stream.send(REQUEST)
        with trio.fail_after(30):
            again = await stream.receive()
        assert again is not None
        assert json.loads(again)["id"] == 7
    assert sum(h.method == "POST" for h in server.heads) == 2


async def test_resuming_gives_up_after_three_tries() -> None:
    """A server that never answers on its resumed streams (each ends after a fresh event id)
    is resumed at most 3 times, then the request fails."""
    server = PollingServer(lambda n, last: (200, f"id: r{n}\nretry: 5\ndata:\n\n".encode()))
    async with served(server) as stream:
        await stream.send(REQUEST)
        with trio.fail_after(30):
            answer = await stream.receive()
    assert answer is not None
    assert json.loads(answer)["error"]["code"] == -32603
    assert [h.headers["last-event-id"] for h in server.heads if h.method == "GET"] == [
        "e1",
        "r1",
        "r2",
    ]
