"""A loopback TCP proxy a test can cut, to drop connections without touching the server."""

from __future__ import annotations

from functools import partial

import trio


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port``. ``cut()`` drops live connections;
    ``close()`` also stops listening, so the target looks unreachable."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._pairs: list[trio.CancelScope] = []
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
        scope = trio.CancelScope()
        self._pairs.append(scope)
        with scope:
            up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with client, up, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, up)
                nursery.start_soon(_copy, up, client)

    def cut(self) -> None:
        for scope in self._pairs:
            scope.cancel()
        self._pairs.clear()

    def close(self) -> None:
        self._listening.cancel()
        self.cut()


async def _copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
