"""What a write can fail with, as its caller sees it."""

from __future__ import annotations


class StorageUnavailable(Exception):
    """The database is unreachable and the journal that stands in for it is full (or cannot
    be written). New work must be refused until storage recovers; nothing accepted is lost."""


class WriteConflict(Exception):
    """A versioned write found the row moved by someone else (optimistic concurrency): the
    row was left as it was. ``current`` describes what the write found."""

    def __init__(self, message: str, *, current: str | None = None) -> None:
        super().__init__(message)
        self.current = current


class WriteRejected(Exception):
    """The database refused this record itself (a constraint or a bad value), so retrying
    cannot help. It was set aside in the journal's ``rejected.jsonl``, never silently dropped."""
