"""A small pool of read connections for the node's own queries (threads, tasks).

Short autocommit transactions, each with its own ``statement_timeout``, on a
``psycopg_pool.ConnectionPool`` owned by whoever opens it: ``open()`` at the node's start
(without waiting for a connection: a database away at start-up fails reads, clearly, not
the node's start), ``close()`` at its end. Every method blocks: call it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from storage.connection import connect_kwargs
from storage.errors import StorageError

__all__ = ["ReadPool"]


class ReadPool:
    """Read connections to ``url``; failures raise the owner's ``error`` class (a
    :class:`~storage.errors.StorageError`) with a message naming ``what`` is read."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        what: str,
        error: Callable[[str], StorageError],
        max_connections: int = 4,
        wait_seconds: float = 10.0,
        statement_timeout_ms: int = 10_000,
    ) -> None:
        self._what = what
        self._error = error
        self._wait = wait_seconds
        self._statement_timeout = str(statement_timeout_ms)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={
                "autocommit": True,
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                **connect_kwargs(url),
            },
            open=False,
            name=name,
        )

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[dict[str, Any]]:
        """The rows of ``sql``, in one short transaction bounded by the statement timeout.
        Raises the owner's error if no connection comes within ``wait_seconds`` or the
        query fails."""
        try:
            with self._pool.connection(timeout=self._wait) as conn, conn.transaction():
                conn.execute(
                    "select set_config('statement_timeout', %s, true)",
                    (self._statement_timeout,),
                )
                with conn.cursor(row_factory=dict_row) as cursor:
                    cursor.execute(sql.encode(), params)
                    return cursor.fetchall()
        except PoolTimeout:
            raise self._error(
                f"no database connection within {self._wait:g} s (is the database up?)"
            ) from None
        except psycopg.Error as exc:
            raise self._error(f"reading {self._what} failed: {type(exc).__name__}") from exc
