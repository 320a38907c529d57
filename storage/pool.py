"""The connection pool, configured for the database it actually talks to.

psycopg's async pool is asyncio-only (BRIEF.md), so storage uses the sync pool from the
persistence actor's thread. Supabase's transaction-mode pooler supports no prepared statements:
for it, ``prepare_threshold=None`` (a connect keyword; the URI refuses it).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from psycopg_pool import ConnectionPool


def is_transaction_pooler(url: str) -> bool:
    """Supabase's transaction-mode pooler listens on port 6543 (session mode and direct: 5432)."""
    return urlsplit(url).port == 6543


def connect_kwargs(url: str) -> dict[str, object]:
    kwargs: dict[str, object] = {"application_name": "exai-runtime"}
    if is_transaction_pooler(url):
        kwargs["prepare_threshold"] = None
    return kwargs


def open_pool(url: str, *, max_size: int, timeout: float = 10.0) -> ConnectionPool:
    """Open a pool and wait until one connection works, so a bad URL fails at start-up."""
    pool = ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs=connect_kwargs(url),
        open=False,
        name="exai",
        timeout=timeout,
    )
    pool.open(wait=True, timeout=timeout)
    return pool
