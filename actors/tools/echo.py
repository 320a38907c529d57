"""``echo``: the built-in diagnostic tool. It proves the whole path works, end to end."""

from __future__ import annotations

from pydantic import BaseModel, Field

from runtime.mcp.schema import ToolAnnotations
from runtime.mcp.tools import Tool, ToolContext, ToolOutput


class EchoArgs(BaseModel):
    text: str = Field(description="Text to send back unchanged.")


class EchoOutput(BaseModel):
    text: str


class Echo(Tool[EchoArgs]):
    name = "echo"
    description = "Return the given text unchanged (a diagnostic of the round trip)."
    annotations = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    Args = EchoArgs
    Output = EchoOutput
    #: May run as an MCP task (2025-11-25, docs/tasks.md).
    task_support = "optional"

    async def run(self, args: EchoArgs, ctx: ToolContext) -> ToolOutput:
        return ToolOutput(text=args.text, structured=EchoOutput(text=args.text))
