"""The vocabulary of supervision: restart types, strategies, child specs and child contexts."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

__all__ = ["ChildContext", "ChildSpec", "Intensity", "Restart", "StartFunction", "Strategy"]


class Restart(enum.StrEnum):
    """When a supervisor restarts a child that has ended on its own.

    A child that the supervisor itself stopped (shutdown, or a sibling's restart under
    ``ONE_FOR_ALL``/``REST_FOR_ONE``) is not "ended on its own"; see :class:`Strategy`.
    """

    PERMANENT = "permanent"
    """Always restarted, also after a normal return (a permanent child is meant to run forever,
    so returning is a fault too, and it counts against the restart intensity)."""

    TRANSIENT = "transient"
    """Restarted only after an abnormal exit, i.e. when it raised. A normal return removes it."""

    TEMPORARY = "temporary"
    """Never restarted; removed from the supervisor once it ends, however it ends."""


class Strategy(enum.StrEnum):
    """Which children a supervisor restarts when one of them has to be restarted.

    Siblings that are restarted along with the failed child are first stopped in reverse start
    order (each with its own ``shutdown`` grace), then everything is started again in start
    order. Temporary siblings stopped this way are removed instead of restarted.
    """

    ONE_FOR_ONE = "one_for_one"
    """Only the child that ended is restarted. Use it when children are independent."""

    ONE_FOR_ALL = "one_for_all"
    """All children are stopped and restarted. Use it when each child needs all the others."""

    REST_FOR_ONE = "rest_for_one"
    """The child that ended and every child started after it are stopped and restarted. Use it
    when later children depend on earlier ones."""


class ChildContext:
    """Handed to a child's start function: who the child is and how it talks to its supervisor.

    One context is made per *start* of a child, so ``stop_requested`` and ``restarts`` describe
    this incarnation only.
    """

    __slots__ = (
        "_on_started",
        "_started",
        "_stop_requested",
        "id",
        "last_error",
        "path",
        "restarts",
    )

    def __init__(
        self,
        id: str,
        path: str,
        *,
        restarts: int = 0,
        last_error: Exception | None = None,
        stop_requested: trio.Event | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.id = id
        """The child's id, unique among its siblings."""
        self.path = path
        """Where the child sits in the tree, e.g. ``/root/sessions/session/42``."""
        self.restarts = restarts
        """How many times the supervisor has (re)started this child before this start."""
        self.last_error = last_error
        """The exception that ended this child's previous run, when that crash is why it is
        being started again; ``None`` at its first start and after a normal exit."""
        # Made on first use: a child that never looks at it (a session's actor, stopped by
        # cancellation) costs no event.
        self._stop_requested = stop_requested
        self._on_started = on_started
        self._started = False

    @property
    def stop_requested(self) -> trio.Event:
        """Set when the supervisor asks the child to stop gracefully. The child should return
        soon after; once the spec's ``shutdown`` grace period has passed it is cancelled."""
        if self._stop_requested is None:
            self._stop_requested = trio.Event()
        return self._stop_requested

    @property
    def has_started(self) -> bool:
        """Whether :meth:`started` has been called."""
        return self._started

    def started(self) -> None:
        """Report that the child is initialised; the supervisor then starts the next child.

        The equivalent of ``task_status.started()`` and of OTP's ``init/1`` returning. Until a
        child calls it, its supervisor is blocked (as an OTP supervisor is during ``init/1``),
        so do slow work after it. Calling it twice is a bug and raises ``RuntimeError``.
        """
        if self._started:
            raise RuntimeError(f"child {self.path} called started() twice")
        self._started = True
        if self._on_started is not None:
            self._on_started()


StartFunction = Callable[[ChildContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Intensity:
    """A restart intensity (OTP's MaxR and MaxT): more than ``max_restarts`` restarts within
    ``period`` seconds is one too many (see :class:`~runtime.supervision.RestartIntensity`)."""

    max_restarts: int
    period: float

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.period > 0:
            raise ValueError(f"period must be > 0 seconds, got {self.period}")


"""A child's body. Returning is a normal exit, raising an abnormal one."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to start one child and how to treat it when it ends (OTP's child specification).

    ``shutdown`` is the grace period, in seconds, between setting ``ctx.stop_requested`` and
    cancelling the child when the supervisor stops it: ``0`` cancels at once (OTP
    ``brutal_kill``) and ``None`` waits for as long as it takes (OTP ``infinity``, the right
    value for a child that is itself a supervisor, which has grace periods of its own).

    ``intensity`` gives the child a restart intensity of its own: its restarts count against
    it instead of against the supervisor's, and one restart too many gives this child up
    alone (logged ``child.gave_up``, removed, its :class:`~runtime.supervision.ChildHandle`
    reports :attr:`~runtime.supervision.ExitReason.GAVE_UP`) while the supervisor and its
    other children go on. It is what OTP gets by putting each such child under a supervisor of
    its own (one child, this intensity) started as a ``temporary`` child, without a second
    supervisor per child: a crash-looping session then cannot exhaust the intensity of the
    supervisor that holds every session. Only under ``ONE_FOR_ONE``, where a restart concerns
    the child alone.
    """

    id: str
    start: StartFunction
    restart: Restart = Restart.PERMANENT
    shutdown: float | None = 5.0
    intensity: Intensity | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a child id must be a non-empty string")
        # Written so that NaN is refused too.
        if self.shutdown is not None and not self.shutdown >= 0:
            raise ValueError(f"shutdown must be None or >= 0 seconds, got {self.shutdown}")
