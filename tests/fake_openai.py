"""A real OpenAI-compatible chat-completions server on loopback, scripted per test.

Real sockets, real HTTP/1.1 (h11, keep-alive and chunked streams included), so the client
under test runs exactly as in production. Each request takes the next behaviour from the
script; with the script empty it answers normally (streamed if the request asked for it).

Behaviours: :class:`Reply` (answer with usage), :class:`StreamReply` (server-sent events,
with or without usage, usage at the top level or inside the choice as Kimi does, optionally
paused or dropped part-way), :class:`Status` (an error status, e.g. 429 with Retry-After),
:class:`Slow` (wait, then behave), :class:`Hang` (never answer), :class:`Drop` (close the
connection without answering), :class:`Hold` (tell the test the request arrived, then answer
only once the test releases it).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import h11
import trio


@dataclass(frozen=True)
class Reply:
    text: str = "hello from the fake upstream"
    usage: tuple[int, int] | None = (12, 7)  # (prompt_tokens, completion_tokens)
    finish_reason: str = "stop"


@dataclass(frozen=True)
class StreamReply:
    chunks: Sequence[str] = ("hel", "lo ", "world")
    usage: tuple[int, int] | None = (12, 3)
    # "if_asked": a final usage event only with stream_options.include_usage (OpenAI);
    # "last_chunk": usage on the last chunk, asked or not (GLM); "choice": inside it (Kimi).
    usage_at: Literal["if_asked", "last_chunk", "choice"] = "if_asked"
    pause_after: int | None = None  # after this many chunks, wait for `resume`
    resume: trio.Event | None = None
    drop_after: int | None = None  # after this many chunks, close the connection


@dataclass(frozen=True)
class Status:
    status: int
    message: str = "fake upstream error"
    retry_after: str | None = None
    headers: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Slow:
    seconds: float
    then: Behaviour


@dataclass(frozen=True)
class Hang:
    pass


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Hold:
    """Call ``arrived`` with the request (the upstream has it: a tool's effect happened),
    then answer as ``then`` once ``release`` is set, if ever. For a test that must act while
    a call is certainly running, e.g. kill the server under it."""

    release: trio.Event
    arrived: Callable[[Received], None]
    then: Behaviour = Reply()


Behaviour: TypeAlias = Reply | StreamReply | Status | Slow | Hang | Drop | Hold


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    port: int = 0
    received: list[Received] = field(default_factory=list)
    #: With the script empty: how to answer a request, chosen from what it asks (for a test
    #: whose requests interleave, e.g. a turn and a background summary); else the default.
    respond: Callable[[Received], Behaviour] | None = None
    _script: deque[Behaviour] = field(default_factory=deque)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        self._script.extend(behaviours)

    def _next(self, request: Received) -> Behaviour:
        if self._script:
            return self._script.popleft()
        if self.respond is not None:
            return self.respond(request)
        return StreamReply() if request.body.get("stream") else Reply()

    async def handle(self, stream: trio.SocketStream) -> None:
        # A test server must never take the nursery down because a client went away.
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await _read_request(conn, stream)
            if request is None:
                return
            self.received.append(request)
            behaviour = self._next(request)
            if not await self._respond(conn, stream, behaviour, request):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _respond(
        self, conn: h11.Connection, stream: trio.SocketStream, b: Behaviour, req: Received
    ) -> bool:
        """Answer one request; False: the connection is to be closed."""
        model = str(req.body.get("model", "fake-model"))
        match b:
            case Slow(seconds=seconds, then=then):
                await trio.sleep(seconds)
                return await self._respond(conn, stream, then, req)
            case Hang():
                await trio.sleep_forever()
            case Hold(release=release, arrived=arrived, then=then):
                arrived(req)
                await release.wait()
                return await self._respond(conn, stream, then, req)
            case Drop():
                return False
            case Status():
                headers = [*b.headers]
                if b.retry_after is not None:
                    headers.append(("retry-after", b.retry_after))
                body = {"error": {"message": b.message, "type": "fake_error"}}
                await _send_json(conn, stream, b.status, body, headers)
            case Reply():
                answer: dict[str, Any] = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": b.text},
                            "finish_reason": b.finish_reason,
                        }
                    ],
                }
                if b.usage is not None:
                    answer["usage"] = _usage(b.usage)
                await _send_json(conn, stream, 200, answer, [])
            case StreamReply():
                return await _stream(conn, stream, b, model, req)
        return True


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> Received | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return Received(
                method=request.method.decode(),
                path=request.target.decode(),
                headers={k.decode().lower(): v.decode() for k, v in request.headers},
                body=json.loads(body) if body else {},
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_json(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[str, str]],
) -> None:
    payload = json.dumps(body).encode()
    await _send(
        conn,
        stream,
        h11.Response(
            status_code=status,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
                *headers,
            ],
        ),
    )
    await _send(conn, stream, h11.Data(data=payload))
    await _send(conn, stream, h11.EndOfMessage())


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    prompt, completion = usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _stream(
    conn: h11.Connection, stream: trio.SocketStream, b: StreamReply, model: str, req: Received
) -> bool:
    await _send(
        conn,
        stream,
        h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]),
    )

    async def event(data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        await _send(conn, stream, h11.Data(data=f"data: {text}\n\n".encode()))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    await _send(conn, stream, h11.Data(data=b": keep-alive comment\n\n"))
    for index, text in enumerate(b.chunks):
        if b.drop_after is not None and index == b.drop_after:
            return False
        if b.pause_after is not None and index == b.pause_after and b.resume is not None:
            await b.resume.wait()
        await event(chunk({"content": text}))
    last = chunk({}, "stop")
    if b.usage is not None and b.usage_at == "choice":
        last["choices"][0]["usage"] = _usage(b.usage)
    if b.usage is not None and b.usage_at == "last_chunk":
        last["usage"] = _usage(b.usage)
    await event(last)
    wants_usage = bool(req.body.get("stream_options", {}).get("include_usage"))
    if b.usage is not None and b.usage_at == "if_asked" and wants_usage:
        await event(
            {"id": "chatcmpl-fake", "model": model, "choices": [], "usage": _usage(b.usage)}
        )
    await event("[DONE]")
    await _send(conn, stream, h11.EndOfMessage())
    return True


@asynccontextmanager
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """Serve on 127.0.0.1 (a free port) until the block ends."""
    server = FakeOpenAI()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, server.handle, listeners)
        yield server
        nursery.cancel_scope.cancel()
