"""``exai serve --workers N``: one parent process and N worker processes on one port.

One node is one trio program, and one trio program is one core: the GIL (and the one event
loop) bound what a node can do. With ``--workers N`` the CLI's process becomes the
**parent** (this module) and starts N **workers**, each a whole node (``actors.node``: its
own supervision tree, pools, journal, admin interface, node id in ``nodes``), all listening
on the same MCP port with ``SO_REUSEPORT`` (socket(7): the kernel spreads new connections over
the group's sockets by a hash of their addresses) and all on the one database. The parent
serves no MCP itself and does no per-call work; it:

* holds the state dir's lock (``runtime/statefile.py``; taken by the CLI before this runs),
  so the workers, which take none, are still one server per state dir;
* reserves the port (:func:`runtime.listener.reserve_port`: bound, never listening, with
  ``SO_REUSEPORT``), choosing it when ``--port 0``, so every worker and every successor
  binds the same one, and nobody else can;
* creates the client and admin tokens before any worker could race to;
* owns the embedded Postgres (started before the workers, with ``max_connections`` room for
  all of them, and stopped after the last one has exited), or passes ``--database-url`` on,
  having checked that the database has room for every worker's connections
  (``storage/connection_budget.py``: refused at once, exit code 4, if not): each worker
  then waits for the database and applies the migrations as a single node does (the
  migrations' advisory lock makes that once, storage/migrations.py), so a worker restarted
  during a database outage behaves as a node started during one;
* supervises the workers with the project's :class:`~runtime.supervision.Supervisor`
  (one_for_one, the root's intensity: ``EXAI_ROOT_MAX_RESTARTS`` restarts within
  ``EXAI_ROOT_RESTART_PERIOD`` seconds, then it gives up, stops every worker and exits 1).
  A worker that exits without being asked is restarted after a back-off
  (:data:`BACKOFF_FIRST` seconds, doubled for each quick failure in a row, at most
  :data:`BACKOFF_MAX`). Its successor settles what it left: its start-up recovery
  (storage/recovery.py) replays the dead worker's journal (one file per process, whose lock
  the kernel released) and marks that node's running tasks and active sessions
  ``interrupted``, once (the update is conditional on their status);
* writes ``server.json`` (the shared URL, and each worker's pid, node id and admin
  interface: ``exai status`` asks every worker) once every worker serves, rewrites it when
  a successor does, and prints the one ``serving MCP on`` line;
* passes SIGHUP on to every worker (each reloads its client tokens and tool access);
* on SIGINT/SIGTERM asks every worker at once to stop (SIGTERM: each drains as a node
  does), waits for all, then stops the Postgres and releases the lock (exit 0); a second
  signal is passed on too (it cuts each worker's drain short).

**Workers never outlive the parent.** A worker is the leader of its own process group, so a
terminal's Ctrl-C reaches the parent alone (which passes one SIGTERM on: a second one
straight from the terminal would cut the drain short). Its lifeline is a socket pair with
the parent (the descriptor in ``EXAI_WORKER_CHANNEL``): the worker writes one line of JSON
(its :class:`~runtime.statefile.ServerInfo`) each time its listener serves, and reads for the
end of the stream, which comes when the parent is gone however it went (SIGKILL included):
it then stops at once (``actors.node.run_node``'s ``lifeline``). The other way, the worker
sends an empty line every :data:`PULSE_S` seconds from its event loop; one that has served
and then goes ``EXAI_WORKER_TIMEOUT`` seconds without a line (stopped, its loop blocked) is
killed and restarted, since the kernel would go on giving it its share of new connections.
``PR_SET_PDEATHSIG`` would not do: it fires when the *thread* that forked exits (prctl(2)),
and trio starts processes from its worker threads, which come and go. A worker whose task is
cancelled (a parent that gives up) has its whole group killed (SIGKILL) before the task ends.

Each worker's own files are under ``<state-dir>/workers/<index>/`` (``runtime.config``'s
``node_dir``): its ``server.json``, ``logs/exai.log``, and the record of its proxied stdio
servers' process groups (a successor kills its predecessor's, never a sibling's). Journals
stay in ``<state-dir>/journal/``, one file per process, so any worker's start-up recovery
finds every dead process's journal. Its console log goes to the parent's stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import structlog
import trio
from pydantic import ValidationError

from runtime.actor import sole_exception
from runtime.admin import load_admin_token
from runtime.auth import load_or_create_token
from runtime.config import Settings, worker_dir
from runtime.listener import reserve_port
from runtime.logs import LogSettings, log_path
from runtime.statefile import ServerInfo, WorkerInfo, remove_server_info, write_server_info
from runtime.supervision import ChildContext, ChildSpec, Restart, Strategy, Supervisor, run_root
from storage.connection_budget import check_room, embedded_max_connections
from storage.embedded import EmbeddedPostgres

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "WorkerExited",
    "WorkerParent",
    "worker_channel",
]

log = structlog.get_logger("workers")

#: Seconds before a dead worker's first restart; doubled for each further quick failure.
BACKOFF_FIRST = 0.5
#: The longest back-off, in seconds.
BACKOFF_MAX = 10.0
#: A worker that served for this many seconds before dying was not failing quickly: its
#: successor's back-off starts again from :data:`BACKOFF_FIRST`.
QUICK_FAILURE_S = 30.0
#: Exit code of the parent when a worker could not start or the parent gave up.
EXIT_FAILED = 1
#: The longest announcement line read from a worker (a ServerInfo is a few hundred bytes).
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
#: Seconds between a worker's signs of life (an empty line) to the parent, sent from its
#: event loop: a worker stopped (SIGSTOP) or whose loop is blocked sends none, and the parent
#: kills it after ``EXAI_WORKER_TIMEOUT`` seconds of silence (``Settings.worker_timeout``).
PULSE_S = 0.5


def describe_exit(code: int) -> str:
    """A process's return code as a person reads it: ``exit code 4``, ``signal SIGKILL``
    (``signal 40`` for a real-time signal, which has no name)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


