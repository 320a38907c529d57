"""Conversation threads: one turn of a thread, and a client's list of threads.

A turn, in order:

1. **the thread** (a continuation): read from Postgres through :class:`ThreadStore`; it must
   be the caller's (another identity's thread is "unknown", never "not yours"), not expired
   (``thread_ttl_seconds`` after its last turn) and not full (``max_turns`` exchanges);
2. **Phase 1**: history the caller embedded into its prompt is stripped
   (:mod:`actors.conversation.embedded`);
3. **the request**: the stored history rebuilt within budgets (:mod:`.history`), its newest
   summary first if it has one, then the new prompt with its files; budgets are in the
   thread's calibrated tokens (:mod:`.compaction`);
4. **the call**: through the rate limiter and the provider (:mod:`.upstream`);
5. **the store**: the thread row (turn count, expiry moved on, calibration) and the turn's
   messages (file copies, prompt, answer) through the persistence actor, the last one a
   *critical* write, so once the client holds the answer, the next turn can read it;
6. **compaction**: if the thread has grown past its threshold, a summary of its older
   exchanges is started in the service's nursery (:mod:`.compaction`); the turn does not
   wait for it.

Nothing is stored for a turn that failed: a thread is only what was answered. Turns of one
thread are serialised within the node (a lock per thread), so two concurrent continuations
cannot both take the last exchange or write the same turn index. Nodes sharing a database do
not share these locks; a client racing itself across nodes may exceed ``max_turns`` by one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar
from uuid import UUID, uuid4

import structlog
import trio

from actors.conversation.compaction import (
    CompactionJob,
    CompactionPlan,
    Compactor,
    calibrated,
    next_ratio,
    plan_compaction,
    ratio_for,
)
from actors.conversation.embedded import Stripped, strip_embedded_history
from actors.conversation.errors import (
    PromptOnlyHistory,
    ThreadExpired,
    ThreadFull,
    ThreadListUnavailable,
    ThreadNotFound,
    ThreadStoreUnavailable,
)
from actors.conversation.history import (
    FILE_MESSAGE,
    FileCopy,
    History,
    HistoryBudget,
    Summary,
    Turn,
    compose,
    tokens,
    turns_from_messages,
    user_message,
)
from actors.conversation.owners import owner_id
from actors.conversation.upstream import Upstream, choose_provider, complete
from actors.persistence import PersistenceClient
from actors.providers import ChatMessage, ChatRequest, ChatResult, OnText
from actors.providers.usage import estimate_tokens
from runtime.config import ChatLimits
from runtime.supervision import ChildContext
from storage.rows import MessageRole, MessageRow, ThreadRow
from storage.threads import (
    StoredThread,
    ThreadContext,
    ThreadPage,
    ThreadReadError,
    ThreadStore,
)
from storage.untrusted import storable_text

log = structlog.get_logger("conversation")

TOOL_NAME = "chat"
TITLE_CHARS = 80
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TurnRequest:
    identity: str
    session_id: str
    prompt: str
    continuation_id: UUID | None = None
    model: str | None = None
    files: tuple[FileCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    thread_id: UUID
    turn: int  # exchanges in the thread, this one included
    remaining: int
    expires_at: datetime
    result: ChatResult
    history: History
    stripped: Stripped
    stored: bool  # False: the turn could not be confirmed stored (logged)
    tokens: TokenCounts
    compacting: bool = False  # a summary of older exchanges was started after this turn


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """The request this turn sent, counted three ways: ``estimated`` (characters / 4),
    ``calibrated`` (the estimate times the ``ratio`` the thread had learnt for its model
    before this turn), and ``reported`` (the upstream's ``prompt_tokens``; ``None`` when it
    reported none). ``ratio``: the thread's ratio after this turn."""

    estimated: int
    calibrated: int
    reported: int | None
    ratio: float


