"""Read-only views of a supervisor, for a status command.

Times are ``trio.current_time()`` values: the supervisor's own monotonic clock, the same one
the restart intensity uses (and the one ``trio.testing.MockClock`` controls). They mean
nothing across processes; compute ages as ``snapshot.taken_at - started_at``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from runtime.supervision.spec import Restart, Strategy

__all__ = ["ChildSnapshot", "ChildState", "SupervisorSnapshot"]


class ChildState(enum.StrEnum):
    """Where a child is in its life cycle, as its supervisor sees it."""

    STARTING = "starting"
    """Its start function runs but has not called ``ctx.started()`` yet."""
    RUNNING = "running"
    """It has reported started and has not ended."""
    STOPPING = "stopping"
    """The supervisor asked it to stop (or cancelled it) and waits for it to end."""
    RESTARTING = "restarting"
    """It ended or was stopped, and waits for its turn to be started again."""
    STOPPED = "stopped"
    """It is not running and will not be restarted by this supervisor incarnation."""


@dataclass(frozen=True, slots=True)
class ChildSnapshot:
    """One child as its supervisor sees it at the moment of the snapshot."""

    id: str
    path: str
    restart: Restart
    state: ChildState
    restarts: int
    """Start attempts after the first one, in this supervisor incarnation."""
    started_at: float | None
    """``trio.current_time()`` when it last reported started; ``None`` if it never did."""
    last_error: str | None
    """``repr`` of the last exception it raised, if any."""


@dataclass(frozen=True, slots=True)
class SupervisorSnapshot:
    """A supervisor and its direct children (in start order) at one moment."""

    path: str | None
    """``None`` before the supervisor has ever run."""
    strategy: Strategy
    max_restarts: int
    period: float
    running: bool
    taken_at: float | None
    """``trio.current_time()`` of the snapshot; ``None`` when taken outside ``trio.run``."""
    restart_times: tuple[float, ...]
    """The restarts that still count against the intensity, oldest first."""
    children: tuple[ChildSnapshot, ...]
