"""What the node gives the tools of :mod:`runtime.mcp.tool_api`: worker threads for plain
``def`` tools, and a watch on the event loop for ``async def`` ones.

**Worker threads.** A plain ``def`` tool runs in a worker thread (``trio.to_thread``), at most
``EXAI_TOOL_THREADS`` at once over the node (:attr:`ToolWorkers.thread_limiter`), so it never
blocks the event loop. Nothing can stop a thread: when its call is cancelled or times out,
the client is answered at once and the thread runs on. Its call's slots (the session's and
the node's), the tool's own concurrency and the thread's place stay taken until the thread
returns, so a client cannot pile up threads by cancelling and calling again. They are held by
the thread's end, not by the call's task: ``trio.to_thread.run_sync`` releases the limiter it
is given only once the thread has *actually* finished, even after it abandoned the thread on
a cancel, and :class:`_ThreadHold` is that limiter. Such threads are listed by ``exai status``
(``tool_threads.outliving``).

**Loop-stall watchdog** (``/root/tool_workers``). An ``async def`` tool that blocks (a
``time.sleep``, a synchronous HTTP call, a long computation) stops every session of the node.
The watchdog sleeps ``period`` seconds at a time and measures how late it wakes; a wake more
than ``EXAI_LOOP_STALL_MS`` late is a stall, blamed on every ``async def`` tool that was
running at some point since its previous wake (the one that blocked is among them; trio gives
no cheaper way to know which task held the loop). Each tool is named at most once a minute
(``tool.blocked_loop``, with the stalls not logged since); a stall while no tool ran is
``loop.stalled``, as rarely.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import structlog
import trio

from runtime.connection import RequestId
from runtime.log_throttle import LogThrottle
from runtime.status_model import ToolThread, ToolThreadsStatus
from runtime.supervision import ChildContext

log = structlog.get_logger("tools")

#: Seconds between two log lines naming the same tool's stalls.
STALL_LOG_PERIOD = 60.0

Answered = Literal["cancelled", "timed out"]


@dataclass(eq=False, slots=True)
class WorkerThread:
    """One plain ``def`` tool's call in its worker thread."""

    tool: str
    session_id: str
    request_id: RequestId
    #: ``trio.current_time()`` when the thread was started.
    started_at: float
    #: Set if its call was answered while the thread still ran: why, and when.
    answered: Answered | None = None
    answered_at: float | None = None


