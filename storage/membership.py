"""Membership of the nodes sharing one database: who is alive, who is dead, and the sweep.

One row per node in ``nodes`` (db/migrations/20261124000300_nodes.sql, ..._node_membership.sql).
A node registers at start-up (:mod:`storage.recovery`) and its persistence actor stamps
``heartbeat_at`` with the *database's* clock every ``node_heartbeat_interval`` seconds, with a
small :class:`NodeSnapshot` of itself; a clean stop sets ``stopped_at``.

**Alive, dead, stopped.** One definition, here, used by everything that asks (the sweep,
start-up recovery, the shared rate limits' count of live nodes, ``exai status --cluster``):

* *stopped*: ``stopped_at`` set by the node itself (it said goodbye): later than any sweep;
* *dead*: never stopped and silent for longer than ``node_timeout`` by the database's clock
  (:data:`LIVE`'s negation), or swept (``stopped_at`` stamped by the sweep, no later than
  ``swept_at``);
* *alive*: the rest.

**A dead node that comes back** (it was paused, SIGSTOP/SIGCONT, or cut off from the database
past the timeout) rejoins with its next heartbeat: the node's own writer clears the
``stopped_at`` the sweep stamped (:func:`storage.writes.write_batch`'s ``node_id``) and logs
``membership.rejoined``; ``swept_*`` stay as the record. What the sweep marked stays
``interrupted`` until the node's own final state for it supersedes it.

**The sweep** (:func:`sweep`), run periodically by every node (``actors/membership.py``): in one
transaction, lock the rows of dead nodes nobody else is sweeping (``for update skip
locked``), mark their ``pending``/``running`` tasks and ``active`` sessions ``interrupted``
with ``update ... where status in (...)`` (so a row is marked, and counted, once: a second
sweeper waits for the row lock, then finds its status changed), and, once nothing is left,
mark the node stopped with ``swept_at``/``swept_by``. Each pass touches at most ``limit``
rows, so a dead node with a million tasks takes several passes (by whichever nodes) and
stalls none. ``interrupted`` is a guess: a final state written later by the node that ran the
task (its journal replayed) replaces it (:mod:`storage.writes`).

Every function blocks: call it from trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Defaults of the node settings (runtime/config.py), in seconds. The timeout is half the
#: default ``resume_grace`` (60 s): a dead node's sessions are marked interrupted while a
#: client could still be told to give up on resuming them.
HEARTBEAT_INTERVAL = 5.0
NODE_TIMEOUT = 30.0
SWEEP_INTERVAL = 10.0
#: Rows (tasks + sessions) one sweep pass marks, at most.
SWEEP_LIMIT = 1000

#: The live-node predicate, on a row of ``nodes``; its one parameter is the timeout (s).
LIVE = "stopped_at is null and heartbeat_at >= now() - make_interval(secs => %s)"
#: How many nodes are alive (one parameter: the timeout).
LIVE_NODES_SQL = f"select count(*) from nodes where {LIVE}"

NodeState = Literal["alive", "dead", "stopped"]


#: Providers one node's snapshot lists at most (they come from its configuration).
SNAPSHOT_PROVIDERS_MAX = 64
LimitsMode = Literal["shared", "local_share", "off"]


class ProviderUsage(BaseModel):
    """One upstream's limits as one node uses them (its rate limiter's view)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(max_length=256)
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    in_flight: int = Field(ge=0, description="This node's calls to it in flight.")
    waiting: int = Field(ge=0, description="This node's calls waiting for its limits.")
    requests_available: float | None = Field(
        default=None, description="This node's own bucket now (None: unlimited)."
    )
    tokens_available: float | None = None


class NodeLimits(BaseModel):
    """How a node enforces the limits: ``shared`` (the database's buckets and quotas),
    ``local_share`` (the database did not answer: ``1 / live_nodes`` of each limit, and of
    each quota's remainder) or ``off`` (``EXAI_SHARED_LIMITS=false``: every node alone)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    mode: LimitsMode
    live_nodes: int = Field(ge=1, description="Live nodes as last read: the share's divisor.")
    providers: list[ProviderUsage] = Field(max_length=SNAPSHOT_PROVIDERS_MAX)
    providers_omitted: int = Field(default=0, ge=0, description="Past the bound, not listed.")


class NodeSnapshot(BaseModel):
    """What a node publishes with each heartbeat (``nodes.snapshot``): cheap, local counts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sessions: int = Field(ge=0, description="Sessions attached.")
    sessions_detached: int = Field(default=0, ge=0, description="Sessions parked for resume.")
    calls_in_flight: int = Field(ge=0, description="Tool calls running, all sessions.")
    storage_available: bool = Field(description="Its storage takes new work.")
    draining: bool = Field(description="It was asked to stop and is draining its sessions.")
    health: Literal["ok", "draining", "degraded"] = Field(
        description="ok; draining (stopping); degraded (storage refuses new work)."
    )
    limits: NodeLimits | None = Field(
        default=None, description="Its rate limiter's view; None: not known (yet)."
    )


