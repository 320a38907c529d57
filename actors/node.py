"""One server process ("node"): storage, then the supervision tree, then the announcement.

Start-up order is dependency order, and shutdown is its exact reverse, so nothing is ever
used after what it depends on has gone:

1. storage (not an actor): the database (embedded Postgres under the state dir, or
   ``--database-url``, waited for up to ``EXAI_DATABASE_WAIT`` seconds while it does not
   answer), migrations, the write journal, and crash recovery: the journal of a killed
   predecessor is replayed and its ``running`` tasks become ``interrupted`` *before* any
   session is accepted;
2. the root supervisor (one_for_one), whose children start in order:
   ``persistence`` (pykka actor, reached through an :class:`ActorName`), ``persistence_pulse``
   (the trio side's timer: journal fsyncs, activity sync, heartbeats), ``membership`` (the
   periodic sweep of dead nodes on the same database: actors/membership.py), ``rate_limiter`` (the
   pykka actor every upstream call asks first, reached through an :class:`ActorName`, with its
   pacer), ``providers`` (one HTTP client
   per configured upstream; none is fine: ``chat`` then says how to configure one),
   ``admin`` (``/status``, ``/metrics``), ``tool_workers`` (the loop-stall watchdog; plain
   ``def`` tools' worker threads are counted there: runtime/tool_workers.py), ``tasks`` (the
   MCP task host: docs/tasks.md),
   ``sessions`` (the sessions supervisor: each
   session's actor is its dynamic child, docs/supervision.md) and ``listener`` (the WebSocket
   listener, which starts sessions, and the reaper of parked ones);
3. ``server.json`` and the one line announcing the URL.

Before all of it, the configuration (flags, ``EXAI_*``, the ``EXAI_CONFIG`` file with its
``[clients]``, ``[chat]``, ``[upstream]`` and ``[tools]`` tables) is loaded and checked, and
the team's tools are imported (``actors/tools/loading.py``): a bad one ends the process with
exit code 2 and one message, before anything is started. (The CLI has already
locked the state dir: ``runtime/statefile.py``.) A cause that stops the start later is a
:class:`~storage.startup_errors.StartupError` (database: exit code 4; the port: 3), raised as
itself to the CLI, which prints its one line.

On SIGINT or SIGTERM the root is asked to stop (never cancelled, so every child gets its grace
period): ``listener`` drains (``/readyz`` answers 503 and new sessions are refused; each
session is closed with 1001 once its calls in flight are answered, and those still running
after ``EXAI_DRAIN_TIMEOUT`` seconds, or at once on a second signal, are cancelled; each
session records its end and is forgotten by the rate limiter), ``sessions`` stops with no
child left, ``admin`` stops, ``providers`` closes its HTTP
clients, ``rate_limiter`` refuses whatever still waits, ``persistence_pulse`` flushes what is
buffered, ``persistence`` stops behind every write already sent. Then the read pool of
threads and the journal are closed and the embedded Postgres stopped. A root that gives up
(more than ``EXAI_ROOT_MAX_RESTARTS`` restarts within the period) raises
:class:`~runtime.supervision.SupervisorGaveUp` (its sessions are not drained: what their calls
need may be gone); the CLI reports it and exits non-zero.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
import structlog
import trio
from pydantic import JsonValue

from actors.conversation import Conversations, Upstream
from actors.membership import Membership
from actors.persistence import PersistenceActor, PersistenceClient, PersistenceConfig
from actors.providers import UpstreamConfig, UpstreamConfigError, load_upstream, open_providers
from actors.rate_cluster import shared_buckets, upstream_id
from actors.rate_limiter import RateLimiterActor, node_limits, supervised_rate_limiter
from actors.servers import ProxiedServers, RemoteEndpoint
from actors.servers.host import endpoint as server_endpoint
from actors.session import SessionBounds, SessionConfig, SessionLifecycle, SessionServices
from actors.session.handover import Handover, end_copies_ended_elsewhere
from actors.session.mail import announce_tools_changed
from actors.status import LiveSession, NodeStatusSource
from actors.tasks import TaskHost
from actors.tools import builtin_tool_names, builtin_tools
from actors.tools.loading import load_tools
from runtime.actor import sole_exception
from runtime.admin import serve_admin
from runtime.auth import ClientTokens, load_or_create_token
from runtime.breaker import BreakerSnapshot
from runtime.budget import NodeBudget
from runtime.collector import tune_for_long_lived_objects
from runtime.config import (
    ConfigError,
    ConfigFile,
    Settings,
    load_config_file,
    named_client_tokens,
    require_private,
)
from runtime.handshake_admission import HandshakeAdmission
from runtime.listener import ListenerCounters
from runtime.logs import register_secret, secret_named
from runtime.mcp.tool_api import use_workers
from runtime.mcp.tools import Tool
from runtime.mcp.versions import SUPPORTED_VERSIONS
from runtime.pykka_supervision import ActorName, pykka_child
from runtime.server import McpWebSocketServer, Sessions, listener_status
from runtime.session_registry import SessionPhase, SessionRegistry
from runtime.statefile import ServerInfo, remove_server_info, write_server_info
from runtime.streamable_http.endpoint import HttpConfig, StreamableHttpEndpoint
from runtime.streamable_http.session_transport import StreamBounds
from runtime.supervision import ChildContext, ChildSpec, Strategy, Supervisor, run_root
from runtime.tool_access import ToolAccess
from runtime.tool_workers import ToolWorkers
from storage.connection import DatabaseTarget, check_database
from storage.embedded import EmbeddedPostgres
from storage.errors import ActorUnavailable
from storage.journal import Journal
from storage.membership import NodeLimits, NodeSnapshot
from storage.migrations import apply_migrations
from storage.recovery import recover
from storage.session_handover import SessionClaims
from storage.shared_limits import SharedLimits
from storage.startup_errors import DatabaseUnavailable, DatabaseUnreachable, StartupError
from storage.threads import ThreadStore

log = structlog.get_logger("node")

#: Exit code of a process whose configuration is invalid (as the CLI's own check).
EXIT_CONFIG = 2
#: Back-off between attempts to reach the database at start, in seconds: doubled after each
#: attempt from the first to the second (so a database starting alongside us is found
#: quickly, and one that is down is not hammered).
DATABASE_RETRY_FIRST = 0.25
DATABASE_RETRY_MAX = 5.0
#: Longest a single attempt may take to connect, in seconds (libpq's ``connect_timeout``).
DATABASE_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What the configuration file and the environment add to the settings."""

    file: ConfigFile
    clients: ClientTokens
    upstream: UpstreamConfig
    #: The team's own tools (``[tools]``, the ``exai.tools`` entry points), imported.
    tools: list[Tool[Any]] = field(default_factory=list)
    #: Which tools each client identity may call (``[clients.<name>] tools``).
    access: ToolAccess = field(default_factory=ToolAccess)


