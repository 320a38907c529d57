"""An in-memory transport: a session whose peer is a :class:`MemoryClient`, with no socket.

As httpx's ``MockTransport`` or the MCP SDK's in-memory client streams do, it lets a test
(or a program embedding the runtime) drive a whole session, reader, mailbox, supervised
actor, calls and persistence, exactly as a socket would, and see what a socket cannot show:
the request each message relates to (``related_request_id``, see
:class:`runtime.connection.Connection`). ``actors.session.memory.memory_session`` runs a
session over it.

::

    transport, client = memory_pair()
    # the session reads transport.receive and sends through transport (a Connection)
    await client.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
    delivery = await client.receive()   # Delivery(message={...}, related_request_id=1)

Bounds: output is unbounded (``send`` never waits, ``wait_writable`` never blocks): a
test reads what it wants when it wants, and back-pressure is the socket transport's business
(tested over real sockets). Input is what the client sends, in order. Trio thread only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from runtime.connection import CLOSE_NORMAL, ConnectionGone, RequestId

__all__ = ["Delivery", "MemoryClient", "MemoryClosed", "MemoryTransport", "memory_pair"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message the session sent: decoded, as encoded, and the request it relates to."""

    message: Any
    """The decoded JSON-RPC message (a dict), or a batch (a list)."""
    raw: str
    related_request_id: RequestId | None


class MemoryClosed(Exception):
    """The session closed the connection (``code``, ``reason``), or the client did."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class MemoryTransport:
    """The session's side: a :class:`~runtime.connection.Connection`, and :meth:`receive`,
    its :data:`~runtime.connection.Receive` (the client's frames)."""

    def __init__(self) -> None:
        self._out_send, self._out_receive = trio.open_memory_channel[Delivery](math.inf)
        self._in_send, self._in_receive = trio.open_memory_channel[str | bytes](math.inf)
        #: The close the session sent, once it did.
        self.closed: MemoryClosed | None = None

    async def send(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Deliver ``message`` to the client (never waits: output is unbounded)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(message, related_request_id)

    def send_nowait(self, message: str, related_request_id: RequestId | None = None) -> None:
        """Deliver ``message`` to the client now. Raises :class:`ConnectionGone` once closed."""
        if self.closed is not None:
            raise ConnectionGone
        try:
            self._out_send.send_nowait(Delivery(json.loads(message), message, related_request_id))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionGone from None

    def watch_delivery(self, related_request_id: RequestId, lost: Callable[[], None]) -> None:
        """Never calls ``lost``: one stream, whose messages are delivered while it lasts."""

    async def wait_writable(self) -> None:
        """Never blocks (output is unbounded); raises :class:`ConnectionGone` once closed."""
        if self.closed is not None:
            raise ConnectionGone
        await trio.lowlevel.checkpoint_if_cancelled()

    async def close(self, code: int, reason: str) -> None:
        """The session ends the connection: the client's next :meth:`MemoryClient.receive`
        after what was already sent raises :class:`MemoryClosed` with ``code``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed is None:
            self.closed = MemoryClosed(code, reason)
            self._out_send.close()

    async def receive(self) -> str | bytes:
        """The client's next frame. Raises :class:`ConnectionGone` once the client closed."""
        try:
            return await self._in_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionGone from None


class MemoryClient:
    """The peer's side: sends frames to the session, receives what it sends."""

    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport
        self._sent = transport._in_send
        self._received = transport._out_receive

    async def send(self, message: object) -> None:
        """Send one frame: ``str`` or ``bytes`` as they are, anything else as JSON.

        Raises :class:`MemoryClosed` if either side closed the connection.
        """
        frame = message if isinstance(message, str | bytes) else json.dumps(message)
        try:
            await self._sent.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._closed() from None

    async def receive(self) -> Delivery:
        """The session's next message, in the order it sent them. Raises
        :class:`MemoryClosed` once everything sent before the close has been received."""
        try:
            return await self._received.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed() from None

    def receive_nowait(self) -> Delivery | None:
        """The session's next message if one is waiting, else ``None``."""
        try:
            return self._received.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return None

    async def response(self, request_id: RequestId) -> tuple[Delivery, list[Delivery]]:
        """Receive until the response to ``request_id``: it, and what came before it (its
        progress, log messages, other responses), in order."""
        before: list[Delivery] = []
        while True:
            delivery = await self.receive()
            message = delivery.message
            if (
                isinstance(message, dict)
                and "method" not in message
                and message.get("id") == request_id
            ):
                return delivery, before
            before.append(delivery)

    async def request(
        self, request_id: RequestId, method: str, params: dict[str, Any] | None = None
    ) -> Any:
        """Send a request and return its response (a decoded dict), skipping anything the
        session sent before it."""
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.send(frame)
        delivery, _ = await self.response(request_id)
        return delivery.message

    async def aclose(self) -> None:
        """The client ends the connection (as a WebSocket close 1000 would): the session's
        next read raises :class:`~runtime.connection.ConnectionGone`. Idempotent."""
        await self._sent.aclose()

    @property
    def closed(self) -> MemoryClosed | None:
        """The close the session sent, if it did."""
        return self._transport.closed

    def _closed(self) -> MemoryClosed:
        return self._transport.closed or MemoryClosed(CLOSE_NORMAL, "closed by the client")


def memory_pair() -> tuple[MemoryTransport, MemoryClient]:
    """A connected pair: the session's transport and its client."""
    transport = MemoryTransport()
    return transport, MemoryClient(transport)
