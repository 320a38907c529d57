"""The call runner: one ``tools/call`` from admission to its reply, and batches.

A call is *admitted* by the actor (its era, its params, its tool, storage taking work), then
waits for two slots, the session's (``max_inflight``) and the node's (``total_slots``), and
runs as a task in the incarnation's nursery: its task row (pending, running, then its final
state, committed before the reply goes out), the tool itself (with progress and heartbeats
if the client asked), and its reply, sent through the session's
:class:`~runtime.connection.Connection`. A call holds its slots until the connection has
accepted its reply, not merely until its tool returns: a peer that does not read its replies
therefore stops its own session's work. While every slot is taken the actor stops taking
messages, so later requests wait in the mailbox, and once that is full the reader refuses
them with "server busy".

A batch (2025-03-26 only) runs as one task too, one batch at a time, so it never holds up the
messages behind it; its members' slots are given back as each member's reply is ready (the
batch holds at most ``max_batch`` replies until its own reply is sent).

Cancellation: ``notifications/cancelled`` cancels a call's scope (through the
:class:`SessionState`), while it waits for a slot or runs: it then gets no response (MCP:
the receiver SHOULD NOT send one) and its row is ``cancelled``. A crash or the end of the
incarnation cancels the nursery: a running call is recorded failed ("interrupted"), and the
actor answers it -32001 (``actors.session.actor``); unless the incarnation ended because its
client left (``SessionState.client_left``: the connection ended, a DELETE), when the call was
its client's to cancel and is recorded ``cancelled``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal
from uuid import UUID

import pydantic_core
import trio
from structlog.typing import FilteringBoundLogger

from actors.persistence import (
    ActorUnavailable,
    PersistenceClient,
    StorageUnavailable,
)
from actors.session.config import SessionConfig
from actors.session.methods import SessionMethods, params, read_tasks, task_id_of
from actors.session.state import RequestId, SessionState
from actors.tasks import (
    CANCELLED_BY_NOTIFICATION,
    CANCELLED_HANDLE_LOST,
    CANCELLED_STREAM_CLOSED,
    POLL_INTERVAL_MS,
    RunningTask,
    TaskHost,
    TaskOutcome,
)
from actors.tasks.wire import created_task, payload_of, timestamp, unknown_task
from runtime import trace
from runtime.connection import Connection, ConnectionGone
from runtime.log_throttle import LogThrottle
from runtime.mcp import jsonrpc, translation, versions
from runtime.mcp.errors import (
    InvalidParams,
    InvalidRequest,
    LimitExceeded,
    MethodNotFound,
    MissingRequiredClientCapability,
    RpcError,
)
from runtime.mcp.progress import Progress
from runtime.mcp.schema import (
    LOG_LEVELS,
    CallToolParams,
    CreateTaskResult,
    LogLevel,
    LogMessageParams,
    RequestMeta,
    Task,
)
from runtime.mcp.tools import Tool, ToolContext, ToolRegistry
from storage.durability import Durability
from storage.errors import ExaiError, StorageError
from storage.rows import SessionActivity
from storage.tasks import Retention, TaskLifecycle
from storage.untrusted import clip

#: Why a call runs as an MCP task: the client asked (2025-11-25, ``params.task``), or the
#: server chose to (2026-07-28, the Tasks extension: SEP-2663's "server-directed" creation).
TaskMode = Literal["requested", "directed"]

#: The ``_meta`` of a call that sent none.
_NO_META = RequestMeta()
#: A read-only call whose records could not be confirmed (``CallRunner._intent_rides``).
_NOT_RECORDED = StorageUnavailable(
    "storage unavailable: the call could not be recorded, so its answer is withheld; the tool "
    "is read-only, retry later"
)


class CallRunner:
    """The ``tools/call`` requests and batches of one actor incarnation (module doc)."""

    def __init__(
        self,
        state: SessionState,
        connection: Connection,
        methods: SessionMethods,
        *,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
        path: str,
        refusals: LogThrottle | None = None,
    ) -> None:
        self.state = state
        self._send = connection.send
        self._connection = connection
        self._methods = methods
        self._tools = tools
        self._persistence = persistence
        self._config = config
        self._path = path
        #: Calls refused for their arguments are logged through this (``SessionActor``'s).
        self._refusals = refusals if refusals is not None else LogThrottle()
        self._slots = trio.Semaphore(config.max_inflight)
        #: One batch runs at a time: a second waits in the actor, the mailbox behind it.
        self._batch_slot = trio.Semaphore(1)
        self._calls: trio.Nursery | None = None
        #: ``tasks/result`` requests waiting now (bounded: ``max_task_result_waiters``).
        self._result_waiters = 0

    @property
    def _log(self) -> FilteringBoundLogger:
        """The session's logger, bound to its client once known (``SessionMethods.log``)."""
        return self._methods.log

    @asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        """The incarnation's nursery of calls: leaving it (a crash, the end) cancels them."""
        async with trio.open_nursery() as calls:
            self._calls = calls
            yield
            calls.cancel_scope.cancel()

    async def start(self, request: jsonrpc.Request) -> RpcError | None:
        """Admit the call and start it as a task; the error it was refused with, if so (it
        has been answered with it)."""
        admitted = await self._admit(request)
        if admitted is None:
            return None
        if isinstance(admitted, RpcError):
            await self._send(jsonrpc.encode_error(request.id, admitted), request.id)
            return admitted
        assert self._calls is not None
        if admitted.task is not None:
            self._calls.start_soon(self._create_task, request.id, admitted)
        else:
            self._calls.start_soon(self._call_and_send, request.id, admitted)
        return None

    # -- admission --------------------------------------------------------------------------

    async def _admit(self, request: jsonrpc.Request) -> RpcError | _Admitted | None:
        """Validate and take a slot; or the error that refuses the call; or ``None`` if the
        client cancelled the call while it waited for a slot.

        Waiting for a slot here is the back-pressure: the mailbox fills behind us, then the
        reader refuses with "server busy".
        """
        try:
            # The params (their `_meta` with them) are parsed once, here; the version is read
            # from that parse, and refused first, as for any other request.
            try:
                call = params(CallToolParams, request)
            except InvalidParams:
                self._methods.version_of(request)  # a bad version is refused before bad params
                raise
            version = self._methods.version_of(request, call.meta or _NO_META)
            # A tool the client's identity may not call is answered as an unknown one.
            tool = self._tools.get(call.name, self.state.identity)
            if tool is None:
                # The client's text, bounded only by the message size: quoted clipped (a
                # tool's name is at most 128 characters, so no real name is cut).
                raise InvalidParams(f"unknown tool: {clip(call.name, 128)!r}")
            task = self._task_mode(call, tool, version)
            try:
                self._persistence.ensure_available()
            except StorageUnavailable as error:
                # The persistence actor's words for what is unavailable, and the call's own
                # for what was done about it; answered by the translation point (-32004).
                raise StorageUnavailable(f"{error.reason}; nothing was done, retry later") from None
            if task is not None and self._admit_task(task, tool):
                self.state.handling(request.id)
                return _Admitted(tool, call, version, task=task)
        except (RpcError, ExaiError) as error:
            return translation.refusal(error)
        # The node-wide limiter counts borrowers: each call is its own, whatever id its client
        # chose (ids are only unique within a session, and only while unanswered).
        admitted = _Admitted(tool, call, version)
        state = self.state
        if self._take_slots_nowait(admitted):
            # The common case: both slots free, taken without a checkpoint, so nothing can
            # cancel the call before it runs and it needs no scope to wait in.
            state.admitted(request.id)
            return admitted
        # While it waits for a slot the call is already cancellable (its scope is known).
        waiting = state.waiting_for_slot(request.id)
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
            state.slot_wait_over(request.id)
        if not taken:
            return None  # cancelled while waiting: no response
        state.admitted(request.id)
        return admitted

    def _take_slots_nowait(self, admitted: _Admitted) -> bool:
        """Take the session's slot and the node's for ``admitted`` if both are free now;
        ``False``, holding neither, if either is not (the caller then waits for them in
        order, cancellable)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            self._config.total_slots.acquire_on_behalf_of_nowait(admitted)
        except trio.WouldBlock:
            self._slots.release()
            return False
        except BaseException:
            self._slots.release()
            raise
        return True

    def _task_mode(self, call: CallToolParams, tool: Tool[Any], version: str) -> TaskMode | None:
        """Whether the call runs as an MCP task, and why (docs/tasks.md):

        - 2025-11-25 (basic/utilities/tasks, "Tool-Level Negotiation"): ``"requested"`` when
          the client sent ``params.task``; -32601 for a tool that forbids it (every tool but
          those that declare ``execution.taskSupport``), or that requires it and was called
          without.
        - 2026-07-28 with the Tasks extension (SEP-2663, "server-directed"): ``"directed"``
          for a tool that supports tasks when the request declares the extension in its
          ``_meta`` client capabilities; ``params.task`` is ignored ("MUST"). A tool that
          requires a task, called without the extension: -32021.

        Any other version ignores ``params.task`` (MCP: a receiver that does not declare
        the capability MUST process the request normally)."""
        if self._methods.has_tasks_extension(version):
            if tool.task_support == "forbidden":
                return None
            capabilities = call.meta.client_capabilities if call.meta else None
            if versions.declares_extension(capabilities, versions.TASKS_EXTENSION):
                return "directed"
            if tool.task_support == "required":
                raise MissingRequiredClientCapability(
                    f"missing required client capability: tool {tool.name!r} is answered "
                    f"with a task; declare the {versions.TASKS_EXTENSION!r} extension in "
                    f"_meta[{versions.CLIENT_CAPABILITIES_META!r}].extensions",
                    {"extensions": {versions.TASKS_EXTENSION: {}}},
                )
            return None
        if not self._methods.has_tasks(version):
            return None
        if call.task is None:
            if tool.task_support == "required":
                raise MethodNotFound(
                    f"tool {tool.name!r} must be called as a task (execution.taskSupport is "
                    "'required'): add params.task"
                )
            return None
        if tool.task_support == "forbidden":
            raise MethodNotFound(
                f"tool {tool.name!r} does not support task-augmented calls "
                "(execution.taskSupport is 'forbidden'): call it without params.task"
            )
        return "requested"

    def _admit_task(self, task: TaskMode, tool: Tool[Any]) -> bool:
        """Count the call as one of its identity's tasks: ``True``; ``False`` if it is to run
        as a plain call instead. Raises -32005 (``LimitExceeded``) past the identity's bound
        (``EXAI_MAX_TASKS_PER_IDENTITY``) where a task is the only answer the call may get:

        - ``"requested"`` (2025-11-25): the client asked for a task, and "Receivers that
          accept a task-augmented request MUST return a CreateTaskResult as the response"
          (``basic/utilities/tasks.mdx``, "Result Retrieval"); the spec has no plain answer
          to a task-augmented request (its SDK clients parse the answer as a
          ``CreateTaskResult``), so a server that will not take the task refuses the call.
        - ``"directed"`` (2026-07-28, SEP-2663) to a tool whose ``task_support`` is
          ``"required"`` (it can only be answered with a task).

        Otherwise, a ``"directed"`` call to an ``"optional"`` tool, the server is free to
        answer plainly (SEP-2663, "Capability Negotiation": it "MAY return CreateTaskResult
        in lieu of a standard result ... at its own discretion and on a per-request basis.
        The server is the sole decider"): past the bound it runs as a plain call, under the
        session's slots like any other, and its client gets its result."""
        host = self._config.tasks
        assert host is not None  # _task_mode
        try:
            host.admit(self.state.identity)
        except LimitExceeded:
            if task == "directed" and tool.task_support == "optional":
                return False
            raise
        return True

    def _release(self, admitted: _Admitted) -> None:
        """Give back a call's two slots, once. Cannot raise: it runs on every path out of a
        call (reply sent, cancelled, crashed, session gone). While its tool keeps them (a
        worker thread still running, :meth:`_keep`) they are given back when it lets go."""
        if admitted.released:
            return
        if admitted.kept:
            admitted.release_when_let_go = True
            return
        admitted.released = True
        self._slots.release()
        self._config.total_slots.release_on_behalf_of(admitted)

    def _keep(self, admitted: _Admitted) -> Callable[[], None]:
        """``ToolContext.keep_slots``: the call's slots outlive its answer until the returned
        function is called (a plain ``def`` tool's thread returned: runtime/tool_workers.py)."""
        admitted.kept += 1

        def let_go() -> None:
            admitted.kept -= 1
            if not admitted.kept and admitted.release_when_let_go:
                self._release(admitted)

        return let_go

    # -- one call ---------------------------------------------------------------------------

    async def _call_and_send(self, request_id: RequestId, admitted: _Admitted) -> None:
        try:
            reply = await self._call(request_id, admitted)
            # A call the client cancelled gets no response (MCP: the receiver SHOULD NOT).
            if reply is not None:
                try:
                    await self._send(reply, request_id)
                except ConnectionGone:
                    return  # the connection is going away; the reader sees it too
            # Not in a `finally`: a call cut short by a crash stays being handled, so that
            # the actor's on_failure can tell the client it did not complete.
            self.state.answered(request_id)
        finally:
            self._release(admitted)

    async def _call(self, request_id: RequestId, admitted: _Admitted) -> str | None:
        """Run an admitted call as a task (a row: pending, running, then its final state);
        its encoded reply, or ``None`` if the client cancelled it. The caller releases the
        call's slots once the reply is sent.

        The final state is committed (or durably journaled) before the reply is returned, so
        a client never holds a result the database does not. A call cut short by a crash or a
        shutdown is recorded as failed without waiting, as the incarnation is going away.
        """
        tool, call, version = admitted.tool, admitted.params, admitted.version
        state = self.state
        scope = state.call_scope(request_id)
        persistence = self._persistence
        task = TaskLifecycle.create(
            session_id=state.session_id,
            request_id=request_id,
            tool_name=tool.name,
            arguments=call.arguments or {},
            node_id=self._config.node_id,
            max_result_bytes=self._config.max_result_bytes,
        )
        persistence.write_soon(task.created)
        outcome: _Outcome | None = None
        unrecorded = False
        try:
            # The call task's trace event; a call answered with a failure (an error response,
            # an `isError` result) is an `error` event, not only one that raised.
            with (
                scope,
                trace.handling(
                    f"{self._path}/tools/{tool.name}", "tools/call", rpc_id=request_id
                ) as traced,
            ):
                refused = await self._record_intent(task, tool)
                unrecorded = refused is not None
                # A read-only tool's intent rides with its final state (``_record_intent``):
                # if that final write fails, nothing recorded the call, so it is refused.
                unconfirmed = refused is None and self._intent_rides(tool)
                if refused is not None:
                    outcome = _failed(
                        request_id,
                        translation.call_failure(refused, tool=tool.name, version=version),
                    )
                else:
                    outcome = await self._run_tool(
                        request_id, tool, call, version, keep_slots=partial(self._keep, admitted)
                    )
                if outcome.refused:
                    # Arguments that do not parse: the tool never ran, and a client may send
                    # those as fast as it likes (one line per period; every one metered).
                    traced.refused(
                        outcome.error or "invalid arguments",
                        throttle=self._refusals,
                        key="tools/call:invalid arguments",
                    )
                elif outcome.status == "failed":
                    traced.failed(outcome.error or "failed")
        except BaseException:
            left = state.client_left
            persistence.write_soon(
                task.finished("cancelled", error_message=f"cancelled: {left}")
                if left is not None
                else task.finished(
                    "failed", error_message="interrupted: session restarted or stopped"
                )
            )
            raise
        finally:
            state.call_ended(request_id)
        if outcome is None:
            state.answered(request_id)
            persistence.write_soon(task.finished("cancelled"))
            return None
        state.count_call(failed=outcome.status == "failed")
        final = task.finished(
            outcome.status,
            result=outcome.result,
            error_message=outcome.error,
            result_size=outcome.result_size,
        )
        # Cheap: the persistence actor keeps only the latest per session and syncs it lazily.
        # Sent before the final state is awaited, so that both go in one shipment: sent after
        # it, it cost a shipment of its own, and so an actor round trip, per call.
        persistence.write_soon(
            SessionActivity(
                session_id=state.session_id,
                last_activity=final.completed_at,
                tool_calls=state.tool_calls,
                tool_errors=state.tool_errors,
            )
        )
        try:
            if persistence.durability is Durability.ASYNC or unrecorded:
                # Nothing waits: with `async` by choice; for a call refused because its
                # intent could not be recorded, the same write would wait as long in vain.
                persistence.write_soon(final)
            else:
                # The one retry layer of the final write is the client's.
                await persistence.write(final)
        except (StorageError, ActorUnavailable, trio.TooSlowError) as error:
            if unconfirmed:
                # Neither the intent nor the final state is known to be in the journal: the
                # answer must not reach the client (an answered call is never lost), and the
                # read-only tool had no effect to account for: refused, as an intent that
                # could not be recorded is.
                self._log.warning("task.not_recorded", task_id=str(task.task_id), error=repr(error))
                return _failed(
                    request_id,
                    translation.call_failure(_NOT_RECORDED, tool=tool.name, version=version),
                ).reply
            # The tool ran and its answer stands; the record of it could not be confirmed.
            self._log.error("task.final_write_failed", task_id=str(task.task_id), error=repr(error))
        return outcome.reply

    def _intent_rides(self, tool: Tool[Any]) -> bool:
        """Whether this call's intent is sent without being waited for, to ride in one
        shipment with its final state: with ``journal`` durability, for a tool declared
        read-only. Waiting for it would buy nothing a crash could show: the intent of a
        read-only call is not fsynced anyway, and with or without the wait a process killed
        before the intent's ``write(2)`` leaves no row, while a read-only tool leaves no effect
        to find without one (storage/durability.py). It saves one round trip to the
        persistence thread per call (issue 17)."""
        return self._persistence.durability is Durability.JOURNAL and tool.read_only

    async def _record_intent(self, task: TaskLifecycle, tool: Tool[Any]) -> ExaiError | None:
        """Record that the call runs (its row ``running``) before its tool does, as a
        write-ahead log would, so that a call whose tool had an effect always leaves a row:
        committed (``commit``), or written to the journal and fsynced (``journal``); not waited
        for with ``async``, nor with ``journal`` for a read-only tool (``_intent_rides``). The error
        that refuses the call if the intent could not be recorded (nothing ran)."""
        persistence = self._persistence
        started = task.started()
        if persistence.durability is Durability.ASYNC or self._intent_rides(tool):
            persistence.write_soon(started)
            return None
        try:
            await persistence.write(started)
        except (StorageError, ActorUnavailable, trio.TooSlowError) as error:
            # The row may still land (a slow database): the call's final state, `failed`,
            # follows it without waiting (``_call``), so that it never stays running.
            self._log.warning(
                "task.intent_not_recorded", task_id=str(task.task_id), error=repr(error)
            )
            return StorageUnavailable(
                "storage unavailable: the call could not be recorded; nothing was done, retry later"
            )
        return None

    async def _run_tool(
        self,
        request_id: RequestId,
        tool: Tool[Any],
        call: CallToolParams,
        version: str,
        *,
        detached: bool = False,
        keep_slots: Callable[[], Callable[[], None]] | None = None,
    ) -> _Outcome:
        """Run the tool; ``detached``: as an MCP task, with no progress and no client log;
        ``keep_slots``: the tool's ``ToolContext.keep_slots``."""
        try:
            args = tool.parse(call.arguments)
        except InvalidParams as error:
            return _failed(
                request_id,
                translation.call_failure(error, tool=tool.name, version=version),
                refused=True,
            )
        token = call.meta.progress_token if call.meta and not detached else None
        progress = Progress(token, self._send, request_id) if token is not None else None
        ctx = ToolContext(
            self.state.session_id,
            request_id,
            identity=self.state.identity,
            progress=progress,
            log=None if detached else self._client_log(call, version),
            keep_slots=keep_slots,
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
        except Exception as exc:
            # A failing tool is the tool's failure, not the session's: answer and carry on.
            # Domain errors (retry later, a limit, invalid input, the tool failed) and the
            # rest are answered in one place, in the request's era (runtime.mcp.translation).
            # The heartbeat's nursery groups what the tool raised: taken out of the group, so
            # that a tool's domain error means the same with progress as without.
            failure = translation.call_failure(_alone(exc), tool=tool.name, version=version)
            if failure.unexpected:
                self._log.exception("tool.failed", tool=tool.name, id=request_id)
            return _failed(request_id, failure)
        # Built as plain data, not through CallToolResult: this is the hot path of every call,
        # and the shape is fixed.
        body: dict[str, Any] = {
            "content": (
                output.content
                if output.content is not None
                else [{"type": "text", "text": output.text}]
            )
        }
        if versions.has_structured_content(version):
            if output.structured is not None:
                body["structuredContent"] = output.structured.model_dump(mode="json")
            elif output.structured_content is not None:
                body["structuredContent"] = output.structured_content
        body["isError"] = output.is_error
        if versions.is_modern(version):
            body["resultType"] = "complete"
        # Encoded once: the reply is built around it, and the task row's bound is its size.
        try:
            encoded = pydantic_core.to_json(body)
        except ValueError as exc:
            # A result JSON cannot carry (a lone surrogate in its text, nesting past the
            # encoder's limit) is the tool's failure, answered as any unexpected one: it must
            # not end the session's task, and with it the session's other calls.
            failure = translation.call_failure(exc, tool=tool.name, version=version)
            self._log.exception("tool.failed", tool=tool.name, id=request_id)
            return _failed(request_id, failure)
        reply = jsonrpc.encode_encoded_result(request_id, encoded)
        if output.is_error:
            return _Outcome(reply, "failed", body, output.text, len(encoded))
        return _Outcome(reply, "completed", body, None, len(encoded))

    # -- MCP tasks (2025-11-25 and the 2026-07-28 extension, docs/tasks.md) ---------------

    async def _create_task(self, request_id: RequestId, admitted: _Admitted) -> None:
        """A call run as an MCP task: its row, in the database (``write_through``: a
        ``tasks/get`` on any node finds it, as SEP-2663 requires before the handle is
        returned), then the task handed to the node's task host, then the answer: at once
        ``CreateTaskResult`` when the client asked for a task; when the server chose one, the
        call's own answer if the task ends soon enough (:meth:`_directed_reply`). A row that
        cannot be written refuses the call (-32004) and nothing runs."""
        host = self._config.tasks
        assert host is not None  # _task_mode
        state = self.state
        tool, call = admitted.tool, admitted.params
        requested_ttl = call.task.ttl if admitted.task == "requested" and call.task else None
        lifecycle = TaskLifecycle.create(
            session_id=state.session_id,
            request_id=request_id,
            tool_name=tool.name,
            arguments=call.arguments or {},
            node_id=self._config.node_id,
            max_result_bytes=self._config.max_result_bytes,
            identity=state.identity,
            retention=Retention.granted(
                requested_ttl, max_ms=host.retention_ms, poll_interval_ms=host.poll_interval_ms
            ),
        )
        reply: str | None
        try:
            await self._persistence.write_through(lifecycle.created)
        except (StorageError, ActorUnavailable, trio.TooSlowError) as error:
            host.withdraw(state.identity)
            self._log.warning(
                "task.not_recorded", task_id=str(lifecycle.task_id), error=repr(error)
            )
            if isinstance(error, (trio.TooSlowError, ActorUnavailable)):
                # The row may still land (it waits in the journal): it must not stay
                # `pending` with nobody to run it.
                self._persistence.write_soon(
                    lifecycle.finished("failed", error_message="not started: not recorded in time")
                )
            refusal = StorageUnavailable(
                "storage unavailable: the task could not be recorded; nothing was done, retry later"
            )
            reply = jsonrpc.encode_error(request_id, translation.refusal(refusal))
        except BaseException:
            # Cut short (the session crashed or ended): the row may have landed; it must
            # not stay `pending` with nobody to run it.
            host.withdraw(state.identity)
            self._persistence.write_soon(
                lifecycle.finished("failed", error_message="interrupted before the task started")
            )
            raise
        else:
            running = host.launch(
                lifecycle, state.identity, partial(self._execute, request_id, admitted)
            )
            if admitted.task == "directed":
                # SEP-2663 has no tasks/list: a task whose handle never reaches its client
                # can never be polled, updated or cancelled. So if the request's stream ends
                # before its answer is written (over Streamable HTTP: queued and dropped, or
                # never queued), the task is cancelled, as the request is.
                watch = _AnswerWatch(host, running)
                self._connection.watch_delivery(request_id, watch)
                reply = await self._directed_reply(request_id, running)
                if reply is None:
                    return  # the client cancelled the request: no response
                watch.sent = True
            else:
                created = lifecycle.created
                at = timestamp(created.created_at)
                task = Task(
                    task_id=str(lifecycle.task_id),
                    status="working",
                    created_at=at,
                    last_updated_at=at,
                    ttl=created.ttl_ms,
                    poll_interval=created.poll_interval_ms,
                )
                reply = jsonrpc.encode_result(request_id, CreateTaskResult(task=task))
        try:
            await self._send(reply, request_id)
        except ConnectionGone:
            return  # the task runs on; the client finds it with tasks/list or tasks/get
        self.state.answered(request_id)

    async def _directed_reply(self, request_id: RequestId, running: RunningTask) -> str | None:
        """A task the server chose (SEP-2663, "server-directed"): the call's own answer if
        the task ends within ``task_after`` seconds, so a quick call costs its client no
        polling; else ``CreateTaskResult`` (``resultType: "task"``), and the task runs on,
        durable, for ``tasks/get``.

        Cancellation: the client cancelling the request meanwhile (``notifications/cancelled``,
        or over Streamable HTTP closing its response stream) cancels the task too, without
        waiting for it: nobody was told of it, so nobody could ever ask for it; ``None``
        then (no response). So does the answer never reaching the client (the request's
        stream ending first, the session's end included: ``_AnswerWatch``).
        """
        host = self._config.tasks
        assert host is not None  # _task_mode
        scope = self.state.waiting_for_task(request_id)
        try:
            with scope, trio.move_on_after(self._config.task_after):
                await running.done.wait()
        finally:
            self.state.call_ended(request_id)
        if scope.cancelled_caught:
            # Over Streamable HTTP a sessionless request is cancelled only by closing its
            # stream; elsewhere by notifications/cancelled. The cause, never an id (host.py).
            why = CANCELLED_STREAM_CLOSED if self.state.sessionless else CANCELLED_BY_NOTIFICATION
            host.cancel_soon(running, why)
            self.state.answered(request_id)
            return None
        outcome = running.outcome
        if running.done.is_set() and outcome is not None:
            if outcome.rpc_error is not None:
                error = {"jsonrpc": "2.0", "id": request_id, "error": outcome.rpc_error}
                return pydantic_core.to_json(error).decode()
            if outcome.result is not None:
                return jsonrpc.encode_result(request_id, outcome.result)
        # Still running, or ended with no answer to give (cancelled, its node stopping):
        # the handle, whose tasks/get says which.
        return jsonrpc.encode_result(request_id, created_task(running.lifecycle.created))

    async def _execute(self, request_id: RequestId, admitted: _Admitted) -> TaskOutcome:
        """Run a task's tool, detached from this session (no progress, no client log: the
        client may be gone); how it ended, as ``tools/call`` would have answered."""
        outcome = await self._run_tool(
            request_id, admitted.tool, admitted.params, admitted.version, detached=True
        )
        return TaskOutcome(
            outcome.status,
            result=outcome.result,
            result_size=outcome.result_size,
            error_message=outcome.error,
            rpc_error=outcome.rpc_error,
        )

    async def task_result(self, request: jsonrpc.Request) -> RpcError | None:
        """``tasks/result``: admitted here, then waits in its own task of the incarnation's
        nursery (never in the actor), at most ``max_task_result_waiters`` per session
        (-32005 past it); cancellable with ``notifications/cancelled``. The error it was
        refused with, if so (it has been answered with it)."""
        try:
            version = self._methods.version_of(request)
            if not self._methods.has_tasks(version):
                raise MethodNotFound(
                    f"method not found: 'tasks/result' (protocol version {version})"
                )
            task_id = task_id_of(request)
            bound = self._config.max_task_result_waiters
            if self._result_waiters >= bound:
                raise LimitExceeded(
                    f"too many tasks/result requests waiting in this session ({bound}, "
                    "EXAI_MAX_TASK_RESULT_WAITERS): wait for one, or poll with tasks/get",
                    {"limit": "task_result_waiters", "max": bound},
                )
        except RpcError as error:
            await self._send(jsonrpc.encode_error(request.id, error), request.id)
            return error
        self._result_waiters += 1
        scope = self.state.waiting_for_task(request.id)
        assert self._calls is not None
        self._calls.start_soon(self._await_result, request.id, task_id, scope)
        return None

    async def _await_result(
        self, request_id: RequestId, task_id: UUID, scope: trio.CancelScope
    ) -> None:
        reply: str | None = None
        try:
            with scope:
                try:
                    reply = await self._task_payload(request_id, task_id)
                except RpcError as error:
                    reply = jsonrpc.encode_error(request_id, error)
            if reply is not None:
                try:
                    await self._send(reply, request_id)
                except ConnectionGone:
                    return
            self.state.answered(request_id)
        finally:
            self._result_waiters -= 1
            self.state.call_ended(request_id)

    async def _task_payload(self, request_id: RequestId, task_id: UUID) -> str:
        """Once the task is terminal: exactly what its ``tools/call`` would have answered
        (MCP: MUST), with the related-task ``_meta``. A task running here is waited for on
        its event; one running elsewhere is read again every ``pollInterval``."""
        host = self._config.tasks
        assert host is not None
        identity = self.state.identity
        while True:
            running = host.running(task_id, identity)
            if running is not None:
                await running.done.wait()
                final, outcome = running.final, running.outcome
                assert final is not None
                payload = payload_of(
                    str(task_id),
                    final.status,
                    result=outcome.result if outcome is not None else None,
                    rpc_error=outcome.rpc_error if outcome is not None else None,
                    error_message=final.error_message,
                )
                return _encode_payload(request_id, payload)
            row = await read_tasks(partial(host.store.payload, task_id, identity))
            if row is None:
                raise unknown_task(task_id)
            if row.terminal:
                if row.expired(datetime.now(UTC)):
                    raise InvalidParams(
                        f"Failed to retrieve task: task {task_id} has expired (its result was "
                        f"cleared after its ttl of {row.ttl_ms} ms)"
                    )
                payload = payload_of(
                    str(task_id),
                    row.status,
                    result=row.result,
                    rpc_error=row.rpc_error,
                    error_message=row.error_message,
                )
                return _encode_payload(request_id, payload)
            await trio.sleep((row.poll_interval_ms or POLL_INTERVAL_MS) / 1000)

    def _client_log(
        self, call: CallToolParams, version: str
    ) -> Callable[[LogLevel, object, RequestId], Awaitable[None]] | None:
        """How a call's tool logs to its client: through the session's ``logging/setLevel``
        threshold in the handshake era; in 2026-07-28, at or above the level the request
        names in ``_meta`` (``io.modelcontextprotocol/logLevel``), and not at all without
        one: the server "MUST NOT emit ``notifications/message`` for a request that does
        not include this field" (``server/utilities/logging.mdx``)."""
        if not versions.is_modern(version):
            return self._log_to_client
        wanted = call.meta.log_level if call.meta else None
        if wanted not in LOG_LEVELS:
            return None
        threshold = LOG_LEVELS.index(wanted)

        async def log_at_or_above(level: LogLevel, data: object, request_id: RequestId) -> None:
            if LOG_LEVELS.index(level) >= threshold:
                note = LogMessageParams(level=level, logger="exai", data=data)
                message = jsonrpc.encode_notification("notifications/message", note)
                await self._send(message, request_id)

        return log_at_or_above

    async def _log_to_client(self, level: LogLevel, data: object, request_id: RequestId) -> None:
        """A tool's ``notifications/message``, if the client's level lets it through; it
        relates to the call's request."""
        if not self.state.wants_log(level):
            return
        note = LogMessageParams(level=level, logger="exai", data=data)
        await self._send(jsonrpc.encode_notification("notifications/message", note), request_id)

    # -- batches (2025-03-26) ---------------------------------------------------------------

    async def batch(self, batch: jsonrpc.Batch) -> None:
        """Classify a batch's members and start it as a task (one batch at a time); an empty
        batch, or one outside 2025-03-26, is refused as a whole (-32600, id null)."""
        version = self.state.protocol_version or ""
        if not batch.items or not versions.allows_batches(version):
            why = (
                "an empty batch"
                if not batch.items
                else f"batches are not part of protocol version {version or '(none yet)'}"
            )
            refusal = InvalidRequest(f"invalid request: {why}")
            await self._send(jsonrpc.encode_error(None, refusal), None)
            return
        # Members are classified here, in order and before anything runs, so that an id that
        # is already in use (in the session, or earlier in this batch) is refused for that
        # member alone, deterministically. The ids taken are reserved until the batch's reply
        # is sent, so that no later request can borrow them meanwhile.
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
            self.state.handling(message.id)
            reserved.append(message.id)
        return message

    async def _run_batch(
        self, members: list[jsonrpc.Inbound | str], reserved: list[RequestId]
    ) -> None:
        # A member's slots are given back as soon as its own reply is ready, not when the
        # batch's is sent: a batch with more calls than the session has slots would
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
                # One reply for the whole batch: it relates to the batch's first request (a
                # transport with a stream per request sends it on the batch's).
                related = reserved[0] if reserved else None
                await self._send(jsonrpc.encode_batch(answered), related)
            for request_id in reserved:
                self.state.answered(request_id)
        except ConnectionGone:
            return
        finally:
            self._batch_slot.release()

    async def _batch_member(
        self, message: jsonrpc.Inbound, replies: list[str | None], index: int
    ) -> None:
        if isinstance(message, jsonrpc.Notification):
            self._methods.notify(message)
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
                replies[index] = await self._methods.reply(message)


@dataclass(eq=False, slots=True)
class _AnswerWatch:
    """A directed task's ``lost`` callback (``Connection.watch_delivery``): its request's
    stream ended before the answer was written, so the task is cancelled, saying whether
    its handle had been sent; unless it has ended already (its answer was then its own
    result, or it is over anyway)."""

    host: TaskHost
    running: RunningTask
    #: The answer (the handle, or the call's own result) was given to the connection.
    sent: bool = False

    def __call__(self) -> None:
        if not self.running.done.is_set():
            why = CANCELLED_HANDLE_LOST if self.sent else CANCELLED_STREAM_CLOSED
            self.host.cancel_soon(self.running, why)


def _failed(
    request_id: RequestId, failure: translation.CallFailure, *, refused: bool = False
) -> _Outcome:
    """A failed call's reply as its translation says: a JSON-RPC error or an ``isError``
    result; ``refused``: its tool never ran (its arguments did not parse)."""
    if failure.error is not None:
        error = failure.error
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            body["data"] = error.data
        return _Outcome(
            jsonrpc.encode_error(request_id, error),
            "failed",
            None,
            failure.record,
            rpc_error=body,
            refused=refused,
        )
    assert failure.result is not None
    return _Outcome(
        jsonrpc.encode_result(request_id, failure.result),
        "failed",
        failure.result,
        failure.record,
        refused=refused,
    )


@dataclass(eq=False, slots=True)
class _Admitted:
    """A call that holds its two slots (the session's and the node's) until released; it is
    itself the node-wide limiter's borrower, so accounting never rests on a client's id."""

    tool: Tool[Any]
    params: CallToolParams
    version: str
    released: bool = False
    #: An MCP task (docs/tasks.md): it holds no slot of the session's; the task host takes
    #: a node slot for it.
    task: TaskMode | None = None
    #: Its tool keeps its slots past its answer this many times (``CallRunner._keep``), and
    #: they are to be given back once it lets go.
    kept: int = 0
    release_when_let_go: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How a call ended: the encoded reply and what its task row records."""

    reply: str
    status: Literal["completed", "failed"]
    result: dict[str, Any] | None
    error: str | None
    #: Bytes of ``result`` as compact JSON, when the reply already encoded it.
    result_size: int | None = None
    #: The JSON-RPC error object of ``reply``, when it is an error (an MCP task keeps it).
    rpc_error: dict[str, Any] | None = None
    #: Refused before its tool ran (arguments that do not parse): logged throttled.
    refused: bool = False


def _encode_payload(
    request_id: RequestId, payload: dict[str, Any] | dict[str, dict[str, Any]]
) -> str:
    """A ``tasks/result`` reply from :func:`~actors.tasks.wire.payload_of`'s answer."""
    if "error" in payload:
        message = {"jsonrpc": "2.0", "id": request_id, "error": payload["error"]}
        return pydantic_core.to_json(message).decode()
    return jsonrpc.encode_result(request_id, payload["result"])


def _alone(exc: Exception) -> Exception:
    """The one exception inside a group of one (nested or not), else ``exc`` itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _acquire(nowait: Callable[[], None], wait: Callable[[], Awaitable[None]]) -> None:
    """Take a slot without yielding to the scheduler when one is free (the common case);
    wait only when none is. Saves two scheduler round trips per call on the hot path."""
    try:
        nowait()
    except trio.WouldBlock:
        await wait()
