"""One server process ("node"): storage, then the supervision tree, then the announcement.

Start-up order is dependency order, and shutdown is its exact reverse, so nothing is ever
used after what it depends on has gone:

1. storage (not an actor): the database (embedded Postgres under the state dir, or
   ``--database-url``), migrations, the write journal, and crash recovery: the journal of a
   killed predecessor is replayed and its ``running`` tasks become ``interrupted`` *before*
   any session is accepted;
2. the root supervisor (one_for_one), whose children start in order:
   ``persistence`` (pykka actor, reached through an :class:`ActorName`), ``persistence_pulse``
   (the trio side's timer: journal fsyncs, activity sync, heartbeats), and ``sessions`` (the
   WebSocket listener with the sessions supervisor);
3. ``server.json`` and the one line announcing the URL.

On SIGINT or SIGTERM the root is asked to stop (never cancelled, so every child gets its grace
period): ``sessions`` stops accepting and closes every session with 1001 (each records its
end), ``persistence_pulse`` flushes what is buffered, ``persistence`` stops behind every write
already sent. Then the journal is closed and the embedded Postgres stopped. A root that gives
up (more than ``EXAI_ROOT_MAX_RESTARTS`` restarts within the period) raises
:class:`~runtime.supervision.SupervisorGaveUp`; the CLI reports it and exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial

import structlog
import trio

from actors.persistence import PersistenceActor, PersistenceClient, PersistenceConfig
from actors.session import SessionConfig, SessionLifecycle, SessionServices
from actors.tools import builtin_tools
from runtime.auth import load_or_create_token
from runtime.config import Settings
from runtime.mcp.versions import SUPPORTED_VERSIONS
from runtime.pykka_supervision import ActorName, pykka_child
from runtime.server import McpWebSocketServer, Sessions
from runtime.statefile import ServerInfo, remove_server_info, write_server_info
from runtime.supervision import ChildContext, ChildSpec, Strategy, Supervisor, run_root
from storage.embedded import EmbeddedPostgres
from storage.journal import Journal
from storage.migrations import apply_migrations
from storage.recovery import recover

log = structlog.get_logger("node")


async def run_node(settings: Settings, *, announce: bool = True) -> None:
    """Run until SIGINT/SIGTERM, then shut down in order. Returns normally on a clean stop.

    The signal receiver stays open until the very end, so a second Ctrl-C during shutdown is
    logged and ignored instead of interrupting the flush of accepted writes.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _run(settings, signals, announce=announce)
    log.info("server.stopped")


async def _run(settings: Settings, signals: AsyncIterator[int], *, announce: bool) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    token = load_or_create_token(settings.token_file, settings.token)
    node_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    embedded: EmbeddedPostgres | None = None
    journal: Journal | None = None
    try:
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.pgdata)
            reused = embedded.initialised
            url = await trio.to_thread.run_sync(embedded.start)
            log.info("storage.embedded", pgdata=str(settings.pgdata), reused=reused)
        applied = await trio.to_thread.run_sync(apply_migrations, url)
        log.info("storage.migrated", applied=applied)
        journal = Journal.open(
            settings.state_dir / "journal",
            node_id=node_id,
            max_bytes=settings.journal_max_bytes,
        )
        report = await trio.to_thread.run_sync(partial(recover, url, journal))
        log.info("storage.recovered", report=report.model_dump(mode="json"))

        tree = _Tree(settings, token, node_id, url, journal, announce=announce)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, stop)
            await run_root(tree.root, stop_requested=stop)
            nursery.cancel_scope.cancel()  # the signal watcher's job is done
    finally:
        remove_server_info(settings.server_file)
        with trio.CancelScope(shield=True):
            if journal is not None:
                journal.close()
            if embedded is not None:
                await trio.to_thread.run_sync(embedded.stop)


class _Tree:
    """The root supervisor and what its children share."""

    def __init__(
        self,
        settings: Settings,
        token: str,
        node_id: str,
        database_url: str,
        journal: Journal,
        *,
        announce: bool,
    ) -> None:
        self.settings = settings
        self.token = token
        self.announce = announce
        self.persistence_name: ActorName[PersistenceActor] = ActorName("/root/persistence")
        self.persistence = PersistenceClient(lambda: self.persistence_name.ref)
        config = PersistenceConfig()
        self.services = SessionServices(
            tools=builtin_tools(test_faults=settings.test_faults),
            persistence=self.persistence,
            config=SessionConfig(
                max_inflight=settings.max_inflight_per_session,
                test_faults=settings.test_faults,
                total_slots=trio.CapacityLimiter(settings.max_inflight_total),
                heartbeat_interval=settings.heartbeat_interval,
                page_size=settings.page_size,
                node_id=node_id,
            ),
            mailbox_capacity=settings.session_mailbox,
            max_message_bytes=settings.max_message_bytes,
            max_restarts=settings.session_max_restarts,
            restart_period=settings.session_restart_period,
        )
        self.lifecycle = SessionLifecycle(self.services, resume_grace=settings.resume_grace)
        self.root = Supervisor(
            [
                ChildSpec(
                    "persistence",
                    pykka_child(
                        self.persistence_name,
                        partial(PersistenceActor.start, database_url, journal, config=config),
                    ),
                    shutdown=60,
                ),
                ChildSpec("persistence_pulse", self._pulse, shutdown=60),
                ChildSpec("sessions", self._sessions, shutdown=None),
            ],
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=settings.root_max_restarts,
            period=settings.root_restart_period,
        )

    async def _pulse(self, ctx: ChildContext) -> None:
        """The persistence client's clock; on stop, a last flush that retires the node."""
        ctx.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.persistence.pulse)
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()
        with trio.move_on_after(30):
            await self.persistence.flush(retire=True)

    async def _sessions(self, ctx: ChildContext) -> None:
        """The listener and every session. A restart binds the same address again."""
        settings = self.settings
        resumable = self.lifecycle.resumable
        resumable.parking = True
        server = McpWebSocketServer(
            host=settings.host,
            port=settings.port,
            token=self.token,
            session_host=self.lifecycle,
            sessions=Sessions(max_sessions=settings.max_sessions),
            max_message_bytes=settings.max_message_bytes,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resumable.run)
            async with trio.open_nursery() as serving:
                await serving.start(server.run)
                self._announce(server.url)
                ctx.started()
                await ctx.stop_requested.wait()
                resumable.parking = False  # sessions closed by us are over, not parked
                remove_server_info(settings.server_file)
                server.stop()
            # server.run has returned: every session has ended; the reaper's work is done.
            nursery.cancel_scope.cancel()
        await resumable.expire_all()

    def _announce(self, url: str) -> None:
        settings = self.settings
        write_server_info(
            settings.server_file,
            ServerInfo(
                url=url,
                pid=os.getpid(),
                started_at=datetime.now(UTC),
                protocol_versions=list(SUPPORTED_VERSIONS),
            ),
        )
        if self.announce:
            self.announce = False  # once per process, not per restart
            print(f"exai: serving MCP on {url}", file=sys.stdout, flush=True)
        log.info("server.ready", url=url)


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    """First signal: ask the tree to stop. Later ones: say we are already at it."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("server.already_stopping", signal=name)
            continue
        log.info("server.stopping", signal=name)
        stop.set()
