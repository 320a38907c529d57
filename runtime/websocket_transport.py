"""A session's :class:`~runtime.connection.Connection` over one WebSocket (``/mcp``).

Output goes through the session's bounded outgoing queue (:class:`~runtime.outbox.Outbox`):
:meth:`send` *is* the queue's ``put`` (no wrapper on the hot path), and one writer task
drains it to the socket in order. What is the transport's business stays here: the byte
budgets (the queue's), a peer that stops reading (the queue finds it stalled; the
connection is closed with 1008 and the session ends), and closing within a bounded time
(a peer that does not take the close frame has its TCP connection dropped).

Tasks: :meth:`start` starts the writer and the stall watchdog in the caller's nursery
(``actors.session.lifecycle``), beside the session's own; cancelling that nursery stops both.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio
from trio_websocket import CloseReason, WebSocketConnection

from runtime.connection import RequestId
from runtime.outbox import Outbox

__all__ = ["CLOSE_POLICY_VIOLATION", "WebSocketTransport"]

log = structlog.get_logger("session")

#: RFC 6455 section 7.4.1: "a message that violates its policy" (here: not reading replies).
CLOSE_POLICY_VIOLATION = 1008


class WebSocketTransport:
    """One session's connection over ``ws`` (see the module doc)."""

    __slots__ = (
        "_close_timeout",
        "_closed_for_stall",
        "_session_id",
        "_ws",
        "outbox",
        "send",
        "send_nowait",
        "sent",
        "wait_writable",
    )

    def __init__(
        self, ws: WebSocketConnection, outbox: Outbox, *, close_timeout: float, session_id: str
    ) -> None:
        self._ws = ws
        self.outbox = outbox
        self._close_timeout = close_timeout
        self._session_id = session_id
        #: The first close this side sent, if any (see ``actors.session.lifecycle``: a close
        #: this side starts is known from what it sent, not from trio-websocket's report).
        self.sent: CloseReason | None = None
        self._closed_for_stall = trio.Event()
        # The Connection's sending side is the queue's own methods, bound once: a direct
        # call per message, no wrapper (the hot path).
        self.send = outbox.put
        self.send_nowait = outbox.put_nowait
        self.wait_writable = outbox.wait_writable

    def watch_delivery(self, related_request_id: RequestId, lost: Callable[[], None]) -> None:
        """Never calls ``lost``: one stream for the whole session; a message it queued is
        lost only with the connection, whose end the session handles (parked or ended)."""

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``: nothing more is queued (what is queued is dropped), then the
        close frame; a peer that does not take it within ``close_timeout`` seconds (it is not
        reading) has its TCP connection dropped instead (trio-websocket closes the stream
        when ``aclose`` is cancelled)."""
        self.outbox.close()
        if self.sent is None:
            self.sent = CloseReason(code, reason)
        with trio.move_on_after(self._close_timeout):
            await self._ws.aclose(code, reason)

    def start(self, nursery: trio.Nursery) -> None:
        """Start the writer (the outgoing queue to the socket) and the stall watchdog in
        ``nursery``, the session's own (no nursery of the transport's: two tasks per
        session, not four, at 10,000 idle sessions); cancelling it stops both. The writer
        returning (the queue closed) leaves a 1008 close under way to finish; it raises what
        sending raises when the connection closes."""
        nursery.start_soon(self._end_when_stalled)
        nursery.start_soon(self.outbox.run, self._ws.send_message)

    async def settle(self) -> None:
        """Once the session stopped reading: if it stopped because its peer does not read,
        wait for the 1008 close (bounded by ``close_timeout``) to finish."""
        if self.outbox.stalled.is_set():
            await self._closed_for_stall.wait()

    async def _end_when_stalled(self) -> None:
        """End the session once its peer is found not reading (:attr:`Outbox.stalled`): 1008,
        and no parking, since a resumed session would only stall again."""
        outbox = self.outbox
        await outbox.stalled.wait()
        try:
            log.warning(
                "session.peer_not_reading",
                session_id=self._session_id,
                queued_bytes=outbox.queued_bytes,
                queued_messages=len(outbox),
                stall_timeout=outbox.stall_timeout,
            )
            await self.close(CLOSE_POLICY_VIOLATION, "not reading replies")
        finally:
            self._closed_for_stall.set()
