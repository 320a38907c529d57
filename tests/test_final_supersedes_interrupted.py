"""The node that ran a call is the truth about it: a task's final step, arriving after
recovery marked the task ``interrupted`` (its node looked dead), replaces ``interrupted``.

Against a real Postgres, with recovery's own function doing the interrupting: a node whose
heartbeat is older than ``node_ttl`` is dead to ``recover()``. Covered: every write path
(fast, safe = journal replay, isolated), the same record again (a duplicate, not a conflict,
not re-applied), a late ``running`` step (quiet, changes nothing), a different final state
(still a conflict), a dead node's journal replayed by its successor after another node's
recovery interrupted its task, and a late critical write through the persistence actor.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from actors.persistence import PersistenceActor, PersistenceClient, WriteConflict
from storage.errors import RowVersion
from storage.journal import Journal
from storage.migrations import apply_migrations
from storage.recovery import RecoveryReport, recover
from storage.rows import Record, SessionRow, TokenUsage
from storage.tasks import TaskLifecycle
from storage.writes import write_batch
from tests.harness import fresh_database, query

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as url:
        apply_migrations(url)
        yield url


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


def _node(db: str) -> str:
    """A node that stopped heartbeating an hour ago (by the database's clock): dead to
    ``recover()`` under its default ``node_ttl`` (300 s)."""
    node_id = f"gone-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db) as conn:
        conn.execute(
            "insert into nodes (node_id, hostname, pid, heartbeat_at)"
            " values (%s, 'elsewhere', 1, now() - interval '1 hour')",
            (node_id,),
        )
    return node_id


def _task(session: SessionRow) -> TaskLifecycle:
    assert session.node_id is not None
    return TaskLifecycle.create(
        session_id=session.session_id,
        request_id=1,
        tool_name="echo",
        arguments={"text": "hi"},
        node_id=session.node_id,
    )


def _session(node_id: str) -> SessionRow:
    return SessionRow(session_id=f"s-{uuid.uuid4().hex}", created_at=NOW, node_id=node_id)


def _recover_elsewhere(db: str, tmp_path: Path) -> RecoveryReport:
    """Another node's start-up recovery, in its own (empty) state dir."""
    journal = Journal.open(tmp_path / f"other-{uuid.uuid4().hex[:8]}", node_id="other-node")
    try:
        return recover(db, journal)
    finally:
        journal.close()


def _row(db: str, task: TaskLifecycle) -> tuple[Any, ...]:
    """status, version, result, error_message, completed_at, updated_at."""
    rows = query(
        db,
        "select status, version, result, error_message, completed_at, updated_at"
        " from tasks where id = %s",
        (task.task_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


def _interrupted_while_running(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> tuple[SessionRow, TaskLifecycle]:
    """A task its node created and started, then interrupted by another node's recovery
    (version 2 -> 3)."""
    node = _node(db)
    session = _session(node)
    task = _task(session)
    assert not write_batch(conn, [session, task.created, task.started()]).errors
    report = _recover_elsewhere(db, tmp_path)
    assert node in report.dead_nodes
    assert _row(db, task)[:2] == ("interrupted", 3)
    return session, task


def _refused_usage() -> TokenUsage:
    """A record the database refuses (its session does not exist): it sends a batch down to
    the isolated, record-by-record attempt."""
    return TokenUsage(
        usage_id=uuid.uuid4(),
        session_id=f"s-missing-{uuid.uuid4().hex}",
        task_id=None,
        provider="kimi",
        model="k2",
        input_tokens=1,
        output_tokens=1,
        cost=Decimal(0),
        estimated=True,
        created_at=NOW,
    )


@pytest.mark.parametrize("path", ["fast", "safe", "isolated"])
def test_a_final_step_replaces_interrupted_on_every_write_path(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path, path: str
) -> None:
    _, task = _interrupted_while_running(db, conn, tmp_path)
    finished = task.finished("completed", result={"text": "hi"}, at=NOW + timedelta(seconds=5))
    batch: list[Record] = [finished]
    if path == "fast":
        # With a new task created and finished in the same batch: the fast path folds that
        # one into its COPY and still updates the older row.
        other_session = _session(task.created.node_id)
        other = _task(other_session)
        batch = [other_session, other.created, other.started(), other.finished("completed")]
        batch.append(finished)
    if path == "isolated":
        batch = [_refused_usage(), finished]

    result = write_batch(conn, batch, replay=path != "fast")

    assert result.path == path
    assert not result.conflicts
    assert set(result.rejected) == ({0} if path == "isolated" else set())
    status, version, stored, error, completed_at, _ = _row(db, task)
    # Past the interrupt (3 + 1), not back to the record's own 3.
    assert (status, version, stored, error) == ("completed", 4, {"text": "hi"}, None)
    assert completed_at == finished.completed_at


def test_the_same_final_step_again_is_a_duplicate(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    _, task = _interrupted_while_running(db, conn, tmp_path)
    finished = task.finished("failed", error_message="boom")
    assert not write_batch(conn, [finished], replay=True).errors
    applied = _row(db, task)
    assert applied[:4] == ("failed", 4, None, "boom")

    for replay in (True, False, True):  # a replay, a retry, a replay of a replay
        result = write_batch(conn, [finished], replay=replay)
        assert not result.errors
        assert _row(db, task) == applied  # not re-applied: not even updated_at moved
    # Twice in one batch (a record re-sent after an actor restart, then replayed).
    assert not write_batch(conn, [finished, finished], replay=True).errors
    assert _row(db, task) == applied


def test_a_task_interrupted_before_it_started_takes_its_steps_quietly(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Interrupted at version 2 (from pending): the late ``running`` step, at the same
    version, is quiet and changes nothing; the final one (version 3) then applies."""
    node = _node(db)
    session = _session(node)
    task = _task(session)
    assert not write_batch(conn, [session, task.created]).errors
    _recover_elsewhere(db, tmp_path)
    interrupted = _row(db, task)
    assert interrupted[:2] == ("interrupted", 2)

    started = task.started()
    for replay in (True, False):
        assert not write_batch(conn, [started], replay=replay).errors
        assert _row(db, task) == interrupted

    finished = task.finished("completed", result="late")
    assert not write_batch(conn, [started, finished], replay=True).errors
    assert _row(db, task)[:4] == ("completed", 3, "late", None)
    [(started_at,)] = query(db, "select started_at from tasks where id = %s", (task.task_id,))
    assert started_at is None  # the running step never applied; only the final one did


@pytest.mark.parametrize("replay", [True, False])
def test_a_late_running_step_leaves_interrupted_as_it_is(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path, replay: bool
) -> None:
    """Interrupted at version 3 (from running): the task's first steps again, as its
    journal would replay them, are duplicates; the row keeps recovery's state."""
    _, task = _interrupted_while_running(db, conn, tmp_path)
    before = _row(db, task)
    again = TaskLifecycle(task.created)  # the lifecycle has moved on: build the step afresh
    result = write_batch(conn, [task.created, again.started(at=NOW)], replay=replay)
    assert not result.errors
    assert _row(db, task) == before


@pytest.mark.parametrize("replay", [True, False])
def test_a_different_final_state_is_still_a_conflict(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path, replay: bool
) -> None:
    # Completed the ordinary way (version 3): a failed step for it is a conflict.
    node = _node(db)
    session = _session(node)
    done = _task(session)
    done_records: list[Record] = [session, done.created, done.started()]
    assert not write_batch(conn, [*done_records, done.finished("completed")]).errors
    other = TaskLifecycle(done.created)
    other.started()
    result = write_batch(conn, [other.finished("failed", error_message="no")], replay=replay)
    assert result.conflicts[0].current == RowVersion("completed", 3)
    assert _row(db, done)[:4] == ("completed", 3, None, None)

    # Completed over interrupted (version 4): a different final state at 3 is a conflict too,
    # though the row is past its version.
    _, superseded = _interrupted_while_running(db, conn, tmp_path)
    rival = TaskLifecycle(superseded.created)
    rival.started()
    assert not write_batch(conn, [superseded.finished("completed")], replay=True).errors
    result = write_batch(conn, [rival.finished("cancelled")], replay=replay)
    assert result.conflicts[0].current == RowVersion("completed", 4)
    assert _row(db, superseded)[:2] == ("completed", 4)

    # Cancelled before it ran (version 2): a final step after running (3) is one version
    # ahead, yet never replaces a final state.
    never_ran = _task(session)
    assert not write_batch(conn, [never_ran.created]).errors
    ran = TaskLifecycle(never_ran.created)
    ran.started()
    assert not write_batch(conn, [never_ran.finished("cancelled")]).errors
    result = write_batch(conn, [ran.finished("completed", result="x")], replay=replay)
    assert result.conflicts[0].current == RowVersion("cancelled", 2)
    assert _row(db, never_ran)[:3] == ("cancelled", 2, None)


def test_a_dead_nodes_journal_replayed_after_another_node_interrupted_its_task(
    db: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Two nodes, one database. Node A ran a call to its end, but its final step only reached
    its journal (the database was away), and its heartbeat is old. Node B starts: A looks
    dead, B's recovery interrupts the task. A's successor then starts in A's state dir and
    replays A's journal: the task is completed, as A knew, with no conflict."""
    node_a = _node(db)
    session = _session(node_a)
    task = _task(session)
    assert not write_batch(conn, [session, task.created, task.started()]).errors
    a_state = tmp_path / "a" / "journal"
    a_journal = Journal.open(a_state, node_id=node_a)
    finished = task.finished("completed", result={"answer": 42})
    assert not a_journal.append([finished], durable=True)
    a_journal.close()  # A exits (a SIGKILL releases the lock the same way)

    b_report = _recover_elsewhere(db, tmp_path)
    assert node_a in b_report.dead_nodes
    assert b_report.interrupted_tasks >= 1
    assert _row(db, task)[:2] == ("interrupted", 3)

    successor = Journal.open(a_state, node_id=f"a-next-{uuid.uuid4().hex[:8]}")
    try:
        report = recover(db, successor)
    finally:
        successor.close()
    assert report.replayed_records == 1
    assert report.conflicts == 0
    assert report.interrupted_tasks == 0
    assert _row(db, task)[:4] == ("completed", 4, {"answer": 42}, None)


@asynccontextmanager
async def _actor(db: str, journal: Journal) -> AsyncIterator[PersistenceClient]:
    ref = PersistenceActor.start(db, journal)
    try:
        yield PersistenceClient.for_ref(ref)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=30))


async def test_a_late_final_write_through_the_actor_succeeds(db: str, tmp_path: Path) -> None:
    """Node A is alive but was cut off long enough to look dead; B's recovery interrupted its
    tasks. A's critical final write returns (no ``WriteConflict``), a background one is not
    counted a conflict, and a different final state still raises."""
    node_a = _node(db)
    session = _session(node_a)
    critical, background = _task(session), _task(session)
    journal = Journal.open(tmp_path / "a", node_id=node_a)
    try:
        async with _actor(db, journal) as client:
            await client.write(session)
            for task in (critical, background):
                client.write_soon(task.created)
                await client.write(task.started())
            report = await trio.to_thread.run_sync(_recover_elsewhere, db, tmp_path)
            assert node_a in report.dead_nodes
            assert _row(db, critical)[:2] == ("interrupted", 3)

            await client.write(critical.finished("completed", result="late"))
            client.write_soon(background.finished("failed", error_message="late"))
            status = await client.flush()
            assert status.conflicts == 0

            rival = TaskLifecycle(critical.created)
            rival.started()
            with pytest.raises(WriteConflict) as conflict:
                await client.write(rival.finished("cancelled"))
            assert conflict.value.current == RowVersion("completed", 4)
    finally:
        journal.close()
    assert _row(db, critical)[:4] == ("completed", 4, "late", None)
    assert _row(db, background)[:4] == ("failed", 4, None, "late")
