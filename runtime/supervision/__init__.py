"""Erlang/OTP-style supervision trees of trio tasks. See ``docs/supervision.md``.

A child is an async function taking a :class:`ChildContext`; a :class:`ChildSpec` says how to
start it and when to restart it; a :class:`Supervisor` runs children, restarts them by its
:class:`Strategy` within its restart intensity, and is itself a child function, so trees nest.
"""

from runtime.supervision.errors import (
    ChildStartError,
    DuplicateChild,
    SupervisionError,
    SupervisorGaveUp,
    SupervisorNotRunning,
    UnknownChild,
)
from runtime.supervision.handle import ChildExit, ChildHandle, ExitReason
from runtime.supervision.intensity import RestartIntensity
from runtime.supervision.snapshot import ChildSnapshot, ChildState, SupervisorSnapshot
from runtime.supervision.spec import (
    ChildContext,
    ChildSpec,
    Intensity,
    Restart,
    StartFunction,
    Strategy,
)
from runtime.supervision.supervisor import Supervisor, run_root

__all__ = [
    "ChildContext",
    "ChildExit",
    "ChildHandle",
    "ChildSnapshot",
    "ChildSpec",
    "ChildStartError",
    "ChildState",
    "DuplicateChild",
    "ExitReason",
    "Intensity",
    "Restart",
    "RestartIntensity",
    "StartFunction",
    "Strategy",
    "SupervisionError",
    "Supervisor",
    "SupervisorGaveUp",
    "SupervisorNotRunning",
    "SupervisorSnapshot",
    "UnknownChild",
    "run_root",
]