class ClusterNode(BaseModel):
    """One row of ``nodes``, as ``exai status --cluster`` shows it."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_age_s: float = Field(description="Seconds since its heartbeat, database clock.")
    state: NodeState
    stopped_at: datetime | None
    swept_at: datetime | None
    swept_by: str | None = Field(description="The node that interrupted its work, if any.")
    swept_tasks: int
    swept_sessions: int
    snapshot: NodeSnapshot | None = Field(description="Published with its last heartbeat.")


class SweepReport(BaseModel):
    """One pass: rows marked ``interrupted`` now, nodes finished (marked swept) now, and
    whether the row budget ran out (work left for the next pass)."""

    swept_nodes: list[str]
    tasks: int
    sessions: int
    more: bool


def sweep(
    conn: psycopg.Connection[Any],
    me: str,
    *,
    node_timeout: float,
    limit: int = SWEEP_LIMIT,
    statement_timeout: float = 10.0,
) -> SweepReport:
    """One bounded pass over the dead nodes (see the module doc); ``conn`` in autocommit.

    Raises ``psycopg.Error`` (the transaction is rolled back: nothing marked)."""
    swept: list[str] = []
    tasks = sessions = 0
    more = False
    with conn.transaction():
        conn.execute(
            "select set_config('statement_timeout', %s, true)",
            (str(max(1, round(statement_timeout * 1000))),),
        )
        dead = conn.execute(
            f"""
            select node_id from nodes
             where node_id <> %s and not ({LIVE}) and stopped_at is null
             order by heartbeat_at
             limit %s
               for update skip locked
            """,
            (me, node_timeout, limit),
        ).fetchall()
        budget = limit
        for (node_id,) in dead:
            marked_tasks, marked_sessions, done = interrupt_work(conn, node_id, limit=budget)
            budget -= marked_tasks + marked_sessions
            tasks += marked_tasks
            sessions += marked_sessions
            conn.execute(
                """
                update nodes
                   set swept_by = %s, swept_at = now(),
                       swept_tasks = swept_tasks + %s, swept_sessions = swept_sessions + %s,
                       stopped_at = case when %s then now() end
                 where node_id = %s
                """,
                (me, marked_tasks, marked_sessions, done, node_id),
            )
            if done:
                swept.append(node_id)
            if not done or budget <= 0:
                more = True
                break
    return SweepReport(swept_nodes=swept, tasks=tasks, sessions=sessions, more=more)


def interrupt_work(
    conn: psycopg.Connection[Any], node_id: str, *, limit: int | None
) -> tuple[int, int, bool]:
    """Mark up to ``limit`` (None: all) of ``node_id``'s ``pending``/``running`` tasks, then
    its ``active`` sessions, ``interrupted`` (version bumped); in the caller's transaction.

    Returns (tasks marked, sessions marked, whether none is left). A row is marked once:
    the outer ``where status in (...)`` is re-checked on the row's latest version after its
    lock, so a concurrent sweeper (or the node's own late final state) wins cleanly."""
    cap = "all" if limit is None else str(int(limit))
    tasks = conn.execute(
        f"""
        update tasks
           set status = 'interrupted', version = version + 1,
               completed_at = coalesce(completed_at, now()), updated_at = now(),
               error_message = 'interrupted: node ' || node_id
                               || ' stopped before the task finished'
         where id in (select id from tasks
                       where node_id = %s and status in ('pending', 'running')
                       limit {cap})
           and status in ('pending', 'running')
        """,
        (node_id,),
    ).rowcount
    left = None if limit is None else limit - tasks
    if left is not None and left <= 0:
        return tasks, 0, False
    cap = "all" if left is None else str(int(left))
    sessions = conn.execute(
        f"""
        update sessions
           set status = 'interrupted', closed_at = coalesce(closed_at, now()),
               version = version + 1
         where session_id in (select session_id from sessions
                               where node_id = %s and status = 'active'
                               limit {cap})
           and status = 'active'
        """,
        (node_id,),
    ).rowcount
    done = left is None or sessions < left
    return tasks, sessions, done


#: Nodes ``status --cluster`` shows at most, the newest.
CLUSTER_NODES_MAX = 1000
#: What one row may bring into ``status --cluster``: text columns clipped to this many
#: characters, a snapshot larger than this many bytes as JSON text read as none. A node writes
#: far less; the bounds hold against a row written by hand, 1,000 of which are
#: read at once.
TEXT_MAX = 256
SNAPSHOT_BYTES_MAX = 16_384


def cluster_nodes(
    conn: psycopg.Connection[Any], *, node_timeout: float, recent: float = 86_400.0
) -> list[ClusterNode]:
    """Every node heard from within ``recent`` seconds (and every node still taken for
    running), oldest start first, with its state by the database's clock: at most the
    :data:`CLUSTER_NODES_MAX` started last (a crash loop registers a node per restart)."""
    rows = conn.execute(
        f"""
        select left(node_id, {TEXT_MAX}), left(hostname, {TEXT_MAX}), pid, started_at,
               extract(epoch from now() - heartbeat_at)::float8,
               case when stopped_at is not null and stopped_at <= swept_at then 'dead'
                    when stopped_at is not null then 'stopped'
                    when {LIVE} then 'alive'
                    else 'dead' end,
               stopped_at, swept_at, left(swept_by, {TEXT_MAX}), swept_tasks, swept_sessions,
               case when octet_length(snapshot::text) <= {SNAPSHOT_BYTES_MAX} then snapshot end
          from nodes
         where stopped_at is null or heartbeat_at >= now() - make_interval(secs => %s)
         order by started_at desc, node_id desc
         limit %s
        """,
        (node_timeout, recent, CLUSTER_NODES_MAX),
    ).fetchall()
    rows.reverse()
    return [
        ClusterNode(
            node_id=r[0],
            hostname=r[1],
            pid=r[2],
            started_at=r[3],
            heartbeat_age_s=round(max(0.0, r[4]), 3),
            state=r[5],
            stopped_at=r[6],
            swept_at=r[7],
            swept_by=r[8],
            swept_tasks=r[9],
            swept_sessions=r[10],
            snapshot=_snapshot(r[11]),
        )
        for r in rows
    ]


def _snapshot(value: object) -> NodeSnapshot | None:
    """A row's snapshot, or None if it has none or none this code can read (a node of
    another version, or a row written by hand): one odd row must not hide the cluster."""
    if value is None:
        return None
    try:
        return NodeSnapshot.model_validate(value)
    except ValidationError:
        return None