class WorkerExited(Exception):
    """A worker process ended without being asked to: its supervisor restarts it."""

    def __init__(self, index: int, pid: int, code: int) -> None:
        super().__init__(f"worker {index} (pid {pid}) ended on its own: {describe_exit(code)}")
        self.index = index
        self.pid = pid
        self.code = code


@dataclass(slots=True)
class _Slot:
    """One worker's place (1..N), across its incarnations."""

    index: int
    info: WorkerInfo | None = None
    started_at: float = 0.0
    #: trio's clock when the worker was last heard from (a line on its socket pair).
    heard_at: float = 0.0
    #: Set when the current incarnation first serves (its announcement).
    served: trio.Event = field(default_factory=trio.Event)
    quick_failures: int = 0

    def backoff(self, now: float) -> float:
        """The pause before the next incarnation, in seconds (module doc)."""
        if now - self.started_at >= QUICK_FAILURE_S:
            self.quick_failures = 0
        delay: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**self.quick_failures)
        self.quick_failures += 1
        return delay


class WorkerParent:
    """The parent of ``count`` workers (module doc). :meth:`run` until a stop; then
    :attr:`exit_code` says how it ended."""

    def __init__(self, settings: Settings, log_settings: LogSettings, *, announce: bool = True):
        self.settings = settings
        self.log_settings = log_settings
        self.announce = announce
        self.count = settings.workers
        self.state_dir = settings.state_dir.resolve()
        self.slots = [_Slot(index) for index in range(1, self.count + 1)]
        self.url = ""
        self.http_url = ""
        self.port = 0
        self.database_url = ""
        #: Set by the first SIGINT/SIGTERM (or a worker failing to start): everything stops.
        self.stopping = trio.Event()
        #: Set by the second: passed on to every worker, cutting its drain short.
        self.cut_short = trio.Event()
        #: Set once every worker has served: ``server.json`` written, the line printed.
        self.serving = trio.Event()
        #: How it ended: 0, or the code of a worker that could not start (2..5), or 1.
        self.exit_code = 0
        self.failure: str | None = None
        self.started_at = datetime.now(UTC)
        #: The running worker processes, by index (SIGHUP is passed on to each).
        self._processes: dict[int, trio.Process] = {}
        self.supervisor = Supervisor(
            [
                ChildSpec(
                    f"worker-{slot.index}",
                    partial(self._worker, slot),
                    # Returns normally when asked to stop, or when it failed before the server
                    # ever served (the parent then stops): nothing to restart. Raises when it
                    # died on its own: restarted.
                    restart=Restart.TRANSIENT,
                    shutdown=None,  # the worker's own drain is bounded (EXAI_DRAIN_TIMEOUT)
                )
                for slot in self.slots
            ],
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=settings.root_max_restarts,
            period=settings.root_restart_period,
            concurrent_shutdown=True,  # every worker drains at the same time
        )

    # -- the parent's life ---------------------------------------------------------------------

    async def run(self) -> None:
        """Signals watched from the start; the port, the database, the workers; then, in
        reverse, everything stopped. Raises :class:`~storage.startup_errors.StartupError`
        (the port, the embedded Postgres, a database without room for the workers'
        connections) before any worker starts, and
        :class:`~runtime.supervision.SupervisionError` if the workers' supervisor gives up."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals)
                    await self._serve()
                    nursery.cancel_scope.cancel()
            except ExceptionGroup as group:
                error = sole_exception(group)  # the verdict, to the CLI as itself
                raise error from error.__cause__
        log.info("workers.stopped", exit_code=self.exit_code)

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        received = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                # Each worker reloads its client tokens and tool access (actors/node.py).
                log.info("workers.reloading", workers=len(self._processes))
                for process in self._processes.values():
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGHUP)
                continue
            received += 1
            if received == 1:
                log.info("workers.stopping", signal=name)
                self.stopping.set()
            elif received == 2:
                log.warning("workers.stopping_now", signal=name)
                self.cut_short.set()
            else:
                log.warning("workers.already_stopping", signal=name)

    async def _serve(self) -> None:
        settings = self.settings
        self.port, reserved = reserve_port(settings.host, settings.port)
        embedded: EmbeddedPostgres | None = None
        try:
            url = settings.database_url
            if url is None:
                # Room for every worker's connections (storage/connection_budget.py).
                embedded = EmbeddedPostgres(
                    settings.pgdata, max_connections=embedded_max_connections(self.count)
                )
                reused = embedded.initialised
                url = await trio.to_thread.run_sync(embedded.start)
                log.info("storage.embedded", pgdata=str(settings.pgdata), reused=reused)
            self.database_url = url
            # Refused now, in one line, rather than N workers each serving with its
            # persistence refused ("too many clients") under load.
            await trio.to_thread.run_sync(
                partial(check_room, url, self.count, what=f"--workers {self.count}")
            )
            # Made once here, not raced for by N workers at their first start.
            load_or_create_token(settings.token_file, settings.token)
            load_admin_token(settings.state_dir)
            log.info("workers.starting", workers=self.count, port=self.port)
            if not self.stopping.is_set():
                await run_root(self.supervisor, name="workers", stop_requested=self.stopping)
        finally:
            remove_server_info(settings.server_file)
            with trio.CancelScope(shield=True):
                if embedded is not None:
                    await trio.to_thread.run_sync(embedded.stop)
                for sock in reserved:
                    sock.close()

    # -- one worker ----------------------------------------------------------------------------

    async def _worker(self, slot: _Slot, ctx: ChildContext) -> None:
        """One incarnation of worker ``slot``: started, watched, asked to stop (module doc)."""
        if ctx.restarts:
            delay = slot.backoff(trio.current_time())
            log.info("workers.restart_in", worker=slot.index, delay_s=delay)
            with trio.move_on_after(delay):
                await self.stopping.wait()
        if self.stopping.is_set():
            ctx.started()
            return
        process, ours = await self._spawn(slot.index)
        slot.info, slot.started_at = None, trio.current_time()
        slot.heard_at, slot.served = slot.started_at, trio.Event()
        self._processes[slot.index] = process
        log.info("workers.started", worker=slot.index, pid=process.pid, restarts=ctx.restarts)
        ctx.started()
        channel = trio.socket.from_stdlib_socket(ours)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_announcements, slot, process.pid, channel)
                nursery.start_soon(self._pass_signals_on, process, ctx.stop_requested)
                nursery.start_soon(self._kill_when_silent, slot, process.pid)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            channel.close()
            self._processes.pop(slot.index, None)
            if process.returncode is None:  # cancelled: nobody waits for a drain any more
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
        slot.info = None
        self._ended(slot, process.pid, code, asked=ctx.stop_requested.is_set())

    async def _spawn(self, index: int) -> tuple[trio.Process, socket.socket]:
        """Worker ``index``'s process, and the parent's end of their socket pair."""
        ours, theirs = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "runtime.cli", "serve"],
                env=self._environment(index, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: the terminal's signals are ours
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return process, ours

    def _ended(self, slot: _Slot, pid: int, code: int, *, asked: bool) -> None:
        """A worker's process has exited with ``code``: stopped (``asked``), failed to start
        (the parent stops too), or died (raises :class:`WorkerExited`: restarted)."""
        if asked:
            log.info("workers.exited", worker=slot.index, pid=pid, exit_code=code)
            # -SIGTERM: asked before its signal handler was installed (still importing).
            if code not in (0, -signal.SIGTERM) and self.exit_code == 0:
                self.exit_code = EXIT_FAILED
                self.failure = f"worker {slot.index} (pid {pid}) stopped with {describe_exit(code)}"
            return
        if not self.serving.is_set():
            # It could not start (its own line on stderr says why: a bad config, the
            # database): the server does not start either, with the worker's exit code.
            log.error("workers.start_failed", worker=slot.index, pid=pid, exit_code=code)
            if self.exit_code == 0:
                self.exit_code = code if 2 <= code <= 5 else EXIT_FAILED
                self.failure = (
                    f"worker {slot.index} could not start ({describe_exit(code)}); its log: "
                    f"{log_path(worker_dir(self.state_dir, slot.index))}"
                )
            self.stopping.set()
            return
        self._write_server_info()
        raise WorkerExited(slot.index, pid, code)

    async def _pass_signals_on(self, process: trio.Process, stop_requested: trio.Event) -> None:
        """The supervisor's stop request, then the operator's second signal, as SIGTERMs."""
        await stop_requested.wait()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await self.cut_short.wait()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)

    async def _kill_when_silent(self, slot: _Slot, pid: int) -> None:
        """Kill (SIGKILL, its group) a worker that has served and then sent nothing for
        ``worker_timeout`` seconds: stopped, or its event loop blocked. Its exit is then a
        death like any other (restarted). Before it serves, its start is bounded by its own
        database wait, not by this."""
        timeout = self.settings.worker_timeout
        await slot.served.wait()
        while True:
            await trio.sleep_until(slot.heard_at + timeout)
            if trio.current_time() - slot.heard_at < timeout:
                continue
            log.error(
                "workers.unresponsive", worker=slot.index, pid=pid, silent_s=round(timeout, 1)
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            return

    async def _read_announcements(
        self, slot: _Slot, pid: int, channel: trio.socket.SocketType
    ) -> None:
        """Each line the worker writes is its ServerInfo, sent whenever its listener serves."""
        buffer = b""
        while True:
            chunk = await channel.recv(4096)
            if not chunk:
                return
            slot.heard_at = trio.current_time()
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line:  # an empty line is a sign of life (PULSE_S)
                    self._announced(slot, pid, line)
            if len(buffer) > MAX_ANNOUNCEMENT_BYTES:
                log.error("workers.bad_announcement", worker=slot.index, bytes=len(buffer))
                return

    def _announced(self, slot: _Slot, pid: int, line: bytes) -> None:
        try:
            info = ServerInfo.model_validate_json(line)
        except ValidationError as exc:
            log.error(  # noqa: TRY400 - a peer's bad line, not our bug: no traceback
                "workers.bad_announcement", worker=slot.index, error=str(exc)[:200]
            )
            return
        self.url, self.http_url = info.url, info.http_url or ""
        slot.info = WorkerInfo(
            index=slot.index,
            pid=pid,
            node_id=info.node_id or "",
            admin_url=info.admin_url,
            started_at=info.started_at,
        )
        slot.served.set()
        log.info("workers.ready", worker=slot.index, pid=pid, node_id=info.node_id)
        if self.serving.is_set():
            self._write_server_info()
            return
        if all(s.info is not None for s in self.slots):
            self._write_server_info()
            self.serving.set()
            log.info("server.ready", url=self.url, http_url=self.http_url, workers=self.count)
            if self.announce:
                print(
                    f"exai: serving MCP on {self.url} (WebSocket) and {self.http_url} "
                    f"(Streamable HTTP), {self.count} workers",
                    file=sys.stdout,
                    flush=True,
                )

    def _write_server_info(self) -> None:
        if self.stopping.is_set():
            return  # removed on the way out; a late announcement must not bring it back
        workers = [slot.info for slot in self.slots if slot.info is not None]
        write_server_info(
            self.settings.server_file,
            ServerInfo(
                url=self.url,
                pid=os.getpid(),
                started_at=self.started_at,
                protocol_versions=_versions(),
                admin_url=workers[0].admin_url if workers else None,
                http_url=self.http_url,
                workers=workers,
                worker_count=self.count,
            ),
        )

    def _environment(self, index: int, channel: int) -> dict[str, str]:
        """The worker's settings: the parent's, through ``EXAI_*`` (the flags it was given
        included), with the port and database chosen here and its own index and channel."""
        settings = self.settings
        env = dict(os.environ)
        env.update(
            EXAI_HOST=settings.host,
            EXAI_PORT=str(self.port),
            EXAI_STATE_DIR=str(self.state_dir),
            EXAI_DATABASE_URL=self.database_url,
            EXAI_DATABASE_WAIT=str(settings.database_wait),
            EXAI_DURABILITY=settings.durability.value,
            EXAI_LOG_LEVEL=settings.log_level,
            EXAI_TRACE_SAMPLE=str(self.log_settings.trace_sample),
            EXAI_LOG_CONSOLE=self.log_settings.log_console,
            EXAI_WORKERS="1",
            EXAI_WORKER_INDEX=str(index),
            EXAI_WORKER_CHANNEL=str(channel),
        )
        if settings.config is not None:
            env["EXAI_CONFIG"] = str(settings.config.resolve())
        return env


def _versions() -> list[str]:
    from runtime.mcp.versions import SUPPORTED_VERSIONS  # noqa: PLC0415 - parent only

    return list(SUPPORTED_VERSIONS)


async def _pulse(channel: trio.socket.SocketType) -> None:
    """A sign of life (an empty line) to the parent every :data:`PULSE_S` seconds."""
    while True:
        await trio.sleep(PULSE_S)
        try:
            await channel.send(b"\n")
        except OSError:  # the parent is gone: the lifeline's read says so
            return


def worker_channel(fd: int) -> tuple[Callable[[ServerInfo], None], Callable[[], Awaitable[None]]]:
    """A worker's side of its socket pair with the parent: the ``announcer`` (writes one
    JSON line per :class:`ServerInfo`) and the ``lifeline`` (returns when the parent's end is
    closed: the parent is gone; meanwhile it sends the parent a sign of life every
    :data:`PULSE_S` seconds) that ``actors.node.run_node`` takes."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)

    def announcer(info: ServerInfo) -> None:
        line = info.model_dump_json().encode() + b"\n"
        try:
            sock.send(line)  # a few hundred bytes into an empty socket buffer
        except OSError as exc:  # the parent is gone: the lifeline says so too
            log.warning("workers.announce_failed", error=str(exc))

    async def lifeline() -> None:
        channel = trio.socket.from_stdlib_socket(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pulse, channel)
            while await channel.recv(4096):  # the parent never writes: only the end matters
                pass
            nursery.cancel_scope.cancel()

    return announcer, lifeline
