"""The tools a session can call."""

from __future__ import annotations

from typing import Any

from actors.conversation import Conversations
from actors.tools.chat import Chat
from actors.tools.echo import Echo
from actors.tools.testing import BlockUntilCancelled, CrashRateLimiter, ReportSteps, Sleep
from actors.tools.threads import Threads
from runtime.mcp.tools import Tool, ToolRegistry


def builtin_tools(
    *, test_faults: bool = False, conversations: Conversations | None = None
) -> ToolRegistry:
    """``echo`` always; ``chat`` and ``threads`` when the node runs conversations (they are
    listed even with no provider configured: ``chat`` then says how to configure one)."""
    tools: list[Tool[Any]] = [Echo()]
    if conversations is not None:
        tools.extend([Chat(conversations), Threads(conversations)])
    if test_faults:
        tools.extend([BlockUntilCancelled(), ReportSteps(), Sleep()])
        if conversations is not None:
            tools.append(CrashRateLimiter(conversations.upstream))
    return ToolRegistry(tools)
