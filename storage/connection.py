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
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

import psycopg


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

    def discard(self) -> None:
        """Drop the connection after an error: its state is unknown, the next use reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self.discard()
