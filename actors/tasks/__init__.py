"""MCP tasks (2025-11-25, basic/utilities/tasks): the node's task host (docs/tasks.md)."""

from actors.tasks.host import (
    CANCELLED_BY_NOTIFICATION,
    CANCELLED_BY_REQUEST,
    CANCELLED_HANDLE_LOST,
    CANCELLED_ON_ANOTHER_NODE,
    CANCELLED_STREAM_CLOSED,
    POLL_INTERVAL_MS,
    Execute,
    RunningTask,
    TaskHost,
    TaskOutcome,
)

__all__ = [
    "CANCELLED_BY_NOTIFICATION",
    "CANCELLED_BY_REQUEST",
    "CANCELLED_HANDLE_LOST",
    "CANCELLED_ON_ANOTHER_NODE",
    "CANCELLED_STREAM_CLOSED",
    "POLL_INTERVAL_MS",
    "Execute",
    "RunningTask",
    "TaskHost",
    "TaskOutcome",
]
