"""Server configuration: one validated model for flags, environment and defaults, plus the
config file.

Every knob lives here so that a bad value is refused once, at start-up, with a message that
names the setting, instead of surfacing later as a confusing failure deep in a session.
Precedence, highest first: command-line flag, ``EXAI_*`` environment variable, default.

The config file (``EXAI_CONFIG``, TOML) holds what does not fit in a variable: named client
tokens and the tools each may call (``[clients]``), conversation limits (``[chat]``), upstream
providers (``[upstream]``), the modules of the team's own tools (``[tools]``, loaded by
``actors/tools/loading.py``) and the MCP servers it proxies (``[servers]``). Its
``[upstream]`` table belongs to :func:`actors.providers.load_upstream`, which reads it itself
(``runtime`` does not import ``actors``); here it is only checked to be a table. Any other
top-level key is refused, so a misspelt table name is an error rather than a silently
ignored setting.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.auth import TokenDigest
from runtime.handshake_admission import Network, parse_networks
from runtime.streamable_http.origin import OriginPolicy
from runtime.tool_access import AccessRule, ToolAccess
from storage.durability import Durability
from storage.shared_limits import Period, PeriodQuota

#: The most worker processes ``--workers`` starts: each is a whole node (its pools, threads,
#: its own connections to the database), so far more than the cores is only overhead.
WORKERS_MAX = 64


class ConfigError(Exception):
    """The configuration is invalid; the message is meant for the operator as it is."""


def worker_dir(state_dir: Path, index: int) -> Path:
    """``<state-dir>/workers/<index>``: worker ``index``'s own files under a ``--workers``
    server's state dir (its server.json, logs, proxied servers' process groups)."""
    return state_dir / "workers" / str(index)


class Settings(BaseSettings):
    """Everything ``exai serve`` can be told. Field names map to ``EXAI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EXAI_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to listen on.")
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    state_dir: Path = Field(
        default=Path(".exai"),
        description="Token, server.json, embedded Postgres data and journals live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; when unset an embedded Postgres runs under the state dir.",
    )
    database_wait: float = Field(
        default=30.0,
        ge=0,
        description="Seconds to wait at start for a database that does not answer, trying "
        "again with back-off (one log line per attempt); then exit code 4. A refused login "
        "or a missing database is not waited for. 0: one attempt.",
    )
    token: str | None = Field(
        default=None,
        min_length=16,
        description="Client token of the identity 'default'; when unset one is generated and "
        "kept in <state-dir>/token.",
    )
    config: Path | None = Field(
        default=None,
        description="TOML config file: [clients], [chat], [upstream] and [tools] tables.",
    )
    client_tokens: SecretStr | None = Field(
        default=None,
        description="Named client tokens, 'alice=TOKEN,bob=TOKEN' (also [clients] in the "
        "config file); each name is the identity that owns its threads.",
    )
    max_sessions: int = Field(
        default=10_000, ge=1, description="Concurrent sessions; more are refused with HTTP 503."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest WebSocket message accepted; larger ones close the socket (1009).",
    )
    handshake_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds from accepting a TCP connection to the end of its WebSocket "
        "handshake (101 or an HTTP error sent); past it the connection gets HTTP 408 if its "
        "request never arrived, and is closed.",
    )
    max_handshakes: int = Field(
        default=1024,
        ge=1,
        description="Connections in their handshake at once, over all addresses; one more is "
        "closed at once, before it is read. Keep it well below the descriptor limit "
        "(ulimit -n), so that a flood of handshakes cannot use up the descriptors.",
    )
    max_handshakes_per_address: int = Field(
        default=32,
        ge=1,
        description="Connections in their handshake at once from one remote IP address (not "
        "counted for trusted proxies); one more is closed at once, before it is read.",
    )
    trusted_proxies: str = Field(
        default="127.0.0.1,::1",
        description="Comma-separated IP addresses or CIDR networks exempt from "
        "max_handshakes_per_address: behind a reverse proxy every client arrives from the "
        "proxy's address. Setting it replaces the default (loopback).",
    )
    drain_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a stopping server (SIGTERM, SIGINT) lets tool calls in flight "
        "finish and be answered; /readyz answers 503 and new sessions are refused meanwhile. "
        "Calls still running then are cancelled; a second signal cancels them at once.",
    )
    ws_ping_interval: float = Field(
        default=20.0,
        gt=0,
        description="Seconds without a byte from a WebSocket peer after which the server "
        "pings it (RFC 6455 section 5.5.2).",
    )
    ws_ping_timeout: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a pinged peer has to answer (pong) before its connection is "
        "dropped and its session parked for resume, as for any dropped socket.",
    )
    session_mailbox: int = Field(
        default=64,
        ge=1,
        description="Capacity of each session actor's mailbox (messages waiting to be handled).",
    )
    session_max_restarts: int = Field(
        default=3,
        ge=0,
        description="Session actor restarts tolerated within the period before the socket "
        "is closed with 1011 (OTP intensity).",
    )
    session_restart_period: float = Field(
        default=10.0, gt=0, description="Seconds over which session restarts are counted."
    )
    max_inflight_per_session: int = Field(
        default=8, ge=1, description="Concurrent tools/call requests one session may run."
    )
    max_inflight_total: int = Field(
        default=1024, ge=1, description="Concurrent tools/call requests over all sessions."
    )
    session_mailbox_bytes: int = Field(
        default=8 * 2**20,
        ge=1024,
        description="Bytes of requests one session may have waiting in its mailbox; beyond "
        "it (or session_mailbox messages) new requests are refused with -32000 'server busy'.",
    )
    node_mailbox_bytes: int = Field(
        default=256 * 2**20,
        ge=1024,
        description="Bytes of requests waiting in all sessions' mailboxes together; beyond it "
        "new requests are refused with -32000 'server busy'.",
    )
    session_outgoing_bytes: int = Field(
        default=8 * 2**20,
        ge=1024,
        description="Bytes one session's peer may leave untaken (replies, notifications); "
        "beyond it the session stops reading its socket (TCP back-pressure).",
    )
    session_outgoing_messages: int = Field(
        default=1024,
        ge=1,
        description="Messages one session's peer may leave untaken; beyond it the session "
        "stops reading its socket.",
    )
    node_outgoing_bytes: int = Field(
        default=256 * 2**20,
        ge=1024,
        description="Bytes untaken by all sessions' peers together; beyond it sessions with "
        "output waiting stop reading.",
    )
    stall_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a peer may leave its outgoing queue full with nothing taken "
        "before it is closed with 1008 and its session ended (not parked).",
    )
    max_batch: int = Field(
        default=64,
        ge=1,
        description="Most members of one JSON-RPC batch (2025-03-26); a larger batch is "
        "refused as a whole with -32600 and id null.",
    )
    heartbeat_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds of tool silence after which a heartbeat progress is sent "
        "(only to requests that carry a progress token).",
    )
    page_size: int = Field(default=50, ge=1, description="Items per page of list results.")
    resume_grace: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a session whose socket dropped can be resumed by presenting its "
        "id (Mcp-Session-Id header or ?session=); 0 disables resume.",
    )
    http_session_idle: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a Streamable HTTP session (Mcp-Session-Id) may go without a "
        "request, and with no stream open, before it ends: clients that never send DELETE "
        "cannot fill max_sessions.",
    )
    http_sessions_per_identity: int = Field(
        default=256,
        ge=1,
        description="Streamable HTTP sessions one client identity may hold at once; a "
        "further initialize gets 429.",
    )
    http_exchanges_per_identity: int = Field(
        default=128,
        ge=1,
        description="HTTP requests one client identity may have in progress at once (streams "
        "held open and calls waited on included); beyond, 429, so that one identity cannot "
        "take every connection of max_http_connections.",
    )
    http_keepalive: float = Field(
        default=15.0,
        gt=0,
        description="Seconds an idle kept-alive HTTP connection stays open; quiet SSE streams "
        "get a comment this often.",
    )
    max_http_connections: int = Field(
        default=1024,
        ge=1,
        description="HTTP connections (Streamable HTTP) open at once; beyond, 503 and close.",
    )
    allowed_origins: str = Field(
        default="",
        description="Comma-separated origins (scheme://host[:port], or null) a browser page "
        "may connect from, besides loopback ones; any other Origin header is refused with "
        "403 (MCP's DNS rebinding defence), on HTTP and WebSocket alike.",
    )
    durability: Durability = Field(
        default=Durability.JOURNAL,
        description="What a call's answer waits for: 'commit' (the database's commit), "
        "'journal' (the local journal's group fsync; the database follows in batches) or "
        "'async' (nothing; the last moments may be lost on a crash). docs/persistence.md says "
        "what each keeps when the process is killed and when the machine is lost.",
    )
    journal_max_bytes: int = Field(
        default=128 * 2**20,
        ge=2**16,
        description="Bound of the write journal kept while the database is away, in bytes; it "
        "never grows past it. From three quarters of it on, new sessions and tool calls are "
        "refused with 'storage unavailable'; the rest is kept for the records of work already "
        "accepted, and a record that does not fit is refused.",
    )
    shared_limits: bool = Field(
        default=True,
        description="Hold upstream keys' requests and tokens per minute and each client "
        "identity's requests per minute across every node of the database (one row per limit "
        "in Postgres), and count [clients.<name>.quota] there. Off: each node enforces them "
        "alone (N nodes admit N times the limit) and quotas are not enforced.",
    )
    max_stored_result_bytes: int = Field(
        default=2**20,
        ge=1024,
        description="Largest tool result (and error message) stored with its task, in bytes of "
        "JSON; a larger one is stored as its beginning, a marker and its real size (the "
        "client still gets all of it).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=WORKERS_MAX,
        description="Processes serving the one MCP port (SO_REUSEPORT), each a whole node on "
        "the one database; 'auto': one per CPU (os.cpu_count()). 1 runs the node in this "
        "process, as before; 2 or more make this process their parent, which holds the state "
        "dir, owns the embedded Postgres and restarts a worker that dies "
        "(docs/deployment.md#one-machine-with-workers).",
    )
    worker_index: int = Field(
        default=0,
        ge=0,
        le=WORKERS_MAX,
        description="Internal, set by a --workers parent for each worker it starts (1..N); 0: "
        "not a worker. A worker's own files (server.json, logs, children) are under "
        "<state-dir>/workers/<index>.",
    )
    worker_channel: int | None = Field(
        default=None,
        ge=0,
        description="Internal, set by a --workers parent: the descriptor of the worker's end "
        "of its socket pair with the parent (readiness out, the parent's end of life in).",
    )
    worker_timeout: float = Field(
        default=30.0,
        ge=2,
        le=3600,
        description="With --workers: seconds a worker that has served may go without a sign "
        "of life on its socket pair with the parent (it sends one every 0.5 s from its event "
        "loop) before the parent kills it (SIGKILL) and starts another: a stopped or hung "
        "worker would otherwise keep its share of the port's new connections for ever.",
    )
    root_max_restarts: int = Field(
        default=5, ge=0, description="Restarts of the root's children tolerated per period."
    )
    root_restart_period: float = Field(
        default=60.0, gt=0, description="Seconds over which the root counts restarts."
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    test_faults: bool = Field(
        default=False,
        description="Enable test-only fault injection (never in production).",
    )
    tool_threads: int = Field(
        default=40,
        ge=1,
        description="Worker threads for plain def tools (docs/tools.md) over the node; a call "
        "beyond waits for one. A thread whose call was cancelled or timed out keeps its place "
        "until it returns.",
    )
    loop_stall_ms: float = Field(
        default=250.0,
        ge=0,
        description="Milliseconds the event loop may be late before the watchdog logs the "
        "async def tools that were running (tool.blocked_loop, once a minute per tool); 0 "
        "turns the watchdog off.",
    )
    task_retention: float = Field(
        default=86_400.0,
        gt=0,
        description="Seconds a task's result is kept after the task was created (MCP Tasks, "
        "docs/tasks.md): a client's shorter ttl is granted, a longer one capped to this. After "
        "it the stored result is cleared; the task's row and its token usage stay.",
    )
    max_tasks_per_identity: int = Field(
        default=16,
        ge=1,
        description="Task-augmented tools/call requests one client identity may have running "
        "on this node at once; one more is refused with -32005 (docs/tasks.md).",
    )
    max_task_result_waiters: int = Field(
        default=16,
        ge=1,
        description="tasks/result requests one session may have waiting at once; one more is "
        "refused with -32005 (docs/tasks.md).",
    )
    task_after: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="MCP 2026-07-28 Tasks extension: a tools/call to a tool that supports "
        "tasks, from a request declaring io.modelcontextprotocol/tasks, runs as a task; if it "
        "has not ended after this many seconds its client is answered with the task (to poll "
        "with tasks/get) instead of waiting. 0: always answered with the task (docs/tasks.md).",
    )
    node_heartbeat_interval: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="Seconds between this node's heartbeats in the nodes table (with its "
        "snapshot: sessions, calls in flight, health). Sub-second values are allowed.",
    )
    node_timeout: float = Field(
        default=30.0,
        gt=0,
        # A day at most: Postgres's intervals refuse inf (and timestamps 1e16 s back), which
        # would fail every sweep and the shared limits' count of live nodes at run time.
        le=86_400,
        description="Seconds without a heartbeat (by the database's clock) after which a node "
        "is dead and any node's sweep interrupts its unfinished tasks and active sessions. "
        "Must exceed node_heartbeat_interval; default half the default resume_grace "
        "(docs/deployment.md).",
    )
    sweep_interval: float = Field(
        default=10.0,
        gt=0,
        le=86_400,
        description="Seconds between this node's sweeps for dead nodes (every node sweeps; "
        "a dead node is swept once).",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return min(os.cpu_count() or 1, WORKERS_MAX)
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return level

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # refused at start-up, naming the bad entry
        return value

    @model_validator(mode="after")
    def _membership(self) -> Settings:
        if self.node_timeout <= self.node_heartbeat_interval:
            raise ValueError(
                f"node_timeout ({self.node_timeout:g} s) must exceed node_heartbeat_interval "
                f"({self.node_heartbeat_interval:g} s): a live node would look dead"
            )
        return self

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.trusted_proxies)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        OriginPolicy.parse(value)  # refused at start-up, naming the bad entry
        return value

    @property
    def origin_policy(self) -> OriginPolicy:
        return OriginPolicy.parse(self.allowed_origins)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @property
    def token_file(self) -> Path:
        return self.state_dir / "token"

    @property
    def node_dir(self) -> Path:
        """Where this process keeps the files that are one node's own: the state dir itself,
        or ``<state-dir>/workers/<index>`` for a worker (its server.json, logs, children)."""
        if self.worker_index == 0:
            return self.state_dir
        return worker_dir(self.state_dir, self.worker_index)

    @property
    def server_file(self) -> Path:
        """This process's ``server.json`` (a worker's own is in its :attr:`node_dir`; the
        state dir's is its parent's, listing every worker)."""
        return self.node_dir / "server.json"

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "pg"


