"""Reading MCP tasks back, and the two writes that cannot go through the journal.

An MCP task (a task-augmented ``tools/call``, docs/tasks.md) is a row of ``tasks`` with
``augmented`` set. ``tasks/get``, ``tasks/result`` and ``tasks/list`` read it from the
database, so they work from any node and after a restart; every read is scoped to the
caller's identity (MCP 2025-11-25, basic/utilities/tasks, "Task Isolation and Access
Control": a task of another identity is answered as an unknown one).

Two writes go straight to the database instead of through the persistence actor's journal,
because their caller must know at once whether they applied:

* :meth:`TaskStore.request_cancel`: ``tasks/cancel`` of a task that no task host of *this*
  node runs (another node's, or a node that is gone): the row becomes ``cancelled`` only if
  it is still ``pending``/``running``, its version bumped past the owner's next step, so that
  the owner's own final write is refused as a conflict and the row stays cancelled (MCP: a
  cancelled task MUST remain cancelled). The owning node sees it in :meth:`cancelled_among`
  and stops the tool.
* :meth:`TaskStore.clear_expired`: the retention sweep (``result`` set to null,
  ``result_cleared_at`` stamped; never a delete: ``token_usage`` rows cascade from tasks).

Reads use their own small pool from worker threads, as :mod:`storage.threads` does (and for
the same reasons); each query is one short transaction with a local ``statement_timeout``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, JsonValue

from storage.errors import StorageError
from storage.membership import NODE_TIMEOUT
from storage.read_pool import ReadPool
from storage.rows import TaskStatus


class TaskReadError(StorageError):
    """The database could not be read or written (unreachable, too slow, no connection)."""


class StoredTask(BaseModel):
    """An MCP task's row, as the ``tasks/*`` methods need it."""

    model_config = ConfigDict(frozen=True)

    task_id: UUID
    status: TaskStatus
    error_message: str | None
    created_at: datetime
    updated_at: datetime
    ttl_ms: int | None
    poll_interval_ms: int | None
    node_id: str | None
    expires_at: datetime | None
    result_cleared_at: datetime | None
    #: Only read by :meth:`TaskStore.payload` (``tasks/result``): ``None`` elsewhere.
    result: JsonValue = None
    rpc_error: JsonValue = None

    def expired(self, now: datetime) -> bool:
        """Whether its retention has passed (its result is gone, or about to be swept)."""
        return self.result_cleared_at is not None or (
            self.expires_at is not None and self.expires_at <= now
        )

    @property
    def terminal(self) -> bool:
        """Whether the task will never change again (``interrupted`` may still be replaced
        by the final state of the node that ran it, but that node's answer is what it is)."""
        return self.status in ("completed", "failed", "cancelled", "interrupted")


#: A task's columns, read through :data:`_FROM`. A ``pending``/``running`` row whose node is
#: dead (a clean stop recorded, or no heartbeat for the node timeout, storage.membership) reads
#: as ``interrupted`` at once, before any recovery has marked it: never ``working`` forever.
_COLUMNS = """
    t.id as task_id,
    case when t.status in ('pending', 'running') and n.node_id is not null
              and (n.stopped_at is not null
                   or n.heartbeat_at < now() - make_interval(secs => %(node_ttl)s))
         then 'interrupted' else t.status end as status,
    case when t.status in ('pending', 'running') and n.node_id is not null
              and (n.stopped_at is not null
                   or n.heartbeat_at < now() - make_interval(secs => %(node_ttl)s))
         then 'interrupted: node ' || t.node_id || ' stopped before the task finished'
         else t.error_message end as error_message,
    t.created_at, t.updated_at, t.ttl_ms, t.poll_interval_ms, t.node_id, t.expires_at,
    t.result_cleared_at"""
_FROM = "tasks t left join nodes n on n.node_id = t.node_id"
_MINE = "t.id = %(task_id)s and t.identity = %(identity)s and t.augmented"


