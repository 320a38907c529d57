"""A trio actor's bounded mailbox and the reference others use to post to it.

``tell`` never blocks and never waits: a full mailbox is the sender's problem to answer (the
session answers "server busy"), because silently blocking a reader would stall the socket and,
with it, pings and closes (BRIEF.md: with ``message_queue_size=1`` nothing else moves).
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

M = TypeVar("M")


class MailboxFull(Exception):
    """The actor has ``capacity`` messages waiting already; this one was not queued."""


class ActorStopped(Exception):
    """The actor no longer takes messages."""


class ActorRef(Generic[M]):
    """Where to send messages for one actor; ``path`` names it in logs and the status tree."""

    __slots__ = ("_send", "capacity", "path")

    def __init__(self, path: str, send: trio.MemorySendChannel[M], capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._send = send

    def tell(self, message: M) -> None:
        """Queue ``message`` or raise :class:`MailboxFull` / :class:`ActorStopped` at once."""
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(f"{self.path}: mailbox full ({self.capacity} waiting)") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorStopped(f"{self.path}: stopped") from None

    @property
    def depth(self) -> int:
        """Messages waiting to be handled."""
        return self._send.statistics().current_buffer_used

    def close(self) -> None:
        """No more messages: the actor drains what is queued, then its loop ends."""
        self._send.close()


def open_mailbox(path: str, capacity: int) -> tuple[ActorRef[M], trio.MemoryReceiveChannel[M]]:
    """A fresh mailbox: the ref for senders and the receive end for the actor's loop."""
    send, receive = trio.open_memory_channel[M](capacity)
    return ActorRef(path, send, capacity), receive
