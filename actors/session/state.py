"""What a session knows about itself, and the one set of operations that change it.

:class:`SessionState` is owned by the session, not by one incarnation of its actor, so it
outlives a crash (and a dropped socket, while parked for resume). Several parties act on it,
each through its own named operations, never by reaching into its tables:

==========================  ==============================================================
caller                      operations
==========================  ==============================================================
reader (``reader``)         :meth:`in_use`, :meth:`enqueued`, :meth:`cancel`
actor loop (``actor``)      :meth:`dequeued`, :meth:`handling`, :meth:`answered`,
                            :meth:`take_unanswered`
call runner (``calls``)     :meth:`waiting_for_slot`, :meth:`slot_wait_over`, :meth:`admitted`,
                            :meth:`call_scope`, :meth:`call_ended`, :meth:`count_call`,
                            :meth:`handling`, :meth:`answered`, :meth:`waiting_for_task`
method table (``methods``)  :meth:`negotiated`, :meth:`mark_initialized`,
                            :meth:`set_log_level`, :meth:`wants_log`
transport (``lifecycle``)   :meth:`detached` (its connection dropped: parked for resume),
                            :meth:`claimed` (a resume took it at a new epoch)
drain (``actors.node``)     :meth:`has_pending`, :meth:`cancel_calls`
status (``actors.status``)  :attr:`in_flight` and the plain fields, read only
==========================  ==============================================================

A request id lives in exactly one of three places while it is unanswered: *queued* (in the
mailbox, cancellable there), *a call* (admitted, waiting for a slot or running, cancellable
through its scope), or *handling* (being answered, or answered by a task the crash of this
incarnation would cut short). Trio thread only; no locks, since trio switches tasks only at
checkpoints and no operation here has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from runtime.mcp.schema import LOG_LEVELS, Implementation, LogLevel

RequestId = str | int


@dataclass
class SessionState:
    """What a session knows about itself. Owned by the session, so it outlives a crash.

    The plain fields are read by anyone; they change only through the methods below.
    """

    session_id: str
    remote: str
    #: The client identity its token named at the handshake; a resume must present the same.
    identity: str = "default"
    #: Serving one client identity's sessionless (2026-07-28, Streamable HTTP) requests: its
    #: id is the server's, never given to a client.
    sessionless: bool = False
    #: Set once its client is gone (its connection ended, a DELETE): the calls that
    #: connection's end cuts short were cancelled by their client, not interrupted.
    client_left: str | None = None
    #: The negotiated version (handshake era), or the first modern one a request named.
    protocol_version: str | None = None
    client: Implementation | None = None
    initialized: bool = False
    #: Minimum level of ``notifications/message`` the client wants; ``None``: none.
    log_level: LogLevel | None = None
    #: Tool calls answered, and how many of those failed (the session row's totals).
    tool_calls: int = 0
    tool_errors: int = 0
    #: A 2025-era Streamable HTTP session: each of its requests may reach any node (a load
    #: balancer without stickiness), which serves it from the session's row, so what
    #: ``initialize`` negotiated is in the database before it is answered.
    any_node: bool = False
    #: Its row's epoch while this node holds it (storage/session_handover.py): bumped by
    #: every claim, so a copy another node claimed since writes no park and no end.
    epoch: int = 0
    #: Requests taken from the mailbox and not yet answered (nor cancelled by the client).
    _handling: set[RequestId] = field(default_factory=set, init=False, repr=False)
    #: Admitted tool calls (waiting for a slot or running), by request id: the reader
    #: cancels them without queueing.
    _calls: dict[RequestId, trio.CancelScope] = field(default_factory=dict, init=False, repr=False)
    #: Requests in the mailbox, by id: ``True`` once cancelled there. Bounded by the
    #: mailbox's capacity; the reader adds, the actor removes.
    _queued: dict[RequestId, bool] = field(default_factory=dict, init=False, repr=False)
    #: Those of :attr:`_calls` that are ``tasks/result`` waiting for a task (docs/tasks.md):
    #: a drain does not wait for them, the task may run for hours.
    _task_waits: set[RequestId] = field(default_factory=set, init=False, repr=False)

    # -- the reader -------------------------------------------------------------------------

    def in_use(self, request_id: RequestId) -> bool:
        """Whether a request with this id is queued, waiting for a slot, running or being
        answered: a second one would make both replies ambiguous (JSON-RPC 2.0: the id
        correlates a response with its request)."""
        return (
            request_id in self._queued or request_id in self._calls or request_id in self._handling
        )

    def enqueued(self, request_id: RequestId) -> None:
        """The reader put this request in the mailbox: cancellable there until taken."""
        self._queued[request_id] = False

    def cancel(self, request_id: object) -> None:
        """``notifications/cancelled``: stop that request, wherever it is.

        A call waiting for a slot or running is cancelled through its scope; a request still
        in the mailbox is marked, and the actor drops it when it comes to it. Unknown or
        finished ids (and ids of the wrong type) are ignored, as the spec asks: the race with
        the response is inherent (MCP, basic/utilities/cancellation).
        """
        if not isinstance(request_id, str | int) or isinstance(request_id, bool):
            return
        scope = self._calls.get(request_id)
        if scope is not None:
            scope.cancel()
        elif request_id in self._queued:
            self._queued[request_id] = True

    # -- the actor loop ---------------------------------------------------------------------

    def dequeued(self, request_id: RequestId) -> bool:
        """The actor took this request from the mailbox; whether it was cancelled there."""
        return self._queued.pop(request_id, False)

    def handling(self, request_id: RequestId) -> None:
        """This request is being answered (or reserved by a batch): a crash must answer it."""
        self._handling.add(request_id)

    def answered(self, request_id: RequestId) -> None:
        """Its reply is in the outgoing queue (or it was cancelled): the id is free again."""
        self._handling.discard(request_id)

    def take_unanswered(self) -> set[RequestId]:
        """A crash: the ids this session was answering, forgotten here (the actor answers
        each with -32001)."""
        orphans, self._handling = self._handling, set()
        return orphans

    # -- the call runner --------------------------------------------------------------------

    def waiting_for_slot(self, request_id: RequestId) -> trio.CancelScope:
        """An admitted call waits for its slots: cancellable through the returned scope."""
        scope = self._calls[request_id] = trio.CancelScope()
        return scope

    def slot_wait_over(self, request_id: RequestId) -> None:
        """The wait for slots ended (taken, or cancelled)."""
        del self._calls[request_id]

    def admitted(self, request_id: RequestId) -> trio.CancelScope:
        """The call holds its slots and runs now; the scope that cancels it. Called without
        a checkpoint after :meth:`slot_wait_over`, so no cancel can fall in the gap."""
        self._handling.add(request_id)
        scope = self._calls[request_id] = trio.CancelScope()
        return scope

    def waiting_for_task(self, request_id: RequestId) -> trio.CancelScope:
        """A ``tasks/result`` waits for its task, as a call runs (:meth:`admitted`:
        cancellable, answered -32001 by a crash) but not waited for by a drain
        (:meth:`has_pending`); it ends with :meth:`call_ended`."""
        scope = self.admitted(request_id)
        self._task_waits.add(request_id)
        return scope

    def call_scope(self, request_id: RequestId) -> trio.CancelScope:
        """The running call's scope (see :meth:`admitted`)."""
        return self._calls[request_id]

    def call_ended(self, request_id: RequestId) -> None:
        """The tool is done (answered, failed, cancelled or cut short)."""
        del self._calls[request_id]
        self._task_waits.discard(request_id)

    def count_call(self, *, failed: bool) -> None:
        """One more tool call answered, for the session row's totals."""
        self.tool_calls += 1
        self.tool_errors += failed

    # -- the method table -------------------------------------------------------------------

    def negotiated(self, version: str, client: Implementation | None = None) -> None:
        """The session's version is known (``initialize``, or a modern request's ``_meta``)."""
        self.protocol_version = version
        if client is not None:
            self.client = client

    def mark_initialized(self) -> None:
        """``notifications/initialized``."""
        self.initialized = True

    def set_log_level(self, level: LogLevel) -> None:
        """``logging/setLevel``."""
        self.log_level = level

    def wants_log(self, level: LogLevel) -> bool:
        """Whether a ``notifications/message`` at ``level`` passes the client's threshold."""
        threshold = self.log_level
        return threshold is not None and LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)

    # -- the transport and the node ---------------------------------------------------------

    def detached(self) -> None:
        """Its connection dropped and it is parked for resume: what it was answering was
        cancelled with the connection (nobody could receive it) and is not replayed."""
        self._handling.clear()

    def claimed(self, epoch: int) -> None:
        """A resume claimed it in the database at ``epoch`` (storage/session_handover.py)."""
        self.epoch = epoch

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet done (waiting for slots or running)."""
        return len(self._calls)

    def has_pending(self) -> bool:
        """Whether any request is queued, waiting, running or being answered (a drain waits
        for none to be), a ``tasks/result`` waiting for its task aside: the drain closes its
        session without an answer (its task runs on; the client asks again elsewhere)."""
        if not self._task_waits:
            return bool(self._queued or self._calls or self._handling)
        waits = self._task_waits
        return bool(
            self._queued
            or any(request_id not in waits for request_id in self._calls)
            or any(request_id not in waits for request_id in self._handling)
        )

    def cancel_calls(self) -> int:
        """Cancel every admitted call (a drain cut short); how many there were."""
        calls = list(self._calls)
        for request_id in calls:
            self.cancel(request_id)
        return len(calls)
