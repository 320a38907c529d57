"""One database connection, reconnected on demand: what the single writer thread needs.

Not a pool. The persistence actor is one thread and uses one connection at a time, and
``psycopg_pool`` reconnects in background threads on its own exponential backoff (1 s, 2 s,
4 s, ... up to minutes), which would fight the circuit breaker: after the database came back,
the journal would wait for the pool's next attempt instead of the breaker's trial. Here a
broken connection is dropped and the next :meth:`Connector.connection` reconnects at once,
so *when* to try is decided by the breaker alone, and no thread is started.

Connections are autocommit (each batch opens its own transaction) and set nothing
session-level, so a Supabase transaction-mode pooler URL works (prepared statements are off
for it: :func:`connect_kwargs`). TCP keepalives bound how long a write can hang on a peer
that vanished without closing the socket.

At start-up, :func:`check_database` tells the three ways a database can be unusable apart
(:mod:`storage.startup_errors`): unreachable (worth waiting for), and authentication failed or
database missing (waiting cannot help). :class:`DatabaseTarget` names host, port and database
for the operator without the password.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from storage.startup_errors import (
    DatabaseAuthenticationFailed,
    DatabaseMissing,
    DatabaseUnavailable,
    DatabaseUnreachable,
)


def is_transaction_pooler(url: str) -> bool:
    """Supabase's transaction-mode pooler listens on port 6543 (session mode and direct: 5432).
    It supports no prepared statements (Supabase docs, "Disabling Prepared statements");
    ``prepare_threshold=None`` is a psycopg connect keyword (libpq refuses unknown URI query
    parameters)."""
    return urlsplit(url).port == 6543


def connect_kwargs(url: str) -> dict[str, object]:
    kwargs: dict[str, object] = {"application_name": "exai-runtime"}
    if is_transaction_pooler(url):
        kwargs["prepare_threshold"] = None
    return kwargs


class Connector:
    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def is_open(self) -> bool:
        """A connection is held that was usable when last used (it may have died since)."""
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken

    def connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one. Raises ``psycopg.OperationalError`` if the
        database cannot be reached within ``connect_timeout`` (libpq's minimum is 2 s)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.discard()
        self._conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(2, round(self.connect_timeout)),
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            **connect_kwargs(self.url),  # type: ignore[arg-type]
        )
        return self._conn

    def abort(self) -> None:
        """From another thread: shut the connection's socket down, so that a call blocked on
        a peer that stopped answering without closing (a black hole, a dead NAT mapping:
        keepalives are answered, ``statement_timeout`` never reaches the server) fails now.
        The connection itself is closed by its owner (:meth:`discard`) when that call
        raises; only the socket is touched here, through a duplicate of its descriptor."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):
            duplicate = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                duplicate.shutdown(socket.SHUT_RDWR)
            finally:
                duplicate.close()

    def discard(self) -> None:
        """Drop the connection after an error: its state is unknown, the next use reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self.discard()


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    """Where a connection URL leads, for messages and logs: never the password.

    Parsed by libpq itself (psycopg's ``conninfo_to_dict``); a parameter the URL leaves out
    is libpq's default: its ``PG*`` environment variable, else ``localhost``, port 5432, the
    user's name as database (PostgreSQL docs, libpq "Parameter Key Words"). ``host`` may be a
    Unix-socket directory, and host and port may be comma-separated lists (libpq tries each).
    """

    host: str
    port: str
    database: str
    user: str

    @classmethod
    def from_url(cls, url: str) -> DatabaseTarget:
        params = conninfo_to_dict(url)
        env = os.environ
        user = params.get("user") or env.get("PGUSER") or getpass.getuser()
        return cls(
            host=str(params.get("host") or env.get("PGHOST") or "localhost"),
            port=str(params.get("port") or env.get("PGPORT") or "5432"),
            database=str(params.get("dbname") or env.get("PGDATABASE") or user),
            user=str(user),
        )

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 address in brackets (``[::1]:5432``)."""
        host = f"[{self.host}]" if ":" in self.host and "," not in self.host else self.host
        return f"{host}:{self.port}"


#: SQLSTATEs of a connection refused for good: waiting for the database cannot help
#: (PostgreSQL docs, Appendix A "PostgreSQL Error Codes").
AUTHENTICATION_SQLSTATES = frozenset({"28000", "28P01"})  # invalid authorization, password
MISSING_DATABASE_SQLSTATE = "3D000"  # invalid_catalog_name

#: psycopg gives no SQLSTATE for a failed connection attempt: libpq keeps the server's
#: ErrorResponse only as text (psycopg issue #1188). So the server's messages for these
#: SQLSTATEs are recognised by their text, as the server sends them in its default (English)
#: lc_messages (src/backend/libpq/auth.c, src/backend/utils/init/postinit.c). A server
#: speaking another language is still reported, only waited for before it is (as unreachable).
_SERVER_MESSAGES = (
    (re.compile(r"password authentication failed for user"), "28P01"),
    (re.compile(r'role "[^"]*" does not exist'), "28000"),
    (re.compile(r"no pg_hba\.conf entry for"), "28000"),
    (re.compile(r'database "[^"]*" does not exist'), MISSING_DATABASE_SQLSTATE),
)


def connection_sqlstate(error: psycopg.Error) -> str | None:
    """The SQLSTATE of a failed connection: psycopg's own if it has one, else the one of the
    server's message (above), ``28P01`` when the server asked for a password the URL does not
    give (libpq's ``PQconnectionNeedsPassword``), ``None`` when the server did not answer."""
    if error.sqlstate is not None:
        return error.sqlstate
    if error.pgconn is not None and error.pgconn.needs_password:
        return "28P01"
    text = str(error)
    for pattern, sqlstate in _SERVER_MESSAGES:
        if pattern.search(text):
            return sqlstate
    return None


def connection_failure(error: psycopg.Error, password: str | None = None) -> str:
    """libpq's reason for a failed connection, on one line: ``Connection refused``, ``role
    "x" does not exist``, ``timeout expired``; ``password`` is masked should it appear."""
    line = str(error).strip().split("\n", 1)[0]
    reason = line.rpartition(" failed: ")[2] or line
    reason = reason.removeprefix("connection failed: ").removeprefix("FATAL:").strip()
    if password:
        reason = reason.replace(password, "***")
    return reason


def check_database(url: str, *, connect_timeout: float = 5.0) -> DatabaseTarget:
    """Open one connection to ``url`` and close it; return where it led.

    Raises :class:`~storage.startup_errors.DatabaseAuthenticationFailed` (SQLSTATE 28000,
    28P01) or :class:`~storage.startup_errors.DatabaseMissing` (3D000), which waiting cannot
    cure, or :class:`~storage.startup_errors.DatabaseUnreachable` for anything else (refused,
    timed out within ``connect_timeout`` seconds, libpq's minimum being 2, unknown host).
    Messages name host, port and database, never the password. Blocking: run it in a thread.
    """
    target = DatabaseTarget.from_url(url)
    try:
        with psycopg.connect(
            url,
            connect_timeout=max(2, round(connect_timeout)),
            **connect_kwargs(url),  # type: ignore[arg-type]
        ):
            return target
    except psycopg.OperationalError as exc:
        password = conninfo_to_dict(url).get("password")
        raise refusal(target, exc, str(password) if password else None) from exc


def refusal(
    target: DatabaseTarget, error: psycopg.Error, password: str | None = None
) -> DatabaseUnavailable:
    """The start-up error for a failed connection to ``target``, by SQLSTATE; ``password``
    is masked in the server's reason, should it appear there."""
    reason = connection_failure(error, password)
    sqlstate = connection_sqlstate(error)
    server = f"the database server at {target.address}"
    if sqlstate in AUTHENTICATION_SQLSTATES:
        return DatabaseAuthenticationFailed(
            f"{server} refused user {target.user!r} for database {target.database!r} "
            f"(SQLSTATE {sqlstate}: {reason}): check the user and password of --database-url "
            "(EXAI_DATABASE_URL) and the server's pg_hba.conf"
        )
    if sqlstate == MISSING_DATABASE_SQLSTATE:
        return DatabaseMissing(
            f"{server} has no database {target.database!r} (SQLSTATE {sqlstate}): create it "
            f"(createdb {target.database}) or name another one in --database-url "
            "(EXAI_DATABASE_URL)"
        )
    return DatabaseUnreachable(
        f"cannot reach the database server at {target.address} (database "
        f"{target.database!r}): {reason}"
    )
