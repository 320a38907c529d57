"""Tasks on the wire: a row's status as the protocol's, a row as a ``Task``, a finished task
as the answer its ``tools/call`` would have had. Both shapes: MCP 2025-11-25
(basic/utilities/tasks, SEP-1686: :func:`task_of`) and the 2026-07-28 Tasks extension
(``io.modelcontextprotocol/tasks``, SEP-2663: :func:`detailed_task`, :func:`created_task`).

Status mapping (rows: db/migrations/20261124000400_tasks.sql; docs/tasks.md):

==============  ===============  ==================================================
row             Task.status      statusMessage
==============  ===============  ==================================================
``pending``     ``working``      "waiting for a slot to run"
``running``     ``working``      (none)
``completed``   ``completed``    (none)
``failed``      ``failed``       the error the row keeps
``cancelled``   ``cancelled``    why (by request, on which node)
``interrupted`` ``failed``       the node that ran it stopped before it finished
==============  ===============  ==================================================

``input_required`` is never used: no tool here asks its client for input.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from runtime.mcp.errors import InternalError, InvalidParams, RpcError
from runtime.mcp.schema import RELATED_TASK_META, DetailedTask, Task, TaskStatus
from storage.rows import TaskCreated
from storage.rows import TaskStatus as RowStatus
from storage.task_queries import StoredTask
from storage.untrusted import clip

_STATUS: dict[RowStatus, TaskStatus] = {
    "pending": "working",
    "running": "working",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "interrupted": "failed",
}

#: A node stopped (or died) under the task: its row is ``interrupted`` (recovery) or
#: ``failed`` with this message's cousin (``actors.tasks.host.NODE_STOPPED``).
INTERRUPTED = "the node that ran the task stopped before it finished"


def timestamp(at: datetime) -> str:
    """ISO 8601 / RFC 3339 in UTC, as ``createdAt`` and ``lastUpdatedAt`` want it."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def status_message(row: StoredTask) -> str | None:
    if row.status == "pending":
        return "waiting for a slot to run"
    if row.status == "interrupted":
        return f"{INTERRUPTED} ({row.error_message or 'interrupted'})"
    if row.status in ("failed", "cancelled"):
        return row.error_message
    return None


def task_of(row: StoredTask) -> Task:
    """The row as the protocol's ``Task``."""
    return Task(
        task_id=str(row.task_id),
        status=_STATUS[row.status],
        status_message=status_message(row),
        created_at=timestamp(row.created_at),
        last_updated_at=timestamp(row.updated_at),
        ttl=row.ttl_ms,
        poll_interval=row.poll_interval_ms,
    )


def created_task(created: TaskCreated) -> DetailedTask:
    """SEP-2663's ``CreateTaskResult`` for a task just recorded: ``working``."""
    at = timestamp(created.created_at)
    return DetailedTask(
        result_type="task",
        task_id=str(created.task_id),
        status="working",
        created_at=at,
        last_updated_at=at,
        ttl_ms=created.ttl_ms,
        poll_interval_ms=created.poll_interval_ms,
    )


def detailed_task(
    row: StoredTask, *, result_type: Literal["complete", "task"] = "complete"
) -> DetailedTask:
    """SEP-2663's ``DetailedTask`` of a row read with its result (``TaskStore.payload``):
    ``completed`` carries ``result``, ``failed`` carries ``error`` ("MUST").

    The status follows what the call would have answered, not the row's status: a tool's
    ``isError`` result (a ``failed`` row) is ``completed`` here (SEP-2663: ``failed`` "MUST
    NOT be used for non-JSON-RPC errors"; 2025-11-25 said the opposite, :func:`task_of`); an
    ``interrupted`` row, or a result the row could only keep bounded, is ``failed`` with
    -32603 naming why (:func:`payload_of`)."""
    task = task_of(row)
    status = task.status
    inline: dict[str, Any] = {}
    if row.terminal and status != "cancelled":
        inline = payload_of(
            task.task_id,
            row.status,
            result=row.result,
            rpc_error=row.rpc_error,
            error_message=row.error_message,
            related_meta=False,
        )
        status = "completed" if "result" in inline else "failed"
    return DetailedTask(
        result_type=result_type,
        task_id=task.task_id,
        status=status,
        status_message=task.status_message,
        created_at=task.created_at,
        last_updated_at=task.last_updated_at,
        ttl_ms=task.ttl,
        poll_interval_ms=task.poll_interval,
        **inline,
    )


def unknown_task(task_id: object) -> InvalidParams:
    """MCP: an invalid or nonexistent task id is -32602. Another identity's task gets this
    same error, so that ids cannot be probed."""
    return InvalidParams(f"Failed to retrieve task: task {clip(str(task_id), 64)} not found")


def related(task_id: str) -> dict[str, Any]:
    """The ``_meta`` that ties a ``tasks/result`` answer to its task (MCP: MUST)."""
    return {RELATED_TASK_META: {"taskId": task_id}}


def payload_of(
    task_id: str,
    status: RowStatus,
    *,
    result: Any,
    rpc_error: Any,
    error_message: str | None,
    related_meta: bool = True,
) -> dict[str, Any] | dict[str, dict[str, Any]]:
    """What ``tools/call`` would have answered, for a task in a terminal state: its result
    (a ``CallToolResult``, with the related-task ``_meta`` if ``related_meta``: 2025-11-25's
    ``tasks/result`` MUST carry it) as ``{"result": ...}``, or its JSON-RPC error object as
    ``{"error": ...}``.

    A cancelled task's call would have had no answer at all (MCP cancellation: no response),
    and an interrupted one's none either: both are answered with -32603 naming the status
    (``data.taskStatus``), as is a result the row could only keep bounded
    (``EXAI_MAX_STORED_RESULT_BYTES``).
    """
    if isinstance(rpc_error, dict):
        return {"error": rpc_error}
    if status == "cancelled":
        return _error(
            InternalError(
                f"task cancelled: {error_message or 'cancelled'}", {"taskStatus": "cancelled"}
            )
        )
    if status == "interrupted" or result is None:
        why = INTERRUPTED if status == "interrupted" else (error_message or "failed")
        return _error(InternalError(f"task failed: {why}", {"taskStatus": "failed"}))
    if isinstance(result, dict) and result.get("truncated") is True and "json_prefix" in result:
        return _error(
            InternalError(
                f"the task's result ({result.get('size_bytes')} bytes) was larger than the "
                f"{result.get('max_bytes')} bytes a task keeps (EXAI_MAX_STORED_RESULT_BYTES)",
                {"taskStatus": _STATUS[status]},
            )
        )
    if not isinstance(result, dict):
        return _error(InternalError("task failed: its stored result is not an object"))
    if not related_meta:
        return {"result": result}
    meta = {**(result.get("_meta") or {}), **related(task_id)}
    return {"result": {**result, "_meta": meta}}


def _error(error: RpcError) -> dict[str, dict[str, Any]]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"error": body}
