"""The dashboard views (db/migrations/*_dashboard_views.sql) over rows inserted into a real,
freshly migrated database: usage and cost per session and per day, latency percentiles and
error rates per tool, active sessions; and that they apply the reader's row level security."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from storage.migrations import apply_migrations
from tests.harness import fresh_database

DAY1 = datetime(2026, 11, 20, tzinfo=UTC)
DAY2 = datetime(2026, 11, 21, tzinfo=UTC)
MS = timedelta(milliseconds=1)
VIEWS = {
    "dashboard_session_usage",
    "dashboard_daily_usage",
    "dashboard_tool_stats",
    "dashboard_tool_stats_daily",
    "dashboard_active_sessions",
}


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as url:
        apply_migrations(url)
        with psycopg.connect(url) as conn:
            _insert(conn)
        yield url


def _session(
    conn: psycopg.Connection[Any], session_id: str, status: str, created: datetime, **more: Any
) -> None:
    conn.execute(
        "insert into sessions (session_id, status, created_at, last_activity, client_name,"
        " client_version, protocol_version, node_id, remote_addr, closed_at)"
        " values (%s, %s, %s, %s, %s, %s, %s, 'node-1', '127.0.0.1:5000', %s)",
        (
            session_id,
            status,
            created,
            more.get("last_activity", created),
            more.get("client"),
            more.get("version"),
            more.get("protocol"),
            more.get("closed_at"),
        ),
    )


def _task(
    conn: psycopg.Connection[Any],
    session_id: str,
    tool: str,
    status: str,
    created: datetime,
    *,
    wait_ms: float | None,
    run_ms: float | None,
) -> None:
    started = created + wait_ms * MS if wait_ms is not None else None
    completed = (started or created) + run_ms * MS if run_ms is not None else None
    conn.execute(
        "insert into tasks (id, session_id, tool_name, status, created_at, started_at,"
        " completed_at, request_id, node_id) values (%s, %s, %s, %s, %s, %s, %s, %s, 'node-1')",
        (uuid4(), session_id, tool, status, created, started, completed, secrets.token_hex(4)),
    )


def _usage(
    conn: psycopg.Connection[Any],
    session_id: str,
    at: datetime,
    tokens: tuple[int, int],
    cost: str,
    *,
    estimated: bool = False,
) -> None:
    conn.execute(
        "insert into token_usage (session_id, provider, model, input_tokens, output_tokens,"
        " cost, estimated, created_at) values (%s, 'glm', 'glm-4.6', %s, %s, %s, %s, %s)",
        (session_id, tokens[0], tokens[1], Decimal(cost), estimated, at),
    )


def _insert(conn: psycopg.Connection[Any]) -> None:
    """Three sessions over two UTC days; the expected numbers are worked out in the tests."""
    _session(
        conn,
        "s1",
        "active",
        DAY1 + timedelta(hours=10),
        client="claude-code",
        version="1.0",
        protocol="2025-06-18",
        last_activity=DAY1 + timedelta(hours=12),
    )
    _session(
        conn,
        "s2",
        "closed",
        DAY1 + timedelta(hours=23, minutes=30),
        client="cursor",
        closed_at=DAY2,
    )
    _session(conn, "s3", "active", DAY2 + timedelta(minutes=30), client="codex")
    at1 = DAY1 + timedelta(hours=11)
    for run_ms in (10, 20, 30, 40):
        _task(conn, "s1", "echo", "completed", at1, wait_ms=1, run_ms=run_ms)
    _task(conn, "s1", "echo", "failed", at1, wait_ms=3, run_ms=100)
    at2 = DAY1 + timedelta(hours=23, minutes=40)
    _task(conn, "s2", "echo", "cancelled", at2, wait_ms=1, run_ms=5)
    # Interrupted: recovery stamped its end long after; that is not the tool's latency.
    _task(conn, "s2", "echo", "interrupted", at2, wait_ms=1, run_ms=600_000)
    at3 = DAY2 + timedelta(hours=1)
    _task(conn, "s3", "slow", "completed", at3, wait_ms=2, run_ms=1000)
    _task(conn, "s3", "slow", "pending", at3, wait_ms=None, run_ms=None)
    _task(conn, "s3", "slow", "running", at3, wait_ms=2, run_ms=None)
    _usage(conn, "s1", DAY1 + timedelta(hours=10, minutes=30), (100, 50), "0.001000")
    _usage(conn, "s1", DAY1 + timedelta(hours=12), (200, 100), "0.002000")
    _usage(conn, "s3", DAY2 + timedelta(hours=2), (10, 5), "0.000500", estimated=True)


def rows(url: str, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(sql.encode())
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_usage_and_cost_per_session(db: str) -> None:
    got = {
        r["session_id"]: r
        for r in rows(db, "select * from dashboard_session_usage order by session_id")
    }
    assert set(got) == {"s1", "s2", "s3"}
    expected = {
        "s1": ("active", "claude-code", 5, 1, 2, 300, 150, Decimal("0.003"), 0),
        "s2": ("closed", "cursor", 2, 0, 0, 0, 0, Decimal(0), 0),
        "s3": ("active", "codex", 3, 0, 1, 10, 5, Decimal("0.0005"), 1),
    }
    for session_id, values in expected.items():
        r = got[session_id]
        assert (
            r["status"],
            r["client_name"],
            r["tasks"],
            r["tasks_failed"],
            r["upstream_calls"],
            r["input_tokens"],
            r["output_tokens"],
            r["cost"],
            r["estimated_calls"],
        ) == values, session_id
    assert got["s2"]["closed_at"] == DAY2


def test_usage_and_cost_per_day(db: str) -> None:
    got = rows(db, "select * from dashboard_daily_usage order by day")
    assert [
        (
            r["day"],
            r["sessions_opened"],
            r["tasks"],
            r["tasks_failed"],
            r["sessions_with_usage"],
            r["upstream_calls"],
            r["input_tokens"],
            r["output_tokens"],
            r["cost"],
        )
        for r in got
    ] == [
        (date(2026, 11, 20), 2, 7, 1, 1, 2, 300, 150, Decimal("0.003")),
        (date(2026, 11, 21), 1, 3, 0, 1, 1, 10, 5, Decimal("0.0005")),
    ]


def test_latency_percentiles_and_error_rates_per_tool(db: str) -> None:
    got = {r["tool_name"]: r for r in rows(db, "select * from dashboard_tool_stats")}
    assert set(got) == {"echo", "slow"}  # pending and running tasks are not finished
    echo = got["echo"]
    assert (
        echo["tasks"],
        echo["completed"],
        echo["failed"],
        echo["cancelled"],
        echo["interrupted"],
    ) == (7, 4, 1, 1, 1)
    # failed + interrupted over everything finished but the cancelled one: 2 / 6.
    assert echo["error_rate"] == Decimal("0.3333")
    # Run times of the completed and failed: 10, 20, 30, 40, 100 ms (linear interpolation,
    # as percentile_cont): p90 = 40 + 0.6 * 60, p95 = 40 + 0.8 * 60, p99 = 40 + 0.96 * 60.
    assert (echo["p50_ms"], echo["p90_ms"], echo["p95_ms"], echo["p99_ms"], echo["max_ms"]) == (
        Decimal("30.000"),
        Decimal("76.000"),
        Decimal("88.000"),
        Decimal("97.600"),
        Decimal("100.000"),
    )
    # Waits of every finished task that started: 1 ms six times, 3 ms once.
    assert (echo["wait_p50_ms"], echo["wait_p95_ms"]) == (Decimal("1.000"), Decimal("2.400"))
    slow = got["slow"]
    assert (slow["tasks"], slow["completed"], slow["failed"], slow["error_rate"]) == (
        1,
        1,
        0,
        Decimal("0.0000"),
    )
    assert slow["p50_ms"] == slow["p99_ms"] == Decimal("1000.000")
    assert slow["wait_p50_ms"] == Decimal("2.000")

    daily = rows(db, "select * from dashboard_tool_stats_daily order by day, tool_name")
    assert [
        (r["day"], r["tool_name"], r["tasks"], r["failed"], r["interrupted"], r["error_rate"])
        for r in daily
    ] == [
        (date(2026, 11, 20), "echo", 7, 1, 1, Decimal("0.3333")),
        (date(2026, 11, 21), "slow", 1, 0, 0, Decimal("0.0000")),
    ]
    assert (daily[0]["p50_ms"], daily[0]["p95_ms"]) == (Decimal("30.000"), Decimal("88.000"))


def test_active_sessions(db: str) -> None:
    got = rows(
        db,
        "select v.*, extract(epoch from (now() - s.last_activity))::bigint as expected_idle"
        " from dashboard_active_sessions v join sessions s using (session_id)"
        " order by session_id",
    )
    assert [r["session_id"] for r in got] == ["s1", "s3"]  # s2 is closed
    s1, s3 = got
    assert (s1["client_name"], s1["protocol_version"], s1["node_id"]) == (
        "claude-code",
        "2025-06-18",
        "node-1",
    )
    assert (s1["tasks"], s1["tasks_pending"], s1["tasks_running"]) == (5, 0, 0)
    assert (s1["input_tokens"], s1["output_tokens"], s1["cost"]) == (300, 150, Decimal("0.003"))
    assert (s3["tasks"], s3["tasks_pending"], s3["tasks_running"]) == (3, 1, 1)
    assert (s3["input_tokens"], s3["output_tokens"], s3["cost"]) == (10, 5, Decimal("0.0005"))
    for r in got:  # ages against the database's own clock, in the same statement
        assert r["idle_s"] == r["expected_idle"]
        assert r["age_s"] >= r["idle_s"]


def test_views_apply_the_readers_row_level_security(db: str) -> None:
    options = {
        name: opts
        for name, opts in (
            (r["relname"], r["reloptions"])
            for r in rows(db, "select relname, reloptions from pg_class where relkind = 'v'")
        )
    }
    for view in VIEWS:
        assert "security_invoker=true" in (options.get(view) or []), view

    # A role with SELECT but no policy sees nothing through the views, as through the
    # tables (row level security is on and has no policy for it); the owner sees everything.
    role = f"exai_dash_{secrets.token_hex(4)}"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"create role {role} nologin".encode())
        try:
            conn.execute(f"grant select on all tables in schema public to {role}".encode())
            conn.execute(f"set role {role}".encode())
            for view in sorted(VIEWS):
                cursor = conn.execute(f"select count(*) from {view}".encode())
                assert cursor.fetchone() == (0,), view
            conn.execute(b"reset role")
            cursor = conn.execute(b"select count(*) from dashboard_session_usage")
            assert cursor.fetchone() == (3,)
        finally:
            conn.execute(b"reset role")
            conn.execute(f"drop owned by {role}".encode())
            conn.execute(f"drop role {role}".encode())
