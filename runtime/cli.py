"""The ``exai`` command: ``serve`` runs a node, ``bridge`` relays stdio to it, ``status`` and
``trace`` are how an operator looks inside it (docs/operations.md).

The CLI is the composition root: it is the one place in ``runtime`` that names the actors,
and it does so through their public entry point only (``actors.node``), imported by ``serve``
alone: ``status`` and ``trace`` are what an operator runs against a struggling machine, so
they start without loading the node (Postgres bindings, embedded server, providers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import structlog
import trio
from pydantic import ValidationError

from runtime import status_view, trace_view
from runtime.config import (
    ConfigError,
    Settings,
    load_config_file,
    load_settings,
    require_private,
)
from runtime.logs import (
    LogSettings,
    configure_logging,
    flush_logging,
    log_path,
    register_secret,
)
from runtime.statefile import StateDirLock, read_server_info, state_dir_unusable
from runtime.stdio_bridge import run_bridge
from runtime.supervision import SupervisionError
from storage.startup_errors import StartupError, startup_error_in

log = structlog.get_logger("cli")

#: Exit code of a server whose root supervisor gave up (its tree could not heal itself), or
#: that failed for any reason other than those of :mod:`storage.startup_errors` (3, 4, 5).
EXIT_GAVE_UP = 1
#: Exit code of a command whose configuration (flags, EXAI_* variables) is invalid.
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exai", description="exai-runtime: MCP server runtime")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    _bridge_parser(commands)
    _status_parser(commands)
    _trace_parser(commands)
    return parser


Commands = argparse._SubParsersAction  # the type of `add_subparsers()`; generic in typeshed

#: Why a secret is not a flag: every local user can read any process's arguments (ps, and
#: /proc/PID/cmdline, world-readable on Linux: proc(5)); the environment and files are not.
_VISIBLE = "discouraged: other local users see it in ps"


def _serve_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the MCP server (embedded Postgres unless a database URL is given)",
        description="Every flag has an EXAI_* environment equivalent; the flag wins. Exit "
        "codes: 0 stopped, 1 failed (see the log), 2 bad configuration, 3 address in use or "
        "cannot bind, 4 database unreachable or refused, 5 state dir unusable or in use.",
    )
    serve.add_argument("--host", help="interface to listen on (EXAI_HOST, default 127.0.0.1)")
    serve.add_argument("--port", help="TCP port, 0 for any free one (EXAI_PORT, default 8765)")
    serve.add_argument(
        "--state-dir", type=Path, help="token, server.json, embedded data (EXAI_STATE_DIR)"
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML file: client tokens, chat limits, upstream providers (EXAI_CONFIG)",
    )
    serve.add_argument(
        "--database-url", help="PostgreSQL URL; omit for embedded Postgres (EXAI_DATABASE_URL)"
    )
    serve.add_argument(
        "--database-wait",
        type=float,
        help="seconds to wait at start for a database that does not answer "
        "(EXAI_DATABASE_WAIT, default 30)",
    )
    serve.add_argument(
        "--durability",
        choices=["commit", "journal", "async"],
        help="what a call's answer waits for: the database's commit, the local journal's "
        "fsync, or nothing (EXAI_DURABILITY, default journal; docs/persistence.md)",
    )
    serve.add_argument(
        "--workers",
        help="processes serving the port, each a whole node on the one database: N (1..64) "
        "or auto (one per CPU) (EXAI_WORKERS, default 1; docs/deployment.md)",
    )
    serve.add_argument("--log-level", help="debug, info, warning, error (EXAI_LOG_LEVEL)")
    serve.add_argument(
        "--trace-sample",
        type=float,
        help="share of traces whose per-message events are logged, 0..1 (EXAI_TRACE_SAMPLE, "
        "default 1)",
    )
    serve.add_argument(
        "--log-console",
        choices=["auto", "text", "json", "off"],
        help="stderr format (EXAI_LOG_CONSOLE, default auto: text on a terminal, else JSON)",
    )


def _bridge_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    bridge = commands.add_parser(
        "bridge",
        help="stdio MCP server relaying to an exai server over WebSocket (for stdio-only IDEs)",
        description="Reads MCP messages on stdin, relays them to --url, writes answers to "
        "stdout; resumes the session when the connection drops, ends it when stdin closes. "
        "The token comes from EXAI_TOKEN, --token-file or <state-dir>/token. Logs go to "
        "stderr.",
    )
    bridge.add_argument("--url", help="ws://HOST:PORT/mcp (default: <state-dir>/server.json)")
    given = bridge.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file", type=Path, help="file holding the client token (instead of EXAI_TOKEN)"
    )
    given.add_argument("--token", help=f"the client token itself ({_VISIBLE})")
    bridge.add_argument("--state-dir", type=Path, help="where a local server keeps its files")
    bridge.add_argument(
        "--give-up-after",
        type=float,
        default=30.0,
        help="seconds the server may stay away before requests fail at once (default 30)",
    )
    bridge.add_argument(
        "--ws-ping-interval",
        type=float,
        help="seconds without a byte from the server before pinging it "
        "(EXAI_WS_PING_INTERVAL, default 20)",
    )
    bridge.add_argument(
        "--ws-ping-timeout",
        type=float,
        help="seconds the server has to answer a ping, or to accept a connection, before the "
        "bridge reconnects (EXAI_WS_PING_TIMEOUT, default 20)",
    )


def _status_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="show the running server: supervision tree, sessions, limits, breakers, storage",
        description="Asks the server's admin interface (loopback only, admin token). Exit "
        "codes: 0 ok, 1 unexpected answer, 2 bad configuration, 3 no server running, "
        "4 server unreachable, 5 admin token refused.",
    )
    status.add_argument("--state-dir", type=Path, help="the server's state dir (EXAI_STATE_DIR)")
    status.add_argument(
        "--url", help="admin interface, http://127.0.0.1:PORT (default: <state-dir>/server.json)"
    )
    given = status.add_mutually_exclusive_group()
    given.add_argument(
        "--admin-token-file",
        "--token-file",
        type=Path,
        help="file holding the admin token (instead of EXAI_ADMIN_TOKEN; default: "
        "<state-dir>/admin-token)",
    )
    given.add_argument("--admin-token", help=f"the admin token itself ({_VISIBLE})")
    status.add_argument("--json", action="store_true", help="the documented JSON document")
    status.add_argument(
        "--cluster",
        action="store_true",
        help="also every node sharing the server's database: heartbeat age, alive/dead/"
        "stopped, sessions, calls in flight (read by the server from its nodes table)",
    )
    status.add_argument(
        "--worker",
        type=int,
        metavar="N",
        help="of a --workers server, worker N alone (default: every worker in turn)",
    )
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    status.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")


def _trace_parser(commands: Commands[argparse.ArgumentParser]) -> None:
    trace = commands.add_parser(
        "trace",
        help="read the server's structured log: filter, follow, or show one request's timeline",
        description="Reads <state-dir>/logs/exai.log and its rotated backups. Times are ISO "
        "8601 (UTC unless an offset is given) or a duration ago (90s, 5m, 2h, 1d).",
    )
    trace.add_argument("--state-dir", type=Path, help="the server's state dir (EXAI_STATE_DIR)")
    trace.add_argument("--file", type=Path, help="a log file to read instead")
    trace.add_argument("--session", help="session id (or a prefix of it)")
    trace.add_argument("--trace", help="trace id")
    trace.add_argument("--actor", help="actor path and everything under it, e.g. /root/persistence")
    trace.add_argument("--event", help="event name, or a prefix ending in * (session.*)")
    trace.add_argument("--since", help="only events at or after this time")
    trace.add_argument("--until", help="only events at or before this time")
    trace.add_argument("--json", action="store_true", help="print the JSON lines as they are")
    mode = trace.add_mutually_exclusive_group()
    mode.add_argument("--follow", "-f", action="store_true", help="print new events as they come")
    mode.add_argument(
        "--timeline", metavar="TRACE_ID", help="one request across actors, with time in each"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "bridge": _bridge, "status": _status, "trace": _trace}
    return handlers[args.command](args)


def _fail(message: str, code: int) -> int:
    flush_logging()  # the last line on stderr is this one, after the log's
    print(f"exai: {message}", file=sys.stderr)
    return code


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            host=args.host,
            port=args.port,
            state_dir=args.state_dir,
            database_url=args.database_url,
            database_wait=args.database_wait,
            durability=args.durability,
            log_level=args.log_level,
            config=args.config,
            workers=args.workers,
        )
        log_settings = _log_settings(trace_sample=args.trace_sample, log_console=args.log_console)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    # Everything the server creates (state dir, tokens, journal, logs, server.json, rejected
    # records) is its owner's alone: 0700 directories, 0600 files, from the first byte.
    os.umask(0o077)
    if settings.worker_index > 0:
        # A --workers worker: its parent holds the state dir's lock (runtime/workers.py).
        return _run_worker(settings, log_settings)
    try:
        # Before anything else touches the state dir (the log file is in it): one server per
        # state dir, whatever the other one is doing (runtime/statefile.py).
        lock = StateDirLock.acquire(settings.state_dir)
    except StartupError as exc:
        return _fail(exc.message, exc.exit_code)
    with lock:
        if settings.workers > 1:
            return _run_parent(settings, log_settings)
        return _run_server(settings, log_settings)


def _start_logging(settings: Settings, log_settings: LogSettings) -> int | None:
    """The log file (this process's node dir's), warnings and the token's mask; an exit code
    if the log cannot be written."""
    try:
        configure_logging(
            settings.log_level, log_file=log_path(settings.node_dir), settings=log_settings
        )
    except OSError as exc:  # logs/ left unwritable (by another user, say)
        unusable = state_dir_unusable(settings.state_dir, exc)
        return _fail(unusable.message, unusable.exit_code)
    # Python warnings (a library's deprecation, platformdirs on a machine without
    # XDG_RUNTIME_DIR) become log events instead of free text among the log lines.
    logging.captureWarnings(True)
    if settings.token:
        register_secret(settings.token)
    return None


def _run_parent(settings: Settings, log_settings: LogSettings) -> int:
    """``--workers N`` (N >= 2): this process supervises N workers (runtime/workers.py)."""
    try:
        # Checked once here, so a bad file is one message, not one per worker.
        load_config_file(settings.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    failed = _start_logging(settings, log_settings)
    if failed is not None:
        return failed
    from runtime.workers import WorkerParent  # noqa: PLC0415 - serve alone loads storage

    parent = WorkerParent(settings, log_settings)
    try:
        trio.run(parent.run)
    except Exception as exc:
        return _failure(settings, exc)
    if parent.exit_code != 0:
        return _fail(parent.failure or "a worker failed", parent.exit_code)
    return 0


def _run_worker(settings: Settings, log_settings: LogSettings) -> int:
    """One worker of a ``--workers`` parent: a node with its own files under
    ``<state-dir>/workers/<index>``, telling its parent when it serves and stopping when the
    parent is gone (runtime/workers.py)."""
    if settings.worker_channel is None:
        return _fail("EXAI_WORKER_INDEX is set by exai serve --workers only", EXIT_CONFIG)
    failed = _start_logging(settings, log_settings)
    if failed is not None:
        return failed
    # Every event it logs names it: N workers share the parent's stderr.
    structlog.contextvars.bind_contextvars(worker=settings.worker_index)
    from runtime.workers import worker_channel  # noqa: PLC0415 - serve alone loads storage

    announcer, lifeline = worker_channel(settings.worker_channel)
    from actors.node import run_node  # noqa: PLC0415 - see the module doc

    try:
        trio.run(
            partial(run_node, settings, announce=False, announcer=announcer, lifeline=lifeline)
        )
    except Exception as exc:
        return _failure(settings, exc)
    return 0


def _run_server(settings: Settings, log_settings: LogSettings) -> int:
    """Run the node; the exit code of how it ended, a failure told in one line on stderr."""
    failed = _start_logging(settings, log_settings)
    if failed is not None:
        return failed
    from actors.node import run_node  # noqa: PLC0415 - see the module doc

    try:
        trio.run(run_node, settings)
    except Exception as exc:
        return _failure(settings, exc)
    return 0


def _failure(settings: Settings, exc: Exception) -> int:
    """How a server that raised ``exc`` ends: its exit code, told in one line on stderr."""
    # Every failure ends in one line and an exit code.
    startup = startup_error_in(exc)
    if startup is not None:
        # Logged where it happened (storage.database_*, child.start_failed).
        return _fail(startup.message, startup.exit_code)
    if isinstance(exc, SupervisionError):
        # The root supervisor gave up (or could not start its children): the tree could
        # not heal itself within its restart intensity. The cause is in the log, once.
        cause = f" (last error: {exc.__cause__!r})" if exc.__cause__ else ""
        return _fail(f"the server stopped: {exc}{cause}", EXIT_GAVE_UP)
    log.exception("server.failed")  # the traceback goes to the log, as any crash's
    return _fail(
        f"the server stopped: {exc!r}; the traceback is in {log_path(settings.node_dir)}",
        EXIT_GAVE_UP,
    )


def _log_settings(**overrides: object) -> LogSettings:
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return LogSettings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        ]
        raise ConfigError("invalid log configuration:\n" + "\n".join(lines)) from None


def _bridge(args: argparse.Namespace) -> int:
    try:
        given = _given_secret(args.token, args.token_file, flag="--token", env="EXAI_TOKEN")
        settings = load_settings(
            state_dir=args.state_dir,
            token=given,
            ws_ping_interval=args.ws_ping_interval,
            ws_ping_timeout=args.ws_ping_timeout,
        )
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    configure_logging(settings.log_level, json=True)
    url = args.url
    if url is None:
        info = read_server_info(settings.server_file)
        if info is None:
            return _fail(
                f"no --url given and no running server found ({settings.server_file})",
                EXIT_CONFIG,
            )
        url = info.url
    token = settings.token
    if token is None and settings.token_file.exists():
        token = settings.token_file.read_text().strip()
    if not token:
        return _fail("no token: set EXAI_TOKEN or pass --token-file", EXIT_CONFIG)
    register_secret(token)
    try:
        trio.run(
            partial(
                run_bridge,
                url,
                token,
                give_up_after=args.give_up_after,
                ping_interval=settings.ws_ping_interval,
                ping_timeout=settings.ws_ping_timeout,
            )
        )
    except ValueError as exc:  # the URL (checked before anything starts)
        return _fail(str(exc), EXIT_CONFIG)
    return 0


def _given_secret(value: str | None, file: Path | None, *, flag: str, env: str) -> str | None:
    """A token given on the command line: from ``--*-token-file`` (read, stripped), or
    from the flag itself with one warning on stderr, since every local user can read a
    process's arguments (proc(5): /proc/PID/cmdline). ``None`` if neither was given.

    Raises :class:`ConfigError` if the file cannot be read or is empty.
    """
    if value is not None:
        print(
            f"exai: warning: {flag} shows the token to every local user (ps); set {env} "
            "or use a token file instead",
            file=sys.stderr,
        )
        return value
    if file is None:
        return None
    require_private(file, "token file")  # as the server refuses its own (ssh's rule)
    try:
        secret = file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {file}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"the token file {file} is empty")
    return secret


def _state_dir(args: argparse.Namespace) -> Settings:
    return load_settings(state_dir=args.state_dir)


def _status(args: argparse.Namespace) -> int:
    try:
        settings = _state_dir(args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    try:
        given = _given_secret(
            args.admin_token, args.admin_token_file, flag="--admin-token", env="EXAI_ADMIN_TOKEN"
        )
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    token = given or os.environ.get("EXAI_ADMIN_TOKEN") or None
    refreshes = 0
    code = status_view.EXIT_OK
    try:
        while True:
            code = _status_once(settings.state_dir, args, token, clear=args.watch)
            refreshes += 1
            if not args.watch or (args.count is not None and refreshes >= args.count):
                return code
            time.sleep(args.interval)  # paces the display; nothing waits on it
    except KeyboardInterrupt:
        return code


def _status_once(
    state_dir: Path, args: argparse.Namespace, token: str | None, *, clear: bool
) -> int:
    """One refresh: a single node's document, or, for a ``--workers`` server, each worker's
    in turn under a ``worker N`` header (``--json``: ``{"workers": [{"worker": N, "status":
    {...}}]}``), the cluster's table once, with the first worker's. A worker that cannot be
    asked (restarting) is one line on stderr, and the exit code is its failure's."""
    try:
        targets = status_view.locate(state_dir, url=args.url, token=token, worker=args.worker)
    except status_view.StatusFailure as failure:
        if clear and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")
        return _fail(str(failure), failure.code)
    code = status_view.EXIT_OK
    sections: list[str] = []
    documents: list[dict[str, object]] = []
    several = len(targets) > 1
    # The cluster's view once, from the first worker that answers.
    cluster_wanted = args.cluster
    for target in targets:
        try:
            status = status_view.fetch(target, cluster=cluster_wanted)
        except status_view.StatusFailure as failure:
            where = f"worker {target.worker}: " if target.worker is not None else ""
            print(f"exai: {where}{failure}", file=sys.stderr)
            code = code or failure.code
            continue
        cluster_wanted = False
        if args.json and several:
            documents.append({"worker": target.worker, "status": status.model_dump(mode="json")})
        elif args.json:
            sections.append(status.model_dump_json(indent=2) + "\n")
        elif several:
            header = f"── worker {target.worker} of {len(targets)} " + "─" * 20 + "\n"
            sections.append(header + status_view.render(status))
        else:
            sections.append(status_view.render(status))
    several_json = args.json and several
    text = (
        json.dumps({"workers": documents}, indent=2) + "\n" if several_json else "".join(sections)
    )
    if clear and sys.stdout.isatty():
        text = "\x1b[H\x1b[2J" + text  # redraw in place, like top
    sys.stdout.write(text)
    sys.stdout.flush()
    return code