class ToolWorkers:
    """The node's worker threads and loop watchdog (module doc); one per node, shared by
    every session, made before the tree starts (``actors/node.py``).

    ``max_threads``: worker threads at once (``EXAI_TOOL_THREADS``); ``stall_ms``: how late
    the loop may be before the watchdog says so (``EXAI_LOOP_STALL_MS``; 0: no watchdog).
    """

    def __init__(self, *, max_threads: int = 40, stall_ms: float = 250.0) -> None:
        self.thread_limiter = trio.CapacityLimiter(max_threads)
        self.stall_threshold = stall_ms / 1000
        self._threads: dict[int, WorkerThread] = {}
        self._ids = itertools.count()
        #: ``async def`` tools running now, by name, and every one that ran since the
        #: watchdog's last wake.
        self._running: dict[str, int] = {}
        self._ran: set[str] = set()
        self._throttle = LogThrottle(STALL_LOG_PERIOD, clock=trio.current_time)

    # -- worker threads ---------------------------------------------------------------------

    def hold(
        self,
        tool: str,
        session_id: str,
        request_id: RequestId,
        *,
        concurrency: trio.CapacityLimiter | None,
        keep_slots: Callable[[], Callable[[], None]],
    ) -> _ThreadHold:
        """The limiter to give ``trio.to_thread.run_sync`` for one call's thread."""
        thread = WorkerThread(tool, session_id, request_id, started_at=trio.current_time())
        return _ThreadHold(self, thread, concurrency, keep_slots)

    def _started(self, thread: WorkerThread) -> int:
        key = next(self._ids)
        self._threads[key] = thread
        return key

    def _ended(self, key: int) -> None:
        thread = self._threads.pop(key, None)
        if thread is not None and thread.answered is not None:
            log.info(
                "tool.thread_returned",
                tool=thread.tool,
                session_id=thread.session_id,
                id=thread.request_id,
                after_answer_s=round(trio.current_time() - (thread.answered_at or 0.0), 3),
            )

    def snapshot(self) -> ToolThreadsStatus:
        """For ``exai status``: threads running, and those whose call was already answered."""
        now = trio.current_time()
        outliving = [
            ToolThread(
                tool=t.tool,
                session_id=t.session_id,
                request_id=t.request_id,
                running_s=round(now - t.started_at, 3),
                answered=t.answered,
                answered_s=round(now - t.answered_at, 3) if t.answered_at is not None else None,
            )
            for t in self._threads.values()
            if t.answered is not None
        ]
        return ToolThreadsStatus(
            running=len(self._threads),
            max=int(self.thread_limiter.total_tokens),
            outliving=outliving,
        )

    # -- the loop watchdog ------------------------------------------------------------------

    @contextmanager
    def running(self, tool: str) -> Iterator[None]:
        """Around an ``async def`` tool's run: it may be blamed for a stall meanwhile."""
        running = self._running
        running[tool] = running.get(tool, 0) + 1
        self._ran.add(tool)
        try:
            yield
        finally:
            left = running[tool] - 1
            if left:
                running[tool] = left
            else:
                del running[tool]

    async def watch(self, ctx: ChildContext) -> None:
        """The supervised child ``tool_workers``: the watchdog, until asked to stop."""
        ctx.started()
        if self.stall_threshold <= 0:
            await ctx.stop_requested.wait()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_loop)
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()

    async def _watch_loop(self) -> None:
        threshold = self.stall_threshold
        # A few wakes per threshold: a stall is seen within about one period of its end.
        period = max(threshold / 4, 0.005)
        due = trio.current_time() + period
        while True:
            await trio.sleep_until(due)
            now = trio.current_time()
            late = now - due
            if late > threshold:
                self._stalled(late)
            self._ran = set(self._running)
            due = now + period

    def _stalled(self, late: float) -> None:
        stalled_ms = round(late * 1000)
        threshold_ms = round(self.stall_threshold * 1000)
        if not self._ran:
            self._throttle.emit(
                log.warning, "loop.stalled", stalled_ms=stalled_ms, threshold_ms=threshold_ms
            )
            return
        for tool in sorted(self._ran):
            self._throttle.emit(
                log.warning,
                "tool.blocked_loop",
                key=f"tool:{tool}",
                tool=tool,
                stalled_ms=stalled_ms,
                threshold_ms=threshold_ms,
                hint="an async def tool must not block: await, or make it a plain def "
                "(it then runs in a worker thread)",
            )


class _ThreadHold:
    """A ``trio.to_thread.run_sync`` limiter for one call's thread (module doc): acquiring
    takes the tool's concurrency and a worker thread's place and keeps the call's slots;
    releasing, which trio does once the thread has returned, gives all of them back."""

    __slots__ = (
        "_concurrency",
        "_keep_slots",
        "_key",
        "_release_slots",
        "_workers",
        "thread",
    )

    def __init__(
        self,
        workers: ToolWorkers,
        thread: WorkerThread,
        concurrency: trio.CapacityLimiter | None,
        keep_slots: Callable[[], Callable[[], None]],
    ) -> None:
        self._workers = workers
        self._concurrency = concurrency
        self._keep_slots = keep_slots
        self._key: int | None = None
        self._release_slots: Callable[[], None] | None = None
        self.thread = thread

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        concurrency = self._concurrency
        if concurrency is not None:
            await concurrency.acquire_on_behalf_of(borrower)
        try:
            await self._workers.thread_limiter.acquire_on_behalf_of(borrower)
        except BaseException:
            if concurrency is not None:
                concurrency.release_on_behalf_of(borrower)
            raise
        self.thread.started_at = trio.current_time()
        self._key = self._workers._started(self.thread)
        self._release_slots = self._keep_slots()

    def release_on_behalf_of(self, borrower: object) -> None:
        workers = self._workers
        try:
            workers.thread_limiter.release_on_behalf_of(borrower)
            if self._concurrency is not None:
                self._concurrency.release_on_behalf_of(borrower)
        finally:
            if self._key is not None:
                workers._ended(self._key)
            if self._release_slots is not None:
                self._release_slots()

    def answered(self, why: Answered) -> None:
        """The call was answered (``why``) while its thread may still run."""
        if self._key is not None and self._key in self._workers._threads:
            self.thread.answered = why
            self.thread.answered_at = trio.current_time()
