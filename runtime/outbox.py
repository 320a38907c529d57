"""A session's outgoing queue: messages accepted for the peer and not yet written to it.

Every message a session sends (replies, progress, log notifications, errors) goes through one
:class:`Outbox`, and one writer task (:meth:`Outbox.run`) writes them to the socket in order.
The queue is bounded in messages and, through a :class:`~runtime.budget.ByteBudget`, in bytes
per session and per node (the node's bound holds back only sessions that have something
queued: an empty queue always takes one message, so peers that read are never stopped by
peers that do not). What happens at the bound depends on who is sending:

* Work (:meth:`Outbox.put`: a tool call's reply, a progress notification) waits for room. A
  tool call keeps its slots until its reply is in this queue, so a peer that does not read
  stops its own session's work, and with it the reading of new requests (the session's reader
  waits for :meth:`Outbox.wait_writable` before it reads the next frame: TCP back-pressure).
* Control (:meth:`Outbox.put_nowait`: ``ping`` answers, "server busy", framing errors) never
  waits: the reader produces it only after finding the queue writable, so it overshoots the
  bound by at most the few bytes of the answer to one frame.

A peer that leaves the queue full, with nothing taken for ``stall_timeout`` seconds, is not
reading at all (what it took is known per message, and finer where the transport tells,
``peer_took``, so that a slow peer taking one large message is not mistaken for a stalled
one): whoever waits for room notices it and sets :attr:`Outbox.stalled`, on which the session
closes the connection (1008: RFC 6455 section 7.4.1, "a message that violates its policy")
and ends. Only waiters keep that time, so the hot path pays nothing for it; a queue
that is full has a waiter by construction, since the reader waits for room before each frame.

Runs in the trio thread only. Cancellation: :meth:`put` and :meth:`wait_writable` are plain
checkpoints (cancelling them queues nothing); cancelling :meth:`run` leaves the message being
written in an unknown state on the wire, which is only done when the connection is going away.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from runtime.budget import ByteBudget
from runtime.connection import ConnectionGone, RequestId, message_size

__all__ = ["Outbox", "OutboxClosed", "message_size"]


class OutboxClosed(ConnectionGone):
    """The session's connection is going away: nothing more can be queued for its peer."""


class Outbox:
    """The outgoing queue of one session; see the module doc for its bounds and rules."""

    __slots__ = (
        "_changed",
        "_messages",
        "_peer_took",
        "_progress_at",
        "_waiters",
        "budget",
        "closed",
        "max_messages",
        "stall_timeout",
        "stalled",
        "watcher",
    )

    def __init__(
        self,
        budget: ByteBudget,
        *,
        max_messages: int,
        stall_timeout: float,
        peer_took: Callable[[], float] | None = None,
    ) -> None:
        self.budget = budget
        self._peer_took = peer_took
        self.max_messages = max_messages
        self.stall_timeout = stall_timeout
        self.closed = False
        #: Set once the peer is found not reading (see the module doc).
        self.stalled = trio.Event()
        self._messages: deque[tuple[str, int]] = deque()
        self._changed = trio.Event()
        self._waiters = 0
        #: When the peer last took a message, or when the queue last became non-empty.
        self._progress_at = 0.0
        #: Cancelled when a message is queued or the queue closes: for a writer that waits
        #: for its first message while it watches something else (an HTTP exchange watches
        #: its peer), which trio cannot wait for in one task otherwise. Its owner sets and
        #: clears it.
        self.watcher: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def queued_bytes(self) -> int:
        return self.budget.used

    def _admits(self, size: int) -> bool:
        # An empty queue always takes one message, whatever the node holds: a peer that reads
        # keeps its queue empty, so peers that do not (whose queues fill up to the node's
        # bound) can slow it down to one message at a time, never stop it.
        if not self._messages:
            return True
        return len(self._messages) < self.max_messages and self.budget.admits(size)

    @property
    def writable(self) -> bool:
        """Room for at least a small message: the reader may read the next frame."""
        return self._admits(1)

    async def put(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Queue ``message``, waiting while the queue (or the node's) is full. One queue per
        connection: ``related_request_id`` (see :class:`runtime.connection.Connection`) has
        no stream to choose, and is taken only so that this *is* the connection's ``send``.

        Raises :class:`OutboxClosed` if the connection is going away, before or while waiting.
        """
        size = message_size(message)
        if self._admits(size):
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await self._wait_room(size)
        self._append(message, size)

    def put_nowait(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Queue a control message now, whatever the bound (see the module doc).

        Raises :class:`OutboxClosed` if the connection is going away.
        """
        self._append(message, message_size(message))

    def _append(self, message: str, size: int) -> None:
        if self.closed:
            raise OutboxClosed
        if not self._messages:
            self._progress_at = trio.current_time()
        self._messages.append((message, size))
        self.budget.add(size)
        self._wake()
        if self.watcher is not None:
            self.watcher.cancel()

    async def wait_writable(self) -> None:
        """Wait until :attr:`writable`. Raises :class:`OutboxClosed` if the connection goes
        away first."""
        if self.writable:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await self._wait_room(1)

    async def _wait_room(self, size: int) -> None:
        while not self._admits(size):
            if self.closed:
                raise OutboxClosed
            deadline = math.inf
            if not self.stalled.is_set():  # waiting means messages are queued here
                deadline = self._last_progress() + self.stall_timeout
                if trio.current_time() >= deadline:
                    self.stalled.set()
                    deadline = math.inf
            with trio.move_on_at(deadline):
                await self._wait_change()
        if self.closed:
            raise OutboxClosed

    def first(self) -> str | None:
        """The message the writer takes next; ``None`` if the queue is empty."""
        return self._messages[0][0] if self._messages else None

    def stall_deadline(self) -> float:
        """When this queue counts as stalled if the peer takes nothing more (trio's clock):
        ``inf`` while it is empty. For a writer's watchdog, where no one waits to ``put``
        (a single response being written to a peer that does not read it)."""
        if not self._messages:
            return math.inf
        return self._last_progress() + self.stall_timeout

    def _last_progress(self) -> float:
        """When the peer last took something: a whole message, or bytes of one."""
        if self._peer_took is None:
            return self._progress_at
        return max(self._progress_at, self._peer_took())

    async def run(self, send: Callable[[str], Awaitable[None]]) -> None:
        """The writer: send queued messages in order, until cancelled or :meth:`close`.

        Errors of ``send`` (the connection closed) propagate to the session.
        """
        messages = self._messages
        while not self.closed:
            if not messages:
                await self._wait_change()
                continue
            message, size = messages[0]
            await send(message)
            if self.closed:
                return  # close() already gave the bytes back
            messages.popleft()
            self.budget.remove(size)
            self._progress_at = trio.current_time()
            self._wake()

    def close(self) -> None:
        """The connection is going away: drop what is queued, give its bytes back, and wake
        every waiter (they raise :class:`OutboxClosed`). Idempotent; cannot raise."""
        self.closed = True
        self._messages.clear()
        self.budget.release_all()
        self._wake()
        if self.watcher is not None:
            self.watcher.cancel()

    async def _wait_change(self) -> None:
        self._waiters += 1
        try:
            await self._changed.wait()
        finally:
            self._waiters -= 1

    def _wake(self) -> None:
        # Only when someone waits: this runs twice per message on the hot path.
        if self._waiters:
            self._changed.set()
            self._changed = trio.Event()