def load_node_config(settings: Settings) -> NodeConfig:
    """The config file, client tokens and providers, checked; :class:`ConfigError` if not.

    Creates the state dir and, on first start, the default token in it.
    """
    file = load_config_file(settings.config)
    if settings.database_url is not None:
        _check_database_url(settings.database_url)
    try:
        upstream = load_upstream(settings.config, os.environ)
    except UpstreamConfigError as exc:
        raise ConfigError(str(exc)) from None
    tools = load_tools(
        file.tools,
        config_dir=settings.config.parent if settings.config is not None else None,
        builtin=builtin_tool_names(test_faults=settings.test_faults),
    )
    for name, entry in file.servers.items():
        # An unset ${NAME} stops the start here; a remote server's header values (its
        # token) are masked in the log from now on, as the node's own tokens are.
        reached = server_endpoint(name, entry, os.environ)
        if isinstance(reached, RemoteEndpoint):
            for header, value in reached.headers.items():
                if secret_named(header):
                    register_secret(value)
                    register_secret(value.partition(" ")[2])  # the credential after "Bearer "
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    clients = load_client_tokens(settings, file)
    return NodeConfig(
        file=file, clients=clients, upstream=upstream, tools=tools, access=file.tool_access()
    )


def load_client_tokens(settings: Settings, file: ConfigFile) -> ClientTokens:
    """Every token the node accepts: its own (``EXAI_TOKEN``, else the token file, created on
    first start) and the named ones; :class:`ConfigError` if any is refused."""
    named = named_client_tokens(settings, file, os.environ)
    if settings.token is None and settings.token_file.exists():
        require_private(settings.token_file, "token file")
    token = load_or_create_token(settings.token_file, settings.token)
    register_secret(token)  # masked in every log line from now on
    try:
        return ClientTokens(token, named)
    except ValueError as exc:
        raise ConfigError(f"invalid client tokens: {exc}") from None


