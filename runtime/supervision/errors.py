"""Exceptions a supervisor raises to its caller.

Every one of them derives from :class:`SupervisionError`, so that a supervisor knows when an
exit it observes has already been explained and logged further down the tree, and logs it
without repeating the traceback.
"""

from __future__ import annotations

__all__ = [
    "ChildStartError",
    "DuplicateChild",
    "SupervisionError",
    "SupervisorGaveUp",
    "SupervisorNotRunning",
    "UnknownChild",
]


class SupervisionError(Exception):
    """Base class of the errors raised by :mod:`runtime.supervision`."""


class SupervisorGaveUp(SupervisionError):
    """A supervisor exceeded its restart intensity, stopped its children and failed.

    Raised by :meth:`Supervisor.run` *after* every child has been stopped, so the parent (or
    the caller of :func:`run_root`) sees an abnormal exit and applies its own strategy: this
    is how a failure escalates up the tree. ``__cause__`` is the error that triggered the
    last restart, or ``None`` when a permanent child kept returning normally.
    """

    def __init__(self, path: str, child: str, max_restarts: int, period: float) -> None:
        self.path = path
        self.child = child
        self.max_restarts = max_restarts
        self.period = period
        super().__init__(
            f"supervisor {path} gave up: more than {max_restarts} restart(s) within "
            f"{period:g} s, the last caused by child {child!r}"
        )


class ChildStartError(SupervisionError):
    """A child raised, or returned, before it called ``ctx.started()``.

    Raised by :meth:`Supervisor.run` when one of its initial children fails to start (the
    children already started are stopped first), and by :meth:`Supervisor.start_child`.
    ``__cause__`` is the child's exception, or a ``RuntimeError`` saying that the child
    returned without calling ``started()``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"child {path} failed to start: {reason}")


class SupervisorNotRunning(SupervisionError):
    """A dynamic-child operation reached a supervisor that is not running or is stopping."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        super().__init__(f"supervisor {path or '(never run)'} is not running")


class DuplicateChild(SupervisionError, ValueError):
    """:meth:`Supervisor.start_child` was given an id that the supervisor already has."""


class UnknownChild(SupervisionError, LookupError):
    """:meth:`Supervisor.terminate_child` was given an id the supervisor does not have."""
