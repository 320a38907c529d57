"""A team's own tools, written as a user would (docs/tools.md) and served by
tests/test_tool_api.py through the config file's ``[tools]`` table, never imported by the
tests themselves: a plain ``def`` and an ``async def`` tool, and the test's hooks (gates a
worker thread waits on, opened by another call, since the server is another process)."""

from __future__ import annotations

import threading
import time
from typing import Annotated

import trio
from pydantic import BaseModel, Field

from runtime.mcp import ToolContext, tool


class Note(BaseModel):
    title: str
    words: int


@tool(annotations={"readOnlyHint": True, "openWorldHint": False})
def word_count(
    text: str, title: Annotated[str, Field(description="The note's title.")] = "untitled"
) -> Note:
    """Count the words of a note."""
    return Note(title=title, words=len(text.split()))


@tool(name="shout", max_concurrency=2)
async def shout_back(
    ctx: ToolContext, text: str, times: Annotated[int, Field(ge=1)] = 1
) -> list[str]:
    """Shout the text back, once per time, reporting progress as it goes."""
    shouted = []
    for time_ in range(1, times + 1):
        await ctx.report_progress(time_, times)
        shouted.append(text.upper())
    return shouted


@tool
def count_up(ctx: ToolContext, to: int) -> int:
    """Count up to a number, telling the client each step from the worker thread."""
    for step in range(1, to + 1):
        ctx.report_progress_from_thread(step, to)
        ctx.log_from_thread("info", {"step": step})
    return to


# -- the tests' hooks ------------------------------------------------------------------------

_gates: dict[str, threading.Event] = {}
_seen: dict[str, str] = {}
_lock = threading.Lock()
#: How long a test's thread waits at most: a failing test never leaves one for ever.
_BOUND = 60.0


def _gate(name: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(name, threading.Event())


@tool
def wait_gate(ctx: ToolContext, gate: str, stop_on_cancel: bool = False) -> str:
    """Test: block this worker thread until the gate opens, or (stop_on_cancel) until the
    call is cancelled; what it saw is told by gate_report."""
    _seen[gate] = "waiting"
    if stop_on_cancel:
        _seen[gate] = "stopped on cancel" if ctx.cancelled.wait(_BOUND) else "never cancelled"
        return "stopped"
    _gate(gate).wait(_BOUND)
    _seen[gate] = "saw cancelled" if ctx.cancelled.is_set() else "not cancelled"
    return f"gate {gate} opened"


@tool(timeout=0.2)
def slow_gate(ctx: ToolContext, gate: str) -> str:
    """Test: wait for a gate past this tool's timeout (0.2 s)."""
    _gate(gate).wait(_BOUND)
    _seen[gate] = "saw cancelled" if ctx.cancelled.is_set() else "not cancelled"
    return "too late"


@tool(timeout=0.2)
async def slow_async(seconds: float) -> str:
    """Test: sleep past this tool's timeout (0.2 s)."""
    await trio.sleep(seconds)
    return "too late"


@tool
def open_gate(gate: str) -> str:
    """Test: open a gate that wait_gate or slow_gate waits on."""
    _gate(gate).set()
    return "opened"


@tool
def gate_report(gate: str) -> str:
    """Test: what the last wait on this gate saw."""
    return _seen.get(gate, "never ran")


@tool
async def block_loop(ms: int) -> str:
    """Test: block the event loop, as an async def tool must never do."""
    time.sleep(ms / 1000)  # noqa: ASYNC251 - the mistake the watchdog is there to name
    return "blocked"
