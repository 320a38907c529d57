"""Apply ``db/migrations/*.sql`` in file-name order, each exactly once.

File names are ``<YYYYMMDDHHMMSS>_<name>.sql`` (Supabase's layout), so name order is time order.
The whole run is one transaction holding a transaction-scoped advisory lock: several nodes
starting together against one database apply each migration once, and the lock works through
Supabase's transaction pooler (session locks would not). A migration whose file changed after it
was applied is refused rather than silently skipped: the database would no longer match the code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from storage.connection import connect_kwargs

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "db" / "migrations"
_NAME = re.compile(r"^(\d{14})_([a-z0-9_]+)\.sql$")
#: Any constant works; it only has to be the same for every node.
_LOCK_KEY = 0x65_78_61_69  # "exai"


class MigrationError(Exception):
    """The migrations on disk and the ones recorded in the database disagree."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: expected <YYYYMMDDHHMMSS>_<name>.sql")
        found.append(Migration(match[1], match[2], path.read_text()))
    return found


def apply_migrations(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Bring the database at ``url`` up to date; return the versions applied by this call."""
    migrations = discover(directory)
    applied_now: list[str] = []
    # connect_kwargs: no prepared statements behind a transaction pooler (storage/connection.py).
    with (
        psycopg.connect(url, autocommit=False, **connect_kwargs(url)) as conn,  # type: ignore[arg-type]
        conn.transaction(),
    ):
        conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            """
            create table if not exists schema_migrations (
                version    text primary key,
                name       text not null,
                checksum   text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        conn.execute("alter table schema_migrations enable row level security")
        done: dict[str, str] = dict(
            conn.execute("select version, checksum from schema_migrations").fetchall()
        )
        for migration in migrations:
            recorded = done.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version}_{migration.name} was changed after it "
                        "was applied; add a new migration instead of editing an applied one"
                    )
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "insert into schema_migrations (version, name, checksum) values (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    return applied_now