class TaskStore:
    """A tiny pool of connections for the ``tasks/*`` methods, owned by the node's task host:
    ``open()`` at its start, ``close()`` at its end. Every method blocks: call it through
    ``trio.to_thread.run_sync``."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 4,
        wait_seconds: float = 10.0,
        statement_timeout_ms: int = 10_000,
        node_timeout: float = NODE_TIMEOUT,
    ) -> None:
        """``node_timeout``: seconds of heartbeat silence after which a node is dead (the
        node's ``EXAI_NODE_TIMEOUT``, storage.membership)."""
        self._node_timeout = node_timeout
        self._reads = ReadPool(
            url,
            name="exai-tasks",
            what="tasks",
            error=TaskReadError,
            max_connections=max_connections,
            wait_seconds=wait_seconds,
            statement_timeout_ms=statement_timeout_ms,
        )

    def open(self) -> None:
        """Start the pool without waiting for a connection (``storage.read_pool``)."""
        self._reads.open()

    def close(self) -> None:
        self._reads.close()

    def get(self, task_id: UUID, identity: str) -> StoredTask | None:
        """The identity's task, or ``None`` (no such task, or another identity's)."""
        rows = self._query(
            f"select {_COLUMNS} from {_FROM} where {_MINE}",
            {"task_id": task_id, "identity": identity},
        )
        return StoredTask(**rows[0]) if rows else None

    def payload(self, task_id: UUID, identity: str) -> StoredTask | None:
        """As :meth:`get`, with the stored ``result`` and ``rpc_error``."""
        rows = self._query(
            f"select {_COLUMNS}, t.result, t.rpc_error from {_FROM} where {_MINE}",
            {"task_id": task_id, "identity": identity},
        )
        return StoredTask(**rows[0]) if rows else None

    def list_tasks(self, identity: str, *, offset: int, limit: int) -> list[StoredTask]:
        """Up to ``limit`` of the identity's tasks from ``offset``, newest first."""
        rows = self._query(
            f"select {_COLUMNS} from {_FROM}"
            " where t.identity = %(identity)s and t.augmented"
            " order by t.created_at desc, t.id desc offset %(offset)s limit %(limit)s",
            {"identity": identity, "offset": offset, "limit": limit},
        )
        return [StoredTask(**row) for row in rows]

    def request_cancel(
        self, task_id: UUID, identity: str, message: str
    ) -> tuple[StoredTask, bool] | None:
        """Mark the identity's task ``cancelled`` if it has not ended (module doc): the row
        as it is afterwards and whether this call cancelled it (``False``: it had ended
        already), or ``None`` if there is no such task. A task whose node is dead has ended
        (``interrupted``), even before recovery marked it."""
        rows = self._query(
            f"""
            with found as (
                select {_COLUMNS} from {_FROM} where {_MINE}
            ),
            cancelled as (
                update tasks t
                   set status = 'cancelled', version = t.version + 2,
                       completed_at = coalesce(t.completed_at, now()), updated_at = now(),
                       error_message = %(message)s
                  from found
                 where t.id = found.task_id and found.status in ('pending', 'running')
                   and t.status in ('pending', 'running')
                returning t.updated_at
            )
            select found.*, cancelled.updated_at as cancelled_at
              from found left join cancelled on true
            """,
            {"task_id": task_id, "identity": identity, "message": message},
        )
        if not rows:
            return None
        row = rows[0]
        cancelled_at = row.pop("cancelled_at")
        if cancelled_at is not None:
            # `found` is the row before the update: what the update made of it.
            row.update(status="cancelled", error_message=message, updated_at=cancelled_at)
        return StoredTask(**row), cancelled_at is not None

    def cancelled_among(self, task_ids: list[UUID]) -> set[UUID]:
        """Which of these tasks (running here) were cancelled in the database meanwhile."""
        if not task_ids:
            return set()
        rows = self._query(
            "select id from tasks where id = any(%(ids)s) and status = 'cancelled'",
            {"ids": task_ids},
        )
        return {row["id"] for row in rows}

    def clear_expired(self, now: datetime, *, limit: int = 1000) -> int:
        """Clear the results of up to ``limit`` ended tasks whose retention has passed; how
        many. A running task keeps its row as it is until it ends (its final write would
        store the result again); the next sweep clears it."""
        rows = self._query(
            """
            with due as (
                select id from tasks
                 where augmented and result_cleared_at is null and expires_at <= %(now)s
                   and status not in ('pending', 'running')
                 limit %(limit)s
            )
            update tasks t
               set result = null, rpc_error = null, result_cleared_at = %(now)s
              from due where t.id = due.id
            returning t.id
            """,
            {"now": now, "limit": limit},
        )
        return len(rows)

    def _query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """One short transaction; ``params`` by name (``node_ttl`` is always given)."""
        return self._reads.query(sql, {"node_ttl": self._node_timeout, **params})
