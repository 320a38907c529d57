"""``threads``: the caller's conversation threads, most recently active first, paged; with
``query``, only those whose prompts or answers match it, each with a snippet.

Only the calling client identity's threads are listed or searched (users of the EX-AI MCP
server this project upgrades asked for a way to list and find threads); expired ones only when
asked for. How a query matches: :mod:`storage.thread_search` and docs/chat.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial

import trio
from pydantic import BaseModel, Field

from actors.conversation import Conversations, ThreadListUnavailable
from actors.conversation.owners import owner_id
from runtime.mcp.schema import ToolAnnotations
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from storage.thread_search import QUERY_BYTES, QUERY_CHARS, SearchPage, ThreadHit, parse_query
from storage.threads import ThreadPage, ThreadReadError, ThreadSummary


class ThreadsArgs(BaseModel):
    limit: int = Field(default=20, ge=1, le=100, description="Threads per page.")
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")
    include_expired: bool = Field(default=False, description="Also list expired threads.")
    # The character bound is also the schema's; the byte bound and the rest are checked by
    # storage.thread_search.parse_query, which names the bound passed.
    query: str | None = Field(
        default=None,
        max_length=QUERY_CHARS,
        description=(
            "Only threads whose prompts or answers match, newest first. Words as in a web "
            'search ("exact phrase", or, -word), case-insensitive, no stemming; with CJK '
            "characters, each space-separated term must occur as written. At most "
            f"{QUERY_CHARS} characters and {QUERY_BYTES} bytes."
        ),
    )


class ThreadInfo(BaseModel):
    continuation_id: str
    title: str | None
    turns: int
    remaining_exchanges: int
    created_at: datetime
    last_activity: datetime
    expires_at: datetime
    expired: bool
    snippet: str | None = Field(
        default=None,
        description="With query: the newest matching message around its match, «marked».",
    )
    prompt_tokens_estimated: int | None = Field(
        default=None,
        description="The last turn's prompt in tokens as estimated (characters / 4, "
        "uncalibrated); None before the first turn that reported usage.",
    )
    prompt_tokens_reported: int | None = Field(
        default=None, description="The same prompt's prompt_tokens as the upstream reported."
    )
    token_ratio: float | None = Field(
        default=None,
        description="Reported tokens per uncalibrated estimate (characters / 4), smoothed over "
        "the thread's turns with its model: the calibration its budgets use.",
    )


class ThreadsOutput(BaseModel):
    threads: list[ThreadInfo]
    next_cursor: str | None


class Threads(Tool[ThreadsArgs]):
    name = "threads"
    description = (
        "List your chat threads, most recent first: continuation_id, exchanges used and "
        "remaining, last activity, expiry. With query, find the threads whose messages match "
        "it, each with a snippet."
    )
    Args = ThreadsArgs
    Output = ThreadsOutput
    annotations = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    def __init__(self, conversations: Conversations) -> None:
        self._conversations = conversations

    async def run(self, args: ThreadsArgs, ctx: ToolContext) -> ToolOutput:
        # A cursor we did not issue or a bad query (InvalidInput) or threads that cannot be
        # read (RetryLater) are answered by the call runner's one translation
        # (runtime.mcp.translation).
        page: ThreadPage | SearchPage
        if args.query is not None:
            page = await self._search(args.query, args, ctx.identity)
        else:
            page = await self._conversations.list_threads(
                ctx.identity,
                limit=args.limit,
                cursor=args.cursor,
                include_expired=args.include_expired,
            )
        now = datetime.now(UTC)
        max_turns = self._conversations.limits.max_turns
        output = ThreadsOutput(
            threads=[_info(t, now, max_turns) for t in page.threads],
            next_cursor=page.next_cursor,
        )
        return ToolOutput(text=_text(output, max_turns), structured=output)

    async def _search(self, text: str, args: ThreadsArgs, identity: str) -> SearchPage:
        """The caller's matching threads: scoped by owner exactly as the listing
        (``Conversations.list_threads``), read through the same store and read pool."""
        query = parse_query(text)  # InvalidSearchQuery (an InvalidInput)
        live_at = None if args.include_expired else datetime.now(UTC)
        search = partial(
            self._conversations.store.search_owned,
            owner_id(identity),
            query,
            limit=args.limit,
            cursor=args.cursor,
            live_at=live_at,
        )
        try:
            # Abandoned on cancel: the worker finishes its query (statement_timeout bounds it)
            # and gives its connection back on its own.
            return await trio.to_thread.run_sync(search, abandon_on_cancel=True)
        except ThreadReadError as exc:
            raise ThreadListUnavailable(
                f"storage unavailable: threads cannot be searched ({exc}); retry later"
            ) from exc


def _info(thread: ThreadSummary | ThreadHit, now: datetime, max_turns: int) -> ThreadInfo:
    return ThreadInfo(
        continuation_id=str(thread.thread_id),
        title=thread.title,
        turns=thread.turn_count,
        remaining_exchanges=max(0, max_turns - thread.turn_count),
        created_at=thread.created_at,
        last_activity=thread.updated_at,
        expires_at=thread.expires_at,
        expired=thread.expires_at <= now,
        snippet=thread.snippet if isinstance(thread, ThreadHit) else None,
        prompt_tokens_estimated=thread.prompt_tokens_estimated,
        prompt_tokens_reported=thread.prompt_tokens_reported,
        token_ratio=thread.token_ratio,
    )


def _text(output: ThreadsOutput, max_turns: int) -> str:
    if not output.threads:
        return "No threads."  # also for a search: nothing of the caller's matched
    lines = []
    for t in output.threads:
        state = "expired" if t.expired else f"expires {t.expires_at.isoformat(timespec='seconds')}"
        lines.append(
            f"{t.continuation_id}  {t.turns}/{max_turns} exchanges ({t.remaining_exchanges} "
            f"left), last {t.last_activity.isoformat(timespec='seconds')}, {state}"
            f"  {t.title or ''}".rstrip()
        )
        if t.snippet is not None:
            lines.append(f"    {t.snippet}")
    if output.next_cursor:
        lines.append(f"next_cursor: {output.next_cursor}")
    return "\n".join(lines)
