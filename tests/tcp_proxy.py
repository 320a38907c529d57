"""A loopback TCP proxy a test can cut, to drop connections without touching the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import trio


@dataclass
class _Link:
    """One proxied connection: cancelling ``scope`` closes both of its sockets."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Swallowing everything in both directions, closing nothing (see ``black_hole``).
    holed: bool = False


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port``. ``cut()`` drops live connections;
    ``close()`` also stops listening, so the target looks unreachable; ``black_hole()`` makes
    live connections half-open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._links: list[_Link] = []
        self._listening = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._listening:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
                )
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        link = _Link()
        self._links.append(link)
        with link.scope:
            up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with client, up, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, up, link)
                nursery.start_soon(_copy, up, client, link)

    def cut(self) -> None:
        for link in self._links:
            link.scope.cancel()
        self._links.clear()

    def close(self) -> None:
        self._listening.cancel()
        self.cut()

    def black_hole(self) -> None:
        """The live connections stop forwarding without closing, as when a NAT forgets a
        mapping or a laptop sleeps: what either end sends is read and dropped, and an end
        that closes is not told to the other. Connections made later are forwarded."""
        for link in self._links:
            link.holed = True


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, link: _Link) -> None:
    try:
        while data := await source.receive_some(65536):
            if not link.holed:
                await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if link.holed:
        await trio.sleep_forever()  # keep the other end open until cut()
