"""What each write waits for, per durability setting, against a real Postgres reached through
a loopback proxy that can hold everything (a black hole) or add a round trip; and a call's
intent recorded before its tool runs. The SIGKILL tests per mode are in
``test_durability_modes.py``; these pin the points one by one.

A database that receives nothing (the proxy's black hole) is what makes "the answer did not
wait for the database" deterministic: the row cannot be there when the write returns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pykka
import pytest
import trio
from pydantic import BaseModel

from actors.persistence import PersistenceActor, PersistenceClient, StorageUnavailable
from actors.persistence.protocol import PersistenceConfig
from actors.session.memory import memory_session
from runtime.mcp.schema import ToolAnnotations
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from storage.durability import Durability
from storage.journal import Journal
from storage.rows import SessionRow
from tests.harness import call, query, wait_until
from tests.memory_support import migrated_database, session_services
from tests.tcp_proxy import TcpProxy, libpq_target, libpq_via

UNREACHABLE = "postgresql://postgres@/postgres?host=/nonexistent-exai-socket-dir"


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with migrated_database(database_url) as url:
        yield url


@asynccontextmanager
async def proxied(db: str, *, delay: float = 0.0) -> AsyncIterator[tuple[TcpProxy, str]]:
    port, unix = libpq_target(db)
    proxy = TcpProxy(port, target_unix=unix, delay=delay)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy, libpq_via(db, proxy.port)
        proxy.close()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def persistence(
    url: str, tmp_path: Path, durability: Durability, config: PersistenceConfig | None = None
) -> AsyncIterator[PersistenceClient]:
    # No fsync but the ones a writer asks for: what is synced is what the test says.
    journal = Journal.open(
        tmp_path / f"journal-{uuid.uuid4().hex[:6]}", node_id="points", fsync_interval=3600
    )
    ref: pykka.ActorRef[Any] = PersistenceActor.start(url, journal, config=config)
    try:
        yield PersistenceClient.for_ref(ref, durability=durability, timeout=60)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=60))
        journal.close()


def _session() -> SessionRow:
    return SessionRow(
        session_id=f"s-{uuid.uuid4().hex}", created_at=datetime.now(UTC), node_id="points"
    )


def _present(db: str, session: SessionRow) -> bool:
    return bool(query(db, "select 1 from sessions where session_id = %s", (session.session_id,)))


async def _warm(client: PersistenceClient) -> None:
    """One record through, so that the writer's connection (through the proxy) is open."""
    await client.write_through(_session())


async def test_journal_answers_at_the_fsync_without_waiting_for_the_database(
    db: str, tmp_path: Path
) -> None:
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, Durability.JOURNAL) as c:
        await _warm(c)
        proxy.black_hole()  # from now on the database receives nothing
        before = datetime.now(UTC)
        session = _session()
        await c.write(session)
        assert not _present(db, session), "journal durability waited for the database"
        status = await c.status()
        assert status.synced == status.appended > status.committed
        assert status.confirmed_at is not None
        assert status.confirmed_at >= before
        proxy.cut()  # the writer's connection breaks; its next one gets through
        await wait_until(lambda: _present(db, session), what="the journaled row lands")


async def test_a_read_only_intent_is_written_not_fsynced(db: str, tmp_path: Path) -> None:
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, Durability.JOURNAL) as c:
        await _warm(c)
        proxy.black_hole()
        await c.write(_session(), fsync=False)
        status = await c.status()
        assert status.appended > status.synced, "an fsync=False write was fsynced"
        await c.write(_session())
        status = await c.status()
        assert status.synced == status.appended
        proxy.cut()


@pytest.mark.parametrize("durability", [Durability.COMMIT, Durability.JOURNAL])
async def test_commit_and_write_through_return_with_the_row_in_the_database(
    db: str, tmp_path: Path, durability: Durability
) -> None:
    """``commit``'s write, and in any mode ``write_through`` and ``write_committed``, return
    only once the database has the record: checked at once, behind a 20 ms round trip."""
    async with (
        proxied(db, delay=0.010) as (_, url),
        persistence(url, tmp_path, durability) as c,
    ):
        for write in (c.write_through, c.write_committed) + (
            (c.write,) if durability is Durability.COMMIT else ()
        ):
            session = _session()
            await write(session)
            assert await trio.to_thread.run_sync(_present, db, session), write.__name__


