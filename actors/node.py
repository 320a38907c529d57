"""One server process ("node"): storage, the actor tree, the listener, in that order.

Start-up order is dependency order, and shutdown is its exact reverse, so nothing is ever
used after what it depends on has gone:

1. the database (embedded Postgres under the state dir, or ``--database-url``) and migrations;
2. the persistence actor, which owns every write;
3. the WebSocket listener and the sessions supervisor;
4. ``server.json`` and the one line announcing the URL.

On SIGINT or SIGTERM: remove ``server.json``, stop accepting, close sessions with 1001 (each
records its end through persistence), stop the persistence actor after every queued write
(pykka queues ``stop`` behind them), close the pool, stop the embedded Postgres if we run it.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial

import pykka
import structlog
import trio
from psycopg_pool import ConnectionPool

from actors.persistence import PersistenceActor, PersistenceClient
from actors.session import SessionConfig, SessionLifecycle, SessionServices
from actors.tools import builtin_tools
from runtime.auth import load_or_create_token
from runtime.config import Settings
from runtime.mcp.versions import SUPPORTED_VERSIONS
from runtime.server import McpWebSocketServer, Sessions
from runtime.statefile import ServerInfo, remove_server_info, write_server_info
from storage.embedded import EmbeddedPostgres
from storage.migrations import apply_migrations
from storage.pool import open_pool

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
    embedded: EmbeddedPostgres | None = None
    pool: ConnectionPool | None = None
    persistence: pykka.ActorRef[PersistenceActor] | None = None
    try:
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.pgdata)
            reused = embedded.initialised
            url = await trio.to_thread.run_sync(embedded.start)
            log.info("storage.embedded", pgdata=str(settings.pgdata), reused=reused)
        applied = await trio.to_thread.run_sync(apply_migrations, url)
        log.info("storage.migrated", applied=applied)
        pool = await trio.to_thread.run_sync(partial(open_pool, url, max_size=settings.db_pool_max))
        persistence = PersistenceActor.start(pool)
        services = SessionServices(
            tools=builtin_tools(test_faults=settings.test_faults),
            persistence=PersistenceClient(persistence),
            config=SessionConfig(
                max_inflight=settings.max_inflight_per_session,
                test_faults=settings.test_faults,
                total_slots=trio.CapacityLimiter(settings.max_inflight_total),
                heartbeat_interval=settings.heartbeat_interval,
                page_size=settings.page_size,
            ),
            mailbox_capacity=settings.session_mailbox,
            max_message_bytes=settings.max_message_bytes,
            max_restarts=settings.session_max_restarts,
            restart_period=settings.session_restart_period,
            node_id=f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        )
        lifecycle = SessionLifecycle(services, resume_grace=settings.resume_grace)
        server = McpWebSocketServer(
            host=settings.host,
            port=settings.port,
            token=token,
            session_host=lifecycle,
            sessions=Sessions(max_sessions=settings.max_sessions),
            max_message_bytes=settings.max_message_bytes,
        )
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[str]) -> None:
                await server.run(task_status=task_status)
                # Sessions are closed; parked ones cannot be resumed from a dying process.
                await lifecycle.resumable.expire_all()
                nursery.cancel_scope.cancel()  # the reaper's and signal watcher's job is done

            def stop() -> None:
                lifecycle.resumable.parking = False  # sessions closed by us are over
                remove_server_info(settings.server_file)
                server.stop()

            nursery.start_soon(lifecycle.resumable.run)

            await nursery.start(serve)
            write_server_info(
                settings.server_file,
                ServerInfo(
                    url=server.url,
                    pid=os.getpid(),
                    started_at=datetime.now(UTC),
                    protocol_versions=list(SUPPORTED_VERSIONS),
                ),
            )
            if announce:
                print(f"exai: serving MCP on {server.url}", file=sys.stdout, flush=True)
            log.info("server.ready", url=server.url)
            nursery.start_soon(_stop_on_signal, signals, stop)
    finally:
        remove_server_info(settings.server_file)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(_stop_storage, persistence, pool, embedded))


async def _stop_on_signal(signals: AsyncIterator[int], stop: Callable[[], None]) -> None:
    """First signal: begin shutdown. Later ones: say we are already at it."""
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if stopping:
            log.warning("server.already_stopping", signal=name)
            continue
        stopping = True
        log.info("server.stopping", signal=name)
        stop()


def _stop_storage(
    persistence: pykka.ActorRef[PersistenceActor] | None,
    pool: ConnectionPool | None,
    embedded: EmbeddedPostgres | None,
) -> None:
    """Blocking, in reverse start order: flush and stop the actor, the pool, then Postgres."""
    if persistence is not None:
        persistence.stop(block=True, timeout=30)
    if pool is not None:
        pool.close()
    if embedded is not None:
        embedded.stop()
