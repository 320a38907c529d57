"""A tool that can only be answered with a task (``execution.taskSupport: "required"``), served
by tests/test_http_review_2.py through the config file's ``[tools]`` table: the node's own
tools are all ``optional``, and past the per-identity task bound a ``required`` one is the
case where the server may not fall back to a plain call (docs/tasks.md)."""

from __future__ import annotations

from pydantic import BaseModel

from runtime.mcp.tools import Tool, ToolContext, ToolOutput


class EchoArgs(BaseModel):
    text: str = ""


class TaskOnlyEcho(Tool[EchoArgs]):
    """Answers its text back, always as a task."""

    name = "task_only_echo"
    description = "Echo the text back; always run as a task."
    Args = EchoArgs
    task_support = "required"

    async def run(self, args: EchoArgs, ctx: ToolContext) -> ToolOutput:
        return ToolOutput(text=args.text)


task_only_echo = TaskOnlyEcho()
