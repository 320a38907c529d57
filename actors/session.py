"""The session actor: one per MCP connection, the only place a session's state changes.

Two tasks serve a connection. The *reader* (``pump``) turns frames into typed messages and
posts them to the actor's bounded mailbox, answering framing errors and a full mailbox itself.
The *actor* (``SessionActor.run``) handles its mailbox one message at a time, so session state
(negotiated version, client info) needs no locks; each ``tools/call`` runs in the actor's own
nursery, at most ``max_inflight`` at once. While all slots are taken the actor stops taking
messages, so later requests wait in the mailbox, and once that is full they are refused with
"server busy" instead of hanging.

Failure containment: anything raised here (other than an ``RpcError`` answered to the client,
or a failing tool answered as an internal error) ends this session only; the sessions
supervisor logs it and closes the socket with 1011.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
import trio
from pydantic import BaseModel, ValidationError
from trio_websocket import ConnectionClosed, WebSocketConnection

from actors.persistence import PersistenceClient
from runtime.mailbox import ActorRef, ActorStopped, MailboxFull, open_mailbox
from runtime.mcp import jsonrpc
from runtime.mcp.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RpcError,
    ServerBusy,
    SessionNotInitialized,
)
from runtime.mcp.schema import (
    CallToolParams,
    CallToolResult,
    EmptyResult,
    Implementation,
    InitializeParams,
    InitializeResult,
    ListToolsParams,
    ListToolsResult,
    ServerCapabilities,
    TextContent,
)
from runtime.mcp.tools import Tool, ToolContext, ToolRegistry
from runtime.mcp.versions import has_structured_content, negotiate
from runtime.server import Handshake
from storage.rows import SessionClose, SessionIdentified, SessionRow

log = structlog.get_logger("session")

SERVER_INFO = Implementation(name="exai-runtime", version="0.1.0")
#: Test-only fault: crashes the session actor itself (not a tool). Off unless configured.
CRASH_METHOD = "$/exai/test/crash"
#: How long a client is told to wait before retrying a request refused as "server busy".
BUSY_RETRY_AFTER_S = 0.05

Send = Callable[[str], Awaitable[None]]


class SessionCrashRequested(Exception):
    """Raised by the test-only fault method to prove one failing session harms no other."""


@dataclass
class SessionState:
    """What a session knows about itself; survives in one place, owned by the actor."""

    session_id: str
    remote: str
    protocol_version: str | None = None
    client: Implementation | None = None
    initialized: bool = False
    inflight: dict[str | int, trio.CancelScope] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_inflight: int
    test_faults: bool


class SessionActor:
    """Handles one session's mailbox. Construct per connection; ``run`` until the mailbox ends."""

    def __init__(
        self,
        state: SessionState,
        send: Send,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
    ) -> None:
        self.state = state
        self._send = send
        self._tools = tools
        self._persistence = persistence
        self._config = config
        self._slots = trio.Semaphore(config.max_inflight)
        self._log = log.bind(session_id=state.session_id)

    async def run(self, inbox: trio.MemoryReceiveChannel[jsonrpc.Inbound]) -> None:
        """Handle messages until the reader closes the mailbox; then wait for running calls.

        Cancelling this (shutdown, socket gone) cancels every running tool call with it.
        """
        async with trio.open_nursery() as calls, inbox:
            async for message in inbox:
                await self._handle(message, calls)

    async def _handle(self, message: jsonrpc.Inbound, calls: trio.Nursery) -> None:
        if isinstance(message, jsonrpc.Request):
            if message.method == "tools/call":
                await self._start_call(message, calls)
            else:
                await self._answer(message)
        elif isinstance(message, jsonrpc.Notification):
            self._notify(message)
        else:
            # We send no requests, so a response from the client correlates with nothing.
            self._log.warning("session.unexpected_response", id=message.id)

    async def _answer(self, request: jsonrpc.Request) -> None:
        try:
            result = await self._dispatch(request)
        except RpcError as error:
            await self._send(jsonrpc.encode_error(request.id, error))
        else:
            await self._send(jsonrpc.encode_result(request.id, result))

    async def _dispatch(self, request: jsonrpc.Request) -> BaseModel:
        method = request.method
        if method == "ping":
            return EmptyResult()
        if method == "initialize":
            return await self._initialize(_params(InitializeParams, request))
        if method == CRASH_METHOD and self._config.test_faults:
            raise SessionCrashRequested("test fault: session crash requested")
        if self.state.protocol_version is None:
            raise SessionNotInitialized(
                f"session not initialized: send 'initialize' before {method!r}"
            )
        if method == "tools/list":
            _params(ListToolsParams, request)
            return ListToolsResult(tools=self._tools.descriptors())
        raise MethodNotFound(f"method not found: {method!r}")

    async def _initialize(self, params: InitializeParams) -> InitializeResult:
        if self.state.protocol_version is not None:
            raise InvalidRequest("session already initialized: 'initialize' may be sent once")
        version = negotiate(params.protocol_version)
        self.state.protocol_version = version
        self.state.client = params.client_info
        self._log = self._log.bind(client=params.client_info.name, protocol=version)
        self._log.info("session.initialized", requested=params.protocol_version)
        self._persistence.write_soon(
            SessionIdentified(
                session_id=self.state.session_id,
                client_name=params.client_info.name,
                client_version=params.client_info.version,
                protocol_version=version,
                at=datetime.now(UTC),
            )
        )
        return InitializeResult(
            protocol_version=version,
            capabilities=ServerCapabilities(),
            server_info=SERVER_INFO,
            meta={"exai/sessionId": self.state.session_id},
        )

    def _notify(self, note: jsonrpc.Notification) -> None:
        if note.method == "notifications/initialized":
            self.state.initialized = True
        elif note.method == "notifications/cancelled":
            request_id = (note.params or {}).get("requestId")
            scope = self.state.inflight.get(request_id) if request_id is not None else None
            if scope is not None:
                scope.cancel()
        else:
            self._log.debug("session.notification_ignored", method=note.method)

    async def _start_call(self, request: jsonrpc.Request, calls: trio.Nursery) -> None:
        try:
            if self.state.protocol_version is None:
                raise SessionNotInitialized(
                    "session not initialized: send 'initialize' before 'tools/call'"
                )
            params = _params(CallToolParams, request)
            tool = self._tools.get(params.name)
            if tool is None:
                raise InvalidParams(f"unknown tool: {params.name!r}")
            if request.id in self.state.inflight:
                raise InvalidRequest(f"request id {request.id!r} is already in flight")
        except RpcError as error:
            await self._send(jsonrpc.encode_error(request.id, error))
            return
        # Waiting here is the back-pressure: the mailbox fills behind us, then the reader
        # refuses with "server busy".
        await self._slots.acquire()
        scope = trio.CancelScope()
        self.state.inflight[request.id] = scope
        calls.start_soon(self._call, request.id, tool, params, scope)

    async def _call(
        self,
        request_id: str | int,
        tool: Tool[Any],
        params: CallToolParams,
        scope: trio.CancelScope,
    ) -> None:
        try:
            with scope:
                reply = await self._run_tool(request_id, tool, params)
            if not scope.cancelled_caught:
                await self._send(reply)
            # A cancelled request gets no response (MCP: the receiver SHOULD NOT answer).
        finally:
            del self.state.inflight[request_id]
            self._slots.release()

    async def _run_tool(
        self, request_id: str | int, tool: Tool[Any], params: CallToolParams
    ) -> str:
        version = self.state.protocol_version or ""
        try:
            args = tool.parse(params.arguments)
        except InvalidParams as error:
            if version >= "2025-11-25":
                # Since 2025-11-25 invalid tool input is a tool error the model can read.
                result = CallToolResult(content=[TextContent(text=error.message)], is_error=True)
                return jsonrpc.encode_result(request_id, result)
            return jsonrpc.encode_error(request_id, error)
        ctx = ToolContext(session_id=self.state.session_id, request_id=request_id)
        try:
            output = await tool.run(args, ctx)
        except Exception:
            # A failing tool is the tool's failure, not the session's: answer and carry on.
            self._log.exception("tool.failed", tool=tool.name, id=request_id)
            return jsonrpc.encode_error(
                request_id, InternalError(f"tool {tool.name!r} failed; see server log")
            )
        structured = output.structured if has_structured_content(version) else None
        result = CallToolResult(
            content=[TextContent(text=output.text)],
            structured_content=structured.model_dump(mode="json") if structured else None,
        )
        return jsonrpc.encode_result(request_id, result)


