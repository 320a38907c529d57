"""MCP tasks (2025-11-25, basic/utilities/tasks): the node's task host (docs/tasks.md)."""

from actors.tasks.host import (
    POLL_INTERVAL_MS,
    Execute,
    RunningTask,
    TaskHost,
    TaskOutcome,
)

__all__ = ["POLL_INTERVAL_MS", "Execute", "RunningTask", "TaskHost", "TaskOutcome"]
