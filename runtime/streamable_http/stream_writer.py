"""One response stream written to its HTTP exchange: one JSON body, or an SSE stream.

The choice is made per request, by what comes first (the spec lets the server choose: 2025-11-25
and 2026-07-28 transport specs, "Sending Messages"): a response that is the first thing the
session sends for its request goes out as ``application/json`` (the common, cheapest case);
anything else first (progress, a log message, a keep-alive) starts ``text/event-stream``, which
then carries everything up to the response and ends after it. A sessionless request's response
is renamed back to the client's id here, and an unknown method of that era is 404.
"""

from __future__ import annotations

import pydantic_core

from runtime.mcp import jsonrpc
from runtime.mcp.errors import MethodNotFound, Unavailable
from runtime.streamable_http import sse
from runtime.streamable_http.refusal import RETRY_AFTER_S
from runtime.streamable_http.session_transport import ResponseStream
from runtime.streamable_http.wire import HttpWire

__all__ = ["JSON", "KEEPALIVE_MARK", "SSE_HEADERS", "StreamWriter"]

JSON = b"application/json"
#: The head of every SSE response.
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", sse.EVENT_STREAM),
    (b"cache-control", b"no-cache"),
    # Reverse proxies (nginx) must not buffer the stream (2026-07-28 transport spec's SHOULD).
    (b"x-accel-buffering", b"no"),
)


#: Queued on a quiet stream; written as an SSE comment, never as a message.
KEEPALIVE_MARK = ":keepalive"


class StreamWriter:
    """Writes one stream's messages: the first, if it is the response and JSON is allowed,
    as an ``application/json`` body; otherwise an SSE stream of them all."""

    def __init__(
        self,
        wire: HttpWire,
        stream: ResponseStream,
        headers: list[tuple[bytes, bytes]],
        json_allowed: bool,
        *,
        opening: bool = False,
    ) -> None:
        self._wire = wire
        self._stream = stream
        self._headers = headers
        self._json_allowed = json_allowed
        #: The stream answers the ``initialize`` that opened its session: an error response
        #: establishes none, so it names none (see :attr:`refused`).
        self._opening = opening
        self._streaming = False
        #: The response was written whole; the connection may serve another request.
        self.done = False
        #: The response was a JSON-RPC error to the ``initialize`` that opened the session.
        self.refused = False

    async def begin_stream(self) -> None:
        self._streaming = True
        await self._wire.start_stream(
            200,
            [*SSE_HEADERS, *self._headers],
        )

    async def write(self, message: str) -> None:
        final = jsonrpc.is_response(message)
        status = 200
        stream = self._stream
        if final and stream.client_id is not None and isinstance(stream.request_id, int):
            # 2026-07-28: an unknown method is 404 with its -32601 (transport spec).
            if jsonrpc.error_code(message, stream.request_id) == MethodNotFound.code:
                status = 404
            message = jsonrpc.rename_response(message, stream.request_id, stream.client_id)
        headers = self._headers
        if final and self._opening and "error" in pydantic_core.from_json(message):
            # 2025-11-25 transport spec, "Session Management": the session id comes "on
            # the HTTP response containing the InitializeResult", and this is none.
            self.refused = True
            headers = []
        if not self._streaming:
            if final and self._json_allowed:
                await self._wire.respond(
                    status, message.encode(), content_type=JSON, headers=headers
                )
                self.done = True
                self._stream.delivered()
                return
            await self.begin_stream()
        if message is KEEPALIVE_MARK:
            await self._wire.send_data(sse.KEEPALIVE)
            return
        await self._wire.send_data(sse.event(message))
        if final:
            await self._wire.end_stream()
            self.done = True
            self._stream.delivered()

    async def finish(self) -> None:
        """The stream ended without its response (cancelled, the session ended): close it
        as its kind requires."""
        if self.done:
            return
        stream = self._stream
        if (
            stream.request_id is not None
            and stream.ending is not None
            and stream.ending != "cancelled"
        ):
            error = Unavailable(
                f"{stream.ending}; the request was not answered",
                {"retryAfterMs": RETRY_AFTER_S * 1000},
            )
            message = jsonrpc.encode_error(stream.wire_id, error)
            if not self._streaming and self._json_allowed:
                await self._wire.respond(
                    200, message.encode(), content_type=JSON, headers=self._headers
                )
                self.done = True
                return
            if not self._streaming:
                await self.begin_stream()
            await self._wire.send_data(sse.event(message))
        elif not self._streaming:
            await self.begin_stream()  # cancelled before anything was sent: an empty stream
        await self._wire.end_stream()
        self.done = True
