"""What a session's mailbox carries: the peer's messages, and the node's own word.

The reader (``actors.session.reader``) posts the client's JSON-RPC messages; the node posts
:class:`ToolsChanged`. Each arrives in an :class:`~runtime.trace.Envelope` (the trace it
belongs to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from runtime import trace
from runtime.mailbox import ActorRef, MailboxFull
from runtime.mcp import jsonrpc
from storage.errors import ActorUnavailable

__all__ = ["Mail", "Message", "ToolsChanged", "announce_tools_changed"]


@dataclass(frozen=True, slots=True)
class ToolsChanged:
    """The node's tools changed (a proxied server's list, or it went down or came back up):
    posted by the node, never by a peer, so that the session tells its client
    (``notifications/tools/list_changed``) through its own connection, in order."""


#: What the reader (and, for :class:`ToolsChanged`, the node) puts in a session's mailbox.
Message = jsonrpc.Inbound | jsonrpc.Batch | ToolsChanged
#: What the session's mailbox carries: a message in its envelope (the trace it belongs to).
Mail = trace.Envelope[Message]


def announce_tools_changed(mailboxes: Iterable[ActorRef[Mail] | None]) -> int:
    """Post :class:`ToolsChanged` to each session's mailbox, without waiting; how many took
    it. A full or closed mailbox is skipped (recorded as a dead letter by the mailbox): the
    notification is advisory, and the client's next ``tools/list`` sees the change anyway."""
    told = 0
    for mailbox in mailboxes:
        if mailbox is None:
            continue  # parked: its client will list the tools again when it comes back
        with contextlib.suppress(MailboxFull, ActorUnavailable):
            mailbox.tell(trace.post(ToolsChanged(), sender="/root/servers"), sender="/root/servers")
            told += 1
    return told
