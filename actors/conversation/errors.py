"""Why a turn cannot happen as asked. Each message is written for the client (the ``chat``
tool answers it as an ``isError`` result, for the model to read and adapt)."""

from __future__ import annotations


class ConversationError(Exception):
    """Base: the turn was refused; nothing was sent upstream and nothing was stored."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ThreadNotFound(ConversationError):
    """No such thread for this client. Another client's thread is reported the same way, so
    a continuation id reveals nothing to someone who does not own it."""


class ThreadExpired(ConversationError):
    """The thread's time to live passed since its last turn."""


class ThreadFull(ConversationError):
    """The thread has had its maximum number of exchanges."""


class PromptOnlyHistory(ConversationError):
    """Once the embedded history was stripped, nothing new was left to say."""
