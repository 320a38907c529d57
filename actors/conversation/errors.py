"""Why a turn, or a listing of threads, cannot happen as asked.

Leaves of the node's error tree (``storage.errors``): a :class:`ConversationError` is a
``ToolFailed`` (``chat`` answers it as an ``isError`` result whose text is for the model to
read and adapt); a :class:`ThreadStoreUnavailable` is a ``RetryLater`` (JSON-RPC -32004,
``data.limit`` ``storage``).
"""

from __future__ import annotations

from typing import ClassVar

from storage.errors import RetryLater, ToolFailed


class ConversationError(ToolFailed):
    """Base: the turn was refused; nothing was sent upstream and nothing was stored."""


class ThreadNotFound(ConversationError):
    """No such thread for this client. Another client's thread is reported the same way, so
    a continuation id reveals nothing to someone who does not own it."""


class ThreadExpired(ConversationError):
    """The thread's time to live passed since its last turn."""


class ThreadFull(ConversationError):
    """The thread has had its maximum number of exchanges."""


class PromptOnlyHistory(ConversationError):
    """Once the embedded history was stripped, nothing new was left to say."""


class ThreadStoreUnavailable(RetryLater):
    """A turn's thread cannot be read (``storage.threads.ThreadReadError``: the database is
    unreachable, too slow, or no reader connection is free); nothing was sent upstream."""

    limit = "storage"
    retry_after = 1.0


class ThreadListUnavailable(ThreadStoreUnavailable):
    """The caller's threads cannot be listed (same causes). Its ``data`` names no provider:
    the ``threads`` tool's answer as clients have always seen it."""

    names_provider: ClassVar[bool] = False
