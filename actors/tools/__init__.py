"""The tools a session can call."""

from __future__ import annotations

from typing import Any

from actors.tools.echo import Echo
from actors.tools.testing import BlockUntilCancelled, ReportSteps
from runtime.mcp.tools import Tool, ToolRegistry


def builtin_tools(*, test_faults: bool = False) -> ToolRegistry:
    tools: list[Tool[Any]] = [Echo()]
    if test_faults:
        tools.extend([BlockUntilCancelled(), ReportSteps()])
    return ToolRegistry(tools)
