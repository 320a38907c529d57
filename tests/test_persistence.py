"""The persistence actor and its client against a real Postgres: what gets written, exactly
once, in which state; conflicts, rejections, coalescing, a dead database, a dead actor."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pykka
import pytest
import trio

from actors.persistence import (
    PersistenceActor,
    PersistenceClient,
    PersistenceConfig,
    StorageUnavailable,
    WriteConflict,
    WriteRejected,
)
from actors.persistence.client import _UNKEPT, _Waiter
from actors.persistence.protocol import Point
from storage.durability import Durability
from storage.errors import RowVersion
from storage.journal import REJECTED_FILE, Journal
from storage.migrations import apply_migrations
from storage.recovery import recover
from storage.rows import (
    MessageRow,
    SessionActivity,
    SessionClose,
    SessionRow,
    ThreadRow,
    TokenUsage,
)
from storage.tasks import TaskLifecycle
from storage.writes import write_batch
from tests.harness import fresh_database, query, wait_until

NOW = datetime.now(UTC)
UNREACHABLE = "postgresql://postgres@/postgres?host=/nonexistent-exai-socket-dir"


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as url:
        apply_migrations(url)
        yield url


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal.open(tmp_path / "journal", node_id=f"test-{uuid.uuid4().hex[:8]}")
    yield journal
    journal.close()


@asynccontextmanager
async def running(
    url: str, journal: Journal, config: PersistenceConfig | None = None
) -> AsyncIterator[tuple[PersistenceClient, pykka.ActorRef[Any]]]:
    ref = PersistenceActor.start(url, journal, config=config)
    try:
        yield PersistenceClient.for_ref(ref), ref
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=30))


def _session(node: str = "n") -> SessionRow:
    return SessionRow(session_id=f"s-{uuid.uuid4().hex}", created_at=NOW, node_id=node)


def _task(session: SessionRow, request_id: int = 1) -> TaskLifecycle:
    return TaskLifecycle.create(
        session_id=session.session_id,
        request_id=request_id,
        tool_name="echo",
        arguments={"text": "hi"},
        node_id=session.node_id or "n",
    )


def _usage(session: SessionRow, task: TaskLifecycle | None = None) -> TokenUsage:
    return TokenUsage(
        usage_id=uuid.uuid4(),
        session_id=session.session_id,
        task_id=task.task_id if task else None,
        provider="kimi",
        model="k2",
        input_tokens=100,
        output_tokens=40,
        cost=Decimal("0.000123"),
        estimated=True,
        created_at=NOW,
    )


def _task_row(url: str, task: TaskLifecycle) -> tuple[Any, ...]:
    rows = query(
        url,
        "select status, version, result, error_message, started_at is not null,"
        " completed_at is not null from tasks where id = %s",
        (task.task_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


async def test_a_tool_call_and_its_usage_land_in_their_final_state(
    db: str, journal: Journal
) -> None:
    session = _session()
    quick, slow = _task(session, 1), _task(session, 2)
    async with running(db, journal) as (client, _):
        await client.write(session)
        # `quick`: all three steps in one shipment, folded into one row by the fast path.
        client.write_soon(quick.created)
        client.write_soon(quick.started())
        usage = _usage(session, quick)
        client.write_soon(usage)
        await client.write(quick.finished("completed", result={"content": [{"text": "hi"}]}))
        # `slow`: each step in its own transaction, as for a tool that takes a while.
        client.write_soon(slow.created)
        await client.flush()
        client.write_soon(slow.started())
        await client.flush()
        await client.write(slow.finished("failed", error_message="upstream said no"))

    assert _task_row(db, quick) == ("completed", 3, {"content": [{"text": "hi"}]}, None, True, True)
    assert _task_row(db, slow) == ("failed", 3, None, "upstream said no", True, True)
    [(request_id, tool, digest, node)] = query(
        db,
        "select request_id, tool_name, arguments_digest, node_id from tasks where id = %s",
        (quick.task_id,),
    )
    assert (request_id, tool, node) == ("1", "echo", "n")
    assert digest.startswith("sha256:")
    assert query(
        db,
        "select task_id, provider, model, input_tokens, output_tokens, cost, estimated"
        " from token_usage where id = %s",
        (usage.usage_id,),
    ) == [(quick.task_id, "kimi", "k2", 100, 40, Decimal("0.000123"), True)]


async def test_threads_and_messages_are_written(db: str, journal: Journal) -> None:
    session = _session()
    thread_id = uuid.uuid4()
    thread = ThreadRow(
        thread_id=thread_id,
        session_id=session.session_id,
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + timedelta(hours=3),
        turn_count=1,
        title="first",
    )
    later = thread.model_copy(
        update={
            "updated_at": NOW + timedelta(minutes=5),
            "expires_at": NOW + timedelta(hours=4),
            "turn_count": 2,
            "title": None,
        }
    )
    messages = [
        MessageRow(
            message_id=uuid.uuid4(),
            thread_id=thread_id,
            turn_index=turn,
            role=role,
            content=f"{role} {turn}",
            token_count=3,
            files=["a.py"] if role == "user" else [],
            created_at=NOW,
        )
        for turn in (0, 1)
        for role in ("user", "assistant")
    ]
    async with running(db, journal) as (client, _):
        await client.write(session)
        client.write_soon(thread)
        for message in messages:
            client.write_soon(message)
        client.write_soon(later)
        client.write_soon(thread)  # an old refresh arriving late moves nothing back
        await client.flush()

    assert query(
        db, "select turn_count, title, expires_at from threads where id = %s", (thread_id,)
    ) == [(2, "first", NOW + timedelta(hours=4))]
    assert query(
        db,
        "select turn_index, role, files from messages where thread_id = %s"
        " order by turn_index, role desc",
        (thread_id,),
    ) == [(0, "user", ["a.py"]), (0, "assistant", []), (1, "user", ["a.py"]), (1, "assistant", [])]


async def test_every_write_is_idempotent(db: str, journal: Journal) -> None:
    session = _session()
    task = _task(session)
    records = [session, task.created, task.started(), _usage(session, task)]
    records.append(task.finished("completed", result="done"))
    async with running(db, journal) as (client, _):
        for record in records:
            await client.write(record)  # a retry of each, one by one
        for record in records:
            await client.write(record)
    with psycopg.connect(db, autocommit=True) as conn:  # a journal replay, twice
        for _ in range(2):
            assert not write_batch(conn, records, replay=True).errors
            assert not write_batch(conn, records).errors  # the fast path falls back
    assert _task_row(db, task)[:2] == ("completed", 3)
    [(usage_rows,)] = query(
        db, "select count(*) from token_usage where session_id = %s", (session.session_id,)
    )
    assert usage_rows == 1


async def test_a_final_step_replaces_interrupted_and_never_another_final_state(
    db: str, journal: Journal
) -> None:
    """Recovery's ``interrupted`` is a guess: the task's own final step replaces it. A
    different final state is a conflict, typed, and not behind (no retry)."""
    session = _session()
    critical, background = _task(session, 1), _task(session, 2)
    async with running(db, journal) as (client, _):
        await client.write(session)
        for task in (critical, background):
            client.write_soon(task.created)
            await client.write(task.started())
        # What recovery does to the tasks of a node it believes dead.
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                "update tasks set status = 'interrupted', version = version + 1 where id = any(%s)",
                ([critical.task_id, background.task_id],),
            )
        await client.write(critical.finished("completed", result="late"))
        client.write_soon(background.finished("completed", result="late"))
        status = await client.flush()
        rival = TaskLifecycle(critical.created)
        rival.started()
        with pytest.raises(WriteConflict, match="found 'completed' at version 4") as conflict:
            await client.write(rival.finished("failed", error_message="no"))
        assert conflict.value.current == RowVersion("completed", 4)

    assert status.conflicts == 0
    assert _task_row(db, critical)[:3] == ("completed", 4, "late")
    assert _task_row(db, background)[:3] == ("completed", 4, "late")


async def test_a_record_the_database_refuses_is_set_aside_and_the_rest_commit(
    db: str, journal: Journal
) -> None:
    session = _session()
    orphan = _usage(_session())  # its session does not exist: a foreign key violation
    fine = _usage(session)
    async with running(db, journal) as (client, _):
        await client.write(session)
        client.write_soon(fine)
        with pytest.raises(WriteRejected, match="ForeignKeyViolation"):
            await client.write(orphan)
        status = await client.status()

    assert status.rejected == 1
    assert query(db, "select count(*) from token_usage where id = %s", (fine.usage_id,)) == [(1,)]
    [entry] = [json.loads(line) for line in (journal.directory / REJECTED_FILE).open()]
    assert entry["record"]["usage_id"] == str(orphan.usage_id)
    assert "ForeignKeyViolation" in entry["error"]


async def test_session_activity_is_coalesced_into_one_write(db: str, journal: Journal) -> None:
    session = _session()
    async with running(db, journal) as (client, _):
        await client.write(session)
        before = await client.status()
        for calls in range(1, 101):
            client.write_soon(
                SessionActivity(
                    session_id=session.session_id,
                    last_activity=NOW + timedelta(seconds=calls),
                    tool_calls=calls,
                    tool_errors=calls // 10,
                )
            )
        after = await client.flush()
        await client.write(
            SessionClose(session_id=session.session_id, closed_at=NOW, last_activity=NOW)
        )

    assert after.records_written - before.records_written == 1
    assert query(
        db,
        "select status, tool_calls, tool_errors, last_activity, version from sessions"
        " where session_id = %s",
        (session.session_id,),
    ) == [("closed", 100, 10, NOW + timedelta(seconds=100), 2)]


async def test_with_the_database_away_writes_are_journaled_until_the_bound(
    db: str, tmp_path: Path
) -> None:
    """Critical writes return once journaled; at the bound new work is refused while the
    records of accepted work are still kept; the next start replays it all."""
    journal = Journal.open(tmp_path / "journal", node_id="away", max_bytes=8_000)
    config = PersistenceConfig(connect_timeout=2, breaker_reset=60)
    session = _session("away")
    accepted: list[TaskLifecycle] = []
    async with running(UNREACHABLE, journal, config) as (client, _):
        await client.write(session)
        refused: StorageUnavailable | None = None
        for n in range(1000):
            task = _task(session, n)
            try:
                await client.write(task.created)
            except StorageUnavailable as exc:
                refused = exc
                break
            accepted.append(task)
        assert refused is not None
        assert "journal is" in str(refused)
        assert accepted, "the bound is far above one task"
        assert not client.available
        with pytest.raises(StorageUnavailable):
            client.ensure_available()
        client.write_soon(accepted[0].started())  # accepted work still gets recorded
        status = await client.flush()
        assert status.journal_full
        assert status.database == "down"
        assert status.records_written == 0
        assert status.journal_pending_records == len(accepted) + 2
    journal.close()  # as a crash would: the file stays, its lock is released

    successor = Journal.open(tmp_path / "journal", node_id="successor")
    report = await trio.to_thread.run_sync(recover, db, successor)
    successor.close()
    assert report.replayed_records == len(accepted) + 2
    assert report.dead_nodes == ["away"]
    assert report.interrupted_tasks == len(accepted)
    assert report.interrupted_sessions == 1
    statuses = query(
        db,
        "select status, version, count(*) from tasks where session_id = %s"
        " group by 1, 2 order by 2",
        (session.session_id,),
    )
    assert statuses == [("interrupted", 2, len(accepted) - 1), ("interrupted", 3, 1)]


async def test_a_slow_database_is_bypassed_through_the_journal(db: str, journal: Journal) -> None:
    """A statement stuck behind a lock times out; the write is journaled and answered, and
    replayed once the database is responsive again."""
    session = _session()
    config = PersistenceConfig(statement_timeout=0.3, breaker_reset=60)
    usage = _usage(session)
    async with running(db, journal, config) as (client, _):
        await client.write(session)
        with psycopg.connect(db) as blocker:  # holds the lock until its transaction ends
            blocker.execute("lock table token_usage in access exclusive mode")
            await client.write(usage)
            stuck = await client.status()
            blocker.rollback()
        drained = await client.flush(force=True)

    assert stuck.database == "down"
    assert stuck.journal_pending_records == 1
    assert "statement timeout" in (stuck.last_error or "")
    assert drained.journal_pending_records == 0
    assert drained.database == "up"
    assert query(db, "select count(*) from token_usage where id = %s", (usage.usage_id,)) == [(1,)]


async def test_a_restarted_actor_gets_what_the_dead_one_never_took(
    db: str, journal: Journal
) -> None:
    session = _session()
    holder = {"ref": PersistenceActor.start(db, journal)}
    client = PersistenceClient(lambda: holder["ref"])
    try:
        await client.write(session)
        await trio.to_thread.run_sync(partial(holder["ref"].stop, block=True))
        lost_in_flight = _usage(session)
        client.write_soon(lost_in_flight)
        retried = _usage(session)
        written = trio.Event()

        async def critical_write() -> None:
            await client.write(retried)  # waits, retrying, for the next incarnation
            written.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(critical_write)
            await trio.testing.wait_all_tasks_blocked()
            assert not written.is_set()  # no actor: the write is still waiting
            holder["ref"] = PersistenceActor.start(db, journal)  # what the supervisor does
        assert written.is_set()
    finally:
        await trio.to_thread.run_sync(partial(holder["ref"].stop, block=True))
    found = query(
        db,
        "select id from token_usage where id = any(%s)",
        ([lost_in_flight.usage_id, retried.usage_id],),
    )
    assert {row[0] for row in found} == {lost_in_flight.usage_id, retried.usage_id}


async def test_a_critical_write_with_no_actor_coming_back_fails_after_its_timeout(
    db: str, journal: Journal
) -> None:
    ref = PersistenceActor.start(db, journal)
    await trio.to_thread.run_sync(partial(ref.stop, block=True))
    client = PersistenceClient(lambda: ref, timeout=0.2)
    with pytest.raises(trio.TooSlowError):
        await client.write(_usage(_session()))


@dataclass
class _Held:
    """A client whose pulse runs, a session written, and ``token_usage`` locked by another
    connection: a usage write waits until ``blocker`` lets go (or its deadline)."""

    client: PersistenceClient
    session: SessionRow
    pulse: trio.CancelScope
    blocker: psycopg.Connection[Any]


@asynccontextmanager
async def _usage_held(
    db: str, journal: Journal, durability: Durability, write_timeout: float
) -> AsyncIterator[_Held]:
    config = PersistenceConfig(statement_timeout=60, breaker_reset=60)
    ref = PersistenceActor.start(db, journal, config=config)
    client = PersistenceClient(lambda: ref, durability=durability, timeout=write_timeout)
    try:
        async with trio.open_nursery() as nursery:

            async def run_pulse(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await client.pulse(0.05)

            pulse = await nursery.start(run_pulse)
            session = _session()
            await client.write_through(session)
            await trio.testing.wait_all_tasks_blocked()
            with psycopg.connect(db) as blocker:  # holds the lock until its transaction ends
                blocker.execute("lock table token_usage in access exclusive mode")
                yield _Held(client, session, pulse, blocker)
                blocker.rollback()
            await client.flush()
            pulse.cancel()
    finally:
        await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=30))


async def test_with_the_pulse_a_write_waiting_past_its_timeout_fails_and_the_rest_go_on(
    db: str, journal: Journal
) -> None:
    """The pulse's timekeeper keeps the deadlines of waiting writes (no cancel scope each):
    a write held up by a locked table fails with TooSlowError, while the 2,000 writes sent
    behind it (journal durability: they wait for no database) are answered, and forgotten
    although the held one is ahead of them; the held one lands once the table is free."""
    answered = 0
    async with _usage_held(db, journal, Durability.JOURNAL, write_timeout=2) as held:
        client, session = held.client, held.session
        usage = _usage(session)

        async def held_write() -> None:
            with pytest.raises(trio.TooSlowError):
                await client.write_through(usage)

        async def activity(n: int) -> None:
            nonlocal answered
            await client.write(
                SessionActivity(session_id=session.session_id, last_activity=NOW, tool_calls=n)
            )
            answered += 1

        async with trio.open_nursery() as writers:
            writers.start_soon(held_write)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as behind:
                for n in range(2000):
                    behind.start_soon(activity, n)
            # Answered and forgotten, the held one still ahead of them: what the timekeeper
            # holds is bounded by the writes waiting.
            assert len(client._deadlines) < 1024
    assert answered == 2000
    assert query(db, "select count(*) from token_usage where id = %s", (usage.usage_id,)) == [(1,)]


async def test_a_write_waiting_when_the_pulse_stops_still_fails_at_its_deadline(
    db: str, journal: Journal
) -> None:
    """A write kept by the pulse's timekeeper, still waiting when the pulse stops (a pulse
    that failed, a node stopping), is not left with no deadline: it fails with TooSlowError
    at its own (a shielded final write of an ending session would otherwise hold the node's
    shutdown for as long as the database does)."""
    timed_out = trio.Event()
    async with (
        _usage_held(db, journal, Durability.COMMIT, write_timeout=5) as held,
        trio.open_nursery() as nursery,
    ):

        async def held_write() -> None:
            with pytest.raises(trio.TooSlowError), trio.CancelScope(shield=True):
                await held.client.write_through(_usage(held.session))
            timed_out.set()

        nursery.start_soon(held_write)
        await trio.testing.wait_all_tasks_blocked()
        assert len(held.client._deadlines) == 1  # the timekeeper's to keep
        held.pulse.cancel()
        with trio.fail_after(60):  # a hang guard: its deadline is 5 s after its call
            await timed_out.wait()
        assert not held.client._deadlines


def test_an_answer_after_a_stopping_timekeeper_woke_its_write_is_its_answer() -> None:
    """The stopping timekeeper wakes a write it kept with a marker, so that the write waits on
    in a scope of its own; an answer that comes before it waits again replaces the marker
    (the write returns it), and a later one, or the timekeeper's, changes nothing."""
    waiter = _Waiter(Point.COMMITTED, 1.0)
    waiter.settle(_UNKEPT)
    assert waiter.done.is_set()
    waiter.settle(None)  # the database's answer, before the writer runs
    assert waiter.error is None
    waiter.settle(trio.TooSlowError())  # answered once
    assert waiter.error is None