class Conversations:
    """The node's conversation service, shared by every session (it holds no session state)."""

    def __init__(
        self,
        *,
        store: ThreadStore,
        persistence: PersistenceClient,
        upstream: Upstream,
        limits: ChatLimits,
    ) -> None:
        self.store = store
        self.persistence = persistence
        self.upstream = upstream
        self.limits = limits
        self._budget = HistoryBudget(
            tokens=limits.history_tokens,
            max_messages=limits.max_messages,
            message_tokens=limits.message_tokens,
        )
        self._locks: dict[UUID, tuple[trio.Lock, int]] = {}
        self.compactor = Compactor(
            store=store, persistence=persistence, upstream=upstream, limits=limits
        )

    async def run(self, ctx: ChildContext) -> None:
        """``/root/conversations``: the nursery of the service's compactions (its own
        tasks, started by turns); on stop, the ones running are cancelled."""
        await self.compactor.run(ctx)

    async def turn(self, request: TurnRequest, *, on_text: OnText | None = None) -> TurnOutcome:
        """One exchange; raises ConversationError, ProviderError, RateLimited,
        UpstreamNotReady or ThreadStoreUnavailable (see the module doc): each a domain error
        of the node's tree (``storage.errors``), which the call runner answers."""
        providers, limiter = self.upstream.ready()
        provider = choose_provider(providers, request.model)  # ProviderNotConfigured first
        prompt = storable_text(request.prompt)
        files = tuple(
            FileCopy(storable_text(f.path), storable_text(f.content)) for f in request.files
        )
        thread_id = request.continuation_id or uuid4()
        model = request.model or provider.settings.default_model
        async with self._turn_lock(thread_id):
            thread = None
            context = ThreadContext()
            if request.continuation_id is not None:
                thread = await self._owned_thread(request.continuation_id, request.identity)
                context = await self._context(thread_id)
            ratio = ratio_for(context, model)
            # CPU work proportional to the prompt and the thread (up to a few MiB): off the
            # trio thread, so one large turn does not stall every session of the node.
            turns, history, stripped = await trio.to_thread.run_sync(
                partial(self._prepare, thread, prompt, files, context=context, ratio=ratio)
            )
            messages = [
                *history.messages,
                ChatMessage(role="user", content=user_message(stripped.text, files)),
            ]
            chat = ChatRequest(
                messages=messages, model=request.model, max_tokens=self.limits.max_output_tokens
            )
            owner = owner_id(request.identity)
            result = await complete(
                provider,
                limiter,
                self.persistence,
                session_id=request.session_id,
                identity=request.identity,
                request=chat,
                on_text=on_text,
                owner=owner,
                thread_id=thread_id,
            )
            estimated = estimate_tokens(m.content for m in messages)
            reported = None if result.usage.estimated else result.usage.input_tokens
            learnt = next_ratio(context, model, estimated=estimated, reported=reported)
            counts = TokenCounts(
                estimated=estimated,
                calibrated=calibrated(estimated, ratio),
                reported=reported,
                ratio=learnt if learnt is not None else ratio,
            )
            index = thread.turn_count if thread is not None else 0
            now = datetime.now(UTC)
            expires_at = now + timedelta(seconds=self.limits.thread_ttl_seconds)
            reply = storable_text(result.text)
            stored = await self._store(
                request,
                thread_id,
                index,
                new=thread is None,
                prompt=stripped.text,
                files=files,
                reply=reply,
                now=now,
                expires_at=expires_at,
                counts=counts,
                ratio_model=model if learnt is not None else None,
            )
            compacting = False
            if stored and self.limits.compaction:
                thread_turns = [*turns, Turn(index, stripped.text, reply, files)]
                plan = await trio.to_thread.run_sync(
                    partial(self._plan, thread_turns, context, ratio=counts.ratio)
                )
                if plan is not None:
                    job = CompactionJob(
                        thread_id=thread_id,
                        identity=request.identity,
                        session_id=request.session_id,
                        provider=provider.name,
                        model=model,
                        plan=plan,
                    )
                    compacting = self.compactor.start(job)
        turn = index + 1
        return TurnOutcome(
            thread_id=thread_id,
            turn=turn,
            remaining=max(0, self.limits.max_turns - turn),
            expires_at=expires_at,
            result=result,
            history=history,
            stripped=stripped,
            stored=stored,
            tokens=counts,
            compacting=compacting,
        )

    async def list_threads(
        self, identity: str, *, limit: int, cursor: str | None, include_expired: bool
    ) -> ThreadPage:
        """A page of the caller's threads, most recently active first. Raises
        ``InvalidThreadCursor`` (an ``InvalidInput``) or :class:`ThreadListUnavailable`."""
        live_at = None if include_expired else datetime.now(UTC)
        try:
            return await self._read(
                partial(
                    self.store.list_owned,
                    owner_id(identity),
                    limit=limit,
                    cursor=cursor,
                    live_at=live_at,
                )
            )
        except ThreadReadError as exc:
            raise ThreadListUnavailable(
                f"storage unavailable: threads cannot be read ({exc}); retry later"
            ) from exc

    # -- steps ---------------------------------------------------------------------------

    async def _owned_thread(self, thread_id: UUID, identity: str) -> StoredThread:
        try:
            thread = await self._read(partial(self.store.load, thread_id))
        except ThreadReadError as exc:
            raise ThreadStoreUnavailable(
                f"storage unavailable: the thread cannot be read ({exc}); nothing was sent "
                "upstream, retry later"
            ) from exc
        if thread is None or thread.owner_id != owner_id(identity):
            raise ThreadNotFound(
                f"unknown continuation_id {thread_id}: no such thread for this client. "
                "Start a new thread by calling chat without continuation_id."
            )
        if thread.expires_at <= datetime.now(UTC):
            ttl = _duration(self.limits.thread_ttl_seconds)
            raise ThreadExpired(
                f"thread {thread_id} expired at {thread.expires_at.isoformat()} ({ttl} after "
                "its last turn). Start a new thread by calling chat without continuation_id."
            )
        if thread.turn_count >= self.limits.max_turns:
            raise ThreadFull(
                f"thread {thread_id} has reached its limit of {self.limits.max_turns} "
                "exchanges. Start a new thread by calling chat without continuation_id "
                "(summarise what matters from this one in the new prompt)."
            )
        return thread

    async def _context(self, thread_id: UUID) -> ThreadContext:
        try:
            return await self._read(partial(self.store.load_context, thread_id))
        except ThreadReadError as exc:
            raise ThreadStoreUnavailable(
                f"storage unavailable: the thread cannot be read ({exc}); nothing was sent "
                "upstream, retry later"
            ) from exc

    def _plan(
        self, turns: list[Turn], context: ThreadContext, *, ratio: float
    ) -> CompactionPlan | None:
        """The compaction the thread calls for once this turn is stored, if any: past its
        threshold, or when the next turn's history would leave out an exchange the summary
        does not cover (it would be lost: neither sent nor summarised)."""
        stored = context.summary
        summary = None
        if stored is not None:
            summary = Summary(stored.first_turn, stored.last_turn, stored.content)
        upcoming = compose(turns, self._budget.calibrated(ratio), summary=summary)
        return plan_compaction(
            turns, summary, self.limits, ratio, truncated=upcoming.omitted_turns > 0
        )

    def _prepare(
        self,
        thread: StoredThread | None,
        prompt: str,
        files: Sequence[FileCopy],
        *,
        context: ThreadContext,
        ratio: float,
    ) -> tuple[list[Turn], History, Stripped]:
        if thread is None:
            empty = History(messages=[], turns=0, omitted_turns=0, tokens=0)
            return [], empty, Stripped(prompt, 0, 0)
        turns = turns_from_messages(thread.messages)
        said = [text for turn in turns for text in (turn.prompt, turn.reply) if text]
        copies = [copy.content for turn in turns for copy in turn.files]
        stripped = strip_embedded_history(prompt, said, files=copies)
        if stripped.changed:
            log.info(
                "chat.history_stripped",
                thread_id=str(thread.thread_id),
                removed_chars=stripped.removed_chars,
                passages=stripped.passages,
            )
        if not stripped.text.strip():
            raise PromptOnlyHistory(
                "the prompt only repeats this thread's earlier messages, which the server "
                "already keeps and sends upstream with every turn; send just the new message"
            )
        stored = context.summary
        summary = None
        if stored is not None:
            summary = Summary(stored.first_turn, stored.last_turn, stored.content)
        history = compose(
            turns,
            self._budget.calibrated(ratio),
            summary=summary,
            current_files={f.path for f in files},
        )
        return turns, history, stripped

    async def _store(
        self,
        request: TurnRequest,
        thread_id: UUID,
        index: int,
        *,
        new: bool,
        prompt: str,
        files: Sequence[FileCopy],
        reply: str,
        now: datetime,
        expires_at: datetime,
        counts: TokenCounts,
        ratio_model: str | None,
    ) -> bool:
        records: list[ThreadRow | MessageRow] = [
            ThreadRow(
                thread_id=thread_id,
                created_at=now,
                updated_at=now,
                expires_at=expires_at,
                turn_count=index + 1,
                session_id=request.session_id,
                owner_id=owner_id(request.identity),
                tool_name=TOOL_NAME,
                title=_title(prompt) if new else None,
                token_ratio=counts.ratio if ratio_model is not None else None,
                token_ratio_model=ratio_model,
                prompt_tokens_estimated=counts.estimated,
                prompt_tokens_reported=counts.reported,
            )
        ]
        # Stamped a microsecond apart: within a turn, messages are read back in this order.
        stamps = (now + timedelta(microseconds=i) for i in range(len(files) + 2))
        turn = partial(_message, thread_id=thread_id, index=index)
        for copy in files:
            records.append(
                turn(
                    role="user",
                    content=copy.content,
                    at=next(stamps),
                    tool_name=FILE_MESSAGE,
                    files=[copy.path],
                )
            )
        paths = [copy.path for copy in files]
        records.append(
            turn(role="user", content=prompt, at=next(stamps), tool_name=TOOL_NAME, files=paths)
        )
        records.append(
            turn(role="assistant", content=reply, at=next(stamps), tool_name=TOOL_NAME, files=[])
        )
        for record in records[:-1]:
            self.persistence.write_soon(record)
        return await self._write_critical(records[-1], thread_id)

    async def _write_critical(self, record: ThreadRow | MessageRow, thread_id: UUID) -> bool:
        """Critical: returns once committed (or journaled while the database is away), and,
        the client being FIFO, so is everything written before it, whatever the node's
        durability: the next turn reads the thread back from the database. ``False`` if that
        could not be confirmed: the answer stands, and the failure is logged."""
        try:
            await self.persistence.write_committed(record)
        except Exception:
            log.exception("chat.turn_not_stored", thread_id=str(thread_id))
            return False
        return True

    # -- helpers ---------------------------------------------------------------------------

    async def _read(self, read: Callable[[], T]) -> T:
        # Abandoned on cancel: the thread finishes its short query (statement_timeout bounds
        # it) and returns its connection to the pool on its own.
        return await trio.to_thread.run_sync(read, abandon_on_cancel=True)

    @asynccontextmanager
    async def _turn_lock(self, thread_id: UUID) -> AsyncIterator[None]:
        lock, users = self._locks.get(thread_id, (trio.Lock(), 0))
        self._locks[thread_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[thread_id]
            if users == 1:
                del self._locks[thread_id]
            else:
                self._locks[thread_id] = (lock, users - 1)


def _message(
    *,
    thread_id: UUID,
    index: int,
    role: MessageRole,
    content: str,
    at: datetime,
    tool_name: str,
    files: list[str],
) -> MessageRow:
    return MessageRow(
        message_id=uuid4(),
        thread_id=thread_id,
        turn_index=index,
        role=role,
        content=content,
        token_count=tokens(content),
        files=files,
        tool_name=tool_name,
        created_at=at,
    )


def _title(prompt: str) -> str:
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "")
    return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 3].rstrip() + "..."


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
