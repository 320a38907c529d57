"""``threads``: the caller's conversation threads, most recently active first, paged.

Only the calling client identity's threads are listed (users of the EX-AI MCP server this
project upgrades asked for a way to list and find threads); expired ones only when asked for.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from actors.conversation import Conversations
from runtime.mcp.schema import ToolAnnotations
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from storage.threads import ThreadSummary


class ThreadsArgs(BaseModel):
    limit: int = Field(default=20, ge=1, le=100, description="Threads per page.")
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")
    include_expired: bool = Field(default=False, description="Also list expired threads.")


class ThreadInfo(BaseModel):
    continuation_id: str
    title: str | None
    turns: int
    remaining_exchanges: int
    created_at: datetime
    last_activity: datetime
    expires_at: datetime
    expired: bool


class ThreadsOutput(BaseModel):
    threads: list[ThreadInfo]
    next_cursor: str | None


class Threads(Tool[ThreadsArgs]):
    name = "threads"
    description = (
        "List your chat threads, most recent first: continuation_id, exchanges used and "
        "remaining, last activity, expiry."
    )
    Args = ThreadsArgs
    Output = ThreadsOutput
    annotations = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    def __init__(self, conversations: Conversations) -> None:
        self._conversations = conversations

    async def run(self, args: ThreadsArgs, ctx: ToolContext) -> ToolOutput:
        # A cursor we did not issue (InvalidInput) or threads that cannot be read (RetryLater)
        # are answered by the call runner's one translation (runtime.mcp.translation).
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


def _info(thread: ThreadSummary, now: datetime, max_turns: int) -> ThreadInfo:
    return ThreadInfo(
        continuation_id=str(thread.thread_id),
        title=thread.title,
        turns=thread.turn_count,
        remaining_exchanges=max(0, max_turns - thread.turn_count),
        created_at=thread.created_at,
        last_activity=thread.updated_at,
        expires_at=thread.expires_at,
        expired=thread.expires_at <= now,
    )


def _text(output: ThreadsOutput, max_turns: int) -> str:
    if not output.threads:
        return "No threads."
    lines = []
    for t in output.threads:
        state = "expired" if t.expired else f"expires {t.expires_at.isoformat(timespec='seconds')}"
        lines.append(
            f"{t.continuation_id}  {t.turns}/{max_turns} exchanges ({t.remaining_exchanges} "
            f"left), last {t.last_activity.isoformat(timespec='seconds')}, {state}"
            f"  {t.title or ''}".rstrip()
        )
    if output.next_cursor:
        lines.append(f"next_cursor: {output.next_cursor}")
    return "\n".join(lines)
