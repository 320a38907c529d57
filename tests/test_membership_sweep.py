"""The sweep itself (storage/membership.py) against a real Postgres: bounded passes, exactly
once under concurrent sweepers, live and cleanly stopped nodes untouched, and a final state
written after the sweep replacing ``interrupted``.

Two sweepers run in two threads at once, each over its own connection, starting together
(a barrier), with a row budget smaller than the dead node's work, so that they contend for the
same node over several passes.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest

from runtime.status_model import NodeStatus
from runtime.status_view import _cluster
from storage.membership import SweepReport, cluster_nodes, sweep
from storage.migrations import apply_migrations
from storage.rows import Record, SessionRow
from storage.tasks import TaskLifecycle
from storage.writes import write_batch
from tests.harness import fresh_database, query

TASKS = 25
LIMIT = 7  # rows per pass: the dead node's 25 tasks and 1 session take several passes


@pytest.fixture
def db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as url:
        apply_migrations(url)
        yield url


def _node(db: str, *, silent: str, stopped: bool = False) -> str:
    """A node whose heartbeat is ``silent`` old (a Postgres interval), with one active
    session and ``TASKS`` running tasks; its id."""
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "insert into nodes (node_id, hostname, pid, heartbeat_at, stopped_at)"
            " values (%s, 'h', 1, now() - %s::interval, case when %s then now() end)",
            (node_id, silent, stopped),
        )
        session = SessionRow(
            session_id=f"s-{uuid.uuid4().hex}", created_at=datetime.now(UTC), node_id=node_id
        )
        records: list[Record] = [session]
        for i in range(TASKS):
            task = TaskLifecycle.create(
                session_id=session.session_id,
                request_id=i,
                tool_name="echo",
                arguments={},
                node_id=node_id,
            )
            records += [task.created, task.started()]
        assert not write_batch(conn, records).errors
    return node_id


def _statuses(db: str, node_id: str) -> list[tuple[Any, ...]]:
    return query(
        db,
        "select status, version, count(*) from tasks where node_id = %s"
        " group by status, version order by status",
        (node_id,),
    )


def test_two_sweepers_mark_a_dead_nodes_work_once_in_bounded_passes(db: str) -> None:
    dead = _node(db, silent="1 hour")
    live = _node(db, silent="0 seconds")
    stopped = _node(db, silent="1 hour", stopped=True)
    reports: dict[str, list[SweepReport]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def sweeper(me: str) -> None:
        try:
            with psycopg.connect(db, autocommit=True) as conn:
                barrier.wait()
                while True:
                    report = sweep(conn, me, node_timeout=30, limit=LIMIT)
                    reports[me].append(report)
                    if not report.more:
                        return
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=sweeper, args=(me,)) for me in reports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    # A sweeper that finds the node locked by the other ends; the one holding it goes on
    # while its passes report work left: together they finish the node.
    every = reports["a"] + reports["b"]
    assert all(r.tasks + r.sessions <= LIMIT for r in every)  # bounded
    assert len([r for r in every if r.tasks or r.sessions]) >= 4  # 26 rows, 7 a pass
    assert sum(r.tasks for r in every) == TASKS  # counted once, whoever marked them
    assert sum(r.sessions for r in every) == 1
    assert sum(r.swept_nodes == [dead] for r in every) == 1
    assert _statuses(db, dead) == [("interrupted", 3, TASKS)]  # each marked once (2 -> 3)
    row = query(
        db,
        "select swept_by, swept_tasks, swept_sessions, stopped_at is not null"
        " from nodes where node_id = %s",
        (dead,),
    )[0]
    assert row[0] in ("a", "b")
    assert row[1:] == (TASKS, 1, True)
    # Live and cleanly stopped nodes: untouched.
    for other in (live, stopped):
        assert _statuses(db, other) == [("running", 2, TASKS)]
        assert query(db, "select swept_by from nodes where node_id = %s", (other,)) == [(None,)]
    with psycopg.connect(db, autocommit=True) as conn:
        states = {n.node_id: n.state for n in cluster_nodes(conn, node_timeout=30)}
    assert states == {dead: "dead", live: "alive", stopped: "stopped"}


def test_forged_node_rows_neither_break_nor_flood_the_cluster_view(db: str) -> None:
    """Rows written by hand (or by another version) in ``nodes``: a snapshot this code cannot
    read, one of 100 kB, a 10,000-character id and a hostname holding a terminal escape.
    ``cluster_nodes`` reads every row (the odd snapshots as none, the text clipped to 256
    characters) instead of failing the whole ``status --cluster``; the text view escapes the
    control characters. Before the fix one bad snapshot failed the whole read."""
    long_id = "n" * 10_000
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "insert into nodes (node_id, hostname, pid, snapshot) values"
            " ('bad-snapshot', 'h', 1, '{\"sessions\": \"many\"}'::jsonb),"
            " ('huge-snapshot', 'h', 2, jsonb_build_object('sessions', 0, 'calls_in_flight', 0,"
            "  'storage_available', true, 'draining', false, 'health', 'ok',"
            "  'padding', repeat('x', 100000))),"
            " (%s, %s, 3, null)",
            (long_id, "evil\x1b[2J\x1b]0;pwned\x07host"),
        )
    with psycopg.connect(db, autocommit=True) as conn:
        nodes = {n.node_id: n for n in cluster_nodes(conn, node_timeout=30)}
    assert nodes["bad-snapshot"].snapshot is None
    assert nodes["huge-snapshot"].snapshot is None
    clipped = nodes["n" * 256]
    assert clipped.hostname.startswith("evil\x1b")
    # What the text view reads of a status document: the nodes, and which one is "this".
    status = cast(
        NodeStatus,
        SimpleNamespace(
            nodes=list(nodes.values()), node=SimpleNamespace(node_id="me"), cluster_limits=None
        ),
    )
    text = "\n".join(_cluster(status))
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "evil\\x1b[2J" in text


def test_a_database_lost_mid_sweep_marks_nothing_and_the_next_pass_marks_once(db: str) -> None:
    """The sweeper's connection is killed while its pass is inside the transaction (its
    update waits on a task row another connection holds, then the server ends its backend):
    nothing of the dead node is marked, its row is not swept, and the next pass (a new
    connection, as ``actors/membership.py`` makes after a failure) marks every task and
    the session once, with the counts on the node's row."""
    dead = _node(db, silent="1 hour")
    failures: list[BaseException] = []
    with psycopg.connect(db) as blocker:  # a transaction holding one of the dead node's tasks
        blocker.execute(
            "select 1 from tasks where node_id = %s order by id limit 1 offset 5 for update",
            (dead,),
        )
        sweeper = psycopg.connect(db, autocommit=True)
        pid = sweeper.info.backend_pid

        def run() -> None:
            try:
                sweep(sweeper, "a", node_timeout=30)
            except BaseException as exc:  # the test's thread checks it
                failures.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            with psycopg.connect(db, autocommit=True) as admin:
                for _ in range(5000):  # bounded poll: another backend's state has no event
                    waiting = admin.execute(
                        "select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                        (pid,),
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    threading.Event().wait(0.01)
                else:
                    pytest.fail("the sweep never waited on the held task row")
                admin.execute("select pg_terminate_backend(%s)", (pid,))
        finally:
            thread.join()
            sweeper.close()
        blocker.rollback()
    assert len(failures) == 1
    assert isinstance(failures[0], psycopg.OperationalError)
    assert _statuses(db, dead) == [("running", 2, TASKS)]  # the transaction rolled back
    assert query(
        db, "select swept_by, swept_tasks, stopped_at from nodes where node_id = %s", (dead,)
    ) == [(None, 0, None)]
    with psycopg.connect(db, autocommit=True) as conn:
        report = sweep(conn, "b", node_timeout=30)
    assert (report.tasks, report.sessions, report.swept_nodes) == (TASKS, 1, [dead])
    assert _statuses(db, dead) == [("interrupted", 3, TASKS)]
    assert query(
        db, "select swept_by, swept_tasks, swept_sessions from nodes where node_id = %s", (dead,)
    ) == [("b", TASKS, 1)]
