"""SQL for the session lifecycle. Every statement is idempotent, keyed by ids the caller chose,
so a replayed write (after a crash or a retry) never duplicates or regresses a row."""

from __future__ import annotations

import psycopg

from storage.rows import SessionClose, SessionIdentified, SessionRow


def insert_session(conn: psycopg.Connection[object], row: SessionRow) -> None:
    conn.execute(
        """
        insert into sessions (session_id, created_at, last_activity, status, client_name,
                              client_version, protocol_version, remote_addr, node_id)
        values (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        on conflict (session_id) do nothing
        """,
        (
            row.session_id,
            row.created_at,
            row.created_at,
            row.status,
            row.client_name,
            row.client_version,
            row.protocol_version,
            row.remote_addr,
            row.node_id,
        ),
    )


def identify_session(conn: psycopg.Connection[object], ident: SessionIdentified) -> None:
    conn.execute(
        """
        update sessions
           set client_name = %s, client_version = %s, protocol_version = %s,
               last_activity = greatest(last_activity, %s)
         where session_id = %s
        """,
        (
            ident.client_name,
            ident.client_version,
            ident.protocol_version,
            ident.at,
            ident.session_id,
        ),
    )


def close_session(conn: psycopg.Connection[object], close: SessionClose) -> None:
    # `status = 'active'` guard: replaying an old close never reopens or re-stamps a row.
    conn.execute(
        """
        update sessions
           set status = %s, closed_at = %s, last_activity = greatest(last_activity, %s)
         where session_id = %s and status = 'active'
        """,
        (close.status, close.closed_at, close.last_activity, close.session_id),
    )
