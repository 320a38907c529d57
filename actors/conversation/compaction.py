"""Context Engineering Phase 2: a long thread's older exchanges are summarised by its model.

Without it a long thread is cut to its newest turns within the history budget
(:mod:`.history`), so what the model knew at turn 3 is gone by turn 30. With it:

* **When.** After a turn is stored, its thread's *compactable size* is measured: the newest
  summary plus the prompts and answers of every exchange it does not cover, in calibrated
  tokens (:func:`calibrated`). Files are left out of it: they are never summarised, so
  summarising cannot shrink them. Past ``compaction_threshold_tokens`` (default 40,000), or
  as soon as the next turn's history would leave out an exchange the summary does not cover
  (``max_messages`` or ``history_tokens`` reached first: that exchange would be lost,
  neither sent nor summarised), the exchanges older than the newest
  ``compaction_keep_turns`` (3) that the summary does not cover yet are summarised (oldest
  first, at most ``compaction_input_tokens`` of them per call, as sent: each prompt and
  answer cut to ``message_tokens``; the rest waits for the next
  compaction).
* **What.** Only what was said: each exchange's prompt (as stored, after Phase 1) and answer.
  Files (``messages.tool_name = 'file'``; the history keeps their newest copy as before),
  tool results (``role = 'tool'``) and anything else a thread may hold are never given to the
  summariser; a turn that failed stored nothing, so its error is in no thread.
* **Incremental.** A thread's next summary is asked for with the previous summary and only
  the exchanges after it, and covers the union (same ``first_turn``, a later ``last_turn``):
  the old exchanges are never sent to the summariser twice.
* **Where.** One ``thread_summaries`` row per summary, written through the persistence actor
  (a critical write: committed, or journaled while the database is away). The next turn
  reads the newest; until it exists, the history is today's budgeted truncation.
* **How.** A task of the conversation service's nursery (``/root/conversations``), started
  once the turn's answer is stored, so the client never waits for it. At most one per thread
  and ``max_compactions`` on the node at a time; a compaction that cannot start now is not
  queued, the next turn of the thread asks again. On node stop the nursery is cancelled:
  a summary call in flight is abandoned, nothing half-written is stored.
* **The call** is an upstream call like any other (:func:`.upstream.complete`): the thread's
  provider and model, its circuit breaker, the rate limiter (counted against the thread
  owner's client identity, under a limiter session of its own), one ``token_usage`` row with
  ``purpose = 'compaction'``, the owner and the thread. A summariser that fails (breaker open,
  429, 5xx, ``compaction_timeout_seconds`` passed, an empty answer) is logged
  (``chat.compaction_failed``) and fails no turn; the next turn tries again. An answer
  longer than ``summary_tokens`` could be (an upstream that ignores ``max_tokens``) is cut
  to :func:`summary_bound` before it is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pykka
import structlog
import trio

from actors.conversation.history import Summary, Turn, cut, tokens
from actors.conversation.owners import owner_id
from actors.conversation.upstream import Upstream, complete
from actors.persistence import PersistenceClient
from actors.providers import ChatMessage, ChatRequest
from runtime import trace
from runtime.config import ChatLimits
from runtime.supervision import ChildContext
from storage.errors import ActorUnavailable
from storage.rows import ThreadSummaryRow
from storage.threads import ThreadContext, ThreadStore
from storage.untrusted import storable_text

log = structlog.get_logger("conversation")

#: Bounds of a thread's calibration ratio (reported prompt tokens per estimated token): a
#: report outside them is a miscount (an upstream that counts cached tokens apart, a proxy
#: that rewrites the prompt), not a tokenizer.
RATIO_MIN = 0.25
RATIO_MAX = 4.0
#: Weight of the newest observation in the smoothed ratio (an exponential moving average).
RATIO_WEIGHT = 0.5

INSTRUCTIONS = (
    "You compact a conversation between a user and an assistant so that it can go on "
    "without its full transcript. Write one faithful, dense summary of it: the user's goals "
    "and constraints, what was decided and why, facts, names, numbers, paths and code "
    "identifiers as given, what the assistant answered or promised, and the questions still "
    "open. Keep earlier points that still matter when a previous summary is given. Never "
    "invent anything; plain text, no preamble."
)


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What to summarise: ``turns`` (oldest first, consecutive), extending ``prior``."""

    prior: Summary | None
    turns: tuple[Turn, ...]

    @property
    def first_turn(self) -> int:
        return self.prior.first_turn if self.prior is not None else self.turns[0].index

    @property
    def last_turn(self) -> int:
        return self.turns[-1].index


@dataclass(frozen=True, slots=True)
class CompactionJob:
    """A compaction to run for a thread, with who it is for and where it goes."""

    thread_id: UUID
    identity: str
    session_id: str
    provider: str
    model: str
    plan: CompactionPlan


