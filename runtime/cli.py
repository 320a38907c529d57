"""The ``exai`` command. ``exai serve`` runs a node; later commands (status, trace) join here.

The CLI is the composition root: it is the one place in ``runtime`` that names the actors,
and it does so through their public entry point only (``actors.node``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from actors.node import run_node
from runtime.config import ConfigError, Settings, load_settings
from runtime.logs import configure_logging
from runtime.statefile import read_server_info
from runtime.stdio_bridge import run_bridge


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exai", description="exai-runtime: MCP server runtime")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the MCP server (embedded Postgres unless a database URL is given)",
        description="Every flag has an EXAI_* environment equivalent; the flag wins.",
    )
    serve.add_argument("--host", help="interface to listen on (EXAI_HOST, default 127.0.0.1)")
    serve.add_argument("--port", help="TCP port, 0 for any free one (EXAI_PORT, default 8765)")
    serve.add_argument(
        "--state-dir", type=Path, help="token, server.json, embedded data (EXAI_STATE_DIR)"
    )
    serve.add_argument(
        "--database-url", help="PostgreSQL URL; omit for embedded Postgres (EXAI_DATABASE_URL)"
    )
    serve.add_argument("--log-level", help="debug, info, warning, error (EXAI_LOG_LEVEL)")

    bridge = commands.add_parser(
        "bridge",
        help="stdio MCP server relaying to an exai server over WebSocket (for stdio-only IDEs)",
        description="Reads MCP messages on stdin, relays them to --url, writes answers to "
        "stdout; resumes the session when the connection drops. Logs go to stderr.",
    )
    bridge.add_argument("--url", help="ws://HOST:PORT/mcp (default: <state-dir>/server.json)")
    bridge.add_argument("--token", help="client token (EXAI_TOKEN; default: <state-dir>/token)")
    bridge.add_argument("--state-dir", type=Path, help="where a local server keeps its files")
    bridge.add_argument(
        "--give-up-after",
        type=float,
        default=30.0,
        help="seconds the server may stay away before requests fail at once (default 30)",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        database_url=args.database_url,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bridge":
        return _bridge(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"exai: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    trio.run(run_node, settings)
    return 0


def _bridge(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(state_dir=args.state_dir, token=args.token)
    except ConfigError as exc:
        print(f"exai: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json=True)
    url = args.url
    if url is None:
        info = read_server_info(settings.server_file)
        if info is None:
            print(
                f"exai: no --url given and no running server found ({settings.server_file})",
                file=sys.stderr,
            )
            return 2
        url = info.url
    token = settings.token
    if token is None and settings.token_file.exists():
        token = settings.token_file.read_text().strip()
    if not token:
        print("exai: no token: pass --token or set EXAI_TOKEN", file=sys.stderr)
        return 2
    trio.run(partial(run_bridge, url, token, give_up_after=args.give_up_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
