"""The session actor: the only place a session's MCP state changes.

It handles its mailbox one message at a time, so the session state needs no locks; each
``tools/call`` runs as a task in the actor's own nursery, at most ``max_inflight`` at once.
While every slot is taken the actor stops taking messages, so later requests wait in the
mailbox, and once that is full the reader refuses them with "server busy" instead of hanging.

What survives a crash lives in :class:`SessionState`, owned by the session, not the actor:
the session id, negotiated version, client info, and the ids of requests being handled. When an
incarnation crashes, every request it was handling is answered with ``SessionRestarted``
(-32001) and the next incarnation reads the same mailbox, so nothing queued is lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
import trio
from pydantic import BaseModel, ValidationError
from trio_websocket import ConnectionClosed

from actors.persistence import PersistenceClient
from runtime.actor import Actor
from runtime.mcp import jsonrpc
from runtime.mcp.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RpcError,
    SessionNotInitialized,
    SessionRestarted,
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
from storage.rows import SessionIdentified

log = structlog.get_logger("session")

SERVER_INFO = Implementation(name="exai-runtime", version="0.1.0")
#: Test-only fault: crashes the session actor itself (not a tool). Off unless configured.
CRASH_METHOD = "$/exai/test/crash"

Send = Callable[[str], Awaitable[None]]
RequestId = str | int


class SessionCrashRequested(Exception):
    """Raised by the test-only fault method to prove a crash is contained and healed."""


@dataclass
class SessionState:
    """What a session knows about itself. Owned by the session, so it outlives a crash."""

    session_id: str
    remote: str
    protocol_version: str | None = None
    client: Implementation | None = None
    initialized: bool = False
    #: Requests taken from the mailbox and not yet answered (nor cancelled by the client).
    handling: set[RequestId] = field(default_factory=set)
    #: Running tool calls, by request id: the reader cancels them without queueing.
    calls: dict[RequestId, trio.CancelScope] = field(default_factory=dict)

    def cancel(self, request_id: object) -> None:
        """``notifications/cancelled``: stop that call. Unknown or finished ids are ignored,
        as the spec asks (the race between a cancel and the response is inherent)."""
        scope = self.calls.get(request_id) if isinstance(request_id, str | int) else None
        if scope is not None:
            scope.cancel()


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_inflight: int
    test_faults: bool
    #: Shared by every session of the node: the total of running tool calls.
    total_slots: trio.CapacityLimiter


class SessionActor(Actor[jsonrpc.Inbound]):
    """One incarnation of a session's actor. A restart makes a new one over the same state."""

    def __init__(
        self,
        state: SessionState,
        send: Send,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
    ) -> None:
        self.path = f"/root/sessions/{state.session_id}"
        self.state = state
        self._send = send
        self._tools = tools
        self._persistence = persistence
        self._config = config
        self._slots = trio.Semaphore(config.max_inflight)
        self._calls: trio.Nursery | None = None
        self._log = log.bind(session_id=state.session_id)

    @asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        # Tool calls belong to the incarnation that started them: a crash cancels them.
        async with trio.open_nursery() as calls:
            self._calls = calls
            yield
            calls.cancel_scope.cancel()

    async def receive(self, message: jsonrpc.Inbound) -> None:
        if isinstance(message, jsonrpc.Request):
            if message.method == "tools/call":
                await self._start_call(message)
            else:
                await self._answer(message)
        elif isinstance(message, jsonrpc.Notification):
            self._notify(message)
        else:
            # We send no requests, so a response from the client correlates with nothing.
            self._log.warning("session.unexpected_response", id=message.id)

    async def on_failure(self, error: Exception) -> None:
        """Tell each request this incarnation was handling that it did not complete."""
        orphans, self.state.handling = self.state.handling, set()
        failure = SessionRestarted(
            "session restarted after an internal error; this request did not complete "
            "and may be retried"
        )
        for request_id in sorted(orphans, key=str):
            try:
                await self._send(jsonrpc.encode_error(request_id, failure))
            except ConnectionClosed:
                return

    async def _answer(self, request: jsonrpc.Request) -> None:
        self.state.handling.add(request.id)
        try:
            result = await self._dispatch(request)
        except RpcError as error:
            reply = jsonrpc.encode_error(request.id, error)
        else:
            reply = jsonrpc.encode_result(request.id, result)
        await self._send(reply)
        self.state.handling.discard(request.id)

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
            # Normally handled by the reader before queueing; kept for completeness.
            self.state.cancel((note.params or {}).get("requestId"))
        else:
            self._log.debug("session.notification_ignored", method=note.method)

    async def _start_call(self, request: jsonrpc.Request) -> None:
        try:
            if self.state.protocol_version is None:
                raise SessionNotInitialized(
                    "session not initialized: send 'initialize' before 'tools/call'"
                )
            params = _params(CallToolParams, request)
            tool = self._tools.get(params.name)
            if tool is None:
                raise InvalidParams(f"unknown tool: {params.name!r}")
            if request.id in self.state.handling:
                raise InvalidRequest(f"request id {request.id!r} is already in flight")
        except RpcError as error:
            await self._send(jsonrpc.encode_error(request.id, error))
            return
        # Waiting here is the back-pressure: the mailbox fills behind us, then the reader
        # refuses with "server busy".
        await self._slots.acquire()
        try:
            await self._config.total_slots.acquire_on_behalf_of(request.id)
        except BaseException:
            self._slots.release()
            raise
        self.state.handling.add(request.id)
        scope = trio.CancelScope()
        self.state.calls[request.id] = scope
        assert self._calls is not None
        self._calls.start_soon(self._call, request.id, tool, params, scope)

    async def _call(
        self,
        request_id: RequestId,
        tool: Tool[Any],
        params: CallToolParams,
        scope: trio.CancelScope,
    ) -> None:
        try:
            reply = None
            with scope:
                reply = await self._run_tool(request_id, tool, params)
            # A call the client cancelled gets no response (MCP: the receiver SHOULD NOT).
            if reply is not None:
                try:
                    await self._send(reply)
                except ConnectionClosed:
                    return  # the reader sees it too and ends the session
            # Not in a `finally`: a call cut short by a crash stays in `handling`, so that
            # on_failure can tell the client it did not complete.
            self.state.handling.discard(request_id)
        finally:
            del self.state.calls[request_id]
            self._config.total_slots.release_on_behalf_of(request_id)
            self._slots.release()

    async def _run_tool(
        self, request_id: RequestId, tool: Tool[Any], params: CallToolParams
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
