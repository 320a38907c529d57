"""MCP's Streamable HTTP transport, client side, as a :class:`~runtime.mcp.client.MessageStream`
(specification 2025-11-25 ``basic/transports``, "Streamable HTTP").

Every message sent is one ``POST`` to the MCP endpoint, ``Accept: application/json,
text/event-stream``, with the ``MCP-Session-Id`` the server gave in its answer to
``initialize`` (if it gave one) and, once initialized, ``MCP-Protocol-Version``:

- a notification or a response is answered ``202 Accepted``: :meth:`HttpStream.send` waits
  for that answer (at most ``timeout`` seconds);
- a request is answered either with one JSON body or with an SSE stream whose events carry
  the server's messages about it, then its response. :meth:`HttpStream.send` returns once
  the request is handed to a task of the stream's nursery, which reads the answer and feeds
  each message to :meth:`HttpStream.receive`. (A request's answer may take as long as the
  tool runs: the sender must not wait for it, or it could not be cancelled.)

After ``notifications/initialized`` the stream also opens the ``GET`` stream for the
server's own messages (``tools/list_changed``, logs, pings); a server answering ``405`` has
none. An SSE stream the server ends before its response, after an event with an ``id``, is
resumed with ``GET`` and ``Last-Event-ID`` after the server's ``retry`` (spec: "Resumability
and Redelivery"; the server's "polling"), at most 3 times; a connection that drops
mid-answer breaks the stream instead.

The stream **breaks** (:class:`~runtime.mcp.client.ServerGone`, naming the endpoint without
its query and never the headers) when the server cannot be reached, a connection drops
mid-answer, the server answers 401/403, or 404 to our session (spec: the session ended, the
client starts a new one; exai's proxy restarts the server), or a message is larger than
``max_message_bytes``. A request the server answers with another HTTP error, or not at all,
gets a JSON-RPC error response (-32603) made here, so that one call fails, not the stream.

:func:`open_http_stream` owns the nursery of the answer-reading tasks and the HTTP client;
on exit it cancels them and ends the session with ``DELETE`` (at most 2 s; 405 is fine).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic_core
import structlog
import trio

from runtime.mcp.client import ServerGone
from runtime.mcp.ws_client import public_url

__all__ = ["HttpStream", "open_http_stream"]

log = structlog.get_logger("servers")

#: Seconds to connect, to send a request, to have a notification accepted.
DEFAULT_TIMEOUT = 30.0
#: Seconds the closing ``DELETE`` may take.
_DELETE_TIMEOUT = 2.0
#: Messages received and not yet read: the reader takes them at once (ClientSession.run).
_QUEUE = 16
#: Resumptions of one cut SSE stream before it is given up.
_MAX_RESUMES = 3
#: Seconds before resuming a cut stream when the server sent no ``retry``.
_DEFAULT_RETRY = 0.5
#: The JSON-RPC error code of a request the server answered with an HTTP error.
_INTERNAL_ERROR = -32603

_ACCEPT = "application/json, text/event-stream"


class _TooLong(Exception):
    """A message (a JSON body, an SSE event, an SSE line) over the bound."""


@dataclass(slots=True)
class _Event:
    data: str
    id: str | None
    retry: float | None
    event: str


class _SseParser:
    """Server-Sent Events, as the WHATWG ``text/event-stream`` rules: ``data:`` lines joined
    by newlines, ``id:``, ``retry:`` (milliseconds), ``event:``, comments, a blank line ends
    an event. Lines end with LF or CRLF (a lone CR is not split). Bounded: an event's data or
    one line over ``limit`` bytes raises :class:`_TooLong`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._data: list[str] = []
        self._size = 0
        self._id: str | None = None
        self._retry: float | None = None
        self._event = ""

    def feed(self, chunk: bytes) -> Iterator[_Event]:
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._limit + 64:
                    raise _TooLong
                return
            line = bytes(self._buffer[:end]).rstrip(b"\r").decode("utf-8", errors="replace")
            del self._buffer[: end + 1]
            event = self._line(line)
            if event is not None:
                yield event

    def _line(self, line: str) -> _Event | None:
        if not line:
            if not self._data and self._id is None and self._retry is None:
                return None
            event = _Event("\n".join(self._data), self._id, self._retry, self._event)
            self._data, self._size, self._id, self._retry, self._event = [], 0, None, None, ""
            return event
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._size += len(value) + 1
            if self._size > self._limit + 1:
                raise _TooLong
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value) / 1000
        elif name == "event":
            self._event = value
        return None