async def test_write_through_is_refused_at_once_while_the_database_is_down(
    tmp_path: Path,
) -> None:
    config = PersistenceConfig(connect_timeout=2, breaker_reset=60)
    async with persistence(UNREACHABLE, tmp_path, Durability.JOURNAL, config) as c:
        await c.write(_session())  # journaled; the writer finds the database down
        await wait_until_down(c)
        appended = (await c.status()).appended
        with pytest.raises(StorageUnavailable, match="nothing was written"):
            await c.write_through(_session())
        assert (await c.status()).appended == appended
        # A commit falls back to the journal's fsync while the database is down.
        await c.write_committed(_session())
        status = await c.status()
        assert status.synced == status.appended > appended


async def wait_until_down(client: PersistenceClient) -> None:
    while (await client.status()).database == "up":
        await client.flush(force=True)


async def test_async_writes_wait_for_the_journal_write_only(db: str, tmp_path: Path) -> None:
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, Durability.ASYNC) as c:
        await _warm(c)
        proxy.black_hole()
        session = _session()
        await c.write(session)
        status = await c.status()
        assert status.appended > status.committed
        assert not _present(db, session)
        proxy.cut()
        await c.flush(force=True)
        assert _present(db, session)


# --- a call's intent, before its tool runs --------------------------------------------------


class _NoArgs(BaseModel):
    pass


class LooksForItsIntent(Tool[_NoArgs]):
    """While it runs, reports where its own ``running`` record is: in the database, in the
    journal, fsynced or not. What a tool with an effect needs to be true before it acts."""

    name = "looks"
    description = "Test only: where is my intent?"
    Args = _NoArgs

    def __init__(self, db: str, client: PersistenceClient) -> None:
        self._db = db
        self._client = client

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        rows = await trio.to_thread.run_sync(
            partial(
                query,
                self._db,
                "select status from tasks where session_id = %s and request_id = %s",
                (ctx.session_id, json.dumps(ctx.request_id)),
            )
        )
        status = await self._client.status()
        found = {
            "database": rows[0][0] if rows else None,
            "synced": status.synced == status.appended,
            "journal": _journaled_running(Path(status.journal_file).parent, ctx),
        }
        return ToolOutput(text=json.dumps(found))


class LooksReadOnly(LooksForItsIntent):
    name = "looks_read_only"
    annotations = ToolAnnotations(read_only_hint=True)


def _journaled_running(directory: Path, ctx: ToolContext) -> bool:
    """The journal holds this call's creation and its ``task_started``."""
    lines = [json.loads(line) for p in directory.glob("journal-*.jsonl") for line in p.open()]
    task_ids = {
        line["task_id"]
        for line in lines
        if line.get("kind") == "task_created"
        and line["session_id"] == ctx.session_id
        and line["request_id"] == json.dumps(ctx.request_id)
    }
    return any(line.get("kind") == "task_started" and line["task_id"] in task_ids for line in lines)


@pytest.mark.parametrize(
    ("durability", "tool", "expected"),
    [
        # commit: the row is running in the database before the tool runs.
        (Durability.COMMIT, "looks", {"database": "running"}),
        # journal: in the journal, fsynced. A read-only tool's intent is not waited for: it
        # rides with the final state (test_a_read_only_calls_intent_rides_with_its_answer).
        (Durability.JOURNAL, "looks", {"journal": True, "synced": True}),
    ],
)
async def test_a_calls_intent_is_recorded_before_its_tool_runs(
    db: str, tmp_path: Path, durability: Durability, tool: str, expected: dict[str, Any]
) -> None:
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, durability) as c:
        await _warm(c)
        if durability is Durability.JOURNAL:
            proxy.black_hole()  # nothing reaches the database: only the journal can hold it
        tools = [LooksForItsIntent(db, c), LooksReadOnly(db, c)]
        services = session_services(c, tools, node_id="points")
        async with memory_session(services) as session:
            await session.client.request(
                "init",
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "points", "version": "1"},
                },
            )
            await session.client.send(call("c1", tool))
            delivery, _ = await session.client.response("c1")
            found = json.loads(delivery.message["result"]["content"][0]["text"])
            assert {key: found[key] for key in expected} == expected, found
        proxy.cut()