async def reload_on_hangup(
    settings: Settings, clients: ClientTokens, access: ToolAccess | None = None
) -> None:
    """SIGHUP: read the client tokens again (config file, token file) and accept the new set
    from the next handshake on; sessions already open go on. Each client's tool access
    (``tools``, ``deny_tools``) is read again with them and applies from the next request on,
    in open sessions too (the tools themselves are loaded once, at start). A file that is
    refused leaves both as they were, with one log line saying why. Runs until cancelled."""
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        async for _ in hangups:
            try:
                file = load_config_file(settings.config)
                fresh = load_client_tokens(settings, file)
            except ConfigError as exc:
                log.warning("config.reload_refused", reason=str(exc), kept=clients.identities)
                continue
            # The access lists first: a client added by this reload is never served before
            # its restrictions apply.
            if access is not None:
                access.adopt(file.tool_access())
            clients.adopt(fresh)
            log.info("config.reloaded", clients=clients.identities)


def _check_database_url(url: str) -> None:
    """libpq must be able to parse the URL (:class:`ConfigError` if not; its message never
    quotes the URL, which holds the password), and the password is masked in every log line."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        raise ConfigError(
            "invalid configuration:\n  database_url (--database-url / EXAI_DATABASE_URL): "
            "not a PostgreSQL URL libpq can parse (postgresql://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    if password:
        register_secret(str(password))


async def run_node(
    settings: Settings,
    *,
    announce: bool = True,
    announcer: Callable[[ServerInfo], None] | None = None,
    lifeline: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM, then shut down in order. Returns normally on a clean stop.

    The signal receiver stays open until the very end: a second signal cuts the drain short
    (calls in flight are cancelled) and later ones are logged and ignored, so that no signal
    interrupts the flush of accepted writes.

    A ``--workers`` worker (runtime/workers.py) also passes ``announcer``, told the
    :class:`ServerInfo` each time the listener serves (its parent learns it is ready), and
    ``lifeline``, which returns when the parent is gone: the node then stops as on two
    signals (nobody is left to ask for a drain or to wait for one).
    """
    try:
        config = load_node_config(settings)
    except ConfigError as exc:
        print(f"exai: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    log.info(
        "node.configured",
        clients=config.clients.identities,
        providers=sorted(config.upstream.providers),
        tools=[tool.name for tool in config.tools],
    )
    tune_for_long_lived_objects()  # thousands of sessions live for hours: runtime/collector.py
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # Signals are watched from the first step on: a stop while storage starts (waiting
        # for the database, say) ends the start instead of waiting for it.
        stop = trio.Event()
        cut_short = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, stop, cut_short.set)
                nursery.start_soon(reload_on_hangup, settings, config.clients, config.access)
                if lifeline is not None:
                    nursery.start_soon(_stop_when_orphaned, lifeline, stop, cut_short)
                await _run(
                    settings, config, stop, cut_short, announce=announce, announcer=announcer
                )
                nursery.cancel_scope.cancel()  # the signal watcher's job is done
        except ExceptionGroup as group:
            # The process's verdict (a root that gave up, a start-up error): to the CLI as
            # itself, with its own cause (what the root last restarted for, the bind's OSError).
            error = sole_exception(group)
            raise error from error.__cause__
    log.info("server.stopped")


async def _run(
    settings: Settings,
    config: NodeConfig,
    stop: trio.Event,
    cut_short: trio.Event,
    *,
    announce: bool,
    announcer: Callable[[ServerInfo], None] | None = None,
) -> None:
    node_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    embedded: EmbeddedPostgres | None = None
    journal: Journal | None = None
    threads: ThreadStore | None = None
    try:
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.pgdata)
            reused = embedded.initialised
            url = await trio.to_thread.run_sync(embedded.start)
            log.info("storage.embedded", pgdata=str(settings.pgdata), reused=reused)
        if not await _wait_for_database(url, settings.database_wait, stop):
            return  # stopped while waiting: nothing else was started
        applied = await trio.to_thread.run_sync(apply_migrations, url)
        log.info("storage.migrated", applied=applied)
        journal = Journal.open(
            settings.state_dir / "journal",
            node_id=node_id,
            max_bytes=settings.journal_max_bytes,
        )
        report = await trio.to_thread.run_sync(
            partial(recover, url, journal, node_ttl=settings.node_timeout)
        )
        log.info("storage.recovered", report=report.model_dump(mode="json"))

        threads = ThreadStore(url)
        threads.open()  # connects in the pool's own threads; returns at once
        tree = _Tree(
            settings,
            config,
            node_id,
            database_url=url,
            journal=journal,
            threads=threads,
            announce=announce,
            announcer=announcer,
            stop_requested=stop,
        )
        async with trio.open_nursery() as nursery:
            # A second signal (run_node's watcher sets cut_short) cancels what the drain
            # still waits for.
            nursery.start_soon(_when_set, cut_short, tree.sessions.cut_drain_short)
            await run_root(tree.root, stop_requested=stop)
            nursery.cancel_scope.cancel()
    finally:
        remove_server_info(settings.server_file)
        with trio.CancelScope(shield=True):
            if threads is not None:
                await trio.to_thread.run_sync(threads.close)
            if journal is not None:
                journal.close()
            if embedded is not None:
                await trio.to_thread.run_sync(embedded.stop)


