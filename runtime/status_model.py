"""The shape of ``exai status --json`` and ``GET /status``: stable and documented.

Scripts parse this, so it changes only by adding fields (``schema_version`` goes up when a
field changes meaning or goes away). Every field is described here and in
``docs/operations.md``. Ages are in seconds *as of the snapshot* (``uptime_s``,
``last_activity_s``), never monotonic clock values, which mean nothing outside the process.

The node fills it in through a :class:`StatusSource` (``actors/status.py``); the admin
interface (``runtime/admin.py``) serves it and renders it as Prometheus metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Literal, Protocol, TypeAlias, assert_never

from pydantic import BaseModel, ConfigDict, Field

from storage.breaker import BreakerState
from storage.membership import ClusterNode, LimitsMode
from storage.rows import SessionTransport
from storage.shared_limits import ClusterLimitsView

SCHEMA_VERSION = 1

ActorKind = Literal["node", "supervisor", "session", "pykka", "task"]
#: ``down``: a proxied MCP server past its restart intensity, tried again later (docs/tools.md).
ActorState = Literal[
    "starting", "running", "stopping", "restarting", "stopped", "detached", "dead", "down"
]
#: How a session's client reaches it: ``websocket`` (``exai bridge`` included: it relays stdio
#: over WebSocket, and the server cannot tell it from any other WebSocket client), ``http``
#: (Streamable HTTP, a 2025-era ``Mcp-Session-Id`` session), ``http-sessionless`` (Streamable
#: HTTP, 2026-07-28: one session per client identity), ``memory`` (in-process, no socket).


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeInfo(_Model):
    node_id: str = Field(description="host:pid:random, as in the nodes table.")
    hostname: str
    pid: int
    version: str = Field(description="exai-runtime version.")
    url: str | None = Field(description="The MCP endpoint, ws://HOST:PORT/mcp.")
    http_url: str | None = Field(
        default=None,
        description="The Streamable HTTP endpoint on the same port, http://HOST:PORT/mcp "
        "(None: not listening, or a server from before this field).",
    )
    started_at: datetime = Field(description="Wall-clock start time, UTC.")
    uptime_s: float
    protocol_versions: list[str]
    sessions_live: int = Field(description="Sessions with a connected socket.")
    sessions_detached: int = Field(description="Sessions parked for resume.")
    sessions_max: int
    tool_calls_in_flight: int = Field(description="Running tool calls, all sessions.")
    tool_calls_max: int | None
    mailbox_bytes: int = Field(
        default=0, description="Bytes of requests waiting in every session's mailbox."
    )
    mailbox_bytes_max: int | None = Field(default=None, description="Their node-wide bound.")
    outgoing_bytes: int = Field(
        default=0, description="Bytes queued for every session's peer, not yet taken."
    )
    outgoing_bytes_max: int | None = Field(default=None, description="Their node-wide bound.")
    log_lines_dropped: int = Field(
        default=0,
        description="Log lines dropped since the start because the log writer's queue was "
        "full (a disk slower than the node; runtime/log_writer.py).",
    )


class ActorStatus(_Model):
    """One node of the supervision tree. ``path`` places it: ``/root/sessions/<id>``."""

    path: str
    kind: ActorKind
    state: ActorState
    mailbox_depth: int | None = Field(description="Messages waiting; None: no mailbox.")
    mailbox_capacity: int | None = Field(description="None: unbounded or no mailbox.")
    restarts: int
    uptime_s: float | None = Field(description="Since its current incarnation started.")
    last_activity_s: float | None = Field(
        description="Since it last finished handling a message; None: never, or not tracked."
    )
    messages_handled: int | None = None
    messages_failed: int | None = None
    last_error: str | None = Field(default=None, description="repr of its last crash.")


class SessionStatus(_Model):
    session_id: str
    state: Literal["attached", "detached"]
    transport: SessionTransport | None = Field(
        default=None,
        description="How its client reaches it (SessionTransport); None: a server from before "
        "this field.",
    )
    remote: str
    client_name: str | None
    client_version: str | None
    protocol_version: str | None
    initialized: bool = Field(description="notifications/initialized received.")
    in_flight: int = Field(description="Tool calls admitted (running or waiting for a slot).")
    queued: int = Field(description="Messages waiting in its mailbox.")
    queued_bytes: int = Field(default=0, description="Bytes of the messages in its mailbox.")
    outgoing: int = Field(default=0, description="Messages queued for its peer, not yet taken.")
    outgoing_bytes: int = Field(default=0, description="Bytes of those messages.")
    restarts: int = Field(description="Session actor restarts after a crash.")
    uptime_s: float
    last_activity_s: float | None
    requests: int = Field(description="Upstream calls admitted by the rate limiter.")
    input_tokens: int
    output_tokens: int
    cost_usd: float
    refused: int = Field(description="Upstream calls refused by a limit.")


class ProviderLimitStatus(_Model):
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrency: int | None
    in_flight: int
    waiting: int
    requests_available: float | None = Field(description="Bucket level now; None: unlimited.")
    tokens_available: float | None


class LimitsStatus(_Model):
    providers: list[ProviderLimitStatus]
    sessions_tracked: int = Field(description="Sessions the rate limiter holds counters for.")
    mode: LimitsMode = Field(
        default="off",
        description="shared: held across the nodes through the database; local_share: the "
        "database does not answer, this node holds 1/live_nodes of each limit; off: this "
        "node alone (EXAI_SHARED_LIMITS=false).",
    )
    live_nodes: int = Field(default=1, description="Live nodes as last read (the divisor).")


class BreakerStatus(_Model):
    """A provider's breaker (``runtime/breaker.py``: its snapshot is this model, and more)."""

    name: str
    state: BreakerState
    window_calls: int = Field(description="Calls in the window (closed state).")
    window_failures: int = Field(description="Of which failed, slow ones included.")
    failure_rate: float | None = Field(description="None until minimum_calls are in the window.")
    retry_after_s: float | None = Field(description="Seconds until a trial, while open.")
    times_opened: int
    rejected: int = Field(description="Calls refused without being tried.")


