"""The ``exai`` command. ``exai serve`` runs a node; later commands (status, trace) join here.

The CLI is the composition root: it is the one place in ``runtime`` that names the actors,
and it does so through their public entry point only (``actors.node``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from actors.node import run_node
from runtime.config import ConfigError, Settings, load_settings
from runtime.logs import configure_logging


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
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"exai: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    trio.run(run_node, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
