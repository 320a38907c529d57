"""The MCP methods a session answers, by protocol era: method name -> handler.

As the official SDK's ``Server.request_handlers`` table, each request method maps to one
handler; here each entry also says in which eras the method exists and whether it may come
before the session has a version. ``tools/call`` is not in the table: it runs as a task with
its own admission (``actors.session.calls``). ``ping`` and ``notifications/cancelled`` are
normally answered by the reader before the mailbox (``actors.session.reader``); the entries
here answer what reaches the actor (a batch member, a 2026-07-28 ``ping`` refused in its era).

Dual era (``runtime/mcp/versions.py``): a *handshake* client (2024-11-05 .. 2025-11-25) sends
``initialize`` once and the negotiated version holds for the session; a *modern* (2026-07-28)
client names its version in every request's ``_meta`` and may start with ``server/discover``.
Each request is answered in the era of its own version (:meth:`SessionMethods.version_of`):

=======================  ==========================  =====================================
method                   eras                        before a version is known
=======================  ==========================  =====================================
``initialize``           handshake (-32022 modern)   yes (it is how one is agreed)
``server/discover``      every                       yes
``ping``                 handshake (2026-07-28: no)  yes
``tools/list``           every                       no: -32600 "session not initialized"
``logging/setLevel``     handshake (2026-07-28: no)  no
``tasks/get``            2025-11-25; 2026-07-28 ext  no
``tasks/list``           2025-11-25, tasks offered   no
``tasks/cancel``         2025-11-25; 2026-07-28 ext  no
``tasks/update``         2026-07-28 extension        no
``$/exai/test/crash*``   every, with test faults on  yes
anything else            -32601 "method not found"   no
=======================  ==========================  =====================================

``tasks/result`` is not in the table either: it may wait as long as its task runs, so it
runs as a task of the call runner, like a call (``actors.session.calls``). The ``tasks/*``
methods read the database (docs/tasks.md): a task of another identity is answered as an
unknown one (-32602). "Tasks offered": on a node that runs a task host. "2026-07-28 ext": the
Tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663), whose methods a request that
does not declare it in its ``_meta`` client capabilities is refused with -32021; it has no
``tasks/list`` nor ``tasks/result`` (-32601).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar
from uuid import UUID

import structlog
import trio
from pydantic import BaseModel, ValidationError
from structlog.typing import FilteringBoundLogger

from actors.persistence import PersistenceClient
from actors.session.config import SessionConfig
from actors.session.state import SessionState
from actors.tasks import CANCELLED_BY_REQUEST, CANCELLED_ON_ANOTHER_NODE, TaskHost
from actors.tasks.wire import detailed_task, task_of, unknown_task
from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import (
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    MissingRequiredClientCapability,
    RpcError,
    SessionNotInitialized,
    Unavailable,
    UnsupportedProtocolVersion,
    invalid_params,
)
from runtime.mcp.paging import decode_cursor, encode_cursor, page
from runtime.mcp.schema import (
    CACHEABLE_RESULTS,
    CancelTaskResult,
    DetailedTask,
    DiscoverResult,
    EmptyResult,
    GetTaskResult,
    Implementation,
    InitializeParams,
    InitializeResult,
    ListTasksParams,
    ListTasksResult,
    ListToolsParams,
    ListToolsResult,
    RequestMeta,
    ServerCapabilities,
    SetLevelParams,
    TaskIdParams,
    TasksCapability,
    ToolsCapability,
    UpdateTaskParams,
)
from runtime.mcp.tools import ToolRegistry
from storage.rows import SessionIdentified, SessionLogLevel
from storage.task_queries import TaskReadError
from storage.untrusted import clip

__all__ = [
    "CRASH_METHOD",
    "CRASH_PERSISTENCE_METHOD",
    "METHODS",
    "SERVER_INFO",
    "Method",
    "SessionCrashRequested",
    "SessionMethods",
    "finish",
    "params",
]

log = structlog.get_logger("session")

SERVER_INFO = Implementation(name="exai-runtime", version="0.1.0")
#: Test-only fault: crashes the session actor itself (not a tool). Off unless configured.
CRASH_METHOD = "$/exai/test/crash"
#: Test-only fault: crashes the (shared) persistence actor, which the root then restarts.
CRASH_PERSISTENCE_METHOD = "$/exai/test/crash-persistence"

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


class SessionCrashRequested(Exception):
    """Raised by the test-only fault method to prove a crash is contained and healed."""


#: A request handler: the session, the request, the version it is answered in -> its result.
Handler = Callable[["SessionMethods", jsonrpc.Request, str], Awaitable[BaseModel]]


def _every_era(session: SessionMethods, version: str) -> bool:
    return True


def _handshake_era(session: SessionMethods, version: str) -> bool:
    """``ping`` and ``logging/setLevel``: gone in 2026-07-28 (``versions.has_ping``)."""
    return versions.has_ping(version)


def _test_faults_on(session: SessionMethods, version: str) -> bool:
    return session.config.test_faults


def _tasks_era(session: SessionMethods, version: str) -> bool:
    """``tasks/get`` and ``tasks/cancel``: 2025-11-25 (``versions.has_tasks``) or the
    2026-07-28 extension, on a node that runs a task host."""
    return session.has_tasks(version) or session.has_tasks_extension(version)


def _core_tasks_era(session: SessionMethods, version: str) -> bool:
    """``tasks/list``: 2025-11-25 only (SEP-2663 dropped it with ``tasks/result``)."""
    return session.has_tasks(version)


def _tasks_extension_era(session: SessionMethods, version: str) -> bool:
    """``tasks/update``: the 2026-07-28 extension only."""
    return session.has_tasks_extension(version)


@dataclass(frozen=True, slots=True)
class Method:
    """One entry of the method table."""

    handler: Handler
    #: Whether the request may come before the session has a version (else -32600,
    #: ``SessionNotInitialized``).
    before_version: bool = False
    #: Whether the method exists for this session in this version's era (else -32601).
    exists: Callable[[SessionMethods, str], bool] = _every_era


class SessionMethods:
    """The session's answers to every request but ``tools/call``, and to notifications.

    One per actor incarnation (the actor calls it, one message at a time); what must outlive
    a crash is in the :class:`SessionState`. :attr:`log` is the session's logger, bound to its
    client and version once known (the call runner logs through it too).
    """

    def __init__(
        self,
        state: SessionState,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
    ) -> None:
        self.state = state
        self.tools = tools
        self.persistence = persistence
        self.config = config
        self.log: FilteringBoundLogger = log.bind(session_id=state.session_id)

    async def reply(self, request: jsonrpc.Request) -> str:
        """The encoded response to one request (never ``tools/call``): its result in its
        era, or its JSON-RPC error."""
        try:
            version = self.version_of(request)
            entry = METHODS.get(request.method)
            if entry is None or not entry.exists(self, version):
                raise MethodNotFound(
                    f"method not found: {request.method!r} (protocol version {version})"
                )
            result = await entry.handler(self, request, version)
        except RpcError as error:
            return jsonrpc.encode_error(request.id, error)
        return jsonrpc.encode_result(request.id, finish(result, version))

    def version_of(self, request: jsonrpc.Request, meta: RequestMeta | None = None) -> str:
        """The protocol version this request is answered in (``""`` before any is known, for
        the methods that may come then), or the error that refuses it: -32022 for a
        ``_meta`` version that is not a modern one, -32600 (``SessionNotInitialized``) before a
        version is known.

        ``meta``: the request's ``_meta`` already parsed (a ``tools/call``'s params carry
        it), so that it is read once; else it is read here from the raw params.
        """
        if meta is not None:
            named, client = meta.protocol_version, meta.client_info
        else:
            raw = (request.params or {}).get("_meta")
            if not isinstance(raw, dict):
                raw = {}
            named = raw.get(versions.PROTOCOL_VERSION_META)
            client = raw.get(versions.CLIENT_INFO_META)
        if named is not None:
            if not isinstance(named, str) or not versions.is_modern(named):
                raise UnsupportedProtocolVersion(str(named), list(versions.MODERN_VERSIONS))
            if self.state.protocol_version is None:
                self._adopt_modern(named, client)
            # Otherwise answered in its own era, leaving a handshake session as it is.
            return named
        entry = METHODS.get(request.method)
        if entry is not None and entry.before_version:
            return self.state.protocol_version or ""
        if self.state.protocol_version is None or versions.is_modern(self.state.protocol_version):
            raise SessionNotInitialized(
                f"session not initialized: send 'initialize' before {request.method!r}, "
                f"or name a protocol version in _meta[{versions.PROTOCOL_VERSION_META!r}]"
            )
        return self.state.protocol_version

    def has_tasks(self, version: str) -> bool:
        """Whether 2025-11-25's core tasks exist for a request in ``version`` (docs/tasks.md)."""
        return self.config.tasks is not None and versions.has_tasks(version)

    def has_tasks_extension(self, version: str) -> bool:
        """Whether the Tasks extension (SEP-2663) is offered for a request in ``version``."""
        return self.config.tasks is not None and versions.has_tasks_extension(version)

    def capabilities(self, version: str) -> ServerCapabilities:
        """The server's capabilities in ``version``: ``tasks`` (2025-11-25) or the Tasks
        extension (2026-07-28) only where tasks exist."""
        return ServerCapabilities(
            tools=ToolsCapability(list_changed=self.config.tools_list_changed),
            tasks=TasksCapability() if self.has_tasks(version) else None,
            extensions=(
                {versions.TASKS_EXTENSION: {}} if self.has_tasks_extension(version) else None
            ),
        )

    def notify(self, note: jsonrpc.Notification) -> None:
        """A notification from the client (no response, ever)."""
        if note.method == "notifications/initialized":
            self.state.mark_initialized()
        elif note.method == "notifications/cancelled":
            # Normally applied by the reader before queueing; kept for batches.
            self.state.cancel((note.params or {}).get("requestId"))
        else:
            self.log.debug("session.notification_ignored", method=note.method)

    def _adopt_modern(self, version: str, client: object) -> None:
        """The first request of a modern session carries the client's identity
        (``_meta[CLIENT_INFO_META]``, as the client sent it): record it."""
        try:
            info = Implementation.model_validate(client or {})
        except ValidationError:
            info = Implementation(name="unknown", version="unknown")
        self.state.negotiated(version)
        self.identify(info, version, requested=version)

    def identify(
        self, client: Implementation, version: str, *, requested: str, background: bool = True
    ) -> SessionIdentified:
        """The client named itself: kept, logged (``session.initialized``), recorded: in the
        background, or (not ``background``) by the caller, which waits for the record
        returned."""
        self.state.negotiated(version, client)
        self.log = self.log.bind(client=client.name, protocol=version)
        self.log.info("session.initialized", requested=requested)
        record = SessionIdentified(
            session_id=self.state.session_id,
            client_name=client.name,
            client_version=client.version,
            protocol_version=version,
            at=datetime.now(UTC),
        )
        if background:
            self.persistence.write_soon(record)
        return record


