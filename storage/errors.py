"""What a write can fail with, as its caller sees it."""

from __future__ import annotations

from dataclasses import dataclass


class StorageUnavailable(Exception):
    """The database is unreachable and the journal that stands in for it is full (or cannot
    be written). New work must be refused until storage recovers; nothing accepted is lost."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        #: What is unavailable, without the advice to retry: a caller that refuses its own
        #: work says it in its own words (``actors.session.calls``: "nothing was done").
        self.reason = reason or message

    @classmethod
    def journal_full(cls, detail: str = "") -> StorageUnavailable:
        """The one sentence for new work refused while the journal stands in for the database
        and is full (the persistence actor's own answer, and its client's from the actor's
        latest status); ``detail`` (say, the journal's size) follows it in parentheses."""
        where = f" ({detail})" if detail else ""
        reason = (
            f"storage unavailable: the database is unreachable and the write journal is full{where}"
        )
        return cls(f"{reason}; retry later", reason=reason)


@dataclass(frozen=True, slots=True)
class RowVersion:
    """Where a versioned row stands: its state and its version (``storage.rows``' task
    versions: 1 pending, 2 running, 3 final)."""

    state: str
    version: int


class WriteConflict(Exception):
    """A versioned write found the row moved by someone else (optimistic concurrency): the
    row was left as it was. ``current``: what the write found, ``None`` if no row."""

    def __init__(self, message: str, *, current: RowVersion | None = None) -> None:
        super().__init__(message)
        self.current = current

    def behind(self, version: int) -> bool:
        """Whether the row has only not caught up with a write to ``version``: it is missing,
        or at a version older than the one that write moves it from (its earlier steps, sent
        again after a persistence actor restart, have not landed yet). A row that moved
        elsewhere (recovery marked it interrupted) is not behind: that conflict stands."""
        return self.current is None or self.current.version < version - 1


class WriteRejected(Exception):
    """The database refused this record itself (a constraint or a bad value), so retrying
    cannot help. It was set aside in the journal's ``rejected.jsonl``, never silently dropped."""