class JournalAtOnce(Tool[_NoArgs]):
    """Read-only; reports, without yielding to the loop, whether its intent is in the journal
    yet. Optionally stops the persistence actor before it returns."""

    name = "journal_at_once"
    description = "Test only: is my intent journaled before I run?"
    Args = _NoArgs
    annotations = ToolAnnotations(read_only_hint=True)

    def __init__(self, journal_dir: Path, stop: pykka.ActorRef[Any] | None = None) -> None:
        self._journal_dir = journal_dir
        self._stop = stop

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        journaled = _journaled_running(self._journal_dir, ctx)
        if self._stop is not None:
            await trio.to_thread.run_sync(partial(self._stop.stop, block=True, timeout=60))
        return ToolOutput(text=json.dumps({"journal": journaled}))


async def _initialized(session: Any) -> None:
    await session.client.request(
        "init",
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "points", "version": "1"},
        },
    )


def _task_kinds(directory: Path, session_id: str) -> list[str]:
    """The kinds of the task records of one session's calls, in journal order."""
    lines = [
        json.loads(line) for p in sorted(directory.glob("journal-*.jsonl")) for line in p.open()
    ]
    tasks = {
        line["task_id"]
        for line in lines
        if line.get("kind") == "task_created" and line["session_id"] == session_id
    }
    return [line["kind"] for line in lines if line.get("task_id") in tasks]


async def test_a_read_only_calls_intent_rides_with_its_answer(db: str, tmp_path: Path) -> None:
    """With ``journal`` durability a read-only tool runs without waiting for its intent (it
    had no effect for the intent to account for; issue 17: one persistence round trip fewer
    per call), and its call still leaves the whole row, intent before final state, fsynced
    before the answer."""
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, Durability.JOURNAL) as c:
        await _warm(c)
        proxy.black_hole()  # only the journal holds anything
        journal_dir = Path((await c.status()).journal_file).parent
        services = session_services(c, [JournalAtOnce(journal_dir)], node_id="points")
        async with memory_session(services) as session:
            await _initialized(session)
            await session.client.send(call("c1", "journal_at_once"))
            delivery, _ = await session.client.response("c1")
            found = json.loads(delivery.message["result"]["content"][0]["text"])
            assert found == {"journal": False}, "the read-only call waited for its intent"
            status = await c.status()
            assert status.synced == status.appended, "answered before the final state's fsync"
            session_id = session.state.session_id
        assert _task_kinds(journal_dir, session_id) == [
            "task_created",
            "task_started",
            "task_finished",
        ]
        proxy.cut()


async def test_a_read_only_call_whose_records_cannot_be_confirmed_is_refused(
    db: str, tmp_path: Path
) -> None:
    """Its intent was not waited for, so if its final state cannot be written either, nothing
    is known to record the call: the answer is withheld (-32004), never sent unrecorded. The
    tool stops the persistence actor; a successor takes the session's later writes."""
    actors: list[pykka.ActorRef[Any]] = []
    journals: list[Journal] = []

    def start(name: str) -> pykka.ActorRef[Any]:
        journals.append(Journal.open(tmp_path / name, node_id="points", fsync_interval=3600))
        actors.append(PersistenceActor.start(db, journals[-1]))
        return actors[-1]

    first = start("journal")
    # A short timeout: a write whose actor is gone waits that long for a successor.
    c = PersistenceClient(lambda: actors[-1], durability=Durability.JOURNAL, timeout=1.0)
    try:
        await _warm(c)
        tool = JournalAtOnce(tmp_path / "journal", stop=first)  # gone when the tool returns
        services = session_services(c, [tool], node_id="points")
        async with memory_session(services) as session:
            await _initialized(session)
            await session.client.send(call("c1", "journal_at_once"))
            delivery, _ = await session.client.response("c1")
            error = delivery.message.get("error")
            assert error is not None, delivery.message
            assert error["code"] == -32004, delivery.message
            assert "could not be recorded" in error["message"]
            start("successor")  # the session's end is written by it
    finally:
        with trio.CancelScope(shield=True):
            for ref in actors:
                await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=60))
        for journal in journals:
            journal.close()