def calibrated(estimate: int, ratio: float) -> int:
    """An estimate (characters / 4) in the thread's upstream tokens."""
    return math.ceil(estimate * ratio)


def next_ratio(
    context: ThreadContext, model: str, *, estimated: int, reported: int | None
) -> float | None:
    """The thread's ratio after a turn whose request was ``estimated`` tokens by characters
    and ``reported`` by the upstream (``None``: it reported none, nothing is learned).

    Smoothed (:data:`RATIO_WEIGHT`) with the stored one when that is for the same model;
    started again for another model; clamped to :data:`RATIO_MIN`..:data:`RATIO_MAX`."""
    if reported is None or reported <= 0 or estimated <= 0:
        return None
    observed = min(RATIO_MAX, max(RATIO_MIN, reported / estimated))
    previous = context.token_ratio if context.token_ratio_model == model else None
    if previous is None:
        return observed
    return min(RATIO_MAX, max(RATIO_MIN, (1 - RATIO_WEIGHT) * previous + RATIO_WEIGHT * observed))


def ratio_for(context: ThreadContext, model: str) -> float:
    """The ratio to use for this model on this thread (1.0 until measured)."""
    if context.token_ratio is not None and context.token_ratio_model == model:
        return min(RATIO_MAX, max(RATIO_MIN, context.token_ratio))
    return 1.0


def plan_compaction(
    turns: Sequence[Turn],
    summary: Summary | None,
    limits: ChatLimits,
    ratio: float,
    *,
    truncated: bool = False,
) -> CompactionPlan | None:
    """The compaction ``turns`` (a thread's, oldest first, the newest one included) call for,
    if any (module doc, "When"). ``truncated``: the next turn's history would leave out
    exchanges the summary does not cover, which compacting now keeps from being lost."""
    if not limits.compaction:
        return None
    start = summary.last_turn + 1 if summary is not None else 0
    pending = [t for t in turns if t.index >= start]
    size = tokens(summary.content) if summary is not None else 0
    size += sum(tokens(t.prompt) + tokens(t.reply) for t in pending)
    if not truncated and calibrated(size, ratio) <= limits.compaction_threshold_tokens:
        return None
    candidates = pending[: max(0, len(pending) - limits.compaction_keep_turns)]
    taken: list[Turn] = []
    budget = 0
    for turn in candidates:
        # What the summariser is given of it (summary_request cuts each message), not its
        # whole size: budgeted whole, a thread of long prompts got one exchange a call and,
        # once a compaction had failed, never caught up again.
        sent = tokens(cut(turn.prompt, limits.message_tokens))
        cost = calibrated(sent + tokens(cut(turn.reply, limits.message_tokens)), ratio)
        if taken and budget + cost > limits.compaction_input_tokens:
            break
        taken.append(turn)
        budget += cost
    if not taken:
        return None
    return CompactionPlan(prior=summary, turns=tuple(taken))


def summary_bound(limits: ChatLimits) -> int:
    """Most estimated tokens (characters / 4) of a stored summary: ``summary_tokens``
    upstream tokens at the calibration's floor, :data:`RATIO_MIN` (longer answers are cut)."""
    return math.ceil(limits.summary_tokens / RATIO_MIN)


def summary_request(plan: CompactionPlan, limits: ChatLimits, model: str) -> ChatRequest:
    """The summariser's request: the instructions, then the previous summary (if any) and the
    exchanges to fold into it, each prompt and answer cut to ``message_tokens``."""
    parts: list[str] = []
    if plan.prior is not None:
        parts.append(
            f"The summary so far, of exchanges {plan.prior.first_turn + 1}-"
            f"{plan.prior.last_turn + 1}:\n\n{plan.prior.content}"
        )
        parts.append(
            f"Extend it with exchanges {plan.turns[0].index + 1}-{plan.last_turn + 1}, which "
            "follow it:"
        )
    else:
        parts.append(f"Summarise exchanges {plan.first_turn + 1}-{plan.last_turn + 1}:")
    for turn in plan.turns:
        parts.append(
            f"### Exchange {turn.index + 1}\nUser:\n{cut(turn.prompt, limits.message_tokens)}\n\n"
            f"Assistant:\n{cut(turn.reply, limits.message_tokens)}"
        )
    parts.append(f"Write the summary of exchanges {plan.first_turn + 1}-{plan.last_turn + 1} now.")
    return ChatRequest(
        messages=[
            ChatMessage(role="system", content=INSTRUCTIONS),
            ChatMessage(role="user", content="\n\n".join(parts)),
        ],
        model=model,
        max_tokens=limits.summary_tokens,
    )