async def test_writes_whose_callers_are_cancelled_are_forgotten_at_their_deadlines(
    db: str, journal: Journal
) -> None:
    """Callers gone (a client disconnects, a session is cancelled) while their writes wait
    on a locked table: each is cancelled at once, its waiter stays with the timekeeper (as
    with the actor) only until its deadline, where the timekeeper answers it with nobody
    waiting, harmlessly; the pulse runs on, and a write sent after them, answered at its own
    deadline, finds the timekeeper holding nothing."""
    cancelled = 0
    async with _usage_held(db, journal, Durability.COMMIT, write_timeout=3) as held:
        client = held.client

        async def caller() -> None:
            nonlocal cancelled
            try:
                await client.write_through(_usage(held.session))
            except trio.Cancelled:
                cancelled += 1
                raise

        async with trio.open_nursery() as callers:
            for _ in range(2000):
                callers.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            assert len(client._deadlines) == 2000
            callers.cancel_scope.cancel()
        assert cancelled == 2000
        with pytest.raises(trio.TooSlowError):
            await client.write_through(_usage(held.session))
        assert not client._deadlines
        assert client._database_waits == 0


async def test_the_pulse_heartbeats_this_node(db: str, journal: Journal) -> None:
    await trio.to_thread.run_sync(recover, db, journal)  # registers the node

    def heartbeat() -> datetime:
        [(at,)] = query(db, "select heartbeat_at from nodes where node_id = %s", (journal.node_id,))
        return at  # type: ignore[no-any-return]

    registered = heartbeat()
    config = PersistenceConfig(heartbeat_interval=0.01)
    async with running(db, journal, config) as (client, _), trio.open_nursery() as nursery:
        nursery.start_soon(client.pulse, 0.01)
        await wait_until(lambda: heartbeat() > registered, what="a heartbeat")
        nursery.cancel_scope.cancel()
