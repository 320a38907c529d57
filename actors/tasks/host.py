"""The node's task host (``/root/tasks``): where MCP tasks run, detached from sessions.

A task-augmented ``tools/call`` (MCP 2025-11-25, basic/utilities/tasks; docs/tasks.md) is
answered with ``CreateTaskResult`` at once and its tool runs on here, owned by this host's
nursery, not by the session's: the client may disconnect, the session end, and the task goes
on; its outcome is in its row for ``tasks/get`` and ``tasks/result`` from any session, any
node. The session only admits it (:meth:`TaskHost.admit`), writes its row to the database
(``write_through``), then hands it over (:meth:`TaskHost.launch`).

Each task, in its own trio task of the host's nursery:

1. waits for a node slot (``EXAI_MAX_INFLIGHT_TOTAL``, shared with every call; the task is
   ``working`` meanwhile) — not for a session slot: the session may be gone; what bounds one
   client instead is ``EXAI_MAX_TASKS_PER_IDENTITY`` tasks running on this node;
2. records that it runs (``running``) and runs the tool (no progress notifications and no
   client log: nobody may be listening);
3. records its final state, committed (in the database, or fsynced in the journal while the
   database is down) *before* anyone is told it is done (:attr:`RunningTask.done`).

``tasks/cancel`` of a task running here cancels its scope: it is recorded ``cancelled``
(MCP: it MUST stay cancelled even if the tool completes meanwhile). A task cancelled in the
database by another node (``storage.task_queries.TaskStore.request_cancel``) is seen by this
host's pulse (every :data:`POLL_INTERVAL_MS`) and stopped the same way.

On stop (node shutdown) every running task is cancelled and recorded ``failed`` with a
message saying the node stopped; a node that is killed leaves its rows to recovery, which
marks them ``interrupted`` (answered as ``failed``, docs/tasks.md). The pulse also runs the
retention sweep (``TaskStore.clear_expired``) every :data:`SWEEP_INTERVAL` seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import structlog
import trio

from actors.persistence import ActorUnavailable, PersistenceClient
from runtime.mcp.errors import LimitExceeded, Unavailable
from runtime.supervision import ChildContext
from storage.errors import StorageError
from storage.membership import NODE_TIMEOUT
from storage.rows import TaskFinished
from storage.task_queries import TaskReadError, TaskStore
from storage.tasks import TaskLifecycle

log = structlog.get_logger("tasks")

#: Suggested to clients as ``pollInterval``, and how often a waiting ``tasks/result`` reads
#: the row of a task another node runs, in milliseconds.
POLL_INTERVAL_MS = 1000
#: Seconds between retention sweeps.
SWEEP_INTERVAL = 60.0
#: Seconds a stopping node gives each interrupted task's final write.
FINAL_WRITE_GRACE = 10.0
#: ``error_message`` of a task cut short by its node's stop.
NODE_STOPPED = "interrupted: the node running the task stopped before it finished"

# Why a task was cancelled, as its row's ``error_message`` (its ``statusMessage``): the cause,
# never who. Every client of the identity reads it, and a sessionless (2026-07-28) session's
# id is the server's own, given to no client; the log lines name the session instead.
#: ``tasks/cancel`` on this node.
CANCELLED_BY_REQUEST = "cancelled by request (tasks/cancel)"
#: ``tasks/cancel`` on another node (marked in the database, stopped by this node's pulse).
CANCELLED_ON_ANOTHER_NODE = "cancelled by request (tasks/cancel, on another node)"
#: A 2026-07-28 call whose request's stream closed before it was answered: the client closed
#: it (the transport's cancellation), or the session ended (a drain cut short, say); or whose
#: client sent ``notifications/cancelled`` for it.
CANCELLED_STREAM_CLOSED = (
    "cancelled: the request's stream closed before it was answered (its client closed it, "
    "or its session ended)"
)
CANCELLED_BY_NOTIFICATION = "cancelled by notifications/cancelled before it was answered"
#: The task's handle (``CreateTaskResult``) never reached its client: the request's stream
#: closed (its client closed it, or the session ended) before the handle was written, so
#: nobody could ever poll, update or cancel the task.
CANCELLED_HANDLE_LOST = (
    "cancelled: the request's stream closed before the task's handle reached the client"
)


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How a task's tool call ended: what ``tools/call`` would have answered (its result
    body, or its JSON-RPC error object) and what the row records."""

    status: Literal["completed", "failed"]
    result: dict[str, Any] | None = None
    #: Bytes of ``result`` as compact JSON, if already encoded.
    result_size: int | None = None
    error_message: str | None = None
    rpc_error: dict[str, Any] | None = None


