"""Why ``exai serve`` could not start: one exception per cause, each with its exit code and a
one-line message for the operator that names the cause and what to do.

Raised where the cause is known (the listener's bind, the database connection, the state
dir) and reported by the CLI, which finds the error however deep trio's exception groups
and the supervisor's :class:`~runtime.supervision.ChildStartError` have wrapped it
(:func:`startup_error_in`), prints its message as one line and exits with its code.

| exit code | class | cause |
|---|---|---|
| 3 | :class:`CannotListen` | the MCP address is in use, or cannot be bound |
| 4 | :class:`DatabaseUnreachable` | nothing answered within ``EXAI_DATABASE_WAIT`` |
| 4 | :class:`DatabaseAuthenticationFailed` | the server refused the user (SQLSTATE 28P01, 28000) |
| 4 | :class:`DatabaseMissing` | no such database on the server (SQLSTATE 3D000) |
| 4 | :class:`DatabaseTooSmall` | ``--workers N`` would not fit in the server's free connections |
| 5 | :class:`StateDirUnusable` | the state dir cannot be created or written |
| 5 | :class:`StateDirInUse` | another server holds the state dir's lock |

Exit codes 1 (anything else, a root supervisor that gave up) and 2 (configuration) are the
CLI's own. The module sits in ``storage``, the bottom layer, so that every layer can raise
these errors (as ``storage.untrusted``). Messages never hold a password: database errors name
host, port and database only (:class:`storage.connection.DatabaseTarget`).
"""

from __future__ import annotations

import re
from typing import ClassVar

from storage.untrusted import printable

_LINE_BREAKS = re.compile(r"\s*\n\s*")


class StartupError(Exception):
    """``exai serve`` cannot start; :attr:`message` says why and what to do, on one line."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        # libpq's and the OS's messages may span lines ("...failed: Connection refused\n\tIs
        # the server running..."): the operator gets one line, safe for a terminal.
        self.message = printable(_LINE_BREAKS.sub(" ", message.strip()))
        super().__init__(self.message)


class CannotListen(StartupError):
    """The MCP port cannot be bound (address in use, no such interface, no permission)."""

    exit_code = 3


class DatabaseUnavailable(StartupError):
    """The database cannot be used: base of the three causes below."""

    exit_code = 4


class DatabaseUnreachable(DatabaseUnavailable):
    """No database answered (refused, timed out, unknown host) until the wait ran out."""


class DatabaseAuthenticationFailed(DatabaseUnavailable):
    """The server refused the user or its password; trying again cannot help."""


class DatabaseMissing(DatabaseUnavailable):
    """The server has no database of that name; trying again cannot help."""


class DatabaseTooSmall(DatabaseUnavailable):
    """The server's ``max_connections`` leaves too few free for the workers asked for
    (``storage/connection_budget.py``); trying again cannot help."""


class StateDirUnusable(StartupError):
    """The state dir cannot be created, or a file in it cannot be written."""

    exit_code = 5


class StateDirInUse(StateDirUnusable):
    """Another ``exai serve`` holds the state dir (its lock): one server per state dir."""


def startup_error_in(error: BaseException) -> StartupError | None:
    """The :class:`StartupError` behind ``error``: ``error`` itself, one inside its (nested)
    exception groups, or one in its chain of causes (``raise ... from``), depth first; ``None``
    if there is none. ``__context__`` is not followed: an exception merely being handled when
    another was raised did not cause it."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StartupError):
            return current
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(reversed(current.exceptions))
    return None
