"""db/migrations on real databases: applied twice, on plain PostgreSQL and on one dressed as
Supabase (an ``auth`` schema with ``auth.uid()``, the ``authenticated`` role and the
``supabase_realtime`` publication, created here as Supabase has them)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from storage.migrations import apply_migrations, discover
from tests.harness import fresh_database, query

OUR_TABLES = {
    "schema_migrations",
    "sessions",
    "nodes",
    "tasks",
    "token_usage",
    "threads",
    "messages",
}


def _apply_files_again(url: str) -> None:
    """Every file is idempotent by itself too (if not exists, guarded DO blocks)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for migration in discover():
            conn.execute(migration.sql.encode())


def _publication_tables(url: str) -> set[str]:
    rows = query(
        url,
        "select tablename from pg_publication_tables where pubname = 'supabase_realtime'",
    )
    return {row[0] for row in rows}


def _policies(url: str) -> set[str]:
    return {row[0] for row in query(url, "select policyname from pg_policies")}


def test_applied_twice_on_plain_postgres(database_url: str) -> None:
    with fresh_database(database_url) as url:
        applied = apply_migrations(url)
        assert applied == [m.version for m in discover()]
        assert apply_migrations(url) == []
        _apply_files_again(url)
        assert apply_migrations(url) == []

        tables = {
            row[0]: row[1]
            for row in query(
                url,
                "select relname, relrowsecurity from pg_class"
                " where relkind = 'r' and relnamespace = current_schema()::regnamespace",
            )
        }
        assert set(tables) >= OUR_TABLES
        assert all(tables.values()), f"row level security off on: {tables}"
        assert _policies(url) == set()  # nothing Supabase-only on plain Postgres


@pytest.fixture
def supabase_like(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            created_role = not conn.execute(
                "select 1 from pg_roles where rolname = 'authenticated'"
            ).fetchone()
            if created_role:
                conn.execute("create role authenticated nologin")
            conn.execute("create schema auth")
            conn.execute(
                "create function auth.uid() returns uuid language sql stable"
                " as $$ select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$"
            )
            conn.execute("create publication supabase_realtime")
        try:
            yield url
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("drop owned by authenticated")
        if created_role:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("drop role if exists authenticated")


def test_applied_twice_on_a_supabase_like_database(supabase_like: str) -> None:
    url = supabase_like
    assert apply_migrations(url)
    assert apply_migrations(url) == []
    _apply_files_again(url)

    assert {"sessions", "tasks"} <= _publication_tables(url)
    assert {"threads_select_own", "messages_select_own"} <= _policies(url)


def test_a_publication_for_all_tables_is_left_alone(database_url: str) -> None:
    with fresh_database(database_url) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create publication supabase_realtime for all tables")
        assert apply_migrations(url)
        assert {"sessions", "tasks", "token_usage"} <= _publication_tables(url)
