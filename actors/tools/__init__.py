"""The tools a session can call."""

from __future__ import annotations

from actors.tools.echo import Echo
from runtime.mcp.tools import ToolRegistry


def builtin_tools() -> ToolRegistry:
    return ToolRegistry([Echo()])
