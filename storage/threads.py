"""Reading conversation threads back: the read side of ``threads`` and ``messages``.

Writes go through the persistence actor (batched, journaled); reads cannot wait in its queue
behind thousands of writes, and need no ordering with them beyond what a critical write
already guarantees (committed before it returns). So reads take their own small pool of
connections, used from worker threads (``trio.to_thread.run_sync``): psycopg's async API
needs asyncio (trio support is the open issue psycopg/psycopg#29).

Every query is one short transaction with a local ``statement_timeout``, so a hung database
holds a reader thread for seconds, not forever. Nothing session-level is set, so a Supabase
transaction-mode pooler URL works here too (:func:`storage.connection.connect_kwargs`).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from storage.errors import InvalidInput, StorageError
from storage.read_pool import ReadPool
from storage.thread_search import SearchPage, SearchQuery, search_owned
from storage.untrusted import clip

_CURSOR_PREFIX = "exai:threads:v1:"


class ThreadReadError(StorageError):
    """The database could not be read (unreachable, too slow, or no connection free). Its
    reader says what could not be read (``actors.conversation``: ``ThreadStoreUnavailable``)."""


class InvalidThreadCursor(InvalidInput, ValueError):
    """A listing cursor this server did not issue."""


class StoredMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    message_id: UUID
    turn_index: int
    role: str
    content: str
    files: list[str]
    tool_name: str | None
    created_at: datetime


class ThreadSummary(BaseModel):
    """A thread row without its messages (a page of an owner's threads)."""

    model_config = ConfigDict(frozen=True)

    thread_id: UUID
    title: str | None
    turn_count: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    prompt_tokens_estimated: int | None = None
    """The last turn's prompt in tokens as estimated (characters / 4, uncalibrated)."""
    prompt_tokens_reported: int | None = None
    """The same prompt's ``prompt_tokens`` as the upstream reported it."""
    token_ratio: float | None = None
    """Reported / uncalibrated estimate, smoothed over the thread's turns with its model."""


class StoredThread(ThreadSummary):
    """A thread row with its owner and its messages, oldest first (turn, then the order they
    were written)."""

    owner_id: UUID | None
    messages: list[StoredMessage]


#: The columns of a :class:`ThreadSummary`, named as its fields: both reads build it from
#: the row by name, so the mapping exists once.
_SUMMARY_COLUMNS = (
    "id as thread_id, title, turn_count, created_at, updated_at, expires_at,"
    " prompt_tokens_estimated, prompt_tokens_reported, token_ratio"
)


class StoredSummary(BaseModel):
    """A summary of exchanges ``first_turn``..``last_turn`` of a thread (both included)."""

    model_config = ConfigDict(frozen=True)

    first_turn: int
    last_turn: int
    content: str
    provider: str
    model: str
    created_at: datetime


class ThreadContext(BaseModel):
    """What compaction and calibration keep of a thread: its newest summary, and its token
    calibration (reported prompt tokens over the characters / 4 estimate, for one model)."""

    model_config = ConfigDict(frozen=True)

    summary: StoredSummary | None = None
    token_ratio: float | None = None
    token_ratio_model: str | None = None
    prompt_tokens_estimated: int | None = None
    prompt_tokens_reported: int | None = None


class ThreadPage(BaseModel):
    model_config = ConfigDict(frozen=True)

    threads: list[ThreadSummary]
    next_cursor: str | None


def encode_cursor(updated_at: datetime, thread_id: UUID) -> str:
    """Keyset cursor: the last row shown. Stable while threads are added or updated."""
    text = f"{_CURSOR_PREFIX}{updated_at.isoformat()}|{thread_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    # The client's text, quoted clipped (runtime.mcp.paging does the same for list cursors).
    refusal = InvalidThreadCursor(
        f"invalid cursor {clip(cursor, 64)!r}: not one this server issued"
    )
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
        when, _, thread_id = text.removeprefix(_CURSOR_PREFIX).partition("|")
        position = datetime.fromisoformat(when), UUID(thread_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refusal from None
    if not text.startswith(_CURSOR_PREFIX) or position[0].tzinfo is None:
        raise refusal
    return position


class ThreadStore:
    """A tiny pool of read connections, owned by the node: ``open()`` at start, ``close()``
    at the end. Every method blocks: call it through ``trio.to_thread.run_sync``."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 4,
        wait_seconds: float = 10.0,
        statement_timeout_ms: int = 10_000,
    ) -> None:
        self._reads = ReadPool(
            url,
            name="exai-threads",
            what="threads",
            error=ThreadReadError,
            max_connections=max_connections,
            wait_seconds=wait_seconds,
            statement_timeout_ms=statement_timeout_ms,
        )

    def open(self) -> None:
        """Start the pool without waiting for a connection (``storage.read_pool``)."""
        self._reads.open()

    def close(self) -> None:
        self._reads.close()

    def load(self, thread_id: UUID) -> StoredThread | None:
        """The thread and every message of it, or ``None`` if there is no such thread."""
        rows = self._query(
            f"select {_SUMMARY_COLUMNS}, owner_id from threads where id = %s", (thread_id,)
        )
        if not rows:
            return None
        messages = self._query(
            "select id, turn_index, role, content, files, tool_name, created_at"
            " from messages where thread_id = %s order by turn_index, created_at, id",
            (thread_id,),
        )
        return StoredThread(
            **rows[0],
            messages=[
                StoredMessage(
                    message_id=m["id"],
                    turn_index=m["turn_index"],
                    role=m["role"],
                    content=m["content"],
                    files=_files(m["files"]),
                    tool_name=m["tool_name"],
                    created_at=m["created_at"],
                )
                for m in messages
            ],
        )

    def load_context(self, thread_id: UUID) -> ThreadContext:
        """The thread's newest summary and its calibration (empty for an unknown thread)."""
        rows = self._query(
            "select t.token_ratio, t.token_ratio_model, t.prompt_tokens_estimated,"
            " t.prompt_tokens_reported, s.first_turn, s.last_turn, s.content, s.provider,"
            " s.model, s.created_at"
            " from threads t left join lateral (select * from thread_summaries"
            " where thread_id = t.id order by last_turn desc, created_at desc limit 1) s on true"
            " where t.id = %s",
            (thread_id,),
        )
        if not rows:
            return ThreadContext()
        row = rows[0]
        summary = None
        if row["last_turn"] is not None:
            summary = StoredSummary(
                first_turn=row["first_turn"],
                last_turn=row["last_turn"],
                content=row["content"],
                provider=row["provider"],
                model=row["model"],
                created_at=row["created_at"],
            )
        return ThreadContext(
            summary=summary,
            token_ratio=row["token_ratio"],
            token_ratio_model=row["token_ratio_model"],
            prompt_tokens_estimated=row["prompt_tokens_estimated"],
            prompt_tokens_reported=row["prompt_tokens_reported"],
        )

    def list_owned(
        self,
        owner_id: UUID,
        *,
        limit: int,
        cursor: str | None = None,
        live_at: datetime | None = None,
    ) -> ThreadPage:
        """One page of an owner's threads, most recently active first.

        ``live_at``: only threads that have not expired at that time. Raises
        :class:`InvalidThreadCursor` for a cursor this store did not issue.
        """
        where = ["owner_id = %s"]
        params: list[Any] = [owner_id]
        if live_at is not None:
            where.append("expires_at > %s")
            params.append(live_at)
        if cursor is not None:
            updated_at, last_id = decode_cursor(cursor)
            where.append("(updated_at, id) < (%s, %s)")
            params.extend([updated_at, last_id])
        params.append(limit + 1)  # one more tells whether there is a next page
        rows = self._query(
            f"select {_SUMMARY_COLUMNS} from threads"
            f" where {' and '.join(where)} order by updated_at desc, id desc limit %s",
            tuple(params),
        )
        summaries = [ThreadSummary(**r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit and summaries:
            last = summaries[-1]
            next_cursor = encode_cursor(last.updated_at, last.thread_id)
        return ThreadPage(threads=summaries, next_cursor=next_cursor)

    def search_owned(
        self,
        owner_id: UUID,
        query: SearchQuery,
        *,
        limit: int,
        cursor: str | None = None,
        live_at: datetime | None = None,
    ) -> SearchPage:
        """One page of an owner's threads matching ``query`` (:mod:`storage.thread_search`),
        most recently active first, each with a snippet. Raises :class:`InvalidThreadCursor`
        for a cursor this store did not issue (a listing's cursor is a position in the same
        order, so it is accepted)."""
        position = decode_cursor(cursor) if cursor is not None else None
        hits, more = search_owned(
            self._reads.query, owner_id, query, limit=limit, position=position, live_at=live_at
        )
        next_cursor = None
        if more and hits:
            next_cursor = encode_cursor(hits[-1].updated_at, hits[-1].thread_id)
        return SearchPage(threads=hits, next_cursor=next_cursor)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        return self._reads.query(sql, params)


def _files(value: object) -> list[str]:
    """``messages.files`` is jsonb: psycopg gives the list itself (or its text, to be safe)."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, list):
        return [str(item) for item in value]
    return []