Database = Literal["up", "down", "trying"]


def database_of(breaker: BreakerState) -> Database:
    """The database as the storage breaker sees it: closed = up, open = down, half_open =
    trying."""
    match breaker:
        case BreakerState.CLOSED:
            return "up"
        case BreakerState.OPEN:
            return "down"
        case BreakerState.HALF_OPEN:
            return "trying"
        case _:
            assert_never(breaker)


class PersistenceStatus(_Model):
    """The persistence actor's status, as it answers ``status``/``flush``/a tick (it fills it
    in: ``actors/persistence/actor.py``) and as ``exai status`` shows it: one model."""

    available: bool = Field(description="Storage takes new work (sessions, tool calls).")
    database: Database = Field(
        description="The storage breaker: closed = up, open = down, half_open = trying."
    )
    queue: int = Field(description="Messages waiting in the persistence actor's inbox.")
    journal_file: str
    journal_bytes: int
    journal_pending_records: int = Field(description="Accepted, not yet in the database.")
    journal_full: bool
    appended: int = Field(
        description="Journal position (bytes of records ever appended) after the last record."
    )
    synced: int = Field(description="Journal position up to which records are fsynced.")
    committed: int = Field(description="Journal position up to which the database has them.")
    durability: str | None = Field(
        default=None,
        description="The node's durability setting (commit, journal or async): what a call's "
        "answer waits for (docs/persistence.md).",
    )
    confirmed_at: datetime | None = Field(
        default=None,
        description="Every record handed to the node's persistence before this instant is "
        "fsynced or in the database (None: nothing confirmed yet).",
    )
    batches: int
    largest_batch: int
    records_written: int
    records_journaled: int
    records_replayed: int
    conflicts: int
    rejected: int
    last_error: str | None


class ListenerStatus(_Model):
    """The MCP port's accept loop and handshakes (runtime/listener.py,
    runtime/handshake_admission.py); counts are totals since the node started."""

    handshakes_in_progress: int = Field(description="Connections accepted, handshake not over.")
    handshakes_max: int = Field(description="EXAI_MAX_HANDSHAKES.")
    handshakes_max_per_address: int = Field(description="EXAI_MAX_HANDSHAKES_PER_ADDRESS.")
    handshakes_refused: dict[str, int] = Field(
        description="Connections closed unread, by bound: 'total' or 'per address'."
    )
    handshakes_timed_out: int = Field(description="Closed at EXAI_HANDSHAKE_TIMEOUT.")
    accept_pauses: int = Field(description="Episodes of accept(2) out of descriptors/memory.")
    failed_accepts: int = Field(description="accept(2) calls failed for lack of resources.")
    connections_failed: int = Field(description="Connections ended by an error of their own.")
    http_connections: int = Field(
        default=0, description="Streamable HTTP connections being served now."
    )
    http_connections_max: int | None = Field(
        default=None, description="EXAI_MAX_HTTP_CONNECTIONS (None: a server from before it)."
    )


class DeadLettersStatus(_Model):
    total: int
    by_reason: dict[str, int]


class ToolThread(_Model):
    """A plain ``def`` tool's worker thread whose call was already answered
    (runtime/tool_workers.py): its slots stay taken until it returns."""

    tool: str
    session_id: str
    request_id: str | int
    running_s: float = Field(description="Since the thread started.")
    answered: Literal["cancelled", "timed out"] | None = Field(
        description="Why its call was answered before the thread returned."
    )
    answered_s: float | None = Field(description="Since its call was answered.")


