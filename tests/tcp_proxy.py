"""A loopback TCP proxy a test can cut, to drop connections without touching the server, or
slow down, to put a network's round trip between a server and its database."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio


@dataclass
class _Link:
    """One proxied connection: cancelling ``scope`` closes both of its sockets."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Swallowing everything in both directions, closing nothing (see ``black_hole``).
    holed: bool = False


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port`` (or to the Unix socket ``target_unix``).
    ``cut()`` drops live connections; ``close()`` also stops listening, so the target looks
    unreachable; ``black_hole()`` makes live connections half-open.

    ``delay`` (seconds) holds every chunk that long in each direction, in order, so a request
    and its answer take ``2 * delay`` more: a WAN's round trip on loopback. Throughput is not
    limited, as on a long fat link.
    """

    def __init__(
        self, target_port: int = 0, *, target_unix: str | None = None, delay: float = 0.0
    ) -> None:
        self.target_port = target_port
        self.target_unix = target_unix
        self.delay = delay
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
            up: trio.abc.Stream
            if self.target_unix is not None:
                up = await trio.open_unix_socket(self.target_unix)
            else:
                up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            copy = partial(_delayed_copy, delay=self.delay) if self.delay > 0 else _copy
            async with client, up, trio.open_nursery() as nursery:
                nursery.start_soon(copy, client, up, link)
                nursery.start_soon(copy, up, client, link)

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


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, link: _Link) -> None:
    try:
        while data := await source.receive_some(65536):
            if not link.holed:
                await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if link.holed:
        await trio.sleep_forever()  # keep the other end open until cut()


async def _delayed_copy(
    source: trio.abc.Stream, sink: trio.abc.Stream, link: _Link, *, delay: float
) -> None:
    """``_copy`` with every chunk sent ``delay`` seconds after it arrived, in order."""
    # Test tooling: the queue is unbounded, as a link's in-flight bytes are (a test that
    # pushes more than memory through a slowed proxy has other problems).
    send, receive = trio.open_memory_channel[tuple[float, bytes]](float("inf"))

    async def later() -> None:
        async for due, data in receive:
            await trio.sleep_until(due)
            if not link.holed:
                await sink.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        try:
            while data := await source.receive_some(65536):
                send.send_nowait((trio.current_time() + delay, bytes(data)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        send.close()
    if link.holed:
        await trio.sleep_forever()


def libpq_via(url: str, port: int) -> str:
    """``url`` (a libpq URI) pointed at ``127.0.0.1:port`` instead of its host, everything
    else (database, user, passfile) kept."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"host", "port"}]
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = f"{netloc[0]}@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}", query=urlencode(query)))


def libpq_target(url: str) -> tuple[int, str | None]:
    """Where ``url`` connects: ``(port, None)`` for TCP, ``(0, socket path)`` for a Unix
    socket directory (libpq's ``host=/dir``: the socket is ``/dir/.s.PGSQL.<port>``)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    host = params.get("host") or parts.hostname or ""
    port = int(params.get("port") or parts.port or 5432)
    if host.startswith("/"):
        return 0, f"{host}/.s.PGSQL.{port}"
    return port, None
