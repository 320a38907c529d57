"""The session: one per MCP connection, whatever the transport.

Modules, one idea each: ``state`` (what a session knows, and who may change it how),
``methods`` (the MCP method table per era), ``calls`` (the ``tools/call`` runner and
batches), ``actor`` (the mailbox loop), ``reader`` (frames in), ``runner`` (a session over any
:class:`~runtime.connection.Connection`, its actor supervised), ``lifecycle`` (WebSocket:
accept, park, resume, end), ``handover`` (sessions resumed on any node of the cluster),
``http`` (Streamable HTTP's sessions), ``memory`` (a session over the in-memory
transport), ``config`` (what the node gives every session).
"""

from actors.session.actor import SessionActor
from actors.session.config import SessionBounds, SessionConfig, SessionServices
from actors.session.lifecycle import SessionLifecycle
from actors.session.state import SessionState

__all__ = [
    "SessionActor",
    "SessionBounds",
    "SessionConfig",
    "SessionLifecycle",
    "SessionServices",
    "SessionState",
]
