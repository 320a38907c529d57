"""Tools that exist only when ``EXAI_TEST_FAULTS`` is on, so tests can hold calls in flight."""

from __future__ import annotations

import trio
from pydantic import BaseModel, Field

from actors.conversation import Upstream
from runtime.mcp.tools import Tool, ToolContext, ToolOutput


class BlockArgs(BaseModel):
    pass


class BlockUntilCancelled(Tool[BlockArgs]):
    """Occupies an in-flight slot until the client cancels it (or the session ends)."""

    name = "exai_test_block"
    description = "Test only: block until cancelled."
    Args = BlockArgs
    #: Tests hold tasks in flight with it (tests/test_tasks.py).
    task_support = "optional"

    async def run(self, args: BlockArgs, ctx: ToolContext) -> ToolOutput:
        await trio.sleep_forever()


class SleepArgs(BaseModel):
    seconds: float = Field(ge=0, le=600)


class Sleep(Tool[SleepArgs]):
    """Answers after ``seconds``, as a slow upstream call would: a call in flight that ends
    on its own (a shutdown's drain waits for it)."""

    name = "exai_test_sleep"
    description = "Test only: answer after the given number of seconds."
    Args = SleepArgs
    #: Tests hold tasks in flight with it (tests/test_tasks.py).
    task_support = "optional"

    async def run(self, args: SleepArgs, ctx: ToolContext) -> ToolOutput:
        await trio.sleep(args.seconds)
        return ToolOutput(text=f"slept {args.seconds:g} s")


class StepsArgs(BaseModel):
    steps: int = Field(default=3, ge=0, le=1000)


class ReportSteps(Tool[StepsArgs]):
    """Reports progress 1..steps (and a log message per step), then answers."""

    name = "exai_test_steps"
    description = "Test only: report progress and log each step."
    Args = StepsArgs

    async def run(self, args: StepsArgs, ctx: ToolContext) -> ToolOutput:
        for step in range(1, args.steps + 1):
            # Cooperative scheduling: a step that never yields would stall the whole node.
            await trio.lowlevel.checkpoint()
            await ctx.report_progress(step, args.steps, f"step {step}")
            await ctx.report_progress(step, args.steps, "a repeat is dropped")
            await ctx.log("info", {"step": step})
        return ToolOutput(text=f"{args.steps} steps")


class CrashArgs(BaseModel):
    pass


class CrashRateLimiter(Tool[CrashArgs]):
    """Crashes the rate limiter's current actor, as a bug in it would, so that its supervision
    is tested through ``exai serve`` under real load (as ``$/exai/test/crash-persistence``
    does for persistence)."""

    name = "exai_test_crash_rate_limiter"
    description = "Test only: crash the rate-limiter actor."
    Args = CrashArgs

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def run(self, args: CrashArgs, ctx: ToolContext) -> ToolOutput:
        limiter = self._upstream.limiter
        if limiter is None:
            return ToolOutput(text="no rate limiter runs", is_error=True)
        limiter.crash_for_test()
        return ToolOutput(text="the rate limiter's actor was told to crash")
