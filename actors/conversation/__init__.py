"""Conversation threads of the ``chat`` tool: the turn (``service``), the history sent
upstream (``history``), Phase 1 stripping (``embedded``), the upstream call (``upstream``), and
who owns a thread (``owners``). See docs/chat.md."""

from actors.conversation.errors import (
    ConversationError,
    PromptOnlyHistory,
    ThreadExpired,
    ThreadFull,
    ThreadListUnavailable,
    ThreadNotFound,
    ThreadStoreUnavailable,
)
from actors.conversation.history import FileCopy
from actors.conversation.service import Conversations, TurnOutcome, TurnRequest
from actors.conversation.upstream import Upstream, UpstreamNotReady

__all__ = [
    "ConversationError",
    "Conversations",
    "FileCopy",
    "PromptOnlyHistory",
    "ThreadExpired",
    "ThreadFull",
    "ThreadListUnavailable",
    "ThreadNotFound",
    "ThreadStoreUnavailable",
    "TurnOutcome",
    "TurnRequest",
    "Upstream",
    "UpstreamNotReady",
]