class ChatLimits(BaseModel):
    """Conversation threads of the ``chat`` tool. Defaults are the seed's values: those of the
    EX-AI MCP server this project upgrades (github.com/Zazzles2908/EX-AI-MCP-Server)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_turns: int = Field(
        default=20,
        ge=1,
        description="Exchanges (a prompt and its answer) per thread; when not set, 200 with "
        "compaction on and 20 with it off.",
    )
    thread_ttl_seconds: float = Field(
        default=3 * 3600.0, gt=0, description="A thread expires this long after its last turn."
    )
    history_tokens: int = Field(
        default=50_000, ge=0, description="Budget of the history sent upstream with a turn."
    )
    max_messages: int = Field(
        default=20, ge=0, description="Most history messages sent upstream with a turn."
    )
    message_tokens: int = Field(
        default=10_000,
        ge=1,
        description="Longest single history message (or attached file copy) sent upstream; "
        "longer ones are cut.",
    )
    max_output_tokens: int = Field(
        default=4096,
        gt=0,
        description="max_tokens asked of the upstream per turn (and reserved by the limiter).",
    )
    compaction: bool = Field(
        default=True,
        description="Summarise a long thread's older exchanges (docs/chat.md, Compaction).",
    )
    compaction_threshold_tokens: int = Field(
        default=40_000,
        ge=1,
        description="Compact once the thread's summary plus its exchanges not yet summarised "
        "pass this many (calibrated) tokens.",
    )
    compaction_keep_turns: int = Field(
        default=3, ge=1, description="Newest exchanges never summarised (sent verbatim)."
    )
    summary_tokens: int = Field(
        default=2_000, gt=0, description="max_tokens asked of the upstream for a summary."
    )
    compaction_input_tokens: int = Field(
        default=50_000,
        ge=1,
        description="Most tokens of exchanges given to one summary call (older first; the "
        "rest waits for the next compaction).",
    )
    max_compactions: int = Field(
        default=4,
        ge=1,
        description="Compactions running at once on the node (others wait for a later turn).",
    )
    compaction_timeout_seconds: float = Field(
        default=120.0, gt=0, description="A summary call that takes longer is abandoned."
    )

    @model_validator(mode="before")
    @classmethod
    def _max_turns_default(cls, data: object) -> object:
        # A compacted thread stays small upstream, so it may run longer: 200 exchanges by
        # default with compaction on. An explicit max_turns always wins.
        if isinstance(data, dict) and "max_turns" not in data:
            return {**data, "max_turns": 200 if data.get("compaction", True) else 20}
        return data


class ClientQuota(BaseModel):
    """``[clients.<name>.quota]``: what the identity may use upstream per UTC day and per UTC
    month, every node and session together, kept in the database across restarts
    (``client_quota_usage``). A call counts as its worst case (prompt estimate +
    ``max_tokens``, and its price) when admitted, corrected to its real usage when it ends.
    Unset: unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_day: int | None = Field(default=None, gt=0)
    tokens_per_day: int | None = Field(default=None, gt=0, description="Input + output.")
    cost_usd_per_day: float | None = Field(default=None, gt=0)
    requests_per_month: int | None = Field(default=None, gt=0)
    tokens_per_month: int | None = Field(default=None, gt=0, description="Input + output.")
    cost_usd_per_month: float | None = Field(default=None, gt=0)

    def periods(self) -> dict[Period, PeriodQuota]:
        """The periods with at least one limit, each with its limits."""
        found: dict[Period, PeriodQuota] = {}
        day = PeriodQuota(self.requests_per_day, self.tokens_per_day, self.cost_usd_per_day)
        month = PeriodQuota(self.requests_per_month, self.tokens_per_month, self.cost_usd_per_month)
        for period, quota in (("day", day), ("month", month)):
            if (quota.requests, quota.tokens, quota.cost_usd) != (None, None, None):
                found[period] = quota  # type: ignore[index]
        return found


