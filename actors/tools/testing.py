"""Tools that exist only when ``EXAI_TEST_FAULTS`` is on, so tests can hold calls in flight."""

from __future__ import annotations

import trio
from pydantic import BaseModel

from runtime.mcp.tools import Tool, ToolContext, ToolOutput


class BlockArgs(BaseModel):
    pass


class BlockUntilCancelled(Tool[BlockArgs]):
    """Occupies an in-flight slot until the client cancels it (or the session ends)."""

    name = "exai_test_block"
    description = "Test only: block until cancelled."
    Args = BlockArgs

    async def run(self, args: BlockArgs, ctx: ToolContext) -> ToolOutput:
        await trio.sleep_forever()
