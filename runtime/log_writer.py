"""A thread that writes log lines, so that no event loop waits on a log file.

Formatting an event is cheap; writing and flushing it is a system call per line, which on the
event-loop thread of a busy node was a tenth of its time (a per-message trace event for every
message every actor handles). :class:`LogWriter` takes each rendered line from any thread into
a bounded queue and returns at once; its own thread writes whatever has gathered in one
``write`` and one ``flush`` per output: woken by the first line after a quiet spell, then
every :data:`GATHER_S` seconds while lines keep coming (a wake-up per line cost the logging
thread more than the write it saved).

**Bounded, never blocking.** The queue holds at most ``max_lines`` lines and ``max_bytes``
bytes. A line that does not fit is dropped and counted (:attr:`LogWriter.dropped`, by level);
once the writer has caught up it writes one ``logs.dropped`` event saying how many, so a gap in
the log is never silent. A disk slower than the node loses log lines, never the node's time.

**Urgent lines.** :meth:`LogWriter.write_now` writes what is queued and then its line on the
caller's thread, for the rare events someone looks for the moment what they tell has
happened; the file keeps one order.

**Shutdown.** :meth:`LogWriter.flush` waits until everything queued before the call is
written (a process that is about to print its last line calls it); :meth:`LogWriter.close`
writes the rest, ends the thread and joins it. The thread is a daemon only so that a process
that never closes its logging can still exit; ``runtime.logs`` closes it at exit
(``atexit``). A process killed with SIGKILL loses what was queued: at most the lines of the
last few milliseconds, against a line-by-line ``flush`` that would have kept them.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

#: Lines queued at most, whatever their size.
MAX_LINES = 65_536
#: Bytes queued at most (the lines as rendered).
MAX_BYTES = 16 * 1024 * 1024
#: While lines keep coming, the writer writes what gathered this often (seconds): the
#: delay a line may wait, in exchange for no wake-up per line.
GATHER_S = 0.05


T = TypeVar("T")


class LogWriter(Generic[T]):
    """The writer thread and its bounded queue of items ``T`` (lines, as the outputs want
    them; module doc).

    ``write_batch(items)`` is called on the writer's thread with every item gathered since
    the last call, oldest first; ``dropped_event(counts)`` makes the item that reports
    ``counts`` (level -> items dropped) when items were dropped.
    """

    def __init__(
        self,
        write_batch: Callable[[Sequence[T]], None],
        dropped_event: Callable[[dict[str, int]], T],
        *,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_BYTES,
        name: str = "exai-log-writer",
    ) -> None:
        self._write_batch = write_batch
        self._dropped_event = dropped_event
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._queue: deque[T] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._output = threading.Lock()  # held while writing: keeps batches in order
        self._more = threading.Condition(self._lock)
        self._written = threading.Condition(self._lock)
        self._taken = 0  # lines the thread has taken off the queue, ever
        self._done = 0  # lines written, ever (taken and written back)
        self._put = 0  # lines queued, ever
        self._closing = False
        self._idle = False  # waiting for a line with an empty queue: put wakes it
        self._urgent = False  # flush or close asked: no gathering
        self._unreported: Counter[str] = Counter()
        #: Lines dropped since the start, by level.
        self.dropped: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T, *, size: int, level: str) -> bool:
        """Queue ``item`` of ``size`` bytes logged at ``level``; ``False`` (and counted) when
        the queue is full or closed. Never blocks on the outputs: only on the queue's lock,
        held for a few list operations."""
        with self._lock:
            if (
                self._closing
                or len(self._queue) >= self._max_lines
                or self._bytes + size > self._max_bytes
            ):
                self.dropped[level] += 1
                self._unreported[level] += 1
                return False
            self._queue.append(item)
            self._bytes += size
            self._put += 1
            if self._idle:
                # Only an idle writer is woken: a busy one comes back for more by itself
                # (a notify per line cost the loop more than the write it saved).
                self._idle = False
                self._more.notify()
        return True

    def write_now(self, item: T) -> None:
        """Write everything queued, then ``item``, on the caller's thread, before returning:
        for the events someone may look for as soon as what they tell has happened (a
        refusal, a failure, a start), written in order after what was queued before them.
        Blocks on the outputs as any direct write does; never counts as dropped."""
        with self._output:
            batch, _ = self._take()
            batch.append(item)
            with contextlib.suppress(Exception):  # as on the writer's thread (_run)
                self._write_batch(batch)
            with self._lock:
                self._done = max(self._done, self._taken)
                self._written.notify_all()

    def _take(self) -> tuple[list[T], bool]:
        """Everything queued (then the report of what was dropped, if anything was), and
        whether the writer is closing. Called holding ``_output``, so batches keep order."""
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
            self._bytes = 0
            self._taken += len(batch)
            unreported = dict(self._unreported)
            self._unreported.clear()
            closing = self._closing
        if unreported:
            batch.append(self._dropped_event(unreported))
        return batch, closing

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` seconds) until every line queued before this call is
        written; whether it was. Never call it from the writer's own outputs."""
        if threading.current_thread() is self._thread:
            return False
        with self._lock:
            target = self._put
            self._urgent = True
            self._more.notify()
            return self._written.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (at most ``timeout`` seconds), end the thread and join it.
        Lines put afterwards are dropped (counted)."""
        with self._lock:
            self._closing = True
            self._more.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                # Idle again after every wake-up that finds nothing: a put's wake-up whose
                # line a write_now took first must not leave the next put without one.
                while not self._queue and not self._closing:
                    self._idle = True
                    self._more.wait()
                self._idle = False
            # The output lock first, then the batch: a write_now on another thread writes
            # either before this batch or after it, never in the middle of the order.
            with self._output:
                batch, closing = self._take()
                if batch:
                    # An output that fails (a full disk) must not end the thread: the next
                    # batch tries again; what failed is lost, as a line that cannot be
                    # written.
                    with contextlib.suppress(Exception):
                        self._write_batch(batch)
            with self._lock:
                self._done = max(self._done, self._taken)
                self._written.notify_all()
                if closing and not self._queue:
                    return
                # Busy: gather for a moment rather than be woken per line (see put).
                self._more.wait_for(lambda: self._urgent or self._closing, GATHER_S)
                self._urgent = False
