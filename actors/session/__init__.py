"""The session: one per MCP connection. See ``lifecycle`` for its life, ``actor`` for its work."""

from actors.session.actor import SessionActor, SessionConfig, SessionState
from actors.session.lifecycle import SessionBounds, SessionLifecycle, SessionServices

__all__ = [
    "SessionActor",
    "SessionBounds",
    "SessionConfig",
    "SessionLifecycle",
    "SessionServices",
    "SessionState",
]