async def _wait_for_database(url: str, wait: float, stop: trio.Event) -> bool:
    """Connect once to the database, trying again with back-off for ``wait`` seconds while it
    does not answer (it may be starting with us): one log line per failed attempt, and one
    naming the database reached. ``False`` if a stop was asked for meanwhile.

    Raises :class:`DatabaseUnreachable` once ``wait`` has passed, and at once the
    :class:`DatabaseUnavailable` of a refused login or a missing database, which no wait cures.
    """
    target = DatabaseTarget.from_url(url)
    where = {"host": target.host, "port": target.port, "database": target.database}
    deadline = trio.current_time() + wait
    delay = DATABASE_RETRY_FIRST
    attempt = 0
    while True:
        attempt += 1
        timeout = min(DATABASE_CONNECT_TIMEOUT, deadline - trio.current_time())
        failure = await _connect_once(url, timeout)
        if failure is None:
            log.info("storage.connected", attempts=attempt, user=target.user, **where)
            return True
        if not isinstance(failure, DatabaseUnreachable):
            log.error("storage.database_refused", attempt=attempt, error=failure.message, **where)
            raise failure
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            log.error(
                "storage.database_unreachable", attempt=attempt, error=failure.message, **where
            )
            raise DatabaseUnreachable(
                f"{failure.message}; gave up after {attempt} attempt(s) in {wait:g} s: start it "
                "or fix --database-url (EXAI_DATABASE_URL); EXAI_DATABASE_WAIT sets how long "
                "to wait"
            ) from failure
        pause = min(delay, remaining)
        log.warning(
            "storage.database_unreachable",
            attempt=attempt,
            error=failure.message,
            retry_in_s=round(pause, 3),
            **where,
        )
        with trio.move_on_after(pause):
            await stop.wait()
        if stop.is_set():
            return False
        delay = min(delay * 2, DATABASE_RETRY_MAX)


async def _connect_once(url: str, connect_timeout: float) -> DatabaseUnavailable | None:
    """One attempt (:func:`storage.connection.check_database`): its failure, or ``None``."""
    try:
        await trio.to_thread.run_sync(partial(check_database, url, connect_timeout=connect_timeout))
    except DatabaseUnavailable as failure:
        return failure
    return None


