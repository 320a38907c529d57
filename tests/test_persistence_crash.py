"""A process using the persistence actor is killed with SIGKILL mid-load; the next start on
the same state dir recovers: nothing accepted is missing, nothing is doubled, and the tasks
it left ``running`` are ``interrupted``.

The process is this module run as a script (``python -m tests.test_persistence_crash``): it
recovers and starts the actor as ``exai serve`` does, runs sessions whose tool calls write
their task steps and usage, and prints a line for each write it was told is safe. The test
reads those lines (no sleeps: it waits for enough of them), kills the process, recovers on
the same journal directory, and checks the database against what was printed. Twice: with
Postgres up throughout, and with Postgres crashed before the kill (so the accepted writes
are only in the dead process's journal).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import trio

from actors.persistence import PersistenceActor, PersistenceClient, PersistenceConfig
from runtime.logs import configure_logging
from storage.embedded import EmbeddedPostgres
from storage.journal import Journal
from storage.migrations import apply_migrations
from storage.recovery import recover
from storage.rows import SessionRow, TokenUsage
from storage.tasks import TaskLifecycle
from tests.harness import ROOT, LineReader, own_postgres, query

SESSIONS = 10
STUCK = 5  # sessions whose one tool call never ends: `running` when the process dies
PHASE = 100


# --- the process that gets killed -----------------------------------------------------------


async def _drive(url: str, journal_dir: Path, node_id: str) -> None:
    journal = Journal.open(journal_dir, node_id=node_id)
    await trio.to_thread.run_sync(recover, url, journal)
    config = PersistenceConfig(breaker_reset=0.05, breaker_max_reset=0.2, connect_timeout=2)
    client = PersistenceClient.for_ref(PersistenceActor.start(url, journal, config=config))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.pulse, 0.05)
        for _ in range(SESSIONS):
            nursery.start_soon(_session, client, node_id)
        for _ in range(STUCK):
            nursery.start_soon(_stuck, client, node_id)


async def _open(client: PersistenceClient, node_id: str) -> SessionRow:
    row = SessionRow(
        session_id=f"s-{uuid.uuid4().hex}", created_at=datetime.now(UTC), node_id=node_id
    )
    await client.write(row)
    return row


def _task(row: SessionRow, n: int, node_id: str) -> TaskLifecycle:
    return TaskLifecycle.create(
        session_id=row.session_id, request_id=n, tool_name="echo", arguments=n, node_id=node_id
    )


async def _session(client: PersistenceClient, node_id: str) -> None:
    row = await _open(client, node_id)
    n = 0
    while True:
        n += 1
        task = _task(row, n, node_id)
        client.write_soon(task.created)
        client.write_soon(task.started())
        await trio.lowlevel.checkpoint()
        usage = TokenUsage(
            usage_id=uuid.uuid4(),
            session_id=row.session_id,
            task_id=task.task_id,
            provider="kimi",
            model="k2",
            input_tokens=n,
            output_tokens=n,
            created_at=datetime.now(UTC),
        )
        client.write_soon(usage)
        await client.write(task.finished("completed", result=n))
        print(f"ACCEPTED {task.task_id} {usage.usage_id}", flush=True)


async def _stuck(client: PersistenceClient, node_id: str) -> None:
    row = await _open(client, node_id)
    task = _task(row, 1, node_id)
    client.write_soon(task.created)
    await client.write(task.started())
    print(f"RUNNING {task.task_id}", flush=True)
    await trio.sleep_forever()


# --- the test -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    with own_postgres() as server:
        yield server


@dataclass
class Printed:
    accepted: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    running: set[uuid.UUID] = field(default_factory=set)

    def take(self, line: str) -> None:
        kind, *ids = line.split()
        if kind == "ACCEPTED":
            self.accepted[uuid.UUID(ids[0])] = uuid.UUID(ids[1])
        elif kind == "RUNNING":
            self.running.add(uuid.UUID(ids[0]))


async def _read_until(reader: LineReader, printed: Printed, accepted: int) -> None:
    with trio.fail_after(60):
        while len(printed.accepted) < accepted or len(printed.running) < STUCK:
            line = await reader.line()
            assert line is not None, "the driver exited early; see its stderr in tmp_path"
            printed.take(line)


@pytest.mark.parametrize("postgres_down", [False, True], ids=["postgres-up", "postgres-down"])
async def test_sigkill_mid_load_then_recovery(
    postgres: EmbeddedPostgres, tmp_path: Path, postgres_down: bool
) -> None:
    admin = postgres.start()
    name = f"crash_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    url = admin.replace("/postgres?", f"/{name}?")
    apply_migrations(url)
    journal_dir = tmp_path / "state" / "journal"
    node_id = f"doomed-{uuid.uuid4().hex[:8]}"

    printed = Printed()
    with (tmp_path / "driver.stderr").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.test_persistence_crash", url, str(journal_dir), node_id],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
        )
    assert process.stdout is not None
    reader = LineReader(process.stdout)
    try:
        await _read_until(reader, printed, PHASE)
        if postgres_down:
            await trio.to_thread.run_sync(postgres.crash)
            await _read_until(reader, printed, len(printed.accepted) + PHASE)
        process.send_signal(signal.SIGKILL)
        while (line := await reader.line()) is not None:  # accepted before it died
            printed.take(line)
    finally:
        process.kill()
        await process.wait()
    assert process.returncode == -signal.SIGKILL

    if postgres_down:
        await trio.to_thread.run_sync(postgres.start)
    successor = Journal.open(journal_dir, node_id="successor")
    report = await trio.to_thread.run_sync(recover, url, successor)
    successor.close()

    assert report.dead_nodes == [node_id]
    assert len(report.journals) == 1
    if postgres_down:
        assert report.replayed_records > 0
    tasks = {
        row[0]: (row[1], row[2])
        for row in query(
            url, "select id, status, version from tasks where node_id = %s", (node_id,)
        )
    }
    for task_id in printed.accepted:
        assert tasks.get(task_id) == ("completed", 3), task_id
    for task_id in printed.running:
        assert tasks.get(task_id) == ("interrupted", 3), task_id
    assert {status for status, _ in tasks.values()} <= {"completed", "interrupted"}
    usage = dict(query(url, "select id, task_id from token_usage"))
    for task_id, usage_id in printed.accepted.items():
        assert usage.get(usage_id) == task_id
    per_task = query(
        url, "select task_id, count(*) from token_usage group by 1 having count(*) > 1"
    )
    assert per_task == []
    assert query(url, "select distinct status from sessions") == [("interrupted",)]
    assert not list(journal_dir.glob("journal-*.jsonl"))


if __name__ == "__main__":
    # stdout carries the ACCEPTED/RUNNING protocol to the test: logs go to stderr, as the
    # server's do (structlog's default would print to stdout, from several threads).
    configure_logging("warning", json=True)
    trio.run(_drive, sys.argv[1], Path(sys.argv[2]), sys.argv[3])