@dataclass(slots=True)
class _Answer:
    """What one SSE stream gave so far: the last event id and retry, whether the response
    to its request came."""

    last_id: str | None = None
    retry: float | None = None
    answered: bool = False


class HttpStream:
    """The client's side of one Streamable HTTP session (module doc). Made by
    :func:`open_http_stream`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        nursery: trio.Nursery,
        *,
        name: str,
        max_message_bytes: int,
        timeout: float,
        listen: bool,
    ) -> None:
        self.name = name
        self._client = client
        self._url = url
        self._where = public_url(url)
        self._nursery = nursery
        self._max = max_message_bytes
        self._timeout = timeout
        self._listen = listen
        self._deliver_to, self._incoming = trio.open_memory_channel[str](_QUEUE)
        self._initialize_id: Any = None
        #: The server's ``MCP-Session-Id``, echoed on every request after ``initialize``.
        self.session_id: str | None = None
        #: The version ``initialize`` agreed, sent as ``MCP-Protocol-Version`` after it.
        self.protocol_version: str | None = None
        self._listening = False
        self._gone: str | None = None
        self._logged: set[str] = set()

    # -- the MessageStream --------------------------------------------------------------------

    async def send(self, message: str) -> None:
        if self._gone is not None:
            raise ServerGone(self._gone)
        request_id, method, is_request = _kind(message)
        if is_request:
            if method == "initialize":
                self._initialize_id = request_id
            self._nursery.start_soon(self._post_request, message, request_id)
            return
        try:
            with trio.fail_after(self._timeout):
                async with self._client.stream(
                    "POST", self._url, content=message.encode(), headers=self._headers()
                ) as response:
                    self._check_status(response)
                    if response.status_code >= 300:
                        self._log_once(
                            f"refused:{response.status_code}",
                            "server.http_refused",
                            status=response.status_code,
                        )
        except trio.TooSlowError:
            self._break(f"{self._where} did not accept a message in {self._timeout:g} s")
        except httpx.HTTPError as error:
            self._break(self._broke(error))
        if self._gone is not None:
            raise ServerGone(self._gone)
        if method == "notifications/initialized" and self._listen and not self._listening:
            self._listening = True
            self._nursery.start_soon(self._listen_for_server)

    async def receive(self) -> str | None:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._gone is not None:
                raise ServerGone(self._gone) from None
            return None

    # -- requests -----------------------------------------------------------------------------

    async def _post_request(self, message: str, request_id: Any) -> None:
        """POST one request and deliver its answer (module doc); never raises what the
        network does: the stream breaks instead."""
        answer = _Answer()
        with self._breaking():
            async with self._client.stream(
                "POST", self._url, content=message.encode(), headers=self._headers()
            ) as response:
                if request_id == self._initialize_id and request_id is not None:
                    self.session_id = response.headers.get("mcp-session-id") or None
                self._check_status(response)
                if self._gone is not None:
                    return
                await self._read_answer(response, request_id, answer)
        if not answer.answered and self._gone is None:
            await self._resume(request_id, answer)

    @contextlib.contextmanager
    def _breaking(self) -> Iterator[None]:
        """What the network does to one exchange breaks the stream instead of being raised:
        a connection dropped mid-answer is the server gone, as a process that died (resuming
        after a cut, tried in a test, hung on server-everything's replay); an over-long
        message is the server's fault. The caller checks ``self._gone`` afterwards."""
        try:
            yield
        except httpx.HTTPError as error:
            self._break(self._broke(error))
        except _TooLong:
            self._break(self._too_long())

    async def _read_answer(
        self, response: httpx.Response, request_id: Any, answer: _Answer
    ) -> None:
        kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if response.status_code >= 300:
            body = await _read_bounded(response, self._max)
            if not await self._deliver_error_body(body, request_id):
                await self._fail(request_id, f"answered HTTP {response.status_code}")
            answer.answered = True
        elif kind == "text/event-stream":
            await self._read_events(response, answer, request_id)
        elif kind == "application/json":
            for message in _messages(await _read_bounded(response, self._max)):
                answer.answered |= await self._deliver(message, request_id)
            if not answer.answered:
                await self._fail(request_id, "answered without a response")
                answer.answered = True
        else:
            await self._fail(
                request_id, f"answered HTTP {response.status_code} with {kind or 'no content type'}"
            )
            answer.answered = True

    async def _resume(self, request_id: Any, answer: _Answer) -> None:
        """The request's SSE stream ended before its response: resume it with
        ``Last-Event-ID`` if the server gave event ids, else fail the request."""
        for _ in range(_MAX_RESUMES):
            if answer.last_id is None:
                break
            await trio.sleep(answer.retry if answer.retry is not None else _DEFAULT_RETRY)
            refused = False
            with self._breaking():
                async with self._client.stream(
                    "GET",
                    self._url,
                    headers=self._headers("text/event-stream", last_event_id=answer.last_id),
                ) as response:
                    self._check_status(response)
                    refused = response.status_code != 200  # no resumption here (405, say)
                    if self._gone is None and not refused:
                        await self._read_events(response, answer, request_id)
            if self._gone is not None or answer.answered:
                return
            if refused:
                break
        await self._fail(request_id, "closed its stream before answering")

    # -- the server's own stream --------------------------------------------------------------

    async def _listen_for_server(self) -> None:
        """The GET stream (module doc). Reopened when the server ends it (after its
        ``retry``), and once when it is cut: a server that cannot be reached again then
        breaks the stream."""
        answer = _Answer()
        cut = False
        while self._gone is None:
            try:
                async with self._client.stream(
                    "GET",
                    self._url,
                    headers=self._headers("text/event-stream", last_event_id=answer.last_id),
                ) as response:
                    self._check_status(response)
                    kind = response.headers.get("content-type", "").partition(";")[0].strip()
                    if self._gone is not None or response.status_code != 200:
                        return  # 405: the server offers no such stream
                    if kind.lower() != "text/event-stream":
                        self._log_once("get", "server.http_refused", why=f"GET answered {kind}")
                        return
                    cut = False
                    await self._read_events(response, answer, None)
            except httpx.HTTPError as error:
                if cut:
                    self._break(self._broke(error))
                    return
                cut = True  # once: an idle connection cut by a proxy on the way, say
                continue
            except _TooLong:
                self._break(self._too_long())
                return
            await trio.sleep(answer.retry if answer.retry is not None else _DEFAULT_RETRY)

    # -- delivery -----------------------------------------------------------------------------

    async def _read_events(
        self, response: httpx.Response, answer: _Answer, request_id: Any
    ) -> None:
        parser = _SseParser(self._max)
        async for chunk in response.aiter_bytes():
            for event in parser.feed(chunk):
                if event.id is not None:
                    answer.last_id = event.id
                if event.retry is not None:
                    answer.retry = event.retry
                if event.data and event.event in ("", "message"):
                    answer.answered |= await self._deliver(event.data, request_id)
                if answer.answered:
                    # The request's stream has nothing more to say (the server SHOULD end
                    # it now): its connection is not held for a server that does not.
                    return

    async def _deliver(self, message: str, request_id: Any) -> bool:
        """Hand ``message`` to :meth:`receive`; whether it is the response to
        ``request_id``."""
        answers = False
        if request_id is not None:
            try:
                decoded = json.loads(message)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict) and ("result" in decoded or "error" in decoded):
                answers = decoded.get("id") == request_id
                if answers and request_id == self._initialize_id:
                    result = decoded.get("result")
                    version = result.get("protocolVersion") if isinstance(result, dict) else None
                    self.protocol_version = version if isinstance(version, str) else None
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._deliver_to.send(message)
        return answers

    async def _deliver_error_body(self, body: bytes, request_id: Any) -> bool:
        """An HTTP error's body that is the JSON-RPC error response to the request: handed
        on as it is."""
        for message in _messages(body):
            if await self._deliver(message, request_id):
                return True
        return False

    async def _fail(self, request_id: Any, why: str) -> None:
        await self._deliver(
            pydantic_core.to_json(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "error": {"code": _INTERNAL_ERROR, "message": f"{self._where} {why}"},
                }
            ).decode(),
            None,
        )

    # -- state --------------------------------------------------------------------------------

    def _headers(
        self, accept: str = _ACCEPT, *, last_event_id: str | None = None
    ) -> dict[str, str]:
        headers = {"accept": accept}
        if accept == _ACCEPT:
            headers["content-type"] = "application/json"
        if self.session_id is not None:
            headers["mcp-session-id"] = self.session_id
        if self.protocol_version is not None:
            headers["mcp-protocol-version"] = self.protocol_version
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        return headers

    def _check_status(self, response: httpx.Response) -> None:
        """Break the stream for an answer that ends the session (module doc)."""
        status = response.status_code
        if status in (401, 403):
            self._break(f"{self._where} refused us with HTTP {status}")
        elif status == 404 and self.session_id is not None:
            self._break(f"{self._where} ended our session (HTTP 404)")

    def _break(self, why: str) -> None:
        if self._gone is None:
            self._gone = why
            self._deliver_to.close()

    def _broke(self, error: httpx.HTTPError) -> str:
        detail = str(error)[:200] or type(error).__name__
        return f"the connection to {self._where} broke ({detail})"

    def _too_long(self) -> str:
        return f"{self.name} sent a message longer than {self._max} bytes (EXAI_MAX_MESSAGE_BYTES)"

    def _log_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._logged and len(self._logged) < 64:
            self._logged.add(key)
            log.warning(event, server=self.name, url=self._where, **fields)

    async def end_session(self) -> None:
        """``DELETE`` the session (spec: "Session Management"), if the server gave one;
        at most 2 s, shielded, errors ignored (405: the server keeps its sessions)."""
        if self.session_id is None:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_DELETE_TIMEOUT),
            contextlib.suppress(httpx.HTTPError),
        ):
            await self._client.delete(self._url, headers=self._headers())
        self.session_id = None