class _Tree:
    """The root supervisor and what its children share."""

    def __init__(
        self,
        settings: Settings,
        config: NodeConfig,
        node_id: str,
        *,
        database_url: str,
        journal: Journal,
        threads: ThreadStore,
        announce: bool,
        announcer: Callable[[ServerInfo], None] | None = None,
        stop_requested: trio.Event,
    ) -> None:
        self.settings = settings
        self.config = config
        self.node_id = node_id
        self.announce = announce
        self.announcer = announcer
        self.persistence_name: ActorName[PersistenceActor] = ActorName("/root/persistence")
        self.persistence = PersistenceClient(
            self.persistence_name.resolve, durability=settings.durability
        )
        # The providers are filled in by their child while it runs; the rate limiter's client
        # is there for the node's life, whichever incarnation of its actor runs.
        self.upstream = Upstream()
        self.limiter_name: ActorName[RateLimiterActor] = ActorName("/root/rate_limiter")
        upstreams = {
            name: upstream_id(
                provider.base_url,
                provider.api_key.get_secret_value() if provider.api_key else None,
            )
            for name, provider in config.upstream.providers.items()
        }
        self.upstream.limiter, rate_limiter = supervised_rate_limiter(
            self.limiter_name,
            config.upstream.provider_limits(),
            config.upstream.client_limits,
            shared=(
                (lambda: SharedLimits(database_url, node_timeout=settings.node_timeout))
                if settings.shared_limits
                else None
            ),
            quotas=config.file.client_quotas(),
            upstreams=upstreams,
        )
        #: The rate limiter's view as last asked, published with the heartbeat.
        self._limits_seen: NodeLimits | None = None
        self.conversations = Conversations(
            store=threads,
            persistence=self.persistence,
            upstream=self.upstream,
            limits=config.file.chat,
        )
        persistence_config = PersistenceConfig(heartbeat_interval=settings.node_heartbeat_interval)
        #: ``/root/membership``: the periodic sweep of dead nodes, and the cluster view.
        self.membership = Membership(
            database_url,
            node_id,
            node_timeout=settings.node_timeout,
            sweep_interval=settings.sweep_interval,
            buckets=shared_buckets(
                config.upstream.provider_limits(),
                upstreams,
                config.upstream.client_limits.requests_per_minute,
                config.clients.identities,
            )
            if settings.shared_limits
            else (),
            quotas=config.file.client_quotas() if settings.shared_limits else {},
        )
        #: Every session of the node: what status, resume and the drain read.
        self.registry: SessionRegistry[LiveSession] = SessionRegistry(
            settings.resume_grace, max_parked=settings.max_sessions
        )
        self.database_ready = _DatabaseProbe(self.persistence)
        #: Set by the first SIGINT/SIGTERM: the tree is asked to stop, and the sessions drain.
        self.stop_requested = stop_requested
        self.sessions = Sessions(self.registry, max_sessions=settings.max_sessions)
        #: ``/root/sessions``: every session's actor is its dynamic child (``transient``, with
        #: the session's own intensity, so a crash-looping session gives up alone and this
        #: supervisor's own intensity is never charged). Concurrent shutdown: thousands of
        #: interchangeable children (OTP ``simple_one_for_one``).
        self.sessions_supervisor = Supervisor(concurrent_shutdown=True)
        # The listener's admission and counters outlive restarts of the sessions child.
        self.admission = HandshakeAdmission(
            max_total=settings.max_handshakes,
            max_per_address=settings.max_handshakes_per_address,
            trusted=settings.trusted_networks,
        )
        self.listener_counters = ListenerCounters()
        self.url: str | None = None
        self.http_url: str | None = None
        self.admin_url: str | None = None
        #: The running listener's Streamable HTTP endpoint (its open connections, for status).
        self.http: StreamableHttpEndpoint | None = None
        bounds = SessionBounds(
            mailbox_bytes=settings.session_mailbox_bytes,
            outgoing_bytes=settings.session_outgoing_bytes,
            outgoing_messages=settings.session_outgoing_messages,
            stall_timeout=settings.stall_timeout,
            max_batch=settings.max_batch,
            node_mailbox=NodeBudget("mailbox", settings.node_mailbox_bytes),
            node_outgoing=NodeBudget("outgoing", settings.node_outgoing_bytes),
        )
        total_slots = trio.CapacityLimiter(settings.max_inflight_total)
        #: ``/root/tool_workers``: plain ``def`` tools' worker threads, the loop watchdog.
        self.tool_workers = ToolWorkers(
            max_threads=settings.tool_threads, stall_ms=settings.loop_stall_ms
        )
        use_workers(self.tool_workers)
        #: ``/root/tasks``: where MCP tasks run, detached from sessions (docs/tasks.md).
        self.tasks = TaskHost(
            persistence=self.persistence,
            total_slots=total_slots,
            database_url=database_url,
            max_per_identity=settings.max_tasks_per_identity,
            retention_ms=round(settings.task_retention * 1000),
            node_timeout=settings.node_timeout,
        )
        #: Resumes on any node sharing the database (actors/session/handover.py); its pool
        #: is opened by the listener child, which serves the resumes.
        self.handover = Handover(
            SessionClaims(
                database_url,
                node_id,
                node_timeout=settings.node_timeout,
                grace=settings.resume_grace,
            ),
            self.persistence,
        )
        self.services = SessionServices(
            tools=builtin_tools(
                test_faults=settings.test_faults,
                conversations=self.conversations,
                extra=config.tools,
                access=config.access,
            ),
            persistence=self.persistence,
            config=SessionConfig(
                max_inflight=settings.max_inflight_per_session,
                test_faults=settings.test_faults,
                total_slots=total_slots,
                tasks=self.tasks,
                max_task_result_waiters=settings.max_task_result_waiters,
                task_after=settings.task_after,
                tools_list_changed=bool(config.file.servers),
                heartbeat_interval=settings.heartbeat_interval,
                page_size=settings.page_size,
                node_id=node_id,
                max_result_bytes=settings.max_stored_result_bytes,
            ),
            mailbox_capacity=settings.session_mailbox,
            max_message_bytes=settings.max_message_bytes,
            max_restarts=settings.session_max_restarts,
            restart_period=settings.session_restart_period,
            session_ended=self._session_ended,
            registry=self.registry,
            sessions=self.sessions_supervisor,
            bounds=bounds,
            handover=self.handover,
        )
        self.lifecycle = SessionLifecycle(self.services)
        #: ``/root/servers``: the proxied MCP servers of ``[servers]`` (docs/tools.md).
        self.servers = ProxiedServers(
            config.file.servers,
            registry=self.services.tools,
            # Its record of child processes is the node's own: a worker's successor kills
            # what its predecessor left, never a sibling's (runtime/child_process.py).
            state_dir=settings.node_dir,
            max_message_bytes=settings.max_message_bytes,
            on_change=self._tools_changed,
        )
        self.root = Supervisor(
            [
                ChildSpec(
                    "persistence",
                    pykka_child(
                        self.persistence_name,
                        partial(
                            PersistenceActor.start,
                            database_url,
                            journal,
                            config=persistence_config,
                        ),
                    ),
                    shutdown=60,
                ),
                ChildSpec("persistence_pulse", self._pulse, shutdown=60),
                # Reads and marks other nodes' rows only: needs nothing but the database.
                ChildSpec("membership", self.membership.run, shutdown=15),
                ChildSpec("rate_limiter", rate_limiter, shutdown=10),
                ChildSpec("providers", self._providers, shutdown=10),
                ChildSpec("admin", self._admin, shutdown=5),
                ChildSpec("tool_workers", self.tool_workers.watch, shutdown=5),
                # Compactions of long threads (a turn starts them, after its answer): after
                # the persistence, the limiter and the providers they use, before sessions,
                # so stopped (its compactions cancelled) once every session has drained.
                ChildSpec("conversations", self.conversations.run, shutdown=10),
                # Before sessions, which hand it tasks; stopped after every session has
                # drained: its running tasks are then cancelled and recorded.
                ChildSpec("tasks", self.tasks.run, shutdown=30),
                # Before sessions, whose calls they serve; stopped after them.
                self.servers.child_spec("servers"),
                # Before the listener, which starts its children: stopped after the listener
                # has drained every session (reverse start order).
                self.sessions_supervisor.child_spec("sessions"),
                ChildSpec("listener", self._listener, shutdown=None),
            ],
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=settings.root_max_restarts,
            period=settings.root_restart_period,
        )
        self.status = NodeStatusSource(
            node_id=node_id,
            sessions=self.sessions,
            url=lambda: self.url,
            http_url=lambda: self.http_url,
            registry=self.registry,
            persistence=self.persistence,
            limiter=lambda: self.upstream.limiter,
            breakers=self._breakers,
            supervisors=[self.root, self.sessions_supervisor, self.servers.supervisor],
            servers=self.servers.status,
            tools=self.services.tools,
            pykka_actors={
                "/root/persistence": self.persistence_name,
                "/root/rate_limiter": self.limiter_name,
            },
            tool_slots=self.services.config.total_slots,
            tool_workers=self.tool_workers,
            byte_budgets=(self.services.bounds.node_mailbox, self.services.bounds.node_outgoing),
            listener=lambda: listener_status(
                self.admission,
                self.listener_counters,
                self.http,
                http_connections_max=settings.max_http_connections,
            ),
            proxied={
                f"/root/servers/{name}": process
                for name, process in self.servers.processes().items()
            },
        )

    async def _session_ended(self, session_id: str) -> None:
        """A session is over: its proxied processes (``share = "session"``) stop, and the
        rate limiter forgets it."""
        self.servers.session_ended(session_id)
        await self.upstream.session_ended(session_id)

    def _tools_changed(self) -> None:
        """A proxied server's tools changed, or it went down or came back: every attached
        session tells its client (``notifications/tools/list_changed``)."""
        told = announce_tools_changed(entry.session.mailbox for entry in self.registry)
        if self.http is not None:
            self.http.tools_changed()  # 2026-07-28: the subscriptions/listen streams
        log.info("servers.tools_announced", sessions=told)

    def _breakers(self) -> list[BreakerSnapshot]:
        providers = self.upstream.providers
        return [p.breaker for p in providers.snapshot()] if providers is not None else []

    async def _admin(self, ctx: ChildContext) -> None:
        """The admin interface (exai status, metrics): up before the listener, so that
        server.json names it, and down after it, so a draining node can still be watched."""
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(
                partial(
                    serve_admin,
                    self.status,
                    state_dir=self.settings.state_dir,
                    cluster=self.membership.cluster,
                )
            )
            self.admin_url = endpoint.url
            ctx.started()
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()

    async def _pulse(self, ctx: ChildContext) -> None:
        """The persistence client's clock; on stop, a last flush that retires the node."""
        ctx.started()
        # The heartbeat goes out on a pulse: beat at least as often as it is due.
        period = min(1.0, self.settings.node_heartbeat_interval)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(self.persistence.pulse, period, snapshot=self._snapshot))
            nursery.start_soon(self._watch_limits)
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()
        with trio.move_on_after(30):
            await self.persistence.flush(retire=True)

    async def _watch_limits(self) -> None:
        """Ask the rate limiter for its view once per heartbeat, for :meth:`_snapshot` (which
        runs in the pulse and asks no actor: a limiter waiting on its database must not delay
        journal fsyncs). An answer that does not come within the interval leaves the last one
        (or none) in place."""
        interval = self.settings.node_heartbeat_interval
        while True:
            limiter = self.upstream.limiter
            if limiter is not None:
                with trio.move_on_after(interval):
                    try:
                        brief = await limiter.brief()
                    except ActorUnavailable:
                        self._limits_seen = None  # restarting: nothing to say
                    else:
                        self._limits_seen = node_limits(brief)
            await trio.sleep(interval)

    def _snapshot(self) -> dict[str, JsonValue]:
        """What this node publishes with its heartbeat (``nodes.snapshot``, read by
        ``exai status --cluster`` on any node): counts at hand, no actor asked."""
        slots = self.services.config.total_slots
        available = self.persistence.available
        draining = self.stop_requested.is_set()
        snapshot = NodeSnapshot(
            sessions=self.registry.attached,
            sessions_detached=self.registry.parked,
            calls_in_flight=int(slots.borrowed_tokens) if slots is not None else 0,
            storage_available=available,
            draining=draining,
            health="draining" if draining else "ok" if available else "degraded",
            limits=self._limits_seen,
        )
        return snapshot.model_dump(mode="json")

    async def _providers(self, ctx: ChildContext) -> None:
        """One HTTP client (and circuit breaker) per configured upstream, closed on stop."""
        async with open_providers(self.config.upstream) as providers:
            self.upstream.providers = providers
            ctx.started()
            try:
                await ctx.stop_requested.wait()
            finally:
                self.upstream.providers = None

    async def _listener(self, ctx: ChildContext) -> None:
        """The WebSocket listener, every connection, and the reaper of parked sessions; on
        stop, the drain. A restart binds the same address again."""
        settings = self.settings
        registry = self.registry
        registry.parking = True
        server = McpWebSocketServer(
            host=settings.host,
            port=settings.port,
            clients=self.config.clients,
            session_host=self.lifecycle,
            sessions=self.sessions,
            max_message_bytes=settings.max_message_bytes,
            handshake_timeout=settings.handshake_timeout,
            admission=self.admission,
            drain_timeout=settings.drain_timeout,
            work=_SessionWork(self.registry),
            database_ready=self.database_ready,
            ping_interval=settings.ws_ping_interval,
            ping_timeout=settings.ws_ping_timeout,
            counters=self.listener_counters,
            http=HttpConfig(
                max_body_bytes=settings.max_message_bytes,
                body_timeout=settings.handshake_timeout,
                keepalive_timeout=settings.http_keepalive,
                idle_timeout=settings.http_session_idle,
                sse_keepalive=settings.http_keepalive,
                max_connections=settings.max_http_connections,
                max_sessions_per_identity=settings.http_sessions_per_identity,
                max_exchanges_per_identity=settings.http_exchanges_per_identity,
                origins=settings.origin_policy,
            ),
            # A --workers worker shares the port with its siblings (runtime/workers.py).
            reuse_port=settings.worker_index > 0,
            stream_bounds=StreamBounds(
                max_bytes=settings.session_outgoing_bytes,
                max_messages=settings.session_outgoing_messages,
                stall_timeout=settings.stall_timeout,
                node=self.services.bounds.node_outgoing,
            ),
        )
        self.http = server.http
        self.handover.claims.open()  # connects in the pool's own threads; returns at once
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.run)  # the reaper of parked sessions
                # HTTP sessions' copies whose row ended on another node (a DELETE there).
                nursery.start_soon(
                    partial(
                        end_copies_ended_elsewhere,
                        self.handover,
                        registry,
                        interval=settings.sweep_interval,
                    )
                )
                async with trio.open_nursery() as serving:
                    await serving.start(server.run)
                    self._announce(server.url, server.http_url)
                    ctx.started()
                    await ctx.stop_requested.wait()
                    if not self.stop_requested.is_set():
                        # The root is giving up (a child failed past its intensity), nobody
                        # asked for a stop: what the calls in flight need may be gone, so
                        # none is waited for.
                        self.sessions.cut_drain_short()
                    registry.parking = False  # sessions closed by us are over, not parked
                    remove_server_info(settings.server_file)
                    server.stop()
                # server.run has returned: every session has ended; the reaper's work is done.
                nursery.cancel_scope.cancel()
        except ExceptionGroup as group:
            error = sole_exception(group)
            if isinstance(error, StartupError):
                # The bind failed: its message explains it, so the supervisor is handed the
                # error itself (logged without a traceback), not the nurseries' wrapping.
                raise error from error.__cause__
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.handover.claims.close)
        await registry.expire_all()

    def _announce(self, url: str, http_url: str) -> None:
        """The listener serves ``url`` (WebSocket) and ``http_url`` (Streamable HTTP, the
        same port): written to ``server.json``, printed once. The printed line's first word
        after ``serving MCP on`` stays the WebSocket URL, which scripts read."""
        settings = self.settings
        self.url, self.http_url = url, http_url
        info = ServerInfo(
            url=url,
            pid=os.getpid(),
            started_at=datetime.now(UTC),
            protocol_versions=list(SUPPORTED_VERSIONS),
            admin_url=self.admin_url,
            http_url=http_url,
            node_id=self.node_id,
        )
        settings.server_file.parent.mkdir(parents=True, exist_ok=True)
        write_server_info(settings.server_file, info)
        if self.announcer is not None:
            self.announcer(info)
        if self.announce:
            self.announce = False  # once per process, not per restart
            print(
                f"exai: serving MCP on {url} (WebSocket) and {http_url} (Streamable HTTP)",
                file=sys.stdout,
                flush=True,
            )
        log.info("server.ready", url=url, http_url=http_url)


