"""The task host (``/root/tasks``, actors/tasks/host.py) on its own: a real persistence actor
and the test Postgres, no session. Its pulse's retention sweep, what a stop records, a
cancel that comes after the tool finished, its per-identity bound; and a sessionless task
(``tasks.session_id`` null, as Streamable HTTP's sessionless requests will have)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.persistence import PersistenceClient
from actors.tasks import TaskHost, TaskOutcome
from actors.tasks.host import NODE_STOPPED
from runtime.mcp.errors import LimitExceeded
from runtime.supervision import ChildContext
from storage.tasks import Retention, TaskLifecycle
from tests.harness import query, wait_until
from tests.memory_support import migrated_database, running_persistence

DONE = TaskOutcome("completed", result={"content": [{"type": "text", "text": "ok"}]})


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with migrated_database(database_url) as url:
        yield url


@asynccontextmanager
async def running_host(
    db: str, journal_dir: Path, **options: Any
) -> AsyncIterator[tuple[TaskHost, PersistenceClient, ChildContext]]:
    """A task host running as a child would, stopped (gracefully) when the block ends."""
    async with running_persistence(db, journal_dir) as persistence:
        host = TaskHost(
            persistence=persistence,
            total_slots=trio.CapacityLimiter(4),
            database_url=db,
            **options,
        )
        started = trio.Event()
        ctx = ChildContext("tasks", "/root/tasks", on_started=started.set)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.run, ctx)
            await started.wait()
            yield host, persistence, ctx
            ctx.stop_requested.set()


async def launch(
    host: TaskHost,
    persistence: PersistenceClient,
    outcome: TaskOutcome | None,
    *,
    identity: str = "alice",
    ttl_ms: int = 60_000,
) -> TaskLifecycle:
    """A task as a session starts one: admitted, its row written through, launched. Its tool
    answers ``outcome`` at once, or blocks until cancelled (``None``)."""

    async def execute() -> TaskOutcome:
        if outcome is None:
            await trio.sleep_forever()
        assert outcome is not None
        return outcome

    lifecycle = TaskLifecycle.create(
        session_id=None,  # sessionless
        request_id=1,
        tool_name="echo",
        arguments={},
        node_id="host-test",
        identity=identity,
        retention=Retention(ttl_ms=ttl_ms, poll_interval_ms=50),
    )
    host.admit(identity)
    await persistence.write_through(lifecycle.created)
    host.launch(lifecycle, identity, execute)
    return lifecycle


def row(db: str, task_id: uuid.UUID) -> tuple[Any, ...]:
    found = query(
        db,
        "select status, result, result_cleared_at, error_message, session_id from tasks"
        " where id = %s",
        (task_id,),
    )
    assert found, task_id
    return found[0]


async def test_the_pulse_clears_expired_results_and_keeps_the_rows(db: str, tmp_path: Path) -> None:
    async with running_host(db, tmp_path, sweep_interval=0.05) as (host, persistence, _):
        kept = await launch(host, persistence, DONE, ttl_ms=3_600_000)
        expired = await launch(host, persistence, DONE, ttl_ms=0)
        await wait_until(
            lambda: row(db, expired.task_id)[2] is not None, what="the sweep to clear it"
        )
        status, result, _, _, session_id = row(db, expired.task_id)
        assert (status, result, session_id) == ("completed", None, None)
        assert row(db, kept.task_id)[:3] == ("completed", DONE.result, None)


async def test_a_stop_records_every_running_task_failed(db: str, tmp_path: Path) -> None:
    async with running_host(db, tmp_path) as (host, persistence, _):
        task = await launch(host, persistence, None)
        assert host.running(task.task_id, "alice") is not None
        assert host.running(task.task_id, "bob") is None  # another identity's: unknown
    # The host has returned: its tasks' final states are committed.
    status, _, _, error, _ = row(db, task.task_id)
    assert (status, error) == ("failed", NODE_STOPPED)


async def test_a_cancelled_task_stays_cancelled(db: str, tmp_path: Path) -> None:
    async with running_host(db, tmp_path) as (host, persistence, _):
        task = await launch(host, persistence, None)
        running = host.running(task.task_id, "alice")
        assert running is not None
        await host.cancel(running, "cancelled by the test")
        assert running.final is not None
        assert running.final.status == "cancelled"
        assert row(db, task.task_id)[0] == "cancelled"
        assert host.running(task.task_id, "alice") is None


async def test_the_identity_bound_counts_until_a_task_ends(db: str, tmp_path: Path) -> None:
    async with running_host(db, tmp_path, max_per_identity=1) as (host, persistence, _):
        task = await launch(host, persistence, None)
        with pytest.raises(LimitExceeded) as refused:
            host.admit("alice")
        assert refused.value.data == {"limit": "tasks_per_identity", "max": 1}
        host.admit("bob")  # another identity's count is its own
        host.withdraw("bob")
        running = host.running(task.task_id, "alice")
        assert running is not None
        await host.cancel(running, "make room")
        host.admit("alice")
        host.withdraw("alice")