async def test_every_client_hears_the_database_writer(db: str, tmp_path: Path) -> None:
    """Two clients of one actor (a node has one; tools and tests may add more): each
    client's write to the database is answered by the writer's report, not only the last
    client's to have shipped something."""
    async with proxied(db) as (proxy, url):
        journal = Journal.open(tmp_path / "journal", node_id="points", fsync_interval=3600)
        ref: pykka.ActorRef[Any] = PersistenceActor.start(url, journal)
        first, second = (
            PersistenceClient.for_ref(ref, durability=Durability.COMMIT, timeout=60)
            for _ in range(2)
        )
        try:
            await _warm(first)
            proxy.black_hole()  # neither write can be answered until the cut
            sessions = [_session(), _session()]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.write_through, sessions[0])
                nursery.start_soon(second.write_through, sessions[1])
                await wait_until_appended(first, 2)
                proxy.cut()
            assert all(_present(db, session) for session in sessions)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=60))
            journal.close()


async def wait_until_appended(client: PersistenceClient, records: int) -> None:
    """Until the journal holds ``records`` more than the database (both writes appended)."""
    # No event says "appended" to a test from outside: poll the status (a condition).
    while True:
        if (await client.status()).journal_pending_records >= records:
            return
        await trio.sleep(0.01)


async def test_a_call_whose_intent_cannot_be_recorded_is_refused_and_the_session_lives(
    db: str, tmp_path: Path
) -> None:
    """A call whose intent cannot be recorded in time is refused with -32004 and its tool
    never runs; the session goes on (found in review: the session crashed, -32001)."""
    async with proxied(db) as (proxy, url), persistence(url, tmp_path, Durability.COMMIT) as c:
        await _warm(c)
        # The client's timeout bounds the intent's wait: a short one for the test.
        short = PersistenceClient(c.ref, durability=Durability.COMMIT, timeout=2.0)
        looks = LooksForItsIntent(db, short)
        services = session_services(short, [looks], node_id="points")
        async with memory_session(services) as session:
            await session.client.request(
                "init",
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "points", "version": "1"},
                },
            )
            proxy.black_hole()  # the intent's commit cannot be answered
            await session.client.send(call("c1", "looks"))
            delivery, _ = await session.client.response("c1")
            error = delivery.message.get("error")
            assert error is not None, delivery.message
            assert error["code"] == -32004, delivery.message
            assert "nothing was done" in error["message"]
            proxy.cut()
            reply = await session.client.request("after", "tools/list", {})
            assert [tool["name"] for tool in reply["result"]["tools"]] == ["looks"]


async def test_a_database_that_stops_answering_is_cut_off(db: str, tmp_path: Path) -> None:
    """A database that stops answering without closing the connection (a black hole:
    keepalives answered, ``statement_timeout`` never reaching the server) cannot hold the
    writer: past ``write_deadline`` its connection is cut, the breaker opens, a commit falls
    back to the journal's fsync, and the actor stops (found in review: SIGTERM hung)."""
    config = PersistenceConfig(write_deadline=0.5, breaker_reset=60)
    async with proxied(db) as (proxy, url):
        journal = Journal.open(tmp_path / "journal", node_id="points")
        ref: pykka.ActorRef[Any] = PersistenceActor.start(url, journal, config=config)
        client = PersistenceClient.for_ref(ref, durability=Durability.COMMIT, timeout=60)
        try:
            await _warm(client)
            proxy.black_hole()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.pulse, 0.1)  # its tick is what cuts the write
                await client.write(_session())
                nursery.cancel_scope.cancel()
            status = await client.status()
            assert status.database == "down"
            assert status.synced == status.appended > status.committed
        finally:
            # Stopping does not wait for the black hole either (no cut() first).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=60))
            journal.close()
            proxy.cut()
