"""The log writer's thread and bounded queue (runtime/log_writer.py): callers never wait on
an output, a full queue drops and counts, the count is logged once the writer catches up,
and flush/close write everything queued before them."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from runtime.log_writer import LogWriter


class Output:
    """An output that can be held shut: ``write_batch`` blocks until ``opened`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.opened = threading.Event()
        self.entered = threading.Event()

    def write_batch(self, items: Sequence[str]) -> None:
        self.entered.set()
        self.opened.wait(30)
        self.batches.append(list(items))

    @staticmethod
    def dropped(counts: dict[str, int]) -> str:
        return "dropped " + ",".join(f"{k}={v}" for k, v in sorted(counts.items()))


def test_a_stuck_output_never_blocks_a_caller_and_drops_are_counted_then_reported() -> None:
    out = Output()
    writer: LogWriter[str] = LogWriter(out.write_batch, out.dropped, max_lines=3, max_bytes=1000)
    try:
        assert writer.put("first", size=5, level="info")
        assert out.entered.wait(30)  # the thread holds "first" in the stuck output
        # The queue takes 3 more lines, then drops (the caller returns at once either way).
        taken = [writer.put(f"line {n}", size=6, level="info") for n in range(3)]
        refused = [writer.put("over", size=4, level=level) for level in ("info", "warning")]
        assert taken == [True, True, True]
        assert refused == [False, False]
        assert dict(writer.dropped) == {"info": 1, "warning": 1}
        out.opened.set()
        assert writer.flush()
    finally:
        writer.close()
    written = [item for batch in out.batches for item in batch]
    assert written == ["first", "line 0", "line 1", "line 2", "dropped info=1,warning=1"]


def test_the_byte_bound_drops_as_the_line_bound_does() -> None:
    out = Output()
    writer: LogWriter[str] = LogWriter(out.write_batch, out.dropped, max_lines=100, max_bytes=10)
    try:
        assert writer.put("a", size=1, level="info")
        assert out.entered.wait(30)
        assert writer.put("b" * 8, size=8, level="info")
        assert not writer.put("c" * 3, size=3, level="error")  # 8 + 3 > 10
        assert writer.put("d", size=2, level="info")  # 8 + 2 fits
        out.opened.set()
        assert writer.flush()
    finally:
        writer.close()
    written = [item for batch in out.batches for item in batch]
    assert written == ["a", "b" * 8, "d", "dropped error=1"]


def test_close_writes_what_is_queued_and_joins_the_thread() -> None:
    out = Output()
    out.opened.set()
    writer: LogWriter[str] = LogWriter(out.write_batch, out.dropped)
    for n in range(1000):
        writer.put(str(n), size=4, level="info")
    writer.close()
    assert not writer._thread.is_alive()
    assert [item for batch in out.batches for item in batch] == [str(n) for n in range(1000)]
    assert not writer.put("late", size=4, level="info")  # closed: dropped, counted
    assert writer.dropped["info"] == 1


def test_a_failing_output_does_not_end_the_writer() -> None:
    seen: list[str] = []
    fail = threading.Event()
    fail.set()

    def write_batch(items: Sequence[str]) -> None:
        if fail.is_set():
            fail.clear()
            raise OSError("disk full")
        seen.extend(items)

    writer: LogWriter[str] = LogWriter(write_batch, Output.dropped)
    try:
        writer.put("lost", size=4, level="info")
        assert writer.flush()
        writer.put("kept", size=4, level="info")
        assert writer.flush()
    finally:
        writer.close()
    assert seen == ["kept"]


def test_an_urgent_line_is_written_before_returning_after_what_was_queued() -> None:
    out = Output()
    writer: LogWriter[str] = LogWriter(out.write_batch, out.dropped, max_lines=2, max_bytes=100)
    try:
        assert writer.put("a", size=1, level="info")
        assert out.entered.wait(30)  # the writer's thread holds "a" in the stuck output
        assert writer.put("b", size=1, level="info")
        assert writer.put("c", size=1, level="info")
        assert not writer.put("d", size=1, level="info")  # full: dropped
        out.opened.set()
        writer.write_now("urgent")  # waits for the writer's batch, then writes in order
        written = [item for batch in out.batches for item in batch]
        assert written == ["a", "b", "c", "dropped info=1", "urgent"]
    finally:
        writer.close()


def test_a_wake_up_whose_line_was_taken_by_write_now_leaves_the_writer_wakeable() -> None:
    """put wakes an idle writer; if write_now takes that line before the writer runs, the
    writer finds nothing and must go idle again, so that the next put wakes it (it used to
    wait on, holding every later line until some other event was written)."""
    written = threading.Event()
    seen: list[str] = []

    def write_batch(items: Sequence[str]) -> None:
        seen.extend(items)
        if "next" in items:
            written.set()

    writer: LogWriter[str] = LogWriter(write_batch, Output.dropped)
    try:
        for _ in range(3000):  # the writer's thread reaching its idle wait
            with writer._lock:
                if writer._idle:
                    break
            threading.Event().wait(0.01)
        with writer._lock:
            assert writer._idle
            # What put does, then what write_now does, before the writer runs.
            writer._queue.append("taken")
            writer._put += 1
            writer._idle = False
            writer._more.notify()
            writer._queue.clear()
            writer._taken += 1
        # Let the writer wake to the empty queue and wait again (no event says it did; the
        # test passes whatever the pause with the fix, and fails without it once it has).
        threading.Event().wait(0.3)
        writer.put("next", size=4, level="info")
        assert written.wait(30)
    finally:
        writer.close()
