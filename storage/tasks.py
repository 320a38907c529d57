"""A task's records, built in order with the right versions.

The task row is versioned (optimistic concurrency): each write states the version it moves the
row to. :class:`TaskLifecycle` counts for the caller, so a session writes

    task = TaskLifecycle.create(session_id=..., request_id=..., tool_name=..., arguments=...,
                                node_id=...)
    persistence.write_soon(task.created)
    persistence.write_soon(task.started())
    ...
    await persistence.write(task.finished("completed", result=...))

and never spells a version. It holds no lock: one task's records come from one trio task.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import JsonValue
from pydantic_core import to_json

from storage import ids
from storage.rows import (
    PENDING_VERSION,
    RUNNING_VERSION,
    FinalTaskStatus,
    TaskCreated,
    TaskFinished,
    TaskStarted,
)
from storage.untrusted import bounded_json, clip_bytes

#: Default bound of a stored tool result (and error message), in bytes of JSON / UTF-8.
MAX_RESULT_BYTES = 1 << 20


def arguments_digest(arguments: JsonValue) -> str:
    """sha256 of the arguments as canonical JSON (sorted keys): equal arguments, equal digest.

    Stored instead of the arguments, which may be large or sensitive.
    """
    canonical = to_json(_sorted(arguments))
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _sorted(value: JsonValue) -> JsonValue:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def request_id_text(request_id: str | int) -> str:
    """The JSON-RPC id as JSON text, so that ``1`` and ``"1"`` stay different."""
    return to_json(request_id).decode()


@dataclass(frozen=True, slots=True)
class Retention:
    """What an MCP task is granted (docs/tasks.md): ``ttl_ms`` from its creation (the
    client's ``task.ttl`` capped by the node's retention), and the poll interval suggested to
    its client, in milliseconds."""

    ttl_ms: int
    poll_interval_ms: int

    @classmethod
    def granted(cls, requested_ms: int | None, *, max_ms: int, poll_interval_ms: int) -> Retention:
        """MCP: receivers MAY override the requested ttl; this one caps it (and grants the
        maximum when none was asked for)."""
        ttl = max_ms if requested_ms is None else min(max(requested_ms, 0), max_ms)
        return cls(ttl_ms=ttl, poll_interval_ms=poll_interval_ms)


class TaskLifecycle:
    """The records of one task, each at the version its predecessor left the row in."""

    def __init__(self, created: TaskCreated, *, max_result_bytes: int = MAX_RESULT_BYTES) -> None:
        self.created = created
        self.task_id = created.task_id
        self.version = PENDING_VERSION
        self.max_result_bytes = max_result_bytes

    @classmethod
    def create(
        cls,
        *,
        session_id: str | None,
        request_id: str | int,
        tool_name: str,
        arguments: JsonValue,
        node_id: str,
        task_id: uuid.UUID | None = None,
        at: datetime | None = None,
        max_result_bytes: int = MAX_RESULT_BYTES,
        identity: str | None = None,
        retention: Retention | None = None,
    ) -> TaskLifecycle:
        """``max_result_bytes``: what :meth:`finished` keeps of a result (see there).
        ``retention``: given for an MCP task (a task-augmented call, docs/tasks.md), whose
        row is then ``augmented`` with its ttl, expiry and poll interval."""
        created_at = at or datetime.now(UTC)
        return cls(
            TaskCreated(
                task_id=task_id or ids.uuid4(),
                session_id=session_id,
                request_id=request_id_text(request_id),
                tool_name=tool_name,
                arguments_digest=arguments_digest(arguments),
                node_id=node_id,
                created_at=created_at,
                identity=identity,
                augmented=retention is not None,
                ttl_ms=None if retention is None else retention.ttl_ms,
                expires_at=(
                    None
                    if retention is None
                    else created_at + timedelta(milliseconds=retention.ttl_ms)
                ),
                poll_interval_ms=None if retention is None else retention.poll_interval_ms,
            ),
            max_result_bytes=max_result_bytes,
        )

    def started(self, at: datetime | None = None) -> TaskStarted:
        if self.version != PENDING_VERSION:
            raise ValueError(f"task {self.task_id} cannot start at version {self.version}")
        self.version = RUNNING_VERSION
        return TaskStarted(task_id=self.task_id, started_at=at or datetime.now(UTC))

    def finished(
        self,
        status: FinalTaskStatus,
        *,
        result: JsonValue = None,
        error_message: str | None = None,
        at: datetime | None = None,
        result_size: int | None = None,
        rpc_error: JsonValue = None,
    ) -> TaskFinished:
        """The final record. A ``result`` whose JSON exceeds ``max_result_bytes`` is stored as
        :func:`~storage.untrusted.bounded_json` makes it (its beginning, a marker and its real
        size), an ``error_message`` beyond as many UTF-8 bytes is cut with a marker: the client
        got the whole answer, the database keeps a bounded record of it. ``result_size``: the
        bytes of the result's compact JSON, if the caller encoded it already (not again)."""
        if self.version > RUNNING_VERSION:
            raise ValueError(f"task {self.task_id} has already finished")
        self.version += 1
        return TaskFinished(
            task_id=self.task_id,
            status=status,
            completed_at=at or datetime.now(UTC),
            version=self.version,
            result=bounded_json(result, self.max_result_bytes, size=result_size),
            error_message=(
                None if error_message is None else clip_bytes(error_message, self.max_result_bytes)
            ),
            rpc_error=None if rpc_error is None else bounded_json(rpc_error, self.max_result_bytes),
        )
