"""Writing a batch of records to Postgres in one transaction, idempotently.

A batch is grouped by kind and each group is one statement (or one COPY), applied in
dependency order: sessions, threads, tasks, task transitions, usage, messages, thread
summaries, then session updates and heartbeats. Regrouping preserves the meaning of the
arrival order because each entity's records arrive in causal order (a task is created
before it starts) and the updates that could meet in one batch commute (``greatest``,
status guards, version checks).

Three attempts, each its own transaction, cheapest first:

1. **fast**: inserts by ``COPY`` straight into the tables (measured: the fastest bulk path,
   docs/benchmarks.md), and a task created and moved on within the batch is folded into one
   row. COPY has no ``ON CONFLICT``, so a row that already exists (a replay) fails the whole
   transaction, which is why folding is safe here: if COPY succeeded, no row pre-existed.
2. **safe**: ``INSERT ... ON CONFLICT DO NOTHING`` with ``executemany`` (pipelined: one round
   trip), no folding. Used directly when replaying a journal, where duplicates are expected.
3. **isolated**: record by record, each under a savepoint, so that one record the database
   refuses (a constraint, a bad value) is reported alone and the rest commit.

Only constraint and data errors (:data:`RECORD_ERRORS`) move to the next attempt. Any other
database error (connection lost, timeout, missing table) is the storage's fault, not the
records', and propagates to the caller, which journals the batch.

Nothing here is session-level (no ``SET``, ``LISTEN``, session locks, prepared statements
needed), so it works through Supabase's transaction-mode pooler. ``statement_timeout`` is set
with ``set_config(..., true)``, which lasts one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, assert_never
from uuid import UUID

import psycopg
import structlog
from psycopg.types.json import Jsonb
from pydantic import JsonValue
from pydantic_core import to_json

from storage.errors import RowVersion, WriteConflict, WriteRejected
from storage.rows import (
    PENDING_VERSION,
    UNKNOWN_IDENTITY,
    MessageRow,
    NodeHeartbeat,
    Record,
    SessionActivity,
    SessionClose,
    SessionIdentified,
    SessionLogLevel,
    SessionParked,
    SessionRow,
    TaskCreated,
    TaskFinished,
    TaskStarted,
    ThreadRow,
    ThreadSummaryRow,
    TokenUsage,
)

log = structlog.get_logger("storage.writes")

#: Errors caused by the records themselves: retrying the same records cannot succeed.
RECORD_ERRORS = (psycopg.IntegrityError, psycopg.DataError)

Connection = psycopg.Connection[Any]


@dataclass(frozen=True)
class Rejoined:
    """A node taken for dead (its heartbeat expired: paused, cut off) that beat again."""

    swept_by: str | None
    swept_at: datetime | None
    swept_tasks: int
    swept_sessions: int


@dataclass
class BatchResult:
    """Per-record failures, by position in the batch; every other record is in the database
    (or already was: a duplicate is success)."""

    conflicts: dict[int, WriteConflict] = field(default_factory=dict)
    rejected: dict[int, WriteRejected] = field(default_factory=dict)
    #: Which attempt committed: "fast", "safe" or "isolated".
    path: str = "fast"
    #: The writing node had been swept as dead and its heartbeat in this batch registered it
    #: again (see :func:`write_batch`'s ``node_id``): who swept it, when, and what it marked.
    rejoined: Rejoined | None = None

    @property
    def errors(self) -> dict[int, Exception]:
        return {**self.conflicts, **self.rejected}


def write_batch(
    conn: Connection,
    records: Sequence[Record],
    *,
    replay: bool = False,
    statement_timeout: float | None = None,
    node_id: str | None = None,
) -> BatchResult:
    """Apply ``records`` in one transaction (see the module doc for the three attempts).

    ``conn`` must be in autocommit mode: each attempt opens its own transaction. ``replay``
    skips the fast attempt, for records that may be in the database already.

    ``node_id``: the writing node's own id, when the writer is that live node (its
    persistence actor). Its heartbeat then also *rejoins* it if a sweep or a start-up
    recovery took it for dead while it was paused or cut off (``stopped_at`` cleared, so it
    counts as alive again: :mod:`storage.membership`), reported as
    :attr:`BatchResult.rejoined`. Without it (a dead node's journal replayed by its
    successor) heartbeats never bring a node back.
    """
    groups = _Groups.of(records)
    if not replay:
        try:
            with conn.transaction():
                _limit(conn, statement_timeout)
                return _apply(conn, groups, fast=True, me=node_id)
        except RECORD_ERRORS as exc:
            log.debug("storage.batch_retry", error=type(exc).__name__, records=len(records))
    try:
        with conn.transaction():
            _limit(conn, statement_timeout)
            result = _apply(conn, groups, fast=False, me=node_id)
            result.path = "safe"
            return result
    except RECORD_ERRORS:
        pass
    with conn.transaction():
        _limit(conn, statement_timeout)
        return _isolated(conn, records, me=node_id)


def _limit(conn: Connection, statement_timeout: float | None) -> None:
    if statement_timeout is not None:
        conn.execute(
            "select set_config('statement_timeout', %s, true)",
            (str(max(1, round(statement_timeout * 1000))),),
        )


@dataclass
class _Groups:
    sessions: list[SessionRow] = field(default_factory=list)
    threads: list[ThreadRow] = field(default_factory=list)
    created: list[TaskCreated] = field(default_factory=list)
    started: list[tuple[int, TaskStarted]] = field(default_factory=list)
    finished: list[tuple[int, TaskFinished]] = field(default_factory=list)
    usage: list[TokenUsage] = field(default_factory=list)
    messages: list[MessageRow] = field(default_factory=list)
    summaries: list[ThreadSummaryRow] = field(default_factory=list)
    identified: list[SessionIdentified] = field(default_factory=list)
    activity: list[SessionActivity] = field(default_factory=list)
    closes: list[SessionClose] = field(default_factory=list)
    parked: list[SessionParked] = field(default_factory=list)
    log_levels: list[SessionLogLevel] = field(default_factory=list)
    heartbeats: list[NodeHeartbeat] = field(default_factory=list)

    @classmethod
    def of(cls, records: Sequence[Record]) -> _Groups:
        groups = cls()
        for index, record in enumerate(records):
            groups.add(index, record)
        return groups

    def add(self, index: int, record: Record) -> None:
        # Every kind of record has its group; a new kind without one is a type error
        # (mypy: assert_never), not a heartbeat.
        match record:
            case SessionRow():
                self.sessions.append(record)
            case ThreadRow():
                self.threads.append(record)
            case TaskCreated():
                self.created.append(record)
            case TaskStarted():
                self.started.append((index, record))
            case TaskFinished():
                self.finished.append((index, record))
            case TokenUsage():
                self.usage.append(record)
            case MessageRow():
                self.messages.append(record)
            case ThreadSummaryRow():
                self.summaries.append(record)
            case SessionIdentified():
                self.identified.append(record)
            case SessionActivity():
                self.activity.append(record)
            case SessionClose():
                self.closes.append(record)
            case SessionParked():
                self.parked.append(record)
            case SessionLogLevel():
                self.log_levels.append(record)
            case NodeHeartbeat():
                self.heartbeats.append(record)
            case _:
                assert_never(record)


def _apply(conn: Connection, groups: _Groups, *, fast: bool, me: str | None) -> BatchResult:
    result = BatchResult()
    if groups.sessions:
        _insert_sessions(conn, groups.sessions, fast=fast)
    if groups.threads:
        _upsert_threads(conn, groups.threads)
    started, finished = groups.started, groups.finished
    if groups.created:
        if fast:
            started, finished = _copy_tasks_folded(conn, groups.created, started, finished)
        else:
            _insert_tasks(conn, groups.created)
    result.conflicts.update(_transitions(conn, started, finished))
    if groups.usage:
        _insert_usage(conn, groups.usage, fast=fast)
        _sum_session_tokens(conn, {r.session_id for r in groups.usage if r.session_id})
    if groups.messages:
        _insert_messages(conn, groups.messages, fast=fast)
    if groups.summaries:
        _insert_summaries(conn, groups.summaries, fast=fast)
    if groups.identified:
        _identify_sessions(conn, groups.identified)
    if groups.activity:
        _record_activity(conn, groups.activity)
    if groups.log_levels:
        _session_log_levels(conn, groups.log_levels)
    if groups.parked:
        _park_sessions(conn, groups.parked)
    if groups.closes:
        _close_sessions(conn, groups.closes)
    if groups.heartbeats:
        result.rejoined = _heartbeats(conn, groups.heartbeats, me)
    return result


def _isolated(conn: Connection, records: Sequence[Record], *, me: str | None) -> BatchResult:
    result = BatchResult(path="isolated")
    for index, record in enumerate(records):
        groups = _Groups()
        groups.add(0, record)
        try:
            with conn.transaction():  # a savepoint: only this record is undone on error
                one = _apply(conn, groups, fast=False, me=me)
        except RECORD_ERRORS as exc:
            result.rejected[index] = WriteRejected(
                f"{record.kind} refused by the database: {type(exc).__name__}: {exc}"
            )
            continue
        if one.conflicts:
            result.conflicts[index] = one.conflicts[0]
        result.rejoined = result.rejoined or one.rejoined
    return result


# --- sessions -------------------------------------------------------------------------------

_SESSION_COLUMNS = (
    "session_id, created_at, last_activity, status, client_name, client_version,"
    " protocol_version, remote_addr, node_id, identity, transport"
)


def _session_tuple(row: SessionRow) -> tuple[object, ...]:
    return (
        row.session_id,
        row.created_at,
        row.created_at,
        row.status,
        row.client_name,
        row.client_version,
        row.protocol_version,
        row.remote_addr,
        row.node_id,
        row.identity,
        row.transport,
    )


def _insert_sessions(conn: Connection, rows: list[SessionRow], *, fast: bool) -> None:
    _insert_new(
        conn, "sessions", _SESSION_COLUMNS, "session_id", map(_session_tuple, rows), fast=fast
    )


def _identify_sessions(conn: Connection, rows: list[SessionIdentified]) -> None:
    # Last write wins: these fields have one writer, the session's initialize.
    with conn.cursor() as cur:
        cur.executemany(
            """
            update sessions
               set client_name = %s, client_version = %s, protocol_version = %s,
                   last_activity = greatest(last_activity, %s)
             where session_id = %s
            """,
            [
                (r.client_name, r.client_version, r.protocol_version, r.at, r.session_id)
                for r in rows
            ],
        )


def _record_activity(conn: Connection, rows: list[SessionActivity]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            """
            update sessions
               set last_activity = greatest(last_activity, %s),
                   tool_calls    = greatest(tool_calls, %s),
                   tool_errors   = greatest(tool_errors, %s)
             where session_id = %s
            """,
            [(r.last_activity, r.tool_calls, r.tool_errors, r.session_id) for r in rows],
        )


def _close_sessions(conn: Connection, rows: list[SessionClose]) -> None:
    # `status = 'active'`: replaying an old close never reopens or re-stamps a row, and a
    # session recovery already marked interrupted stays so. `epoch`: a node whose session
    # another node claimed since (storage/session_handover.py) ends only its own copy, unless
    # its client ended it (an HTTP DELETE: the session's end, wherever it runs now).
    with conn.cursor() as cur:
        cur.executemany(
            """
            update sessions
               set status = %s, closed_at = %s, last_activity = greatest(last_activity, %s),
                   tool_calls = greatest(tool_calls, %s), tool_errors = greatest(tool_errors, %s),
                   parked_until = null, version = version + 1
             where session_id = %s
               and ((status = 'active' and epoch = %s)
                    or (%s and status in ('active', 'interrupted')))
            """,
            [
                (
                    r.status,
                    r.closed_at,
                    r.last_activity,
                    r.tool_calls,
                    r.tool_errors,
                    r.session_id,
                    r.epoch,
                    r.ended_by_client,
                )
                for r in rows
            ],
        )


def _park_sessions(conn: Connection, rows: list[SessionParked]) -> None:
    # Only the holder at its epoch parks (a stale copy changes nothing); the grace runs on
    # the database's clock, which every node that may claim the session reads.
    with conn.cursor() as cur:
        cur.executemany(
            """
            update sessions
               set parked_until = now() + make_interval(secs => %s),
                   tool_calls = greatest(tool_calls, %s), tool_errors = greatest(tool_errors, %s),
                   log_level = %s, last_activity = greatest(last_activity, now())
             where session_id = %s and node_id = %s and epoch = %s and status = 'active'
            """,
            [
                (
                    r.grace_s,
                    r.tool_calls,
                    r.tool_errors,
                    r.log_level,
                    r.session_id,
                    r.node_id,
                    r.epoch,
                )
                for r in rows
            ],
        )


def _session_log_levels(conn: Connection, rows: list[SessionLogLevel]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "update sessions set log_level = %s where session_id = %s and epoch = %s",
            [(r.log_level, r.session_id, r.epoch) for r in rows],
        )


# --- tasks ----------------------------------------------------------------------------------

_TASK_COLUMNS = (
    "id, session_id, task_type, status, created_at, started_at, completed_at, result,"
    " error_message, request_id, tool_name, arguments_digest, node_id, version,"
    " identity, augmented, ttl_ms, expires_at, poll_interval_ms, rpc_error"
)


@dataclass
class _TaskDraft:
    """A task row being built from the records of one batch (fast path only)."""

    created: TaskCreated
    status: str = "pending"
    version: int = PENDING_VERSION
    started: TaskStarted | None = None
    finished: TaskFinished | None = None

    def tuple(self) -> tuple[object, ...]:
        c, s, f = self.created, self.started, self.finished
        return (
            c.task_id,
            c.session_id,
            c.task_type,
            self.status,
            c.created_at,
            s.started_at if s else None,
            f.completed_at if f else None,
            _jsonb(f.result) if f else None,
            f.error_message if f else None,
            c.request_id,
            c.tool_name,
            c.arguments_digest,
            c.node_id,
            self.version,
            c.identity or UNKNOWN_IDENTITY,
            c.augmented,
            c.ttl_ms,
            c.expires_at,
            c.poll_interval_ms,
            _jsonb(f.rpc_error) if f else None,
        )


def _copy_tasks_folded(
    conn: Connection,
    created: list[TaskCreated],
    started: list[tuple[int, TaskStarted]],
    finished: list[tuple[int, TaskFinished]],
) -> tuple[list[tuple[int, TaskStarted]], list[tuple[int, TaskFinished]]]:
    """COPY the new tasks with their later steps in this batch folded in; return the steps
    left for UPDATE (those of tasks created earlier, or that do not follow on)."""
    drafts: dict[UUID, _TaskDraft] = {}
    for record in created:
        drafts.setdefault(record.task_id, _TaskDraft(record))
    left_started = []
    for index, step in started:
        draft = drafts.get(step.task_id)
        if draft is not None and draft.version == step.version - 1 and draft.status == "pending":
            draft.status, draft.version, draft.started = "running", step.version, step
        else:
            left_started.append((index, step))
    left_finished = []
    for index, end in finished:
        draft = drafts.get(end.task_id)
        if draft is not None and draft.version == end.version - 1 and draft.finished is None:
            draft.status, draft.version, draft.finished = end.status, end.version, end
        else:
            left_finished.append((index, end))
    _copy(conn, f"tasks ({_TASK_COLUMNS})", (draft.tuple() for draft in drafts.values()))
    return left_started, left_finished


def _insert_tasks(conn: Connection, rows: list[TaskCreated]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            f"insert into tasks ({_TASK_COLUMNS})"
            " values (%s, %s, %s, 'pending', %s, null, null, null, null, %s, %s, %s, %s, %s,"
            " %s, %s, %s, %s, %s, null)"
            " on conflict (id) do nothing",
            [
                (
                    r.task_id,
                    r.session_id,
                    r.task_type,
                    r.created_at,
                    r.request_id,
                    r.tool_name,
                    r.arguments_digest,
                    r.node_id,
                    PENDING_VERSION,
                    r.identity or UNKNOWN_IDENTITY,
                    r.augmented,
                    r.ttl_ms,
                    r.expires_at,
                    r.poll_interval_ms,
                )
                for r in rows
            ],
        )


def _transitions(
    conn: Connection,
    started: list[tuple[int, TaskStarted]],
    finished: list[tuple[int, TaskFinished]],
) -> dict[int, WriteConflict]:
    """Apply task steps with their version check; classify the ones that did not apply.

    A final step also applies over ``interrupted``, whatever its version: recovery wrote
    that state because the task's node looked dead, a guess; the node that ran the call
    knows how it ended, so its final step (replayed from its journal, or late after an
    outage) is the truth. The row then goes to ``greatest(version + 1, record's version)``:
    past the interrupt, and at least the record's own version, so the same record arriving
    again is seen as a duplicate by :func:`_classify`. A ``running`` step never supersedes,
    and a final step never replaces another final state (not even one version behind: a task
    cancelled before it ran is at version 2, a final step after running states 3).
    """
    missed: list[tuple[int, UUID, int, str]] = []
    if started:
        applied = _rows(
            conn,
            """
            update tasks t
               set status = 'running', started_at = v.started_at, version = v.version,
                   updated_at = now()
              from unnest(%s::uuid[], %s::timestamptz[], %s::int[]) as v(id, started_at, version)
             where t.id = v.id and t.version = v.version - 1
            returning t.id, v.version
            """,
            (
                [s.task_id for _, s in started],
                [s.started_at for _, s in started],
                [s.version for _, s in started],
            ),
        )
        missed += [
            (i, s.task_id, s.version, "running")
            for i, s in started
            if (s.task_id, s.version) not in applied
        ]
    if finished:
        # `returning v.version`: the record's version, which the row's may now exceed.
        applied = _rows(
            conn,
            """
            update tasks t
               set status = v.status, completed_at = v.completed_at, result = v.result::jsonb,
                   error_message = v.error_message, version = greatest(t.version + 1, v.version),
                   rpc_error = v.rpc_error::jsonb, updated_at = now()
              from unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::text[], %s::text[],
                          %s::int[], %s::text[])
                   as v(id, status, completed_at, result, error_message, version, rpc_error)
             where t.id = v.id
               and (t.version = v.version - 1 and t.status in ('pending', 'running')
                    or t.status = 'interrupted')
            returning t.id, v.version
            """,
            (
                [f.task_id for _, f in finished],
                [f.status for _, f in finished],
                [f.completed_at for _, f in finished],
                [_json_text(f.result) for _, f in finished],
                [f.error_message for _, f in finished],
                [f.version for _, f in finished],
                [_json_text(f.rpc_error) for _, f in finished],
            ),
        )
        missed += [
            (i, f.task_id, f.version, f.status)
            for i, f in finished
            if (f.task_id, f.version) not in applied
        ]
    return _classify(conn, missed) if missed else {}


def _rows(conn: Connection, query: str, params: tuple[object, ...]) -> set[tuple[UUID, int]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return {(row[0], row[1]) for row in cur.fetchall()}


def _classify(
    conn: Connection, missed: list[tuple[int, UUID, int, str]]
) -> dict[int, WriteConflict]:
    """A step that did not apply is a duplicate (the row already holds it, or a later step of
    the same writer) or a conflict (someone else moved the row, or it does not exist).

    * ``running`` over ``interrupted`` is quiet: the row keeps recovery's guess until that
      node's final step, which supersedes it, arrives (or never does).
    * A final step is a duplicate only if the row holds that same final state, at its
      version or above (above: it superseded ``interrupted``). Any other state is a
      conflict: a different final state is never overwritten, whatever the versions.
    """
    with conn.cursor() as cur:
        cur.execute(
            "select id, status, version from tasks where id = any(%s)",
            ([task_id for _, task_id, _, _ in missed],),
        )
        current = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    conflicts = {}
    for index, task_id, version, status in missed:
        found = current.get(task_id)
        if found is None:
            conflicts[index] = WriteConflict(f"task {task_id}: no such task row", current=None)
            continue
        row_status, row_version = found
        if status == "running":
            duplicate = (
                row_status == "interrupted"
                or row_version > version
                or (row_version == version and row_status == status)
            )
        else:
            duplicate = row_status == status and row_version >= version
        if duplicate:
            continue  # already applied: a retry or a replay
        conflicts[index] = WriteConflict(
            f"task {task_id}: expected version {version - 1}, found {row_status!r} at version "
            f"{row_version}; the row was left as it was",
            current=RowVersion(row_status, row_version),
        )
    return conflicts


# --- usage, threads, messages, nodes --------------------------------------------------------

_USAGE_COLUMNS = (
    "id, session_id, task_id, provider, model, input_tokens, output_tokens, cost, estimated,"
    " created_at, purpose, owner_id, thread_id"
)


def _usage_tuple(r: TokenUsage) -> tuple[object, ...]:
    return (
        r.usage_id,
        r.session_id,
        r.task_id,
        r.provider,
        r.model,
        r.input_tokens,
        r.output_tokens,
        r.cost,
        r.estimated,
        r.created_at,
        r.purpose,
        r.owner_id,
        r.thread_id,
    )


def _insert_usage(conn: Connection, rows: list[TokenUsage], *, fast: bool) -> None:
    _insert_new(conn, "token_usage", _USAGE_COLUMNS, "id", map(_usage_tuple, rows), fast=fast)


def _sum_session_tokens(conn: Connection, session_ids: set[str]) -> None:
    """Set these sessions' token totals to the sum of their usage rows, in the transaction
    that wrote the rows: a total, not an increment, so a replayed batch (its rows skipped as
    duplicates) leaves it right, and the usage rows stay its one source."""
    if not session_ids:
        return
    with conn.cursor() as cur:
        cur.execute(
            """
            update sessions s
               set input_tokens = u.input_tokens, output_tokens = u.output_tokens
              from (select session_id, sum(input_tokens) as input_tokens,
                           sum(output_tokens) as output_tokens
                      from token_usage
                     where session_id = any(%s)
                     group by session_id) u
             where s.session_id = u.session_id
            """,
            (sorted(session_ids),),
        )


def _upsert_threads(conn: Connection, rows: list[ThreadRow]) -> None:
    # executemany runs one statement per row, so two rows for one thread in a batch are fine
    # (a single multi-row upsert would refuse to touch the same row twice).
    with conn.cursor() as cur:
        cur.executemany(
            """
            insert into threads (id, session_id, owner_id, tool_name, title, turn_count,
                                 created_at, updated_at, expires_at, token_ratio,
                                 token_ratio_model, prompt_tokens_estimated,
                                 prompt_tokens_reported)
            values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            on conflict (id) do update
               set updated_at = greatest(threads.updated_at, excluded.updated_at),
                   expires_at = greatest(threads.expires_at, excluded.expires_at),
                   turn_count = greatest(threads.turn_count, excluded.turn_count),
                   title = coalesce(excluded.title, threads.title),
                   token_ratio = coalesce(excluded.token_ratio, threads.token_ratio),
                   token_ratio_model = coalesce(excluded.token_ratio_model,
                                                threads.token_ratio_model),
                   prompt_tokens_estimated = coalesce(excluded.prompt_tokens_estimated,
                                                      threads.prompt_tokens_estimated),
                   prompt_tokens_reported = coalesce(excluded.prompt_tokens_reported,
                                                     threads.prompt_tokens_reported)
            """,
            [
                (
                    r.thread_id,
                    r.session_id,
                    r.owner_id,
                    r.tool_name,
                    r.title,
                    r.turn_count,
                    r.created_at,
                    r.updated_at,
                    r.expires_at,
                    r.token_ratio,
                    r.token_ratio_model,
                    r.prompt_tokens_estimated,
                    r.prompt_tokens_reported,
                )
                for r in rows
            ],
        )


_MESSAGE_COLUMNS = (
    "id, thread_id, turn_index, role, content, token_count, files, tool_name, created_at"
)


def _message_tuple(r: MessageRow) -> tuple[object, ...]:
    return (
        r.message_id,
        r.thread_id,
        r.turn_index,
        r.role,
        r.content,
        r.token_count,
        Jsonb(r.files),
        r.tool_name,
        r.created_at,
    )


def _insert_messages(conn: Connection, rows: list[MessageRow], *, fast: bool) -> None:
    _insert_new(conn, "messages", _MESSAGE_COLUMNS, "id", map(_message_tuple, rows), fast=fast)


_SUMMARY_COLUMNS = (
    "id, thread_id, first_turn, last_turn, content, token_count, provider, model, created_at"
)


def _insert_summaries(conn: Connection, rows: list[ThreadSummaryRow], *, fast: bool) -> None:
    _insert_new(
        conn,
        "thread_summaries",
        _SUMMARY_COLUMNS,
        "id",
        (
            (
                r.summary_id,
                r.thread_id,
                r.first_turn,
                r.last_turn,
                r.content,
                r.token_count,
                r.provider,
                r.model,
                r.created_at,
            )
            for r in rows
        ),
        fast=fast,
    )


def _heartbeats(conn: Connection, rows: list[NodeHeartbeat], me: str | None) -> Rejoined | None:
    # The database's clock, not ours: nodes compare heartbeats across machines. A node that
    # recovery or a sweep declared stopped stays stopped (its late heartbeats change nothing),
    # except the writer itself (``me``): it is demonstrably alive, so it rejoins first.
    latest: dict[str, tuple[bool, dict[str, JsonValue] | None]] = {}
    for r in rows:  # in journal order: the last snapshot is the newest
        stopping, snapshot = latest.get(r.node_id, (False, None))
        latest[r.node_id] = (stopping or r.stopping, r.snapshot or snapshot)
    rejoined = None
    with conn.cursor() as cur:
        if me is not None and me in latest:
            # Swept since its last heartbeat (a pass of the sweep, or recovery, which stamp
            # stopped_at no later than swept_at) and not stopped by itself since (a clean stop
            # stamps stopped_at later). The swept_* columns stay: the record of what the sweep
            # did. Matches once: the heartbeat below moves heartbeat_at past swept_at.
            cur.execute(
                """
                update nodes set stopped_at = null
                 where node_id = %s and swept_at is not null and heartbeat_at <= swept_at
                   and (stopped_at is null or stopped_at <= swept_at)
                returning swept_by, swept_at, swept_tasks, swept_sessions
                """,
                (me,),
            )
            row = cur.fetchone()
            if row is not None:
                rejoined = Rejoined(row[0], row[1], row[2], row[3])
        cur.executemany(
            """
            update nodes
               set heartbeat_at = now(),
                   stopped_at = case when %s then now() end,
                   snapshot = coalesce(%s, snapshot)
             where node_id = %s and stopped_at is null
            """,
            [
                (stopping, _jsonb(snapshot), node_id)
                for node_id, (stopping, snapshot) in latest.items()
            ],
        )
    return rejoined


# --- helpers --------------------------------------------------------------------------------


def _insert_new(
    conn: Connection,
    table: str,
    columns: str,
    key: str,
    rows: Iterable[tuple[object, ...]],
    *,
    fast: bool,
) -> None:
    """Insert rows that are written once and never change (sessions, usage, messages): COPY
    on the ``fast`` path, else one ``insert ... on conflict (key) do nothing`` per row, so a
    replayed batch (the journal's, after a crash) skips what is already there."""
    if fast:
        _copy(conn, f"{table} ({columns})", rows)
        return
    placeholders = ", ".join(["%s"] * len(columns.split(",")))
    with conn.cursor() as cur:
        cur.executemany(
            f"insert into {table} ({columns}) values ({placeholders})"
            f" on conflict ({key}) do nothing",
            list(rows),
        )


def _copy(conn: Connection, target: str, rows: Any) -> None:
    with conn.cursor() as cur, cur.copy(f"copy {target} from stdin") as copy:
        for row in rows:
            copy.write_row(row)


def _jsonb(value: JsonValue) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def _json_text(value: JsonValue) -> str | None:
    return None if value is None else to_json(value).decode()