async def _stop_when_orphaned(
    lifeline: Callable[[], Awaitable[None]], stop: trio.Event, cut_short: trio.Event
) -> None:
    """A worker whose parent is gone (killed: its end of the socket pair closed) stops at
    once: its calls in flight are cancelled, its sessions closed, its writes flushed."""
    await lifeline()
    log.warning("server.parent_gone")
    stop.set()
    cut_short.set()


async def _when_set(event: trio.Event, action: Callable[[], None]) -> None:
    await event.wait()
    action()


async def _stop_on_signal(
    signals: AsyncIterator[int], stop: trio.Event, cut_drain_short: Callable[[], None]
) -> None:
    """First signal: ask the tree to stop (a drain). Second: cancel the calls the drain waits
    for. Later ones: say we are already at it."""
    received = 0
    async for signum in signals:
        name = signal.Signals(signum).name
        received += 1
        if received == 1:
            log.info("server.stopping", signal=name)
            stop.set()
        elif received == 2:
            log.warning("server.stopping_now", signal=name)
            cut_drain_short()
        else:
            log.warning("server.already_stopping", signal=name)


class _SessionWork:
    """What the drain of :mod:`runtime.server` asks of the sessions (its ``SessionWork``),
    read from the session registry."""

    def __init__(self, registry: SessionRegistry[LiveSession]) -> None:
        self._registry = registry

    def pending(self, session_id: str) -> bool:
        entry = self._registry.get(session_id)
        if entry is None:
            return False
        live = entry.session
        unwritten = live.outbox is not None and len(live.outbox) > 0
        return live.state.has_pending() or unwritten

    def cancel_all(self) -> int:
        cancelled = 0
        for entry in self._registry:
            if entry.phase is not SessionPhase.ATTACHED:
                continue  # parked: its calls ended with its socket
            cancelled += entry.session.state.cancel_calls()
        return cancelled


