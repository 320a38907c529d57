"""How many database connections a node may hold, and whether a database has room for N.

A node (a process of ``exai serve``, or one worker of ``--workers N``) holds at most
:data:`CONNECTIONS_PER_NODE` connections to its database: the database writer (1), membership
(1, and 1 more for a moment while ``status --cluster`` reads the cluster), the shared limits
(1), and three read pools that grow on demand (threads 4, tasks 4, session take-over 2:
``storage/read_pool.py``). Past the server's ``max_connections`` PostgreSQL refuses a new
connection (SQLSTATE 53300, "sorry, too many clients already"); a node then serves with its
persistence unavailable, retrying, and even ``psql`` is refused. So the parent of N workers
checks the room before starting any (:func:`check_room`) and sizes the embedded Postgres it
owns (:func:`embedded_max_connections`).

PostgreSQL's rules (https://www.postgresql.org/docs/15/runtime-config-connection.html):
``max_connections`` counts every client connection; ``superuser_reserved_connections`` (and,
from 16, ``reserved_connections``) of them are kept for roles with those privileges.
"""

from __future__ import annotations

import psycopg

from storage.connection import DatabaseTarget, connect_kwargs
from storage.startup_errors import DatabaseTooSmall

__all__ = ["CONNECTIONS_PER_NODE", "check_room", "embedded_max_connections", "room"]

#: The most connections one node holds (module doc): 1 + 2 + 1 + 4 + 4 + 2.
CONNECTIONS_PER_NODE = 14
#: Connections the embedded Postgres keeps beyond its nodes' (psql, ``exai status --cluster``).
EMBEDDED_SPARE = 20
#: PostgreSQL's default ``max_connections``: the embedded server never has fewer.
POSTGRES_DEFAULT_MAX_CONNECTIONS = 100

_ROOM_SQL = """
select current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (select count(*) from pg_stat_activity where backend_type = 'client backend')::int
"""


def embedded_max_connections(nodes: int) -> int:
    """``max_connections`` for an embedded Postgres serving ``nodes`` nodes: room for each
    node's most and :data:`EMBEDDED_SPARE`, and never below PostgreSQL's default."""
    return max(POSTGRES_DEFAULT_MAX_CONNECTIONS, nodes * CONNECTIONS_PER_NODE + EMBEDDED_SPARE)


def room(url: str, *, connect_timeout: float = 5.0) -> tuple[int, int, int] | None:
    """``(max_connections, reserved, in_use)`` of the server of ``url`` (``in_use``: client
    connections open now, this one excluded), or ``None`` if it cannot be asked now (the
    nodes then wait for it and report it themselves). Never raises ``psycopg.Error``."""
    try:
        with psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=max(1, round(connect_timeout)),
            **connect_kwargs(url),  # type: ignore[arg-type]
        ) as conn:
            row = conn.execute(_ROOM_SQL).fetchone()
    except psycopg.Error:
        return None
    if row is None:
        return None
    maximum, superuser_reserved, reserved, in_use = row
    return int(maximum), int(superuser_reserved) + int(reserved), max(0, int(in_use) - 1)


def check_room(url: str, nodes: int, *, what: str) -> None:
    """Raise :class:`~storage.startup_errors.DatabaseTooSmall` if ``nodes`` more nodes, each
    at its most (:data:`CONNECTIONS_PER_NODE`), would not fit in the connections the server of
    ``url`` has free now. ``what`` names the nodes for the message (``"--workers 8"``). A
    server that cannot be asked now is not refused here (:func:`room`)."""
    found = room(url)
    if found is None:
        return
    maximum, reserved, in_use = found
    free = maximum - reserved - in_use
    need = nodes * CONNECTIONS_PER_NODE
    if need > free:
        raise DatabaseTooSmall(
            f"{what} needs up to {need} database connections ({CONNECTIONS_PER_NODE} per "
            f"worker) but {DatabaseTarget.from_url(url).address} has {free} free "
            f"(max_connections {maximum}, {reserved} reserved, {in_use} in use): use fewer "
            "workers, or raise the database's max_connections"
        )
