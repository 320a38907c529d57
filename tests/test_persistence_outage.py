"""Postgres stopped abruptly under load, then restarted: nothing accepted is lost or doubled.

20 sessions (trio tasks) run tool calls through one persistence actor, each call writing its
task's four steps and a usage row, the final step awaited (critical). Midway the server is
stopped with ``pg_ctl stop -m immediate`` (a crash: every backend dies, in-flight commits end
in an unknown state), the sessions carry on against the journal, the server comes back, and
the actor replays the journal on its own (breaker trial, no forced flush).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import trio

from actors.persistence import PersistenceActor, PersistenceClient, PersistenceConfig
from storage.embedded import EmbeddedPostgres
from storage.journal import Journal
from storage.migrations import apply_migrations
from storage.rows import SessionClose, SessionRow, TokenUsage
from storage.tasks import TaskLifecycle
from tests.harness import own_postgres, query

SESSIONS = 20
PHASE = 150  # tool calls accepted per phase: before the crash, during it, after it


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with own_postgres() as server:
        yield server


class Load:
    """The sessions' shared ledger: what was accepted, and when a phase has enough."""

    def __init__(self) -> None:
        self.accepted: list[TaskLifecycle] = []
        self.usage: dict[uuid.UUID, uuid.UUID] = {}
        self.sessions: list[str] = []
        self.stop = False
        self._target = 0
        self._reached = trio.Event()

    def expect(self, more: int) -> trio.Event:
        self._target = len(self.accepted) + more
        self._reached = trio.Event()
        return self._reached

    def accept(self, task: TaskLifecycle, usage: TokenUsage) -> None:
        self.accepted.append(task)
        self.usage[task.task_id] = usage.usage_id
        if len(self.accepted) >= self._target:
            self._reached.set()


async def session(client: PersistenceClient, load: Load, node: str) -> None:
    row = SessionRow(session_id=f"s-{uuid.uuid4().hex}", created_at=datetime.now(UTC), node_id=node)
    await client.write(row)
    load.sessions.append(row.session_id)
    n = 0
    while not load.stop:
        n += 1
        task = TaskLifecycle.create(
            session_id=row.session_id,
            request_id=n,
            tool_name="echo",
            arguments={"n": n},
            node_id=node,
        )
        client.write_soon(task.created)
        client.write_soon(task.started())
        await trio.lowlevel.checkpoint()  # the tool runs
        usage = TokenUsage(
            usage_id=uuid.uuid4(),
            session_id=row.session_id,
            task_id=task.task_id,
            provider="glm",
            model="glm-4.6",
            input_tokens=n,
            output_tokens=2 * n,
            created_at=datetime.now(UTC),
        )
        client.write_soon(usage)
        await client.write(task.finished("completed", result={"n": n}))
        load.accept(task, usage)
    now = datetime.now(UTC)
    await client.write(SessionClose(session_id=row.session_id, closed_at=now, last_activity=now))


async def test_postgres_crash_and_restart_under_load(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = postgres.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop database if exists outage with (force)")
        conn.execute("create database outage")
    url = url.replace("/postgres?", "/outage?")
    apply_migrations(url)
    journal = Journal.open(tmp_path / "journal", node_id="outage-node")
    config = PersistenceConfig(breaker_reset=0.05, breaker_max_reset=0.2, connect_timeout=2)
    ref = PersistenceActor.start(url, journal, config=config)
    client = PersistenceClient.for_ref(ref)
    load = Load()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.pulse, 0.05)
            await _crash_midway(postgres, client, load)
            nursery.cancel_scope.cancel()
        final = await client.flush()
    finally:
        await trio.to_thread.run_sync(ref.stop)
        journal.close()

    assert final.journal_pending_records == 0
    assert final.records_replayed > 0
    accepted = {task.task_id for task in load.accepted}
    assert len(accepted) >= 3 * PHASE
    rows = query(url, "select id, status, version from tasks")
    by_id = {row[0]: row[1:] for row in rows}
    assert len(rows) == len(by_id)
    # Every task a session started was finished and accepted (sessions stop between calls).
    assert set(by_id) == accepted
    assert set(by_id.values()) == {("completed", 3)}
    usage = query(url, "select id, task_id from token_usage")
    assert sorted(usage) == sorted((u, t) for t, u in load.usage.items())
    assert query(url, "select status, count(*) from sessions group by 1") == [("closed", SESSIONS)]


async def _crash_midway(postgres: EmbeddedPostgres, client: PersistenceClient, load: Load) -> None:
    before = load.expect(PHASE)
    # Bounds a failure (a hang would otherwise never end); a success never waits for it.
    with trio.fail_after(120):
        await _phases(postgres, client, load, before)


async def _phases(
    postgres: EmbeddedPostgres, client: PersistenceClient, load: Load, before: trio.Event
) -> None:
    async with trio.open_nursery() as sessions:
        for _ in range(SESSIONS):
            sessions.start_soon(session, client, load, "outage-node")
        await before.wait()

        during = load.expect(PHASE)
        await trio.to_thread.run_sync(postgres.crash)
        await during.wait()
        crashed = await client.status()
        assert crashed.records_journaled > 0, crashed
        assert crashed.last_error is not None

        after = load.expect(PHASE)
        await trio.to_thread.run_sync(postgres.start)
        backlog = (await client.status()).appended  # what the outage left in the journal
        await after.wait()
        # The writer's own breaker trial finds the server back and replays: poll its status
        # (a condition, bounded only so that a failure ends). Under this load the journal is
        # never empty (the database is written behind); the outage's backlog is what must go.
        while True:
            status = await client.status()
            if status.committed >= backlog and status.database == "up":
                break
            await trio.sleep(0.02)
        load.stop = True