def _trace(args: argparse.Namespace) -> int:
    if args.file is not None:
        path = args.file
    else:
        try:
            path = log_path(_state_dir(args).state_dir)
        except ConfigError as exc:
            return _fail(str(exc), EXIT_CONFIG)
    try:
        wanted = trace_view.EventFilter(
            session=args.session,
            trace=args.trace,
            actor=args.actor,
            event=args.event,
            since=trace_view.parse_when(args.since) if args.since else None,
            until=trace_view.parse_when(args.until) if args.until else None,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    show = _show_json if args.json else _show_text
    try:
        if args.follow:
            for event in trace_view.follow(path, ready=sys.stderr):
                if wanted.matches(event):
                    show(event)
            return 0
        # A --workers server's workers log apart (<state-dir>/workers/N/logs): read them all,
        # in time order, unless --file names one.
        logs = [trace_view.log_files(path)] if args.file else trace_view.node_logs(path)
        if not logs:
            return _fail(f"no log at {path} (has a server run with this state dir?)", 3)
        if args.timeline:
            events = trace_view.select_merged(logs, wanted)
            timeline = trace_view.build_timeline(events, args.timeline)
            if timeline is None:
                return _fail(f"no events of trace {args.timeline} in {path}", 1)
            sys.stdout.write(trace_view.render_timeline(timeline))
            return 0
        for event in trace_view.select_merged(logs, wanted):
            show(event)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `exai trace | head`
        sys.stderr.close()
        return 0
    return 0


def _show_json(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _show_text(event: dict[str, object]) -> None:
    sys.stdout.write(trace_view.format_event(event) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
