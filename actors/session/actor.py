"""The session actor: the only place a session's MCP state changes.

It handles its mailbox one message at a time, so the session state needs no locks; each
``tools/call`` runs as a task in the actor's own nursery, at most ``max_inflight`` at once
(and at most ``total_slots`` over the node). A call holds its slots until its reply is in the
session's outgoing queue (:class:`~runtime.outbox.Outbox`), not merely until its tool returns:
a peer that does not read its replies therefore stops its own session's work. While every
slot is taken the actor stops taking messages, so later requests wait in the mailbox, and once
that is full the reader refuses them with "server busy" instead of hanging. A batch
(2025-03-26) runs as one task too, one batch at a time, so it never holds up the messages
behind it; its members' slots are given back as each member's reply is ready (the batch
holds at most ``max_batch`` replies until its own reply is queued). ``ping`` and
``notifications/cancelled`` never enter the mailbox at all (see ``reader``).

Dual era: a *handshake* client sends ``initialize`` once and the negotiated version holds for
the session; a *modern* (2026-07-28) client names its version in every request's ``_meta`` and
may start with ``server/discover``. Each request is answered in the era of its own version.

What survives a crash lives in :class:`SessionState`, owned by the session, not the actor:
the session id, negotiated version, client info, log level, and the ids of requests being
handled. When an incarnation crashes, every request it was handling is answered with
``SessionRestarted`` (-32001) and the next incarnation reads the same mailbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import structlog
import trio
from pydantic import BaseModel, ValidationError

from actors.persistence import (
    ActorUnavailable,
    PersistenceClient,
    StorageUnavailable,
    WriteConflict,
    WriteRejected,
)
from runtime import trace
from runtime.actor import Actor
from runtime.mailbox import ActorRef
from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RpcError,
    SessionNotInitialized,
    SessionRestarted,
    Unavailable,
    UnsupportedProtocolVersion,
    invalid_params,
)
from runtime.mcp.paging import page
from runtime.mcp.progress import Progress
from runtime.mcp.schema import (
    CACHEABLE_RESULTS,
    LOG_LEVELS,
    CallToolParams,
    CallToolResult,
    DiscoverResult,
    EmptyResult,
    Implementation,
    InitializeParams,
    InitializeResult,
    ListToolsParams,
    ListToolsResult,
    LogLevel,
    LogMessageParams,
    ServerCapabilities,
    SetLevelParams,
    TextContent,
)
from runtime.mcp.tools import Tool, ToolContext, ToolRegistry
from runtime.outbox import Outbox, OutboxClosed
from storage.rows import SessionActivity, SessionIdentified, TaskFinished
from storage.tasks import MAX_RESULT_BYTES, TaskLifecycle

log = structlog.get_logger("session")

SERVER_INFO = Implementation(name="exai-runtime", version="0.1.0")
#: Test-only fault: crashes the session actor itself (not a tool). Off unless configured.
CRASH_METHOD = "$/exai/test/crash"
#: Test-only fault: crashes the (shared) persistence actor, which the root then restarts.
CRASH_PERSISTENCE_METHOD = "$/exai/test/crash-persistence"

RequestId = str | int
Message = jsonrpc.Inbound | jsonrpc.Batch


class SessionCrashRequested(Exception):
    """Raised by the test-only fault method to prove a crash is contained and healed."""


@dataclass
class SessionState:
    """What a session knows about itself. Owned by the session, so it outlives a crash."""

    session_id: str
    remote: str
    #: The client identity its token named at the handshake; a resume must present the same.
    identity: str = "default"
    protocol_version: str | None = None
    client: Implementation | None = None
    initialized: bool = False
    #: Minimum level of ``notifications/message`` the client wants; ``None``: none.
    log_level: LogLevel | None = None
    #: Requests taken from the mailbox and not yet answered (nor cancelled by the client).
    handling: set[RequestId] = field(default_factory=set)
    #: Admitted tool calls (waiting for a slot or running), by request id: the reader
    #: cancels them without queueing.
    calls: dict[RequestId, trio.CancelScope] = field(default_factory=dict)
    tool_calls: int = 0
    tool_errors: int = 0
    #: Requests in the mailbox, by id: ``True`` once cancelled there. Bounded by the
    #: mailbox's capacity; the reader adds, the actor removes.
    queued: dict[RequestId, bool] = field(default_factory=dict)

    def in_use(self, request_id: RequestId) -> bool:
        """Whether a request with this id is queued, waiting for a slot, running or being
        answered: a second one would make both replies ambiguous (JSON-RPC 2.0: the id
        correlates a response with its request)."""
        return request_id in self.queued or request_id in self.calls or request_id in self.handling

    def cancel(self, request_id: object) -> None:
        """``notifications/cancelled``: stop that request, wherever it is.

        A call waiting for a slot or running is cancelled through its scope; a request still
        in the mailbox is marked, and the actor drops it when it comes to it. Unknown or
        finished ids are ignored, as the spec asks (the race with the response is inherent).
        """
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            return
        scope = self.calls.get(request_id)
        if scope is not None:
            scope.cancel()
        elif request_id in self.queued:
            self.queued[request_id] = True


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_inflight: int
    test_faults: bool
    #: This process's id in the database (sessions, tasks, heartbeats).
    node_id: str
    #: Shared by every session of the node: the total of running tool calls.
    total_slots: trio.CapacityLimiter
    heartbeat_interval: float = 5.0
    page_size: int = 50
    #: Bytes of a tool result kept in its task row (EXAI_MAX_STORED_RESULT_BYTES).
    max_result_bytes: int = MAX_RESULT_BYTES


class SessionActor(Actor[Message]):
    """One incarnation of a session's actor. A restart makes a new one over the same state."""

    def __init__(
        self,
        state: SessionState,
        outbox: Outbox,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
        *,
        mailbox: ActorRef[Any] | None = None,
        postmarks: trace.Postmarks | None = None,
        meter: trace.Meter | None = None,
    ) -> None:
        self.path = f"/root/sessions/{state.session_id}"
        self._mailbox = mailbox
        self._postmarks = postmarks
        self._meter = meter
        self.state = state
        self._outbox = outbox
        self._send = outbox.put
        self._tools = tools
        self._persistence = persistence
        self._config = config
        self._slots = trio.Semaphore(config.max_inflight)
        #: One batch runs at a time: a second waits in the actor, the mailbox behind it.
        self._batch_slot = trio.Semaphore(1)
        self._calls: trio.Nursery | None = None
        self._current: RequestId | None = None
        self._log = log.bind(session_id=state.session_id)

    @asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        # Tool calls belong to the incarnation that started them: a crash cancels them.
        async with trio.open_nursery() as calls:
            self._calls = calls
            yield
            calls.cancel_scope.cancel()

    async def receive(self, message: Message) -> None:
        # One trace event per message: the trace it starts (or continues) is bound while it
        # is handled, and tool-call tasks started here inherit it.
        mark = self._postmarks.take(message) if self._postmarks is not None else None
        kind, rpc_id = _describe(message)
        mailbox = self._mailbox
        with trace.handling(
            self.path,
            kind,
            postmark=mark,
            session_id=self.state.session_id,
            rpc_id=rpc_id,
            depth=mailbox.depth if mailbox is not None else None,
            capacity=mailbox.capacity if mailbox is not None else None,
            meter=self._meter,
        ) as traced:
            refusal = await self._receive(message)
            if refusal is not None:
                traced.failed(refusal.message)

    async def _receive(self, message: Message) -> RpcError | None:
        """Handle one message; the error a ``tools/call`` was refused with, if it was."""
        refusal = None
        if isinstance(message, jsonrpc.Request):
            if self.state.queued.pop(message.id, False) and message.method != "initialize":
                self._log.debug("session.dropped_cancelled", id=message.id)
                return None  # cancelled while queued: no response, as for any cancelled one
            # Until answered or handed to a task, a crash here must still answer it.
            self._current = message.id
            if message.method == "tools/call":
                refusal = await self._start_call(message)
            else:
                await self._answer(message)
            self._current = None
        elif isinstance(message, jsonrpc.Notification):
            self._notify(message)
        elif isinstance(message, jsonrpc.Batch):
            await self._batch(message)
        else:
            # We send no requests, so a response correlates with nothing (the reader drops
            # them before the mailbox; this is only a guard).
            self._log.debug("session.unexpected_response", id=message.id)
        return refusal

    async def on_failure(self, error: Exception) -> None:
        """Tell each request this incarnation was handling that it did not complete."""
        orphans, self.state.handling = self.state.handling, set()
        if self._current is not None:
            orphans.add(self._current)
        failure = SessionRestarted(
            "session restarted after an internal error; this request did not complete "
            "and may be retried"
        )
        for request_id in sorted(orphans, key=str):
            try:
                self._outbox.put_nowait(jsonrpc.encode_error(request_id, failure))
            except OutboxClosed:
                return

    # -- requests other than tools/call -------------------------------------------------

    async def _answer(self, request: jsonrpc.Request) -> None:
        self.state.handling.add(request.id)
        await self._send(await self._reply(request))
        self.state.handling.discard(request.id)

    async def _reply(self, request: jsonrpc.Request) -> str:
        """The encoded response to one request (never ``tools/call``)."""
        try:
            version = self._version_of(request)
            result = await self._dispatch(request, version)
        except RpcError as error:
            return jsonrpc.encode_error(request.id, error)
        return jsonrpc.encode_result(request.id, _finish(result, version))

    def _version_of(self, request: jsonrpc.Request) -> str:
        """The protocol version this request is answered in, or the error that refuses it."""
        meta = (request.params or {}).get("_meta")
        if not isinstance(meta, dict):
            meta = {}
        named = meta.get(versions.PROTOCOL_VERSION_META)
        if named is not None:
            if not isinstance(named, str) or not versions.is_modern(named):
                raise UnsupportedProtocolVersion(str(named), list(versions.MODERN_VERSIONS))
            if self.state.protocol_version is None:
                self._adopt_modern(named, meta)
            # Otherwise answered in its own era, leaving a handshake session as it is.
            return named
        if request.method in (
            "initialize",
            "ping",
            "server/discover",
            CRASH_METHOD,
            CRASH_PERSISTENCE_METHOD,
        ):
            return self.state.protocol_version or ""
        if self.state.protocol_version is None or versions.is_modern(self.state.protocol_version):
            raise SessionNotInitialized(
                f"session not initialized: send 'initialize' before {request.method!r}, "
                f"or name a protocol version in _meta[{versions.PROTOCOL_VERSION_META!r}]"
            )
        return self.state.protocol_version

    def _adopt_modern(self, version: str, meta: dict[str, Any]) -> None:
        """The first request of a modern session carries the client's identity: record it."""
        self.state.protocol_version = version
        client = meta.get(versions.CLIENT_INFO_META)
        try:
            info = Implementation.model_validate(client or {})
        except ValidationError:
            info = Implementation(name="unknown", version="unknown")
        self._identify(info, version, requested=version)

    async def _dispatch(self, request: jsonrpc.Request, version: str) -> BaseModel:
        method = request.method
        if method == "initialize":
            return self._initialize(_params(InitializeParams, request))
        if method == "server/discover":
            return self._discover()
        if method == "ping" and versions.has_ping(version):
            return EmptyResult()
        if method == "tools/list":
            cursor = _params(ListToolsParams, request).cursor
            tools, next_cursor = page(self._tools.descriptors(), cursor, self._config.page_size)
            return ListToolsResult(tools=tools, next_cursor=next_cursor)
        if method == "logging/setLevel" and versions.has_ping(version):
            self.state.log_level = _params(SetLevelParams, request).level
            return EmptyResult()
        if method == CRASH_METHOD and self._config.test_faults:
            raise SessionCrashRequested("test fault: session crash requested")
        if method == CRASH_PERSISTENCE_METHOD and self._config.test_faults:
            self._persistence.crash_actor_for_test()
            return EmptyResult()
        raise MethodNotFound(f"method not found: {method!r} (protocol version {version})")

    def _initialize(self, params: InitializeParams) -> InitializeResult:
        if self.state.protocol_version is not None and versions.is_modern(
            self.state.protocol_version
        ):
            # The session is modern already (say, a discover the client timed out on was
            # answered): -32022 names the modern versions, so the client re-probes with one.
            raise UnsupportedProtocolVersion(
                params.protocol_version, list(versions.MODERN_VERSIONS)
            )
        if self.state.protocol_version is not None:
            raise InvalidRequest("session already initialized: 'initialize' may be sent once")
        version = versions.negotiate(params.protocol_version)
        self.state.protocol_version = version
        self._identify(params.client_info, version, requested=params.protocol_version)
        return InitializeResult(
            protocol_version=version,
            capabilities=ServerCapabilities(),
            server_info=SERVER_INFO,
            meta={"exai/sessionId": self.state.session_id},
        )

    def _discover(self) -> DiscoverResult:
        return DiscoverResult(
            supported_versions=list(versions.SUPPORTED_VERSIONS),
            capabilities=ServerCapabilities(),
            meta={
                versions.SERVER_INFO_META: SERVER_INFO.model_dump(exclude_none=True),
                "exai/sessionId": self.state.session_id,
            },
        )

    def _identify(self, client: Implementation, version: str, *, requested: str) -> None:
        self.state.client = client
        self._log = self._log.bind(client=client.name, protocol=version)
        self._log.info("session.initialized", requested=requested)
        self._persistence.write_soon(
            SessionIdentified(
                session_id=self.state.session_id,
                client_name=client.name,
                client_version=client.version,
                protocol_version=version,
                at=datetime.now(UTC),
            )
        )

    def _notify(self, note: jsonrpc.Notification) -> None:
        if note.method == "notifications/initialized":
            self.state.initialized = True
        elif note.method == "notifications/cancelled":
            # Normally applied by the reader before queueing; kept for batches.
            self.state.cancel((note.params or {}).get("requestId"))
        else:
            self._log.debug("session.notification_ignored", method=note.method)

    # -- batches (2025-03-26) ------------------------------------------------------------

    async def _batch(self, batch: jsonrpc.Batch) -> None:
        version = self.state.protocol_version or ""
        if not batch.items or not versions.allows_batches(version):
            why = (
                "an empty batch"
                if not batch.items
                else f"batches are not part of protocol version {version or '(none yet)'}"
            )
            await self._send(jsonrpc.encode_error(None, InvalidRequest(f"invalid request: {why}")))
            return
        # Members are classified here, in order and before anything runs, so that an id that
        # is already in use (in the session, or earlier in this batch) is refused for that
        # member alone, deterministically. The ids taken are reserved until the batch's reply
        # is queued, so that no later request can borrow them meanwhile.
        members: list[jsonrpc.Inbound | str] = []
        reserved: list[RequestId] = []
        for item in batch.items:
            members.append(self._classify_member(item, reserved))
        await _acquire(self._batch_slot.acquire_nowait, self._batch_slot.acquire)
        assert self._calls is not None
        self._calls.start_soon(self._run_batch, members, reserved)

    def _classify_member(self, item: object, reserved: list[RequestId]) -> jsonrpc.Inbound | str:
        """The member as a message, or its encoded refusal."""
        try:
            message = jsonrpc.classify(item)
        except jsonrpc.InvalidRequestWithId as error:
            return jsonrpc.encode_error(error.request_id, error)
        except RpcError as error:
            return jsonrpc.encode_error(None, error)
        if isinstance(message, jsonrpc.Request):
            if self.state.in_use(message.id):
                refusal = InvalidRequest(
                    f"invalid request: request id {message.id!r} is already in use in this "
                    "session (or earlier in this batch)"
                )
                return jsonrpc.encode_error(message.id, refusal)
            self.state.handling.add(message.id)
            reserved.append(message.id)
        return message

    async def _run_batch(
        self, members: list[jsonrpc.Inbound | str], reserved: list[RequestId]
    ) -> None:
        # A member's slots are given back as soon as its own reply is ready, not when the
        # batch's is queued: a batch with more calls than the session has slots would
        # otherwise wait for slots only it could free. What the batch holds meanwhile is
        # bounded by its own bounds: one batch at a time, at most max_batch replies.
        replies: list[str | None] = [None] * len(members)
        try:
            async with trio.open_nursery() as running:
                for index, member in enumerate(members):
                    if isinstance(member, str):
                        replies[index] = member
                    else:
                        running.start_soon(self._batch_member, member, replies, index)
            answered = [reply for reply in replies if reply is not None]
            if answered:  # a batch of notifications only gets no response at all
                await self._send(jsonrpc.encode_batch(answered))
            for request_id in reserved:
                self.state.handling.discard(request_id)
        except OutboxClosed:
            return
        finally:
            self._batch_slot.release()

    async def _batch_member(
        self, message: jsonrpc.Inbound, replies: list[str | None], index: int
    ) -> None:
        if isinstance(message, jsonrpc.Notification):
            self._notify(message)
        elif isinstance(message, jsonrpc.Request):
            if message.method == "initialize":
                refusal = InvalidRequest("invalid request: 'initialize' must not be batched")
                replies[index] = jsonrpc.encode_error(message.id, refusal)
            elif message.method == "tools/call":
                admitted = await self._admit(message)
                if admitted is None:
                    replies[index] = None
                elif isinstance(admitted, RpcError):
                    replies[index] = jsonrpc.encode_error(message.id, admitted)
                else:
                    try:
                        replies[index] = await self._call(message.id, admitted)
                    finally:
                        self._release(admitted)
            else:
                replies[index] = await self._reply(message)

    # -- tools/call ----------------------------------------------------------------------

    async def _start_call(self, request: jsonrpc.Request) -> RpcError | None:
        """Admit the call and start it as a task; the error it was refused with, if so."""
        admitted = await self._admit(request)
        if admitted is None:
            return None
        if isinstance(admitted, RpcError):
            await self._send(jsonrpc.encode_error(request.id, admitted))
            return admitted
        assert self._calls is not None
        self._calls.start_soon(self._call_and_send, request.id, admitted)
        return None

    async def _admit(self, request: jsonrpc.Request) -> RpcError | _Admitted | None:
        """Validate and take a slot; or the error that refuses the call; or ``None`` if the
        client cancelled the call while it waited for a slot.

        Waiting for a slot here is the back-pressure: the mailbox fills behind us, then the
        reader refuses with "server busy".
        """
        try:
            version = self._version_of(request)
            params = _params(CallToolParams, request)
            tool = self._tools.get(params.name)
            if tool is None:
                raise InvalidParams(f"unknown tool: {params.name!r}")
            if not self._persistence.available:
                raise Unavailable(
                    "storage unavailable: the database is unreachable and the write journal "
                    "is full; nothing was done, retry later",
                    {"retryAfterMs": 1000},
                )
        except RpcError as error:
            return error
        # The node-wide limiter counts borrowers: each call is its own, whatever id its client
        # chose (ids are only unique within a session, and only while unanswered).
        admitted = _Admitted(tool, params, version)
        # While it waits for a slot the call is already cancellable (its scope is known).
        waiting = self.state.calls[request.id] = trio.CancelScope()
        taken = False
        try:
            with waiting:
                await _acquire(self._slots.acquire_nowait, self._slots.acquire)
                try:
                    limiter = self._config.total_slots
                    await _acquire(
                        partial(limiter.acquire_on_behalf_of_nowait, admitted),
                        partial(limiter.acquire_on_behalf_of, admitted),
                    )
                except BaseException:
                    self._slots.release()
                    raise
                taken = True
        finally:
            del self.state.calls[request.id]
        if not taken:
            return None  # cancelled while waiting: no response
        self.state.handling.add(request.id)
        # Replaced without a checkpoint in between, so no cancel can fall in the gap.
        self.state.calls[request.id] = trio.CancelScope()
        return admitted

    def _release(self, admitted: _Admitted) -> None:
        """Give back a call's two slots, once. Cannot raise: it runs on every path out of a
        call (reply queued, cancelled, crashed, session gone)."""
        if admitted.released:
            return
        admitted.released = True
        self._slots.release()
        self._config.total_slots.release_on_behalf_of(admitted)

    async def _call_and_send(self, request_id: RequestId, admitted: _Admitted) -> None:
        try:
            reply = await self._call(request_id, admitted)
            # A call the client cancelled gets no response (MCP: the receiver SHOULD NOT).
            if reply is not None:
                try:
                    await self._send(reply)
                except OutboxClosed:
                    return  # the connection is going away; the reader sees it too
            # Not in a `finally`: a call cut short by a crash stays in `handling`, so that
            # on_failure can tell the client it did not complete.
            self.state.handling.discard(request_id)
        finally:
            self._release(admitted)

    async def _call(self, request_id: RequestId, admitted: _Admitted) -> str | None:
        """Run an admitted call as a task (a row: pending, running, then its final state);
        its encoded reply, or ``None`` if the client cancelled it. The caller releases the
        call's slots once the reply is queued.

        The final state is committed (or durably journaled) before the reply is returned, so
        a client never holds a result the database does not. A call cut short by a crash or a
        shutdown is recorded as failed without waiting, as the incarnation is going away.
        """
        tool, params, version = admitted.tool, admitted.params, admitted.version
        scope = self.state.calls[request_id]
        persistence = self._persistence
        task = TaskLifecycle.create(
            session_id=self.state.session_id,
            request_id=request_id,
            tool_name=tool.name,
            arguments=params.arguments or {},
            node_id=self._config.node_id,
            max_result_bytes=self._config.max_result_bytes,
        )
        persistence.write_soon(task.created)
        persistence.write_soon(task.started())
        outcome: _Outcome | None = None
        try:
            # The call task's trace event; a call answered with a failure (an error response,
            # an `isError` result) is an `error` event, not only one that raised.
            with (
                scope,
                trace.handling(
                    f"{self.path}/tools/{tool.name}", "tools/call", rpc_id=request_id
                ) as traced,
            ):
                outcome = await self._run_tool(request_id, tool, params, version)
                if outcome.status == "failed":
                    traced.failed(outcome.error or "failed")
        except BaseException:
            persistence.write_soon(
                task.finished("failed", error_message="interrupted: session restarted or stopped")
            )
            raise
        finally:
            del self.state.calls[request_id]
        if outcome is None:
            self.state.handling.discard(request_id)
            persistence.write_soon(task.finished("cancelled"))
            return None
        state = self.state
        state.tool_calls += 1
        state.tool_errors += outcome.status == "failed"
        final = task.finished(outcome.status, result=outcome.result, error_message=outcome.error)
        try:
            await _write_retrying(persistence, final)
        except (StorageUnavailable, WriteConflict, WriteRejected, ActorUnavailable) as error:
            # The tool ran and its answer stands; the record of it could not be confirmed.
            self._log.error("task.final_write_failed", task_id=str(task.task_id), error=repr(error))
        except trio.TooSlowError:
            self._log.error("task.final_write_slow", task_id=str(task.task_id))
        # Cheap: the persistence actor keeps only the latest per session and syncs it lazily.
        persistence.write_soon(
            SessionActivity(
                session_id=state.session_id,
                last_activity=final.completed_at,
                tool_calls=state.tool_calls,
                tool_errors=state.tool_errors,
            )
        )
        return outcome.reply

    async def _run_tool(
        self, request_id: RequestId, tool: Tool[Any], params: CallToolParams, version: str
    ) -> _Outcome:
        try:
            args = tool.parse(params.arguments)
        except InvalidParams as error:
            return _invalid_input(request_id, error, version)
        token = params.meta.progress_token if params.meta else None
        progress = Progress(token, self._send) if token is not None else None
        ctx = ToolContext(
            self.state.session_id,
            request_id,
            identity=self.state.identity,
            progress=progress,
            log=self._log_to_client,
        )
        try:
            if progress is None:
                output = await tool.run(args, ctx)
            else:
                # Only calls that asked for progress pay for a nursery and a heartbeat task.
                async with trio.open_nursery() as running:
                    running.start_soon(progress.heartbeat, self._config.heartbeat_interval)
                    output = await tool.run(args, ctx)
                    running.cancel_scope.cancel()
        except InvalidParams as error:
            # Input the tool refused once it looked closer (a model not offered): answered as
            # input that did not parse is, in the request's era.
            return _invalid_input(request_id, error, version)
        except RpcError as error:
            # The tool refused with a meaning (retry later, a limit): answered as it is.
            return _Outcome(jsonrpc.encode_error(request_id, error), "failed", None, error.message)
        except Exception as exc:
            # A failing tool is the tool's failure, not the session's: answer and carry on.
            self._log.exception("tool.failed", tool=tool.name, id=request_id)
            failure = InternalError(f"tool {tool.name!r} failed; see server log")
            return _Outcome(
                jsonrpc.encode_error(request_id, failure), "failed", None, repr(exc)[:1000]
            )
        # Built as plain data, not through CallToolResult: this is the hot path of every call,
        # and the shape is fixed.
        body: dict[str, Any] = {"content": [{"type": "text", "text": output.text}]}
        if output.structured is not None and versions.has_structured_content(version):
            body["structuredContent"] = output.structured.model_dump(mode="json")
        body["isError"] = output.is_error
        if versions.is_modern(version):
            body["resultType"] = "complete"
        if output.is_error:
            return _Outcome(jsonrpc.encode_result(request_id, body), "failed", body, output.text)
        return _Outcome(jsonrpc.encode_result(request_id, body), "completed", body, None)

    async def _log_to_client(self, level: LogLevel, data: object) -> None:
        threshold = self.state.log_level
        if threshold is None or LOG_LEVELS.index(level) < LOG_LEVELS.index(threshold):
            return
        params = LogMessageParams(level=level, logger="exai", data=data)
        await self._send(jsonrpc.encode_notification("notifications/message", params))


