"""What the starter of a dynamic child holds: a way to wait for the child's end and learn how.

OTP's ``start_child`` returns a pid that the caller may monitor (``erlang:monitor/2``) to get
one ``'DOWN'`` message with the exit reason. :class:`ChildHandle` is that monitor: it fires
once, when the child has left its supervisor for good, and never while the supervisor is
only restarting it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["ChildExit", "ChildHandle", "ExitReason"]


class ExitReason(enum.StrEnum):
    """Why a child left its supervisor for good."""

    NORMAL = "normal"
    """It returned, and its restart type does not restart a normal exit."""
    CRASHED = "crashed"
    """It raised and is not restarted: a ``temporary`` child."""
    GAVE_UP = "gave_up"
    """It crashed once more than its own :class:`~runtime.supervision.Intensity` allows."""
    STOPPED = "stopped"
    """The supervisor stopped it: ``terminate_child``, the supervisor's own stop (graceful,
    given up, or cancelled), or a failed restart of a sibling group that removed it."""


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How a child ended: ``error`` is the exception of its last run, if it raised."""

    reason: ExitReason
    error: Exception | None = None


class ChildHandle:
    """The starter's view of one dynamic child (see the module docstring). Trio thread only.

    Costs a few slots: the event :meth:`wait` needs is made only when someone waits, and a
    starter that would rather not spend a task waiting registers one :meth:`on_exit`
    function instead. Waiting never affects the child; cancelling a waiter cancels only the
    wait.
    """

    __slots__ = ("_ended", "_exit", "_on_exit", "id", "path")

    def __init__(self, id: str, path: str) -> None:
        self.id = id
        self.path = path
        self._ended: trio.Event | None = None
        self._exit: ChildExit | None = None
        self._on_exit: Callable[[ChildExit], None] | None = None

    @property
    def exit(self) -> ChildExit | None:
        """How it ended; ``None`` while it is still with its supervisor."""
        return self._exit

    async def wait(self) -> ChildExit:
        """Wait until the child has left its supervisor for good; return how it ended."""
        if self._exit is None:
            if self._ended is None:
                self._ended = trio.Event()
            await self._ended.wait()
        assert self._exit is not None
        return self._exit

    def on_exit(self, function: Callable[[ChildExit], None]) -> None:
        """Call ``function(exit)`` once the child has left for good, from the supervisor's
        task (at once if it already has). It must not block or raise: a starter uses it to
        cancel a scope or set an event. One function per handle (``RuntimeError`` for a
        second)."""
        if self._on_exit is not None:
            raise RuntimeError(f"child {self.path} already has an on_exit function")
        self._on_exit = function
        if self._exit is not None:
            function(self._exit)

    def _end(self, exit: ChildExit) -> None:
        """Called by the supervisor, once; later calls are ignored (the first reason holds)."""
        if self._exit is not None:
            return
        self._exit = exit
        if self._ended is not None:
            self._ended.set()
        if self._on_exit is not None:
            self._on_exit(exit)