class ToolStatus(_Model):
    """One tool the node serves itself: a built-in, or the team's (``[tools]``, an entry
    point; docs/tools.md). A proxied server's tools are counted under its server."""

    name: str
    origin: str = Field(
        description="'built-in', or where it was declared: 'module.function' (a @tool), "
        "'module.Class' (a Tool subclass)."
    )
    runs: Literal["event loop", "worker thread"] = Field(
        description="An async tool runs on the event loop, a plain def in a worker thread."
    )
    running: int | None = Field(
        description="Its calls running now, when it has a max_concurrency (else not counted "
        "apart: the session's and node's call counts include them)."
    )
    max_concurrency: int | None = Field(description="Its calls at once over the node.")
    timeout: float | None = Field(description="Seconds before a call is answered 'timed out'.")


class ToolThreadsStatus(_Model):
    """Worker threads of plain ``def`` tools (runtime/tool_workers.py)."""

    running: int = Field(description="Worker threads running now.")
    max: int = Field(description="EXAI_TOOL_THREADS.")
    outliving: list[ToolThread] = Field(
        description="Threads still running after their call was answered (cancelled or "
        "timed out): nothing can stop a thread; each holds its call's slots until it returns."
    )


class ProxiedServerStatus(_Model):
    """One proxied MCP server of ``[servers]`` (actors/servers, docs/tools.md)."""

    name: str
    endpoint: str = Field(
        default="",
        description="A stdio server's command (no arguments), a remote one's URL (no user "
        "info, no query): what may be shown without showing a secret.",
    )
    state: Literal["starting", "up", "down"]
    pid: int | None = Field(description="Its process now, while it runs.")
    tools: int = Field(description="Tools it lists (the last list, while down).")
    restarts: int = Field(description="Starts after the first.")
    last_error: str | None = Field(description="Why its last incarnation ended.")
    server_name: str | None = Field(description="What it called itself at initialize.")
    share: Literal["node", "identity", "session"] = Field(
        default="node", description="One process for the node, per identity, per session."
    )
    instances: int | None = Field(
        default=None,
        description="identity or session sharing: processes serving callers now (besides "
        "the one that lists its tools).",
    )


class NodeStatus(_Model):
    """Everything ``exai status`` shows. ``limits``/``persistence`` are ``None`` when that
    part does not run, or did not answer within the status deadline (see ``problems``)."""

    schema_version: Literal[1] = 1
    taken_at: datetime = Field(description="When this snapshot was taken, UTC.")
    node: NodeInfo
    actors: list[ActorStatus] = Field(description="Supervision tree, parents before children.")
    sessions: list[SessionStatus]
    limits: LimitsStatus | None
    breakers: list[BreakerStatus]
    persistence: PersistenceStatus | None
    dead_letters: DeadLettersStatus
    listener: ListenerStatus | None = Field(
        default=None, description="None when the listener's counters are not wired in."
    )
    tool_threads: ToolThreadsStatus | None = Field(
        default=None, description="None when the node runs no worker threads for tools."
    )
    tools: list[ToolStatus] = Field(
        default_factory=list,
        description="The tools the node serves itself (built-in and the team's); a proxied "
        "server's are counted in its entry of servers.",
    )
    servers: list[ProxiedServerStatus] = Field(
        default_factory=list, description="The proxied MCP servers of [servers]."
    )
    problems: list[str] = Field(
        default_factory=list, description="Parts that could not be inspected, and why."
    )
    nodes: list[ClusterNode] | None = Field(
        default=None,
        description="With --cluster (GET /status?cluster=1): every node of the database, as "
        "the nodes table says (storage/membership.py); None otherwise, or if it could not "
        "be read (see problems).",
    )
    cluster_limits: ClusterLimitsView | None = Field(
        default=None,
        description="With --cluster: the cluster's limits as one (the shared buckets and "
        "quotas as the database has them, the alive nodes' modes and load); None otherwise.",
    )


class StatusSource(Protocol):
    """What the admin interface asks for a snapshot. Called in the trio thread.

    Async because two parts (persistence, rate limiter) are pykka actors that must be asked;
    an implementation bounds those asks so that a stuck actor shows as a problem instead of
    hanging the status command.
    """

    async def status(self) -> NodeStatus: ...


#: Reads every node of the database and the cluster's limits, for ``GET /status?cluster=1``;
#: raises on failure.
ClusterSource: TypeAlias = Callable[[], Awaitable[tuple[list[ClusterNode], ClusterLimitsView]]]