def _params(model: type[Any], request: jsonrpc.Request) -> Any:
    try:
        return model.model_validate(request.params or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidParams(f"invalid params for {request.method!r}: {problems}") from None


async def pump(
    frames: Callable[[], Awaitable[str | bytes]],
    mailbox: ActorRef[jsonrpc.Inbound],
    send: Send,
    session_id: str,
) -> None:
    """Read frames until the socket closes, post them to the actor, answer what it cannot.

    Framing errors are answered here because they need no session state. A request that finds
    the mailbox full is refused at once with "server busy" and a retry hint; a notification
    that finds it full is dropped and logged (nobody awaits it).
    """
    reader_log = log.bind(session_id=session_id)
    while True:
        frame = await frames()
        try:
            decoded = jsonrpc.decode(frame)
            if isinstance(decoded, list):
                raise InvalidRequest("invalid request: JSON-RPC batches are not supported")
        except jsonrpc.InvalidRequestWithId as error:
            await send(jsonrpc.encode_error(error.request_id, error))
            continue
        except RpcError as error:
            reader_log.info("session.bad_frame", code=error.code, reason=error.message)
            await send(jsonrpc.encode_error(None, error))
            continue
        try:
            mailbox.tell(decoded)
        except MailboxFull:
            if isinstance(decoded, jsonrpc.Request):
                busy = ServerBusy(
                    "server busy: too many requests queued in this session",
                    {"retryAfterMs": math.ceil(BUSY_RETRY_AFTER_S * 1000)},
                )
                await send(jsonrpc.encode_error(decoded.id, busy))
            else:
                reader_log.warning(
                    "dead_letter", reason="mailbox full", kind=type(decoded).__name__
                )
        except ActorStopped:
            return


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session is given by the node: shared, never owned by one session."""

    tools: ToolRegistry
    persistence: PersistenceClient
    config: SessionConfig
    mailbox_capacity: int
    node_id: str


async def serve_session(
    services: SessionServices, ws: WebSocketConnection, handshake: Handshake
) -> None:
    """One connection's whole life: record it, run reader and actor, record its end.

    The socket closing (by the client, or by shutdown with 1001) is the normal end: the reader
    closes the mailbox, and running tool calls are cancelled since nobody can receive their
    answers. The closing write is shielded so that shutdown still records it.
    """
    session_id = handshake.session_id
    opened = datetime.now(UTC)
    await services.persistence.write(
        SessionRow(
            session_id=session_id,
            created_at=opened,
            remote_addr=handshake.remote,
            node_id=services.node_id,
        )
    )
    log.info("session.opened", session_id=session_id, remote=handshake.remote)
    state = SessionState(session_id=session_id, remote=handshake.remote)
    ref: ActorRef[jsonrpc.Inbound]
    ref, inbox = open_mailbox(f"/root/sessions/{session_id}", services.mailbox_capacity)
    actor = SessionActor(
        state, ws.send_message, services.tools, services.persistence, services.config
    )
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(actor.run, inbox)
                await pump(ws.get_message, ref, ws.send_message, session_id)
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass
    finally:
        closed = datetime.now(UTC)
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await services.persistence.write(
                SessionClose(session_id=session_id, closed_at=closed, last_activity=closed)
            )
        log.info("session.closed", session_id=session_id)
