"""Real parts for in-memory session tests: a migrated database, a persistence actor on it,
and the services a session runs with. No socket; nothing mocked (the database is the test
Postgres, the persistence actor the real one)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pykka
import trio

from actors.persistence import PersistenceActor, PersistenceClient
from actors.session import SessionConfig, SessionServices
from runtime.mcp.tools import Tool, ToolRegistry
from storage.journal import Journal
from storage.migrations import apply_migrations
from tests.harness import fresh_database


@contextmanager
def migrated_database(database_url: str) -> Iterator[str]:
    """A fresh database on the test server, migrated; dropped afterwards."""
    with fresh_database(database_url) as url:
        apply_migrations(url)
        yield url


@asynccontextmanager
async def running_persistence(db: str, journal_dir: Path) -> AsyncIterator[PersistenceClient]:
    """A persistence actor on ``db`` with its journal in ``journal_dir``; stopped behind
    every write sent to it when the block ends."""
    journal = Journal.open(journal_dir, node_id=f"mem-{uuid.uuid4().hex[:8]}")
    ref: pykka.ActorRef[Any] = PersistenceActor.start(db, journal)
    try:
        yield PersistenceClient.for_ref(ref)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=30))
        journal.close()


def session_services(
    persistence: PersistenceClient,
    tools: Sequence[Tool[Any]],
    *,
    node_id: str,
    max_inflight: int = 4,
    test_faults: bool = False,
    page_size: int = 50,
) -> SessionServices:
    """What a node gives each session, small enough for tests to reach every bound."""
    return SessionServices(
        tools=ToolRegistry(list(tools)),
        persistence=persistence,
        config=SessionConfig(
            max_inflight=max_inflight,
            test_faults=test_faults,
            node_id=node_id,
            total_slots=trio.CapacityLimiter(16),
            page_size=page_size,
        ),
        mailbox_capacity=8,
        max_message_bytes=64 * 1024,
        max_restarts=3,
        restart_period=60,
    )