def _invalid_input(request_id: RequestId, error: InvalidParams, version: str) -> _Outcome:
    """Invalid tool input: -32602, or since 2025-11-25 a tool error the model can read."""
    if versions.input_errors_are_tool_results(version):
        result = _finish(
            CallToolResult(content=[TextContent(text=error.message)], is_error=True), version
        )
        return _Outcome(jsonrpc.encode_result(request_id, result), "failed", result, error.message)
    return _Outcome(jsonrpc.encode_error(request_id, error), "failed", None, error.message)


async def _write_retrying(persistence: PersistenceClient, record: TaskFinished) -> None:
    """The final state of a task, written across a persistence actor restart.

    The client re-sends a write lost with a crashed incarnation. After a restart the
    task's earlier records (pending, running) are re-sent in the background and this one may
    overtake them: the row is then *behind* (missing, or at an older version), which the
    versioned write reports as a conflict. Flushing lets those records land, then this one is
    retried. A row that moved elsewhere (say, recovery marked it interrupted) stays a conflict.
    """
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            await persistence.write(record)  # retries an actor restart itself
        except WriteConflict as conflict:
            if attempt == attempts or not _row_behind(conflict, record):
                raise
            await persistence.flush()
        else:
            return


def _row_behind(conflict: WriteConflict, record: TaskFinished) -> bool:
    if conflict.current is None:
        return True  # the row is not there yet
    _, _, version = conflict.current.rpartition("@")
    return version.isdigit() and int(version) < record.version - 1


