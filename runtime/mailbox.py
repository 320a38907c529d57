"""A trio actor's bounded mailbox and the reference others use to post to it.

``tell`` never blocks and never waits. When the mailbox is full the mailbox's overflow policy
decides: ``REJECT`` raises :class:`MailboxFull` to the sender, who must answer for it (the
session answers "server busy"); ``DROP`` hands the message to the dead letters. Blocking a
sender instead would stall a socket reader and, with it, pings and closes (trio-websocket's
docs, "Message Queues": a paused reader stops replying to pings).

``ask`` is ``tell`` plus a one-shot reply the actor fills in; the asker bounds its wait with a
timeout and gets :class:`ActorStopped` if the actor ends before answering, never a hang.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio

from runtime.dead_letters import dead_letters

M = TypeVar("M")


class MailboxFull(Exception):
    """The actor has ``capacity`` messages waiting already; this one was not queued."""


class ActorStopped(Exception):
    """The actor no longer takes messages, or ended before answering an ask."""


class Overflow(enum.StrEnum):
    """What ``tell`` does with a message that finds the mailbox full."""

    REJECT = "reject"
    """Raise :class:`MailboxFull` to the sender: it knows best how to refuse its own caller."""

    DROP = "drop"
    """Record it as a dead letter and return: for messages nobody awaits."""


@dataclass(eq=False, slots=True)
class Reply:
    """The one-shot answer to an :class:`Ask`. Filled once, by the actor or by its death."""

    _done: trio.Event = field(default_factory=trio.Event)
    _result: outcome.Outcome[Any] | None = None

    def set(self, result: outcome.Outcome[Any]) -> None:
        if self._result is None:
            self._result = result
            self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        assert self._result is not None
        return self._result.unwrap()


@dataclass(frozen=True, slots=True)
class Ask(Generic[M]):
    """A message that wants an answer. The actor's loop unwraps it; ``receive`` never sees it."""

    message: M
    reply: Reply


class ActorRef(Generic[M]):
    """Where to send messages for one actor; ``path`` names it in logs and the status tree."""

    __slots__ = ("_send", "capacity", "overflow", "path")

    def __init__(
        self,
        path: str,
        send: trio.MemorySendChannel[M | Ask[M]],
        capacity: int,
        overflow: Overflow,
    ) -> None:
        self.path = path
        self.capacity = capacity
        self.overflow = overflow
        self._send = send

    def tell(self, message: M, *, sender: str = "?") -> None:
        """Queue ``message`` without waiting; a full mailbox is handled by the overflow policy.

        Raises :class:`MailboxFull` (``REJECT`` policy) or :class:`ActorStopped`.
        """
        self._post(message, sender)

    async def ask(
        self,
        message: M,
        *,
        timeout: float = math.inf,  # noqa: ASYNC109 - a bounded ask is the kernel's contract
        sender: str = "?",
    ) -> Any:
        """Send ``message`` and wait for the actor's answer.

        An exception raised by the actor while handling it is raised here (the actor lives
        on). Raises :class:`ActorStopped` if the actor ends first, ``trio.TooSlowError`` after
        ``timeout`` seconds. Cancelling the wait leaves the message queued; its answer is
        then simply not read.
        """
        reply = Reply()
        self._post(Ask(message, reply), sender)
        with trio.fail_after(timeout):
            return await reply.wait()

    def _post(self, message: M | Ask[M], sender: str) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            if self.overflow is Overflow.REJECT:
                raise MailboxFull(f"{self.path}: mailbox full ({self.capacity} waiting)") from None
            dead_letters.record(
                target=self.path, sender=sender, reason="mailbox full", kind=_kind(message)
            )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            dead_letters.record(
                target=self.path, sender=sender, reason="actor stopped", kind=_kind(message)
            )
            raise ActorStopped(f"{self.path}: stopped") from None

    @property
    def depth(self) -> int:
        """Messages waiting to be handled."""
        return self._send.statistics().current_buffer_used

    def close(self) -> None:
        """No more messages: the actor handles what is queued, then its loop ends."""
        self._send.close()


def _kind(message: object) -> str:
    inner = message.message if isinstance(message, Ask) else message
    return type(inner).__name__


def open_mailbox(
    path: str, capacity: int, overflow: Overflow = Overflow.REJECT
) -> tuple[ActorRef[M], trio.MemoryReceiveChannel[M | Ask[M]]]:
    """A fresh mailbox: the ref for senders and the receive end for the actor's loop."""
    send, receive = trio.open_memory_channel[M | Ask[M]](capacity)
    return ActorRef(path, send, capacity, overflow), receive