#: Runs the task's tool; given nothing, returns how it ended. Raises only ``Cancelled``.
Execute = Callable[[], Awaitable[TaskOutcome]]


@dataclass(eq=False)
class RunningTask:
    """A task this host runs. Its final record and answer are set before :attr:`done`."""

    lifecycle: TaskLifecycle
    identity: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    #: Why it was cancelled (``tasks/cancel``), once it was.
    cancelled: str | None = None
    final: TaskFinished | None = None
    outcome: TaskOutcome | None = None

    @property
    def task_id(self) -> UUID:
        return self.lifecycle.task_id


class TaskHost:
    """The node's MCP tasks (module doc). One per node; its :meth:`run` is the child
    ``/root/tasks`` of the root supervisor."""

    def __init__(
        self,
        *,
        persistence: PersistenceClient,
        total_slots: trio.CapacityLimiter,
        database_url: str | None,
        max_per_identity: int = 16,
        retention_ms: int = 86_400_000,
        node_timeout: float = NODE_TIMEOUT,
        poll_interval_ms: int = POLL_INTERVAL_MS,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self._persistence = persistence
        self._total_slots = total_slots
        self._database_url = database_url
        self.max_per_identity = max_per_identity
        self.retention_ms = retention_ms
        self._node_timeout = node_timeout
        self.poll_interval_ms = poll_interval_ms
        self._sweep_interval = sweep_interval
        self._nursery: trio.Nursery | None = None
        self._store: TaskStore | None = None
        self._running: dict[UUID, RunningTask] = {}
        #: Per identity: tasks admitted and not yet ended (running, or being written).
        self._counts: Counter[str] = Counter()

    # -- what sessions call -----------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        """The read side; :class:`Unavailable` (-32004) while the host does not run."""
        if self._store is None:
            raise Unavailable("tasks are unavailable: the node's task host is not running")
        return self._store

    def admit(self, identity: str) -> None:
        """Count one more task for ``identity``, or refuse it: -32005 when the identity has
        :attr:`max_per_identity` tasks running here (MCP: receivers SHOULD enforce limits on
        concurrent tasks per requestor), -32004 while the host does not run. Every admitted
        task is either :meth:`launch`-ed or :meth:`withdraw`-n."""
        if self._nursery is None:
            raise Unavailable("tasks are unavailable: the node's task host is not running")
        if self._counts[identity] >= self.max_per_identity:
            raise LimitExceeded(
                f"task limit reached: client {identity!r} has {self.max_per_identity} tasks "
                "running on this node (EXAI_MAX_TASKS_PER_IDENTITY); wait for one to end or "
                "cancel one (tasks/cancel)",
                {"limit": "tasks_per_identity", "max": self.max_per_identity},
            )
        self._counts[identity] += 1

    def withdraw(self, identity: str) -> None:
        """An admitted task that will not run (its row could not be written)."""
        self._uncount(identity)

    def launch(self, lifecycle: TaskLifecycle, identity: str, execute: Execute) -> RunningTask:
        """Run an admitted task, whose row is in the database; returns at once."""
        nursery = self._nursery
        task = RunningTask(lifecycle, identity)
        if nursery is None:  # stopped since admit: recorded as a stop would record it
            self._uncount(identity)
            self._persistence.write_soon(lifecycle.finished("failed", error_message=NODE_STOPPED))
            task.done.set()
            return task
        self._running[task.task_id] = task
        nursery.start_soon(self._run, task, execute)
        log.info("task.created", task_id=str(task.task_id), identity=identity)
        return task

    def running(self, task_id: UUID, identity: str) -> RunningTask | None:
        """The identity's task if it runs here (another identity's is ``None``, as unknown)."""
        task = self._running.get(task_id)
        if task is None or task.identity != identity:
            return None
        return task

    async def cancel(self, task: RunningTask, message: str) -> None:
        """Cancel a task running here and return once its ``cancelled`` state is recorded
        (MCP: the task MUST be cancelled before ``tasks/cancel`` is answered)."""
        if task.cancelled is None:
            task.cancelled = message
        task.scope.cancel()
        await task.done.wait()

    def cancel_soon(self, task: RunningTask, message: str) -> None:
        """Cancel a task running here without waiting for its ``cancelled`` record (a
        request whose client is gone: nobody waits for the answer)."""
        if task.cancelled is None:
            task.cancelled = message
        task.scope.cancel()

    # -- running ----------------------------------------------------------------------------

    async def _run(self, task: RunningTask, execute: Execute) -> None:
        lifecycle = task.lifecycle
        persistence = self._persistence
        outcome: TaskOutcome | None = None
        try:
            with task.scope:
                async with _slot(self._total_slots, task):
                    persistence.write_soon(lifecycle.started())
                    try:
                        outcome = await execute()
                    except Exception:
                        # A bug (execute answers every tool failure itself): this task's
                        # failure, never the host's.
                        log.exception("task.crashed", task_id=str(task.task_id))
                        outcome = TaskOutcome(
                            "failed",
                            error_message="internal error",
                            rpc_error={"code": -32603, "message": "internal error"},
                        )
        except BaseException:
            # The host stops (node shutdown): recorded as such, then the cancellation goes on.
            final = lifecycle.finished("failed", error_message=NODE_STOPPED)
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_GRACE):
                await self._record(final)
            self._ended(task, final, None)
            raise
        if task.cancelled is not None or outcome is None:
            # MCP: once cancelled, a task stays cancelled even if its tool completed.
            final = lifecycle.finished("cancelled", error_message=task.cancelled or "cancelled")
            outcome = None
        else:
            final = lifecycle.finished(
                outcome.status,
                result=outcome.result,
                error_message=outcome.error_message,
                result_size=outcome.result_size,
                rpc_error=outcome.rpc_error,
            )
        await self._record(final)
        self._ended(task, final, outcome)

    async def _record(self, final: TaskFinished) -> None:
        """The final state, committed (in the database; fsynced in the journal while it is
        down) before anyone is told: a failure to confirm it is logged, the outcome stands."""
        try:
            await self._persistence.write_committed(final)
        except (StorageError, ActorUnavailable, trio.TooSlowError) as error:
            log.warning("task.final_write_failed", task_id=str(final.task_id), error=repr(error))

    def _ended(self, task: RunningTask, final: TaskFinished, outcome: TaskOutcome | None) -> None:
        task.final, task.outcome = final, outcome
        self._running.pop(task.task_id, None)
        self._uncount(task.identity)
        task.done.set()
        log.info("task.ended", task_id=str(task.task_id), status=final.status)

    def _uncount(self, identity: str) -> None:
        self._counts[identity] -= 1
        if self._counts[identity] <= 0:
            del self._counts[identity]

    # -- the child --------------------------------------------------------------------------

    async def run(self, ctx: ChildContext) -> None:
        """``/root/tasks``: the nursery every task runs in, and the pulse; on stop, every
        running task is cancelled and recorded (module doc)."""
        store = (
            TaskStore(self._database_url, node_timeout=self._node_timeout)
            if self._database_url is not None
            else None
        )
        if store is not None:
            store.open()  # connects in the pool's own threads; returns at once
        self._store = store
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if store is not None:
                    nursery.start_soon(self._pulse, store)
                ctx.started()
                await ctx.stop_requested.wait()
                self._nursery = None
                if self._running:
                    log.warning("tasks.stopping", running=len(self._running))
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._store = None
            if store is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(store.close)

    async def _pulse(self, store: TaskStore) -> None:
        """Every poll interval: cancel the tasks running here that another node cancelled in
        the database; every sweep interval: clear expired results."""
        next_sweep = trio.current_time()
        while True:
            try:
                if self._running:
                    ids = list(self._running)
                    cancelled = await trio.to_thread.run_sync(
                        store.cancelled_among, ids, abandon_on_cancel=True
                    )
                    for task_id in cancelled:
                        task = self._running.get(task_id)
                        if task is not None and task.cancelled is None:
                            task.cancelled = CANCELLED_ON_ANOTHER_NODE
                            task.scope.cancel()
                if trio.current_time() >= next_sweep:
                    next_sweep = trio.current_time() + self._sweep_interval
                    cleared = await trio.to_thread.run_sync(
                        store.clear_expired, datetime.now(UTC), abandon_on_cancel=True
                    )
                    if cleared:
                        log.info("tasks.results_cleared", tasks=cleared)
            except TaskReadError as error:
                log.warning("tasks.pulse_failed", error=str(error))
            await trio.sleep(self.poll_interval_ms / 1000)

    async def sweep_now(self) -> int:
        """Run the retention sweep once (tests, operators); how many results it cleared."""
        return await trio.to_thread.run_sync(self.store.clear_expired, datetime.now(UTC))


class _slot:
    """A node slot held on behalf of one task (the limiter counts borrowers)."""

    def __init__(self, limiter: trio.CapacityLimiter, borrower: object) -> None:
        self._limiter = limiter
        self._borrower = borrower

    async def __aenter__(self) -> None:
        await self._limiter.acquire_on_behalf_of(self._borrower)

    async def __aexit__(self, *exc: object) -> None:
        self._limiter.release_on_behalf_of(self._borrower)