class ClientEntry(BaseModel):
    """One client identity of the config file's ``[clients.<name>]`` table: its token, given
    exactly one way. ``token`` is the token itself (the file must then be private);
    ``token_env`` names the environment variable that holds it; ``token_sha256`` is the hex
    SHA-256 of the token, so the file holds no secret and may be world-readable (or kept in
    git). ``alice = "TOKEN"`` is shorthand for ``[clients.alice] token = "TOKEN"``.

    ``tools`` and ``deny_tools``: the tools it may list and call, as globs (``"team_*"``);
    without ``tools`` every tool, and a tool matching ``deny_tools`` never
    (:mod:`runtime.tool_access`). ``quota``: its durable day and month quotas
    (:class:`ClientQuota`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr | None = None
    token_env: str | None = Field(default=None, min_length=1)
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    tools: list[str] | None = None
    deny_tools: list[str] = Field(default_factory=list)
    quota: ClientQuota | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ClientEntry:
        given = [self.token, self.token_env, self.token_sha256]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of token, token_env or token_sha256")
        return self


class ToolsConfig(BaseModel):
    """``[tools]``: the team's own tools (docs/tools.md), loaded at start by
    ``actors/tools/loading.py``; the entry-point group ``exai.tools`` is read besides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modules: list[str] = Field(
        default_factory=list,
        description="Importable modules; every @tool (every Tool instance) in each is served.",
    )
    path: list[Path] = Field(
        default_factory=list,
        description="Directories put first on the import path before the modules are "
        "imported; relative ones are relative to the config file's directory.",
    )
    entry_points: bool = Field(
        default=True,
        description="Whether the entry-point group exai.tools of installed packages is served.",
    )


