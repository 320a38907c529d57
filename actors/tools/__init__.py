"""The tools a session can call: the node's own, and the team's (``actors/tools/loading.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actors.conversation import Conversations
from actors.tools.chat import Chat
from actors.tools.echo import Echo
from actors.tools.testing import BlockUntilCancelled, CrashRateLimiter, ReportSteps, Sleep
from actors.tools.threads import Threads
from runtime.mcp.tools import Tool, ToolRegistry
from runtime.tool_access import ToolAccess


def builtin_tool_names(*, test_faults: bool = False) -> list[str]:
    """The names the node's own tools take (a node always runs conversations): no tool of
    the team's may take one."""
    names = [Echo.name, Chat.name, Threads.name]
    if test_faults:
        names += [
            BlockUntilCancelled.name,
            ReportSteps.name,
            Sleep.name,
            CrashRateLimiter.name,
        ]
    return names


def builtin_tools(
    *,
    test_faults: bool = False,
    conversations: Conversations | None = None,
    extra: Iterable[Tool[Any]] = (),
    access: ToolAccess | None = None,
) -> ToolRegistry:
    """``echo`` always; ``chat`` and ``threads`` when the node runs conversations (they are
    listed even with no provider configured: ``chat`` then says how to configure one); then
    ``extra``, the team's tools. ``access``: which of them each client identity may call."""
    tools: list[Tool[Any]] = [Echo()]
    if conversations is not None:
        tools.extend([Chat(conversations), Threads(conversations)])
    if test_faults:
        tools.extend([BlockUntilCancelled(), ReportSteps(), Sleep()])
        if conversations is not None:
            tools.append(CrashRateLimiter(conversations.upstream))
    tools.extend(extra)
    return ToolRegistry(tools, access)