class Compactor:
    """The conversation service's compactions: their nursery (``run``, the node's
    ``/root/conversations`` child) and their bounds (module doc, "How")."""

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
        self._nursery: trio.Nursery | None = None
        #: Threads with a compaction running (at most one each, ``max_compactions`` in all).
        self._running: set[UUID] = set()

    async def run(self, ctx: ChildContext) -> None:
        """The nursery compactions run in, until the node stops them (cancelled: a summary
        call in flight is abandoned and nothing of it is stored)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                ctx.started()
                await ctx.stop_requested.wait()
                self._nursery = None
                if self._running:
                    log.info("chat.compactions_cancelled", running=len(self._running))
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    def start(self, job: CompactionJob) -> bool:
        """Start ``job`` if its thread has none running and the node has room; ``False``
        (logged) otherwise: the thread's next turn asks again."""
        nursery = self._nursery
        reason = None
        if nursery is None:
            reason = "stopped"
        elif job.thread_id in self._running:
            reason = "thread_busy"
        elif len(self._running) >= self.limits.max_compactions:
            reason = "node_busy"
        if reason is not None or nursery is None:
            log.info("chat.compaction_deferred", thread_id=str(job.thread_id), reason=reason)
            return False
        self._running.add(job.thread_id)
        nursery.start_soon(self._compact, job)
        return True

    async def _compact(self, job: CompactionJob) -> None:
        # Its logs keep the turn's trace and session (the task inherited them) and say where
        # it runs.
        with trace.bound(actor="/root/conversations"):
            await self._compact_logged(job)

    async def _compact_logged(self, job: CompactionJob) -> None:
        try:
            with trio.move_on_after(self.limits.compaction_timeout_seconds) as scope:
                await self._summarise(job)
            if scope.cancelled_caught:
                log.warning(
                    "chat.compaction_failed",
                    thread_id=str(job.thread_id),
                    error="timeout",
                    timeout_s=self.limits.compaction_timeout_seconds,
                )
        except Exception as exc:  # a summary never fails a turn: the next turn retries
            log.warning(
                "chat.compaction_failed",
                thread_id=str(job.thread_id),
                error=type(exc).__name__,
                message=str(exc)[:500],
            )
        finally:
            self._running.discard(job.thread_id)

    async def _summarise(self, job: CompactionJob) -> None:
        plan = await self._current(job)
        if plan is None:
            return
        providers, limiter = self.upstream.ready()
        provider = providers.get(job.provider)
        request = summary_request(plan, self.limits, job.model)
        key = f"compaction:{job.thread_id}"
        try:
            result = await complete(
                provider,
                limiter,
                self.persistence,
                session_id=job.session_id,
                identity=job.identity,
                request=request,
                purpose="compaction",
                owner=owner_id(job.identity),
                thread_id=job.thread_id,
                limiter_session=key,
            )
        finally:
            # Shielded: a cancelled summary still leaves no limiter session behind. If the
            # limiter is gone (shutdown), so is its ledger.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(5),
                suppress(ActorUnavailable, pykka.ActorDeadError),
            ):
                await limiter.close_session(key)
        content = storable_text(result.text).strip()
        if not content:
            raise ValueError("the summariser answered with no text")
        # An upstream that ignores max_tokens must not grow the summary past what was asked:
        # stored whole, it would ride in every later summary call and count into the thread's
        # compactable size (compacting it at every turn). No compliant answer is cut: the
        # calibration never counts fewer than RATIO_MIN upstream tokens per estimated token.
        content = cut(content, summary_bound(self.limits))
        row = ThreadSummaryRow(
            summary_id=uuid4(),
            thread_id=job.thread_id,
            first_turn=plan.first_turn,
            last_turn=plan.last_turn,
            content=content,
            token_count=tokens(content),
            provider=result.provider,
            model=result.model,
            created_at=datetime.now(UTC),
        )
        await self.persistence.write_committed(row)
        log.info(
            "chat.compacted",
            thread_id=str(job.thread_id),
            first_turn=plan.first_turn,
            last_turn=plan.last_turn,
            turns=len(plan.turns),
            summary_tokens=row.token_count,
            extended=plan.prior is not None,
        )

    async def _current(self, job: CompactionJob) -> CompactionPlan | None:
        """``job``'s plan against the newest stored summary: a turn may have planned on a
        summary that a compaction then replaced, and extending that older one would redo
        its work. ``None``: there is nothing left to summarise."""
        plan = job.plan
        context = await trio.to_thread.run_sync(
            self.store.load_context, job.thread_id, abandon_on_cancel=True
        )
        stored = context.summary
        known = plan.prior.last_turn if plan.prior is not None else -1
        if stored is None or stored.last_turn <= known:
            return plan
        turns = tuple(t for t in plan.turns if t.index > stored.last_turn)
        if not turns:
            return None
        prior = Summary(stored.first_turn, stored.last_turn, stored.content)
        return CompactionPlan(prior=prior, turns=turns)