class ServerEntry(BaseModel):
    """``[servers.<name>]``: one proxied MCP server (docs/tools.md): a stdio child process
    started from this file only (nothing a client sends can start a process), ``command``;
    or a remote server, ``url`` (``ws://``/``wss://``: WebSocket, ``http://``/``https://``:
    Streamable HTTP) with ``headers``. Exactly one of the two."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command: str | None = Field(
        default=None, min_length=1, description="The program (a path, or a name on PATH)."
    )
    url: str | None = Field(
        default=None,
        pattern=r"^(wss?|https?)://[^\s]+$",
        max_length=2048,
        description="A remote server's endpoint: ws://, wss://, http:// or https://.",
    )
    headers: dict[
        Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")],
        Annotated[str, StringConstraints(pattern=r"^[^\r\n\x00]*$", max_length=8192)],
    ] = Field(
        default_factory=dict,
        description="Sent to a remote server with every request (its Authorization, say); a "
        "value may name the node's variables as ${NAME} (an unset one stops the start).",
    )
    args: list[str] = Field(default_factory=list, description="Its arguments.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Variables set for it on top of the node's; a value may name the node's "
        "own variables as ${NAME} (an unset one stops the start).",
    )
    cwd: Path | None = Field(default=None, description="Its working directory.")
    share: Literal["node", "identity", "session"] = Field(
        default="node",
        description="node: one process serves every session; identity: one per client "
        "identity; session: one per session, stopped with it.",
    )
    max_instances: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="identity or session sharing: processes at once; one more caller is "
        "refused (-32004) until one goes idle.",
    )
    idle_timeout: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="identity or session sharing: seconds with no call before a process is "
        "stopped.",
    )
    separator: str = Field(
        default="__",
        pattern=r"^[A-Za-z0-9_.-]{1,8}$",
        description="Between the server's name and its tools' in the names clients see.",
    )
    max_pending: int = Field(
        default=64, ge=1, le=10_000, description="Requests in flight to it at once."
    )
    max_restarts: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Restarts allowed within restart_period; one more and it is down.",
    )
    restart_period: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds over which restarts are counted."
    )
    retry_after: float = Field(
        default=60.0, gt=0, le=86_400, description="Seconds a down server waits to be retried."
    )

    @model_validator(mode="after")
    def _one_endpoint(self) -> ServerEntry:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (a stdio server) or url (a remote one)")
        if self.url is not None and (self.args or self.env or self.cwd is not None):
            raise ValueError("args, env and cwd are for a command, not a url")
        if self.command is not None and self.headers:
            raise ValueError("headers are for a url, not a command")
        return self


#: A proxied server's name: part of its tools' names.
SERVER_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ConfigFile(BaseModel):
    """The config file's tables. ``upstream`` is validated by ``actors.providers``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: dict[str, SecretStr | ClientEntry] = Field(default_factory=dict)
    chat: ChatLimits = Field(default_factory=ChatLimits)
    upstream: dict[str, Any] = Field(default_factory=dict)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    servers: dict[Annotated[str, StringConstraints(pattern=SERVER_NAME)], ServerEntry] = Field(
        default_factory=dict
    )

    @field_validator("servers")
    @classmethod
    def _prefixes_apart(cls, servers: dict[str, ServerEntry]) -> dict[str, ServerEntry]:
        """No server's prefix ``<name><separator>`` may begin another's: with ``a`` and
        ``a__b`` (or ``a_``), ``a__b__x`` is a tool of both, and a glob meant for one
        (``tools = ["a__*"]``, ``deny_tools``) reaches the other's tools too."""
        prefixes = sorted((name + entry.separator, name) for name, entry in servers.items())
        for (shorter, first), (longer, second) in itertools.pairwise(prefixes):
            if longer.startswith(shorter):
                raise ValueError(
                    f"servers {first} and {second}: the names of {second}'s tools "
                    f"({longer}...) begin as {first}'s ({shorter}...), so one tool name (and "
                    "one access-list glob) could mean either; rename one, or give it another "
                    "separator"
                )
        return servers

    def tool_access(self) -> ToolAccess:
        """Which tools each named client may list and call (``tools``, ``deny_tools``)."""
        return ToolAccess(
            {
                name: AccessRule.of(entry.tools, entry.deny_tools)
                for name, entry in self.clients.items()
                if isinstance(entry, ClientEntry)
            }
        )

    def client_quotas(self) -> dict[str, dict[Period, PeriodQuota]]:
        """Each named client's durable quotas (``[clients.<name>.quota]``), by period."""
        quotas: dict[str, dict[Period, PeriodQuota]] = {}
        for name, entry in self.clients.items():
            if isinstance(entry, ClientEntry) and entry.quota is not None:
                periods = entry.quota.periods()
                if periods:
                    quotas[name] = periods
        return quotas

    @property
    def holds_secrets(self) -> bool:
        """Whether the file itself holds a secret: a raw client token, or an upstream
        ``api_key`` (``api_key_env`` and ``token_env``/``token_sha256`` are not secrets)."""
        raw_token = any(
            isinstance(entry, SecretStr) or entry.token is not None
            for entry in self.clients.values()
        )
        return raw_token or _has_key(self.upstream, "api_key")


