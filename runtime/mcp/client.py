"""The client side of MCP: how exai speaks to the servers it proxies.

One implementation of the protocol in the project: the client uses the server's framing
(:mod:`runtime.mcp.jsonrpc`), payload models (:mod:`runtime.mcp.schema`) and version table
(:mod:`runtime.mcp.versions`); only the direction differs. It runs on trio, over any
:class:`MessageStream` (a child's stdio, :class:`runtime.mcp.stdio_client.StdioStream`).

A :class:`ClientSession` is driven by two parties: its reader (:meth:`ClientSession.run`,
in a nursery its owner keeps) and the tasks that send requests (:meth:`ClientSession.request`,
any number at once, at most ``max_pending``). The reader routes each response to its request
by id, each ``notifications/progress`` to its request's bounded progress channel, answers the
server's own requests (``ping`` with an empty result; ``sampling/createMessage``,
``elicitation/create``, ``roots/list`` and the rest with -32601, logged once per method: this
client offers no capabilities), and hands the other notifications to ``on_notification``.

Cancellation: a request whose caller is cancelled sends ``notifications/cancelled`` for it
(MCP ``basic/utilities/cancellation``), shielded and bounded to one second, and its late
response is dropped. When the stream ends (the process died, the connection dropped) every
request in flight fails with :class:`ServerGone` at once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic_core
import structlog
import trio
from pydantic import ValidationError

from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import RpcError
from runtime.mcp.schema import Implementation, ListToolsResult, ProgressParams, ToolDescriptor
from storage.errors import RetryLater, ToolFailed

__all__ = [
    "ClientError",
    "ClientSession",
    "InitializedServer",
    "MessageStream",
    "Progress",
    "ServerError",
    "ServerGone",
    "TooManyRequests",
]

log = structlog.get_logger("servers")

#: Seconds a cancelled request's ``notifications/cancelled`` may take to send.
_CANCEL_SEND_TIMEOUT = 1.0
#: Progress notifications buffered per request; beyond, new ones are dropped: progress is
#: advisory (the server's pace must not hold the reader, which all requests share).
_PROGRESS_BUFFER = 16
#: Answers to the server's own requests waiting to be written; past them, none is queued.
_REPLY_QUEUE = 256
#: ``tools/list`` pages followed at most: a server that pages forever is cut off.
_MAX_PAGES = 100


class MessageStream(Protocol):
    """A stream of JSON-RPC messages to and from one server."""

    async def send(self, message: str) -> None:
        """Send one encoded message. Raises :class:`ServerGone` if the stream is gone."""
        ...

    async def receive(self) -> str | None:
        """The next encoded message; ``None`` once the stream ended. Raises
        :class:`ServerGone` for a stream that broke (a message over its bound, say)."""
        ...


class ClientError(ToolFailed):
    """Talking to a proxied server failed; the message says how, naming the server."""


class ServerGone(ClientError):
    """The server's stream ended or broke: the request's outcome is unknown."""


class ServerError(ClientError):
    """The server answered the request with a JSON-RPC error: ``code``, ``message``,
    ``data`` as it sent them."""

    def __init__(self, server: str, error: jsonrpc.ErrorObject) -> None:
        super().__init__(f"{server} answered {error.code}: {error.message}")
        self.code = error.code
        self.error_message = error.message
        self.data = error.data


class TooManyRequests(ClientError, RetryLater):
    """The session already has ``max_pending`` requests in flight to this server."""


@dataclass(frozen=True, slots=True)
class Progress:
    """One ``notifications/progress`` of a request, as the server sent it."""

    progress: float
    total: float | None
    message: str | None


#: Called with every notification the reader does not route itself (not progress).
NotificationHandler = Callable[[jsonrpc.Notification], None]


@dataclass(frozen=True, slots=True)
class InitializedServer:
    """What ``initialize`` told us of the server."""

    protocol_version: str
    server_info: Implementation
    capabilities: dict[str, Any]
    instructions: str | None


@dataclass(eq=False)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None
    error: jsonrpc.ErrorObject | None = None
    gone: str | None = None
    #: Why its answer could not be read (not a JSON-RPC response: a result that is not an
    #: object, an error without a message).
    invalid: str | None = None
    progress: trio.MemorySendChannel[Progress] | None = None


class ClientSession:
    """One MCP client session over ``stream`` with the server named ``name`` (in logs and
    errors). :meth:`run` must be running (in its owner's nursery) for requests to be
    answered."""

    def __init__(
        self,
        stream: MessageStream,
        *,
        name: str,
        client_info: Implementation,
        max_pending: int = 64,
        on_notification: NotificationHandler | None = None,
        capabilities: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        #: What ``initialize`` declares; exai's proxy declares none. (A test declares
        #: ``sampling`` to see a real server send requests this client then refuses.)
        self._capabilities = dict(capabilities or {})
        self._stream = stream
        self._client_info = client_info
        self._max_pending = max_pending
        self._on_notification = on_notification
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._progress: dict[str, _Pending] = {}
        self._logged: set[str] = set()
        self._gone: str | None = None
        #: Why the stream broke (:class:`ServerGone` from it); ``None`` if it just ended.
        self.broke: str | None = None
        #: The answers to the server's requests, while :meth:`run` runs.
        self._replies: trio.MemorySendChannel[str] | None = None

    # -- requests -----------------------------------------------------------------------------

    async def initialize(self) -> InitializedServer:
        """The handshake: ``initialize`` at our latest handshake version, then
        ``notifications/initialized``. Raises :class:`ServerError`, :class:`ServerGone`, or
        :class:`ClientError` for a version this client does not speak."""
        result = await self.request(
            "initialize",
            {
                "protocolVersion": versions.LATEST_HANDSHAKE_VERSION,
                "capabilities": self._capabilities,
                "clientInfo": self._client_info.model_dump(exclude_none=True),
            },
        )
        version = result.get("protocolVersion")
        if version not in versions.HANDSHAKE_VERSIONS:
            raise ClientError(f"{self.name} answered initialize with version {version!r}")
        try:
            info = Implementation.model_validate(result.get("serverInfo") or {})
        except ValidationError:
            info = Implementation(name="unknown", version="unknown")
        capabilities = result.get("capabilities")
        instructions = result.get("instructions")
        await self.notify("notifications/initialized")
        return InitializedServer(
            protocol_version=version,
            server_info=info,
            capabilities=capabilities if isinstance(capabilities, dict) else {},
            instructions=instructions if isinstance(instructions, str) else None,
        )

    async def list_tools(self, *, limit: int | None = None) -> list[ToolDescriptor]:
        """Every tool, following ``nextCursor`` (at most 100 pages); with ``limit``, the
        first ``limit`` tools: no page is asked for once they are held (a server listing
        more than its caller serves costs no more than they do). Raises as :meth:`request`,
        and :class:`ClientError` for a malformed answer."""
        tools: list[ToolDescriptor] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            try:
                listed = ListToolsResult.model_validate(page)
            except ValidationError as exc:
                raise ClientError(f"{self.name} answered tools/list with {exc}") from None
            tools.extend(listed.tools)
            cursor = listed.next_cursor
            if limit is not None and len(tools) >= limit:
                return tools[:limit]
            if not cursor:
                return tools
        raise ClientError(f"{self.name} paged tools/list past {_MAX_PAGES} pages")

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its result (a JSON object).

        ``on_progress``: a progress token is added to ``params._meta`` and each of the
        server's progress notifications for it is awaited in this task, in order (at most
        16 buffered: past them, a slow consumer loses the newest).

        Raises :class:`ServerError` (its JSON-RPC error), :class:`ServerGone`,
        :class:`TooManyRequests`. Cancellation: sends ``notifications/cancelled``.
        """
        if self._gone is not None:
            raise ServerGone(f"{self.name} is gone: {self._gone}")
        if len(self._pending) >= self._max_pending:
            raise TooManyRequests(
                f"{self.name} has {self._max_pending} requests in flight; retry later"
            )
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        body = dict(params or {})
        token: str | None = None
        receive: trio.MemoryReceiveChannel[Progress] | None = None
        if on_progress is not None:
            token = f"exai-{request_id}"
            body["_meta"] = {**(body.get("_meta") or {}), "progressToken": token}
            pending.progress, receive = trio.open_memory_channel[Progress](_PROGRESS_BUFFER)
            self._progress[token] = pending
        message = pydantic_core.to_json(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": body}
        ).decode()
        sent = False
        try:
            await self._stream.send(message)
            sent = True
            if receive is None or on_progress is None:
                await pending.done.wait()
            else:
                await _wait_with_progress(receive, on_progress)
        finally:
            # Left unanswered (cancelled, perhaps inside the progress nursery's exception
            # group, or ``on_progress`` raised): the server is told to stop.
            if sent and not pending.done.is_set():
                await self._cancel(request_id)
            del self._pending[request_id]
            if token is not None:
                del self._progress[token]
        if pending.error is not None:
            raise ServerError(self.name, pending.error)
        if pending.invalid is not None:
            raise ClientError(f"{self.name} sent an invalid answer: {pending.invalid}")
        if pending.gone is not None or pending.result is None:
            raise ServerGone(f"{self.name} went away before answering: {pending.gone}")
        return pending.result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification. Raises :class:`ServerGone`."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._stream.send(pydantic_core.to_json(message).decode())

    async def _cancel(self, request_id: int) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CANCEL_SEND_TIMEOUT),
            contextlib.suppress(ServerGone),
        ):
            await self.notify(
                "notifications/cancelled",
                {"requestId": request_id, "reason": "cancelled by exai's client"},
            )

    # -- the reader ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Read the server's messages until its stream ends; then fail every request in
        flight with :class:`ServerGone` and return. Raises what the stream raises besides
        ``ServerGone`` (which ends it as the stream's end does).

        The answers to the server's own requests are written by a task of their own, from a
        queue of :data:`_REPLY_QUEUE` (past it, the newest are dropped, logged once): the
        reader never waits on the server's stdin, so a server that sends a burst of requests
        without reading meanwhile cannot stop the reading of its answers (each side blocked
        on a full pipe)."""
        why = "its stream ended"
        replies, pending_replies = trio.open_memory_channel[str](_REPLY_QUEUE)
        self._replies = replies
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_replies, pending_replies)
                try:
                    while True:
                        try:
                            frame = await self._stream.receive()
                        except ServerGone as gone:
                            why = self.broke = str(gone)
                            return
                        if frame is None:
                            return
                        self._dispatch(frame)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._replies = None
            self._gone = why
            for pending in list(self._pending.values()):
                pending.gone = why
                pending.done.set()
                if pending.progress is not None:
                    pending.progress.close()

    async def _send_replies(self, replies: trio.MemoryReceiveChannel[str]) -> None:
        with contextlib.suppress(ServerGone):  # the reader sees the end next
            async for reply in replies:
                await self._stream.send(reply)

    def _dispatch(self, frame: str) -> None:
        try:
            message = jsonrpc.decode(frame)
        except RpcError as error:
            self._log_once("invalid", "server.invalid_message", error=error.message)
            if isinstance(error, jsonrpc.InvalidRequestWithId):
                self._answer_invalid(frame, error.request_id, error.message)
            return
        if isinstance(message, list):
            self._log_once("batch", "server.invalid_message", error="a batch")
            return
        if isinstance(message, jsonrpc.Response | jsonrpc.ErrorResponse):
            self._answer(message)
        elif isinstance(message, jsonrpc.Request):
            self._answer_server_request(message)
        elif message.method == "notifications/progress":
            self._route_progress(message)
        elif self._on_notification is not None:
            self._on_notification(message)

    def _answer(self, message: jsonrpc.Response | jsonrpc.ErrorResponse) -> None:
        pending = self._pending.get(message.id) if isinstance(message.id, int) else None
        if pending is None or pending.done.is_set():
            # A request we cancelled, or an id we never sent: nobody waits for it.
            return
        if isinstance(message, jsonrpc.Response):
            pending.result = message.result
        else:
            pending.error = message.error
        pending.done.set()
        if pending.progress is not None:
            # The server's progress came before its answer (one stream, in order): what is
            # buffered is handed over, then the request's wait ends (_wait_with_progress).
            pending.progress.close()

    def _answer_invalid(self, frame: str, request_id: jsonrpc.RequestId, why: str) -> None:
        """A response to one of our requests that is not a valid one still ends its wait
        (otherwise it waits for ever, holding its caller's slots): the request fails with
        ``why``. Not for an invalid request of the server's that reuses one of our ids."""
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None or pending.done.is_set():
            return
        data = pydantic_core.from_json(frame)  # it parsed once: its fault is its shape
        if not isinstance(data, dict) or "method" in data:
            return
        pending.invalid = why[:200]
        pending.done.set()
        if pending.progress is not None:
            pending.progress.close()

    def _route_progress(self, message: jsonrpc.Notification) -> None:
        try:
            note = ProgressParams.model_validate(message.params or {})
        except ValidationError:
            self._log_once("progress", "server.invalid_message", error="bad progress params")
            return
        pending = self._progress.get(str(note.progress_token))
        if pending is None or pending.progress is None:
            return
        # Advisory: a slow consumer loses progress, never the reader's time.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            pending.progress.send_nowait(Progress(note.progress, note.total, note.message))

    def _answer_server_request(self, request: jsonrpc.Request) -> None:
        """``ping``: an empty result (MCP: the receiver MUST respond promptly). Anything else
        (sampling, elicitation, roots): -32601, this client declared no such capability."""
        if request.method == "ping":
            reply = jsonrpc.encode_result(request.id, {})
        else:
            self._log_once(
                f"method:{request.method[:64]}",
                "server.request_refused",
                method=request.method[:64],
                why="exai's client offers no client capabilities",
            )
            reply = pydantic_core.to_json(
                {
                    "jsonrpc": "2.0",
                    "id": request.id,
                    "error": {
                        "code": -32601,
                        "message": f"method not found: {request.method[:64]!r} (exai proxies "
                        "tools only: no sampling, elicitation or roots)",
                    },
                }
            ).decode()
        if self._replies is None:
            return
        try:
            self._replies.send_nowait(reply)
        except trio.WouldBlock:
            self._log_once(
                "replies",
                "server.requests_dropped",
                why=f"over {_REPLY_QUEUE} of its requests unanswered at once; the newest get "
                "no answer",
            )

    def _log_once(self, key: str, event: str, **fields: Any) -> None:
        if key in self._logged or len(self._logged) >= 256:
            return
        self._logged.add(key)
        log.warning(event, server=self.name, **fields)


async def _wait_with_progress(
    receive: trio.MemoryReceiveChannel[Progress],
    on_progress: Callable[[Progress], Awaitable[None]],
) -> None:
    """Hand progress to ``on_progress``, in order, until the answer: the reader closes the
    channel when it routes the answer (or the stream ends), after every progress notification
    the server sent before it, so none is lost to the race with the answer."""
    async for note in receive:
        await on_progress(note)