# -- the handlers ----------------------------------------------------------------------------


async def _initialize(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> InitializeResult:
    """``initialize`` (handshake era): negotiate once (``versions.negotiate``)."""
    asked = params(InitializeParams, request)
    state = session.state
    if state.protocol_version is not None and versions.is_modern(state.protocol_version):
        # The session is modern already (say, a discover the client timed out on was
        # answered): -32022 names the modern versions, so the client re-probes with one.
        raise UnsupportedProtocolVersion(asked.protocol_version, list(versions.MODERN_VERSIONS))
    if state.protocol_version is not None:
        raise InvalidRequest("session already initialized: 'initialize' may be sent once")
    negotiated = versions.negotiate(asked.protocol_version)
    identified = session.identify(
        asked.client_info,
        negotiated,
        requested=asked.protocol_version,
        background=not state.any_node,
    )
    if state.any_node:
        # Its next request may reach another node, which serves it from this row: what was
        # negotiated is in the database before the answer (committed, or fsynced in the
        # journal while the database is away: then no node can take it over anyway).
        await session.persistence.write_committed(identified)
    return InitializeResult(
        protocol_version=negotiated,
        capabilities=session.capabilities(negotiated),
        server_info=SERVER_INFO,
        meta={"exai/sessionId": state.session_id},
    )


async def _discover(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> DiscoverResult:
    """``server/discover`` (2026-07-28's probe, answered in every era): the capabilities of
    the newest version, which is what a client that probes will speak (the Tasks extension:
    SEP-2663 advertises it here). A sessionless session's id is nobody's to keep: shared by
    every request of the identity and gone once idle, it is not named."""
    meta: dict[str, Any] = {versions.SERVER_INFO_META: SERVER_INFO.model_dump(exclude_none=True)}
    if not session.state.sessionless:
        meta["exai/sessionId"] = session.state.session_id
    return DiscoverResult(
        supported_versions=list(versions.SUPPORTED_VERSIONS),
        capabilities=session.capabilities(versions.SUPPORTED_VERSIONS[-1]),
        meta=meta,
    )


async def _ping(session: SessionMethods, request: jsonrpc.Request, version: str) -> EmptyResult:
    return EmptyResult()


async def _list_tools(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> ListToolsResult:
    """``tools/list``, paged (``runtime/mcp/paging.py``: opaque cursors, -32602 if bad)."""
    cursor = params(ListToolsParams, request).cursor
    listed = session.tools.descriptors(
        execution=session.has_tasks(version), identity=session.state.identity
    )
    tools, next_cursor = page(listed, cursor, session.config.page_size)
    return ListToolsResult(tools=tools, next_cursor=next_cursor)


def task_id_of(request: jsonrpc.Request) -> UUID:
    """``params.taskId`` as the task's uuid; -32602 as for an unknown task if it is none
    (MCP: an invalid or nonexistent task id is -32602)."""
    raw = params(TaskIdParams, request).task_id
    try:
        return UUID(raw)
    except ValueError:
        raise unknown_task(raw) from None


async def read_tasks(read: Callable[[], T]) -> T:
    """A blocking read of the task store, off the trio thread; -32004 if the database could
    not be read (abandoned on cancel: the query is bounded by its statement timeout)."""
    try:
        return await trio.to_thread.run_sync(read, abandon_on_cancel=True)
    except TaskReadError as error:
        raise Unavailable(f"tasks are unavailable: {error}; retry later") from None


def _task_host(session: SessionMethods) -> TaskHost:
    host = session.config.tasks
    assert host is not None  # the method exists only with a host (_tasks_era)
    return host


def _require_tasks_extension(request: jsonrpc.Request, version: str) -> None:
    """2026-07-28: the ``tasks/*`` methods of a request that does not declare the Tasks
    extension in its ``_meta`` are refused with -32021 (SEP-2663, "Protocol Errors":
    MUST)."""
    if not versions.has_tasks_extension(version):
        return
    meta = (request.params or {}).get("_meta")
    declared = meta.get(versions.CLIENT_CAPABILITIES_META) if isinstance(meta, dict) else None
    if not versions.declares_extension(declared, versions.TASKS_EXTENSION):
        raise MissingRequiredClientCapability(
            f"missing required client capability: {request.method!r} belongs to the "
            f"{versions.TASKS_EXTENSION!r} extension; declare it in "
            f"_meta[{versions.CLIENT_CAPABILITIES_META!r}].extensions",
            {"extensions": {versions.TASKS_EXTENSION: {}}},
        )


async def _get_task(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> GetTaskResult | DetailedTask:
    """``tasks/get``: the task's row, read from the database (any node's task). 2026-07-28
    (SEP-2663): the ``DetailedTask``, its result or error inline once terminal; a task whose
    result retention has passed is -32602 ("Task has expired")."""
    _require_tasks_extension(request, version)
    task_id = task_id_of(request)
    store = _task_host(session).store
    if not versions.has_tasks_extension(version):
        row = await read_tasks(partial(store.get, task_id, session.state.identity))
        if row is None:
            raise unknown_task(task_id)
        return GetTaskResult(**task_of(row).model_dump())
    row = await read_tasks(partial(store.payload, task_id, session.state.identity))
    if row is None:
        raise unknown_task(task_id)
    if row.terminal and row.expired(datetime.now(UTC)):
        raise InvalidParams(
            f"Failed to retrieve task: task {task_id} has expired (its result was cleared "
            f"after its ttl of {row.ttl_ms} ms)"
        )
    return detailed_task(row)


async def _list_tasks(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> ListTasksResult:
    """``tasks/list``: the identity's tasks, newest first, paged with the opaque cursors of
    ``runtime/mcp/paging.py`` (-32602 for one we did not issue)."""
    cursor = params(ListTasksParams, request).cursor
    offset = 0 if cursor is None else decode_cursor(cursor)
    if cursor is not None and offset == 0:
        raise InvalidParams(f"invalid cursor {clip(cursor, 64)!r}: out of range")
    size = session.config.page_size
    store = _task_host(session).store
    rows = await read_tasks(
        partial(store.list_tasks, session.state.identity, offset=offset, limit=size + 1),
    )
    next_cursor = encode_cursor(offset + size) if len(rows) > size else None
    return ListTasksResult(tasks=[task_of(row) for row in rows[:size]], next_cursor=next_cursor)


async def _cancel_task(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> CancelTaskResult | EmptyResult:
    """``tasks/cancel``: a task running on this node is cancelled and recorded ``cancelled``
    before the answer; one that runs on another node (or on none: its node died and no
    recovery has run yet) is marked ``cancelled`` in the database, which its node acts on
    (docs/tasks.md). 2025-11-25: answered with the task, and -32602 for a task already
    ended (MCP). 2026-07-28 (SEP-2663): an empty acknowledgement whatever the task's state
    ("cooperative", "MUST acknowledge"); -32602 only for an unknown task."""
    _require_tasks_extension(request, version)
    extension = versions.has_tasks_extension(version)
    task_id = task_id_of(request)
    host = _task_host(session)
    identity = session.state.identity
    running = host.running(task_id, identity)
    # The row's message says what cancelled it, never which session (actors/tasks/host.py):
    # the session is in this line.
    session.log.info("task.cancel_requested", task_id=str(task_id), here=running is not None)
    if running is not None:
        await host.cancel(running, CANCELLED_BY_REQUEST)
        if extension:
            return EmptyResult()
        row = await read_tasks(partial(host.store.get, task_id, identity))
        if row is None or running.final is None or running.final.status != "cancelled":
            # It ended on its own before the cancel reached it.
            status = running.final.status if running.final is not None else "ended"
            raise InvalidParams(f"Cannot cancel task: already in terminal status {status!r}")
        return CancelTaskResult(**task_of(row).model_dump())
    marked = await read_tasks(
        partial(host.store.request_cancel, task_id, identity, CANCELLED_ON_ANOTHER_NODE),
    )
    if marked is None:
        raise unknown_task(task_id)
    if extension:
        return EmptyResult()
    found, applied = marked
    task = task_of(found)
    if not applied:
        raise InvalidParams(f"Cannot cancel task: already in terminal status {task.status!r}")
    return CancelTaskResult(**task.model_dump())


async def _update_task(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> EmptyResult:
    """``tasks/update`` (2026-07-28, SEP-2663): answers to a task's ``inputRequests``. No
    tool here ever asks its client for input, so no key is ever outstanding, and responses
    to keys not outstanding are ignored ("SHOULD"): a known task is acknowledged with an
    empty result ("MUST"), an unknown one is -32602 ("SHOULD")."""
    _require_tasks_extension(request, version)
    update = params(UpdateTaskParams, request)
    try:
        task_id = UUID(update.task_id)
    except ValueError:
        raise unknown_task(update.task_id) from None
    row = await read_tasks(partial(_task_host(session).store.get, task_id, session.state.identity))
    if row is None:
        raise unknown_task(task_id)
    if update.input_responses:
        # Debug: a client may send these as often as it likes; each costs one line.
        session.log.debug(
            "task.input_ignored",
            task_id=str(task_id),
            keys=len(update.input_responses),
            why="no input requests are outstanding",
        )
    return EmptyResult()


async def _set_level(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> EmptyResult:
    """``logging/setLevel``: the threshold of ``notifications/message`` from now on."""
    state = session.state
    state.set_log_level(params(SetLevelParams, request).level)
    # Journaled (no round trip): part of what a resume on another node restores.
    session.persistence.write_soon(
        SessionLogLevel(session_id=state.session_id, epoch=state.epoch, log_level=state.log_level)
    )
    return EmptyResult()


async def _crash(session: SessionMethods, request: jsonrpc.Request, version: str) -> BaseModel:
    raise SessionCrashRequested("test fault: session crash requested")


async def _crash_persistence(
    session: SessionMethods, request: jsonrpc.Request, version: str
) -> EmptyResult:
    session.persistence.crash_actor_for_test()
    return EmptyResult()


#: The method table (see the module doc).
METHODS: Final[Mapping[str, Method]] = {
    "initialize": Method(_initialize, before_version=True),
    "server/discover": Method(_discover, before_version=True),
    "ping": Method(_ping, before_version=True, exists=_handshake_era),
    "tools/list": Method(_list_tools),
    "logging/setLevel": Method(_set_level, exists=_handshake_era),
    "tasks/get": Method(_get_task, exists=_tasks_era),
    "tasks/list": Method(_list_tasks, exists=_core_tasks_era),
    "tasks/cancel": Method(_cancel_task, exists=_tasks_era),
    "tasks/update": Method(_update_task, exists=_tasks_extension_era),
    CRASH_METHOD: Method(_crash, before_version=True, exists=_test_faults_on),
    CRASH_PERSISTENCE_METHOD: Method(
        _crash_persistence, before_version=True, exists=_test_faults_on
    ),
}


# -- what every answer shares ----------------------------------------------------------------


def finish(result: BaseModel, version: str) -> dict[str, Any]:
    """The result as the request's era wants it: 2026-07-28 tags every result."""
    body: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    if versions.is_modern(version):
        body.setdefault("resultType", "complete")
        if isinstance(result, CACHEABLE_RESULTS):
            body.setdefault("ttlMs", 0)
            body.setdefault("cacheScope", "private")
    return body


def params(model: type[ModelT], request: jsonrpc.Request) -> ModelT:
    """The request's params as ``model``; -32602 naming every bad field."""
    try:
        return model.model_validate(request.params or {})
    except ValidationError as exc:
        raise invalid_params(f"params for {request.method!r}", exc) from None