def _has_key(table: object, key: str) -> bool:
    if isinstance(table, dict):
        return key in table or any(_has_key(value, key) for value in table.values())
    return False


def require_private(path: Path, what: str) -> None:
    """Refuse a file holding secrets that other users can read or change, as ssh refuses a
    private key with loose permissions: :class:`ConfigError` saying how to fix it."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            # No "secret:" in the text: the log's redaction would take what follows for one.
            f"{what} {path} is accessible to other users (mode {mode:04o}) although it holds "
            f"a secret; run 'chmod 600 {path}'"
        )


def load_config_file(path: Path | None) -> ConfigFile:
    """The file's tables (defaults when ``path`` is ``None``); :class:`ConfigError` naming the
    setting at fault, never quoting its value (the file holds tokens)."""
    if path is None:
        return ConfigFile()
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        loaded = ConfigFile.model_validate(document)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"invalid config file {path}:\n{problems}") from None
    if loaded.holds_secrets:
        require_private(path, "config file")
    return loaded


def named_client_tokens(
    settings: Settings, file: ConfigFile, env: Mapping[str, str]
) -> dict[str, str | TokenDigest]:
    """Named client tokens (or their SHA-256 digests) from ``EXAI_CLIENT_TOKENS`` and the
    file's ``[clients]``; ``token_env`` entries are read from ``env``.

    A name in both is an error rather than a silent precedence rule (as for providers).
    """
    named: dict[str, str | TokenDigest] = {}
    for name, entry in file.clients.items():
        if isinstance(entry, SecretStr):
            named[name] = entry.get_secret_value()
        elif entry.token is not None:
            named[name] = entry.token.get_secret_value()
        elif entry.token_sha256 is not None:
            named[name] = TokenDigest(entry.token_sha256)
        elif entry.token_env is not None:
            value = env.get(entry.token_env, "").strip()
            if not value:
                raise ConfigError(
                    f"invalid configuration:\n  clients.{name}.token_env: the variable "
                    f"{entry.token_env} is not set"
                )
            named[name] = value
    if settings.client_tokens is None:
        return named
    for pair in settings.client_tokens.get_secret_value().split(","):
        if not pair.strip():
            continue
        name, equals, token = pair.partition("=")
        name, token = name.strip(), token.strip()
        if not equals or not name or not token:
            raise ConfigError(
                "invalid configuration:\n  client_tokens (EXAI_CLIENT_TOKENS): expected "
                "'name=token' entries separated by commas"
            )
        if name in named:
            raise ConfigError(
                f"client {name!r} is defined both in EXAI_CLIENT_TOKENS and in the config "
                "file's [clients]: keep one"
            )
        named[name] = token
    return named


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment plus explicit overrides (CLI flags).

    Overrides whose value is ``None`` are ignored so that an absent flag falls through to the
    environment. Raises :class:`ConfigError` with one line per invalid setting.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(
                f"  {name} (--{name.replace('_', '-')} / EXAI_{name.upper()}): {error['msg']}"
            )
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