@dataclass(eq=False, slots=True)
class _Admitted:
    """A call that holds its two slots (the session's and the node's) until released; it is
    itself the node-wide limiter's borrower, so accounting never rests on a client's id."""

    tool: Tool[Any]
    params: CallToolParams
    version: str
    released: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How a call ended: the encoded reply and what its task row records."""

    reply: str
    status: Literal["completed", "failed"]
    result: dict[str, Any] | None
    error: str | None


async def _acquire(nowait: Callable[[], None], wait: Callable[[], Awaitable[None]]) -> None:
    """Take a slot without yielding to the scheduler when one is free (the common case);
    wait only when none is. Saves two scheduler round trips per call on the hot path."""
    try:
        nowait()
    except trio.WouldBlock:
        await wait()


def _describe(message: Message) -> tuple[str, RequestId | None]:
    """The trace event's ``kind`` and ``rpc_id`` for a mailbox message."""
    if isinstance(message, jsonrpc.Request):
        return message.method, message.id
    if isinstance(message, jsonrpc.Notification):
        return message.method, None
    if isinstance(message, jsonrpc.Batch):
        return "batch", None
    return "response", message.id


def _finish(result: BaseModel, version: str) -> dict[str, Any]:
    """The result as the request's era wants it: 2026-07-28 tags every result."""
    body: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    if versions.is_modern(version):
        body.setdefault("resultType", "complete")
        if isinstance(result, CACHEABLE_RESULTS):
            body.setdefault("ttlMs", 0)
            body.setdefault("cacheScope", "private")
    return body


def _params(model: type[Any], request: jsonrpc.Request) -> Any:
    try:
        return model.model_validate(request.params or {})
    except ValidationError as exc:
        raise invalid_params(f"params for {request.method!r}", exc) from None