class _DatabaseProbe:
    """``/readyz``'s question "is the database reachable?": the persistence actor's breaker is
    closed and storage takes new work (as ``exai status`` shows it, actors/status.py).

    ``/readyz`` needs no token, so however often it is asked, the actor is asked at most once
    per ``period`` seconds (its pulse's pace); concurrent probes share one answer. No answer
    within ``timeout`` seconds counts as unreachable.
    """

    def __init__(
        self, persistence: PersistenceClient, *, period: float = 1.0, timeout: float = 2.0
    ) -> None:
        self._persistence = persistence
        self._period = period
        self._timeout = timeout
        self._reachable = False
        self._fresh_until = -math.inf
        self._asking: trio.Event | None = None

    async def __call__(self) -> bool:
        while self._asking is not None:  # another probe is asking: share its answer
            await self._asking.wait()
        if trio.current_time() < self._fresh_until:
            return self._reachable
        self._asking = asking = trio.Event()
        try:
            reachable = False
            with trio.move_on_after(self._timeout):
                try:
                    status = await self._persistence.status()
                except ActorUnavailable:
                    pass  # restarting: not reachable now
                else:
                    reachable = status.database == "up" and status.available
            self._reachable = reachable
            self._fresh_until = trio.current_time() + self._period
        finally:
            self._asking = None
            asking.set()
        return self._reachable
