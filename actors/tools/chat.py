"""``chat``: a turn of a conversation thread with the configured upstream LLM.

The conversation itself is :mod:`actors.conversation`; this module is the MCP face of it:
arguments, the answer (text plus structured content), and streaming as progress. A turn that
cannot happen raises a domain error of the node's tree (``storage.errors``), which the call
runner answers through ``runtime.mcp.translation`` (docs/chat.md):

* a model no provider offers (``ModelNotOffered``, an ``InvalidInput``): -32602 before
  2025-11-25, an ``isError`` result from it on, nothing sent;
* the turn cannot happen as asked (a ``ConversationError``: unknown, expired or full thread;
  ``ProviderNotConfigured``; the upstream failed or refused: ``ToolFailed``): an ``isError``
  result whose text says what to do, for the model to read;
* retry later (a rate limit, the upstream's 429, its circuit breaker open, storage or the
  upstream starting: ``RetryLater``): JSON-RPC -32004 with ``data.limit`` and
  ``data.retry_after`` (seconds; ``retryAfterMs`` too, as every -32004 of this server carries);
* a limit that waiting cannot lift (a spent quota: ``LimitExhausted``): JSON-RPC -32005 with
  ``data.limit``.
"""

from __future__ import annotations

import math
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field, field_validator

from actors.conversation import Conversations, FileCopy, TurnOutcome, TurnRequest
from actors.providers import OnText
from runtime.mcp.tools import Tool, ToolContext, ToolOutput


class ChatFileArg(BaseModel):
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="The file's name for the model; a later copy with the same path replaces "
        "earlier ones in the thread's history.",
    )
    content: str = Field(description="The file's text (the server does not read your disk).")


class ChatArgs(BaseModel):
    prompt: str = Field(
        min_length=1,
        description="Your message. Send only what is new: the server keeps the thread's history.",
    )
    continuation_id: UUID | None = Field(
        default=None, description="Continue this thread; omit to start a new one."
    )
    model: str | None = Field(
        default=None, min_length=1, description="Model; the server's default if omitted."
    )
    files: list[ChatFileArg] = Field(default_factory=list, description="Files to discuss.")

    @field_validator("files")
    @classmethod
    def _distinct_paths(cls, files: list[ChatFileArg]) -> list[ChatFileArg]:
        paths = [f.path for f in files]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"each path may be attached once per call: {', '.join(twice)}")
        return files


class ChatUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    estimated: bool
    cost_usd: float | None


class PromptTokens(BaseModel):
    estimated: int = Field(description="Tokens of the request sent, as characters / 4.")
    calibrated: int = Field(
        description="The estimate times the ratio this thread had measured for its model."
    )
    reported: int | None = Field(
        description="prompt_tokens the upstream reported for it (null: none reported)."
    )
    ratio: float = Field(
        description="The thread's calibration after this turn: reported / estimated, smoothed."
    )


class ChatOutput(BaseModel):
    content: str
    continuation_id: str
    turn: int = Field(description="Exchanges in this thread so far, this one included.")
    max_turns: int
    remaining_exchanges: int
    expires_at: datetime = Field(description="When the thread expires unless continued.")
    provider: str
    model: str
    usage: ChatUsage
    history_turns: int = Field(description="Earlier exchanges sent upstream with this one.")
    history_omitted_turns: int = Field(description="Earlier exchanges left out (budget).")
    history_stripped_tokens: int = Field(
        description="Tokens of this thread's history found repeated in the prompt and removed."
    )
    history_summarised_turns: int = Field(
        default=0, description="Earlier exchanges sent as a summary instead of verbatim."
    )
    compacting: bool = Field(
        default=False, description="A summary of older exchanges was started after this turn."
    )
    prompt_tokens: PromptTokens | None = Field(
        default=None, description="The request's size: estimated, calibrated and reported."
    )


class Chat(Tool[ChatArgs]):
    name = "chat"
    description = (
        "Talk with the configured LLM. Starts a thread, or continues one given its "
        "continuation_id (each answer says how many exchanges remain). The server keeps and "
        "sends the history itself: pass only the new message."
    )
    Args = ChatArgs
    Output = ChatOutput
    #: May run as an MCP task (2025-11-25, docs/tasks.md).
    task_support = "optional"

    def __init__(self, conversations: Conversations) -> None:
        self._conversations = conversations

    async def run(self, args: ChatArgs, ctx: ToolContext) -> ToolOutput:
        request = TurnRequest(
            identity=ctx.identity,
            session_id=ctx.session_id,
            prompt=args.prompt,
            continuation_id=args.continuation_id,
            model=args.model,
            files=tuple(FileCopy(f.path, f.content) for f in args.files),
        )
        # Whatever refuses the turn is a domain error (storage.errors), answered by the
        # call runner's one translation (runtime.mcp.translation): see the module doc.
        outcome = await self._conversations.turn(request, on_text=_streamer(ctx))
        return self._answer(outcome)

    def _answer(self, outcome: TurnOutcome) -> ToolOutput:
        limits = self._conversations.limits
        result = outcome.result
        stripped_tokens = math.ceil(outcome.stripped.removed_chars / 4)
        output = ChatOutput(
            content=result.text,
            continuation_id=str(outcome.thread_id),
            turn=outcome.turn,
            max_turns=limits.max_turns,
            remaining_exchanges=outcome.remaining,
            expires_at=outcome.expires_at,
            provider=result.provider,
            model=result.model,
            usage=ChatUsage(
                input_tokens=result.usage.input_tokens,
                output_tokens=result.usage.output_tokens,
                estimated=result.usage.estimated,
                cost_usd=result.cost_usd,
            ),
            history_turns=outcome.history.turns,
            history_omitted_turns=outcome.history.omitted_turns,
            history_stripped_tokens=stripped_tokens,
            history_summarised_turns=outcome.history.summarised_turns,
            compacting=outcome.compacting,
            prompt_tokens=PromptTokens(
                estimated=outcome.tokens.estimated,
                calibrated=outcome.tokens.calibrated,
                reported=outcome.tokens.reported,
                ratio=round(outcome.tokens.ratio, 4),
            ),
        )
        notes = [
            f"continuation_id: {outcome.thread_id} (exchange {outcome.turn} of "
            f"{limits.max_turns}; {outcome.remaining} remaining; expires "
            f"{outcome.expires_at.isoformat(timespec='seconds')} unless continued)"
        ]
        if not outcome.stored:
            notes.append(
                "Warning: this exchange could not be confirmed stored (see the server log); "
                "a continuation may not include it."
            )
        if outcome.remaining == 0:
            notes.append(
                "This thread has no exchanges left: start a new one without continuation_id."
            )
        if stripped_tokens:
            notes.append(
                f"Removed about {stripped_tokens} tokens of this thread's history repeated in "
                "the prompt: the server sends the history itself, so send only the new message."
            )
        if outcome.history.summarised_turns:
            notes.append(
                f"The {outcome.history.summarised_turns} oldest exchanges were sent as a summary."
            )
        if outcome.history.omitted_turns:
            notes.append(
                f"The {outcome.history.omitted_turns} oldest exchanges did not fit the history "
                "budget and were not sent."
            )
        return ToolOutput(text=f"{result.text}\n\n---\n" + "\n".join(notes), structured=output)


def _streamer(ctx: ToolContext) -> OnText | None:
    """Streamed text as progress notifications, if the client asked for progress."""
    if not ctx.wants_progress:
        return None
    received = 0

    async def on_text(text: str) -> None:
        nonlocal received
        received += len(text)  # characters so far: strictly increasing, as progress must be
        await ctx.report_progress(received, None, text)

    return on_text
