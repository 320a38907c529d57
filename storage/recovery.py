"""Start-up recovery: finish what dead processes left, before this one accepts sessions.

Run once per process, after the migrations and before the persistence actor starts and the
listener opens (blocking: from trio, in a worker thread):

1. **Replay** the journals of dead processes found in this state dir (see
   :func:`storage.journal.find_orphans`: a journal whose lock is free belongs to a dead
   process), oldest first, in order. Idempotent writes make a record that did reach the
   database before the crash harmless. Each replayed file is then deleted.
2. **Interrupt** the unfinished work of dead nodes: their ``pending`` and ``running`` tasks
   become ``interrupted`` (version bumped) and their ``active`` sessions ``interrupted``.
   ``interrupted`` is a guess: a final step from that node arriving later (its journal
   replayed elsewhere, or the node back from an outage) replaces it (``storage.writes``).
3. **Register** this node with a fresh heartbeat.

Which nodes are dead. Several nodes may share one database (Supabase), so "not me" is not
"dead". A node is dead when it is proven so or when it stopped proving it is alive:

* the writer of an orphan journal in *this* state dir: the kernel released its lock, so it
  exited (proof);
* a node whose ``nodes.heartbeat_at`` is older than ``node_ttl`` (the node timeout, see
  :mod:`storage.membership`, whose sweep also does this periodically while nodes run) by
  the database's clock and that never recorded a clean stop (evidence: a node cut off from
  the database for longer than ``node_ttl`` looks dead too; when it returns, the final
  steps of the tasks recovery interrupted replace ``interrupted``: the node that ran a call
  knows how it ended, recovery only guessed. Its late ``running`` steps change nothing).

Steps 2 and 3 are one transaction; step 1 commits as it goes, so a failure midway leaves the
rest of the journal to the next start.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg
import structlog
from pydantic import BaseModel

from storage.connection import Connector
from storage.journal import Journal, OrphanJournal, find_orphans, set_aside
from storage.membership import NODE_TIMEOUT, interrupt_work
from storage.writes import write_batch

#: Seconds without a heartbeat after which a node that recorded no clean stop is dead: the
#: node timeout's default (storage.membership, one definition; the node passes its setting).
NODE_TTL = NODE_TIMEOUT

log = structlog.get_logger("storage.recovery")


class RecoveryReport(BaseModel):
    node_id: str
    journals: list[str]
    replayed_records: int
    conflicts: int
    rejected: int
    dead_nodes: list[str]
    interrupted_tasks: int
    interrupted_sessions: int


def recover(
    database_url: str,
    journal: Journal,
    *,
    node_ttl: float = NODE_TTL,
    replay_chunk: int = 2000,
    statement_timeout: float = 60.0,
) -> RecoveryReport:
    """Replay dead processes' journals and interrupt dead nodes' work; register this node."""
    orphans = find_orphans(journal.directory, exclude=journal.paths)
    connector = Connector(database_url)
    try:
        conn = connector.connection()
        replayed = conflicts = rejected = 0
        for orphan in orphans:
            counts = _replay(conn, orphan, replay_chunk, statement_timeout)
            replayed, conflicts, rejected = (
                replayed + counts[0],
                conflicts + counts[1],
                rejected + counts[2],
            )
            orphan.remove()
            log.info("recovery.journal_replayed", file=orphan.path.name, records=counts[0])
        proven = [o.node_id for o in orphans if o.node_id is not None]
        with conn.transaction():
            dead, tasks, sessions = _interrupt_dead(conn, journal.node_id, proven, node_ttl)
            _register(conn, journal.node_id)
    finally:
        for orphan in orphans:
            orphan.release()
        connector.close()
    report = RecoveryReport(
        node_id=journal.node_id,
        journals=[o.path.name for o in orphans],
        replayed_records=replayed,
        conflicts=conflicts,
        rejected=rejected,
        dead_nodes=dead,
        interrupted_tasks=tasks,
        interrupted_sessions=sessions,
    )
    log.info("recovery.done", **report.model_dump())
    return report


def _replay(
    conn: psycopg.Connection[Any], orphan: OrphanJournal, chunk: int, statement_timeout: float
) -> tuple[int, int, int]:
    replayed = conflicts = rejected = 0
    for records in orphan.chunks(chunk):
        result = write_batch(conn, records, replay=True, statement_timeout=statement_timeout)
        for index, conflict in result.conflicts.items():
            log.warning("recovery.conflict", kind=records[index].kind, error=str(conflict))
        set_aside(
            orphan.path.parent,
            [(records[i], error) for i, error in result.rejected.items()],
            node_id=orphan.node_id,
        )
        replayed += len(records)
        conflicts += len(result.conflicts)
        rejected += len(result.rejected)
    return replayed, conflicts, rejected


def _interrupt_dead(
    conn: psycopg.Connection[Any], me: str, proven: list[str], node_ttl: float
) -> tuple[list[str], int, int]:
    expired = [
        row[0]
        for row in conn.execute(
            """
            select node_id from nodes
             where stopped_at is null and node_id <> %s
               and heartbeat_at < now() - make_interval(secs => %s)
            """,
            (me, node_ttl),
        ).fetchall()
    ]
    dead = sorted(set(proven) | set(expired))
    tasks = sessions = 0
    for node_id in dead:
        # Unbounded: start-up recovery runs before this node takes any work. The periodic
        # sweep (storage.membership.sweep) is the bounded one; both mark rows the same way.
        marked_tasks, marked_sessions, _ = interrupt_work(conn, node_id, limit=None)
        tasks += marked_tasks
        sessions += marked_sessions
        conn.execute(
            """
            update nodes
               set stopped_at = now(), swept_at = now(), swept_by = %s,
                   swept_tasks = swept_tasks + %s, swept_sessions = swept_sessions + %s
             where node_id = %s and stopped_at is null
            """,
            (me, marked_tasks, marked_sessions, node_id),
        )
    if tasks or sessions:
        log.warning("recovery.interrupted", nodes=dead, tasks=tasks, sessions=sessions)
    return dead, tasks, sessions


def _register(conn: psycopg.Connection[Any], node_id: str) -> None:
    conn.execute(
        """
        insert into nodes (node_id, hostname, pid) values (%s, %s, %s)
        on conflict (node_id) do update set heartbeat_at = now(), stopped_at = null
        """,
        (node_id, socket.gethostname(), os.getpid()),
    )