@asynccontextmanager
async def open_http_stream(
    url: str,
    headers: Mapping[str, str],
    *,
    name: str,
    max_message_bytes: int,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - HTTP timeouts, not this call's
    listen: bool = True,
) -> AsyncIterator[HttpStream]:
    """A Streamable HTTP session with the MCP endpoint ``url`` (``http://`` or ``https://``,
    checked against the system's CA store), sending ``headers`` on every request;
    ``listen``: open the GET stream.

    Nothing is sent before the first :meth:`HttpStream.send` (the server is reached then:
    an unreachable one breaks the stream). On exit: the answer-reading tasks are cancelled,
    the session is ended (``DELETE``), the client closed.
    """
    async with httpx.AsyncClient(
        headers=dict(headers),
        verify=ssl.create_default_context(),  # the system's CA store, as wss:// uses
        timeout=httpx.Timeout(timeout, read=None),  # an answer takes as long as its tool
        follow_redirects=False,
    ) as client:
        stream: HttpStream | None = None
        try:
            async with trio.open_nursery() as nursery:
                stream = HttpStream(
                    client,
                    url,
                    nursery,
                    name=name,
                    max_message_bytes=max_message_bytes,
                    timeout=timeout,
                    listen=listen,
                )
                yield stream
                nursery.cancel_scope.cancel()
        finally:
            if stream is not None:
                await stream.end_session()


def _kind(message: str) -> tuple[Any, str | None, bool]:
    """``(id, method, is_request)`` of an encoded message (``method`` ``None`` for a
    response)."""
    try:
        decoded = json.loads(message)
    except ValueError:
        return None, None, False
    if not isinstance(decoded, dict):
        return None, None, False
    method = decoded.get("method")
    method = method if isinstance(method, str) else None
    return decoded.get("id"), method, method is not None and "id" in decoded


def _messages(body: bytes) -> list[str]:
    """The JSON-RPC messages of a JSON body: one object, or a batch (older servers)."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return []
    if isinstance(decoded, list):
        return [json.dumps(item) for item in decoded if isinstance(item, dict)]
    return [body.decode("utf-8", errors="replace")] if isinstance(decoded, dict) else []


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body, or :class:`_TooLong` past ``limit`` bytes (read no further than that)."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _TooLong
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise _TooLong
    return bytes(body)
