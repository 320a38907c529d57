"""A trio actor's bounded mailbox and the reference others use to post to it.

``tell`` never blocks and never waits. When the mailbox is full the mailbox's overflow policy
decides: ``REJECT`` raises :class:`MailboxFull` to the sender, who must answer for it (the
session answers "server busy"); ``DROP`` hands the message to the dead letters. Blocking a
sender instead would stall a socket reader and, with it, pings and closes (trio-websocket's
docs, "Message Queues": a paused reader stops replying to pings).

A mailbox is bounded in items (``capacity``) and, when given a :class:`~runtime.budget.ByteBudget`,
in bytes: the sender states each message's size, the budget counts it until the actor takes the
message, and a message the budget does not admit is full exactly as an item past ``capacity``
is. The sizes of queued messages are kept in arrival order beside the channel, which is FIFO
with one consumer, so taking a message gives back exactly its size.

``ask`` is ``tell`` plus a one-shot reply the actor fills in; the asker bounds its wait with a
timeout and gets :class:`~storage.errors.ActorUnavailable` (the node's one "actor is gone"
error, as a pykka service's callers get) if the actor ends before answering, never a hang.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio

from runtime.budget import ByteBudget
from runtime.dead_letters import dead_letters
from storage.errors import ActorUnavailable

M = TypeVar("M")


class MailboxFull(Exception):
    """The actor has ``capacity`` messages, or its byte budget, waiting already; this one was
    not queued."""


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


@dataclass(eq=False, slots=True)
class _Queued:
    """What the two ends of one mailbox share: the sizes of queued messages (in order), and
    the event a sender waiting for room waits on (``None`` while nobody waits)."""

    sizes: deque[int] = field(default_factory=deque)
    room: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class Ask(Generic[M]):
    """A message that wants an answer. The actor's loop unwraps it; ``receive`` never sees it."""

    message: M
    reply: Reply


class ActorRef(Generic[M]):
    """Where to send messages for one actor; ``path`` names it in logs and the status tree."""

    __slots__ = ("_queued", "_send", "budget", "capacity", "overflow", "path")

    def __init__(
        self,
        path: str,
        send: trio.MemorySendChannel[M | Ask[M]],
        capacity: int,
        overflow: Overflow,
        *,
        budget: ByteBudget | None = None,
        queued: _Queued | None = None,
    ) -> None:
        self.path = path
        self.capacity = capacity
        self.overflow = overflow
        self.budget = budget
        self._send = send
        self._queued = queued if queued is not None else _Queued()

    def tell(self, message: M, *, sender: str = "?", size: int = 0) -> None:
        """Queue ``message`` without waiting; a full mailbox is handled by the overflow policy.

        ``size`` is the message's size in bytes (its frame, for a session), counted against
        the mailbox's byte budget until the actor takes it. Raises :class:`MailboxFull`
        (``REJECT`` policy) or :class:`~storage.errors.ActorUnavailable`.
        """
        self._post(message, sender, size)

    async def ask(
        self,
        message: M,
        *,
        timeout: float = math.inf,  # noqa: ASYNC109 - a bounded ask is the kernel's contract
        sender: str = "?",
    ) -> Any:
        """Send ``message`` and wait for the actor's answer.

        An exception raised by the actor while handling it is raised here (the actor lives
        on). Raises :class:`~storage.errors.ActorUnavailable` if the actor ends first,
        ``trio.TooSlowError`` after ``timeout`` seconds. Cancelling the wait leaves the
        message queued; its answer is then simply not read.
        """
        reply = Reply()
        self._post(Ask(message, reply), sender, 0)
        with trio.fail_after(timeout):
            return await reply.wait()

    def _post(self, message: M | Ask[M], sender: str, size: int) -> None:
        budget = self.budget
        if budget is not None and not budget.admits(size):
            self._overflow(message, sender, f"{budget.used} bytes waiting")
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._overflow(message, sender, f"{self.capacity} waiting")
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            dead_letters.record(
                target=self.path, sender=sender, reason="actor stopped", kind=_kind(message)
            )
            raise ActorUnavailable(f"{self.path}: stopped") from None
        if budget is not None:
            # Every queued message has its size here, in channel order (see the module doc).
            budget.add(size)
            self._queued.sizes.append(size)

    def _overflow(self, message: M | Ask[M], sender: str, held: str) -> None:
        if self.overflow is Overflow.REJECT:
            raise MailboxFull(f"{self.path}: mailbox full ({held})")
        dead_letters.record(
            target=self.path, sender=sender, reason="mailbox full", kind=_kind(message)
        )

    @property
    def depth(self) -> int:
        """Messages waiting to be handled."""
        return self._send.statistics().current_buffer_used

    @property
    def has_room(self) -> bool:
        """Whether a small message would be queued now."""
        if self.depth >= self.capacity:
            return False
        return self.budget is None or self.budget.admits(1)

    async def wait_for_room(self) -> None:
        """Wait until the actor has taken a message and :attr:`has_room` holds (room freed
        elsewhere on the node does not wake it: bound the wait). Cancelling it is clean."""
        while not self.has_room:
            queued = self._queued
            if queued.room is None:
                queued.room = trio.Event()
            await queued.room.wait()

    @property
    def queued_bytes(self) -> int:
        """Bytes of the messages waiting (0 without a byte budget)."""
        return self.budget.used if self.budget is not None else 0

    def close(self) -> None:
        """No more messages: the actor handles what is queued, then its loop ends."""
        self._send.close()


class Inbox(Generic[M]):
    """The actor's end of a mailbox: messages in arrival order, each giving back its bytes
    to the budget as it is taken. Iterate it (``async for``) in the actor's loop."""

    __slots__ = ("_budget", "_queued", "_receive")

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[M | Ask[M]],
        budget: ByteBudget | None,
        queued: _Queued,
    ) -> None:
        self._receive = receive
        self._budget = budget
        self._queued = queued

    def __aiter__(self) -> Inbox[M]:
        return self

    async def __anext__(self) -> M | Ask[M]:
        """The next message; waits for one. Ends when the mailbox is closed and drained."""
        try:
            envelope = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        self._taken()
        return envelope

    def receive_nowait(self) -> M | Ask[M]:
        """The next message if one is waiting; raises ``trio.WouldBlock`` otherwise (and
        ``trio.EndOfChannel`` / ``trio.ClosedResourceError`` as the channel does)."""
        envelope = self._receive.receive_nowait()
        self._taken()
        return envelope

    def _taken(self) -> None:
        queued = self._queued
        if self._budget is not None:
            self._budget.remove(queued.sizes.popleft())
        room = queued.room
        if room is not None:
            queued.room = None
            room.set()

    def close(self) -> None:
        """The actor's name is gone: nothing more is received; its bytes are given back."""
        self._receive.close()
        self._queued.sizes.clear()
        if self._budget is not None:
            self._budget.release_all()


def _kind(message: object) -> str:
    inner = message.message if isinstance(message, Ask) else message
    return type(inner).__name__


def open_mailbox(
    path: str,
    capacity: int,
    overflow: Overflow = Overflow.REJECT,
    *,
    budget: ByteBudget | None = None,
) -> tuple[ActorRef[M], Inbox[M]]:
    """A fresh mailbox of ``capacity`` messages (and ``budget``'s bytes, when given): the
    ref for senders and the inbox for the actor's loop."""
    send, receive = trio.open_memory_channel[M | Ask[M]](capacity)
    queued = _Queued()
    ref = ActorRef(path, send, capacity, overflow, budget=budget, queued=queued)
    return ref, Inbox(receive, budget, queued)
