"""The TCP accept loop of the MCP port: nothing one connection does reaches the listener.

Why not ``trio.serve_listeners`` (which ``trio_websocket.serve_websocket`` uses): its loop
logs ``EMFILE`` every 0.1 s for as long as the descriptor table is full, and an exception
escaping a connection's handler cancels the nursery that holds every other connection. Here:

* each connection's task runs in the ``connections`` nursery the caller owns, wrapped so
  that no ``Exception`` leaves it: its failure ends that connection alone and is logged
  (at most one line per :data:`~runtime.log_throttle.DEFAULT_PERIOD` per kind of failure);
* the peer's address comes from ``accept(2)`` itself, while the socket is alive. A peer that
  has already reset makes ``getpeername(2)`` fail with ``ENOTCONN``; reading it while handling
  another failure is how one reset used to take the whole node down;
* ``accept(2)`` failing for lack of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``,
  ``ENOMEM``; see accept(2) and trio's ``serve_listeners``) pauses accepting: one log line
  per episode (``listener.accept_paused``), one when it ends (``listener.accept_resumed``,
  with the number of failed attempts), retries with exponential back-off from
  :data:`BACKOFF_MIN` to :data:`BACKOFF_MAX` seconds, and at once whenever one of our
  connections releases its descriptor. Pending connections wait in the kernel's backlog;
* a ``gate`` decides synchronously, in accept order, whether a new connection may start its
  handshake; a refused one is closed at once, before anything is read from it.

The handler receives a :class:`PeerStream` (a stream that notices its peer going away and
when it last heard from it) and the :class:`Peer`, so a later handler can read the request
head and dispatch on it (WebSocket upgrade or plain HTTP) over the same port.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from runtime.log_throttle import LogThrottle
from storage.startup_errors import CannotListen

log = structlog.get_logger("listener")

#: accept(2) errors that mean "no resources right now", not "this listener is broken".
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors that concern only the connection being accepted (as trio's own list:
#: a peer that reset before we accepted, a firewall denial): try the next one.
_IGNORABLE_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0


@dataclass(frozen=True, slots=True)
class Peer:
    """The remote end of a connection, as ``accept(2)`` reported it."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @classmethod
    def from_sockaddr(cls, sockaddr: object) -> Peer:
        """From an ``AF_INET``/``AF_INET6`` socket address tuple; ``ValueError`` otherwise."""
        match sockaddr:
            case (str() as host, int() as port, *_):
                pass
            case _:
                raise ValueError(f"not an IP socket address: {sockaddr!r}")
        # A link-local IPv6 peer comes with its zone ("fe80::1%eth0"); the zone is not part
        # of the address that limits and trusted-proxy lists name.
        return cls(ipaddress.ip_address(host.partition("%")[0]), port)

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


#: Large writes go out in pieces of this size, so that ``PeerStream.last_sent`` moves while a
#: slow peer takes a large message (the kernel accepts more only as the peer reads).
SEND_CHUNK = 64 * 1024


class PeerStream(trio.abc.Stream):
    """A connection's socket stream that records when data last arrived, when the peer last
    took data, and whether it has ended, so that a task waiting for something else (a
    request head, room in an outgoing queue) can notice.

    ``last_received`` and ``last_sent`` are in trio's clock (``trio.current_time()``),
    seconds. ``ended`` is set when the peer has gone (end of stream, or a reset) or the
    stream was closed here.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.last_received = self.last_sent = trio.current_time()
        self.ended = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.ended.set()
            raise
        if data:
            self.last_received = trio.current_time()
        else:
            self.ended.set()
        return data

    async def wait_readable(self) -> None:
        """Return when :meth:`receive_some` would not block: data, the end of the stream or
        an error waits. For a watch that expects nothing to arrive (a read tried first would
        fail, a system call wasted). Raises ``trio.ClosedResourceError`` if the stream is
        closed here meanwhile."""
        await trio.lowlevel.wait_readable(self._stream.socket)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            if len(data) <= SEND_CHUNK:
                await self._stream.send_all(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), SEND_CHUNK):
                    await self._stream.send_all(view[start : start + SEND_CHUNK])
                    self.last_sent = trio.current_time()
        except trio.BrokenResourceError:
            self.ended.set()
            raise
        self.last_sent = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the socket; a task blocked reading or writing it gets
        ``trio.ClosedResourceError`` (trio's ``notify_closing``)."""
        self.ended.set()
        await self._stream.aclose()


@dataclass(slots=True)
class ListenerCounters:
    """Totals since the node started (they survive restarts of the listener), for
    ``/status`` and ``/metrics``."""

    accept_pauses: int = 0
    """Episodes of accept(2) failing for lack of resources."""
    failed_accepts: int = 0
    """accept(2) calls that failed for lack of resources (every retry counts)."""
    connections_failed: int = 0
    """Connections ended by an error of their own (contained, see the module doc)."""
    handshakes_timed_out: int = 0
    """Connections closed at the handshake deadline (counted by the handshake's owner)."""


#: Releases a connection's place in the handshake admission; idempotent.
Release = Callable[[], None]


class Gate(Protocol):
    """Handshake admission, asked synchronously in accept order."""

    def enter(self, peer: Peer) -> Release | None:
        """Admit ``peer``'s new connection (``None``: refuse it, it is closed at once)."""


ConnectionHandler = Callable[[PeerStream, Peer, Release], Awaitable[None]]
"""Serves one connection; calls the ``Release`` once its handshake is over. It may raise:
the failure is contained and logged by the listener, and the stream is closed after it."""


#: What an operator can do about a bind(2) failure, by errno (see bind(2), ip(7)).
_BIND_ADVICE = {
    errno.EADDRINUSE: "address already in use: stop the process that holds it "
    "(ss -ltnp), or choose another --port",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address: check --host",
    errno.EACCES: "permission denied: ports below 1024 need privileges; choose another --port",
}


def cannot_listen(host: str, port: int, error: OSError) -> CannotListen:
    """The start-up error for a failed bind of ``host:port``, naming both (exit code 3)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(error, socket.gaierror):
        reason = f"unknown host ({error.strerror}): check --host"
    else:
        reason = _BIND_ADVICE.get(error.errno or 0) or f"{error.strerror or error}"
    return CannotListen(f"cannot listen on {address}: {reason}")


async def open_listeners(host: str, port: int, *, reuse_port: bool) -> list[trio.SocketListener]:
    """Listening sockets on every address ``host`` resolves to, as
    ``trio.open_tcp_listeners`` makes them; with ``reuse_port`` each also sets
    ``SO_REUSEPORT`` (socket(7)): the sockets of every ``--workers`` worker on one port form
    one group, among which the kernel spreads new connections by a hash of their addresses.
    Every socket of the group must set it, the parent's reservation (:func:`reserve_port`)
    included. Raises ``OSError`` (``socket.gaierror`` for an unknown host)."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = trio.socket.socket(family, kind, proto)
            try:
                _share_port(sock)
                await sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _share_port(sock: socket.socket | trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Bind (never listen) ``SO_REUSEPORT`` sockets on ``host:port`` for a ``--workers``
    parent: the port (chosen by the kernel when ``port`` is 0) that every worker then listens
    on, held for the parent's life, so that a worker's restart finds it free for the group and
    taken for anyone else (a process without ``SO_REUSEPORT``, or another user: socket(7)). A
    socket that does not listen is never given a connection. Returns the port and the sockets
    (the caller closes them). Raises :class:`CannotListen` (exit code 3) if it cannot bind."""
    held: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            _share_port(sock)
            # Every address on the port the first one got (port 0: the kernel's choice).
            chosen = held[0].getsockname()[1] if len(held) > 1 else address[1]
            sock.bind((address[0], chosen, *address[2:]))
    except OSError as exc:
        for sock in held:
            sock.close()
        raise cannot_listen(host, port, exc) from exc
    return held[0].getsockname()[1], held


class Listener:
    """Accepts on ``host:port`` and runs ``handler`` for each connection in ``connections``;
    with ``reuse_port`` its sockets join the port's ``SO_REUSEPORT`` group (``--workers``)."""

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        gate: Gate,
        host: str,
        port: int,
        counters: ListenerCounters | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._handler = handler
        self._gate = gate
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.counters = counters or ListenerCounters()
        self._released = trio.Event()
        self._throttle = LogThrottle()

    async def run(
        self,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until cancelled; reports the bound port once listening. Cancelling this
        stops accepting; the connections already accepted live on in ``connections``.
        Raises :class:`~storage.startup_errors.CannotListen` if ``host:port`` cannot be bound."""
        try:
            listeners = await open_listeners(self._host, self._port, reuse_port=self._reuse_port)
        except OSError as exc:  # socket.gaierror included: an unknown host name
            raise cannot_listen(self._host, self._port, exc) from exc
        try:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, connections)
                task_status.started(listeners[0].socket.getsockname()[1])
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        backoff = BACKOFF_MIN
        failures = 0
        paused_at = 0.0
        while True:
            try:
                sock, sockaddr = await listener.socket.accept()
            except OSError as exc:
                if exc.errno in _IGNORABLE_ACCEPT_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                self.counters.failed_accepts += 1
                if failures == 0:
                    self.counters.accept_pauses += 1
                    paused_at = trio.current_time()
                    self._throttle.emit(
                        log.warning,
                        "listener.accept_paused",
                        error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        reason=os.strerror(exc.errno or 0),
                    )
                failures += 1
                released = self._released
                with trio.move_on_after(backoff):
                    await released.wait()  # one of ours closed: a descriptor is free
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if failures:
                self._throttle.emit(
                    log.info,
                    "listener.accept_resumed",
                    failed_accepts=failures,
                    paused_s=round(trio.current_time() - paused_at, 3),
                )
                failures, backoff = 0, BACKOFF_MIN
            self._start(sock, sockaddr, connections)

    def _start(
        self, sock: trio.socket.SocketType, sockaddr: object, connections: trio.Nursery
    ) -> None:
        """Admit and start one accepted connection, or close it; never raises."""
        try:
            peer = Peer.from_sockaddr(sockaddr)
            stream = PeerStream(trio.SocketStream(sock))
        except (OSError, ValueError) as exc:
            sock.close()
            self._throttle.emit(log.warning, "listener.accept_failed", error=repr(exc))
            return
        release = self._gate.enter(peer)
        if release is None:
            sock.close()  # refused before reading a byte: costs no more than the accept
            self._descriptor_released()
            return
        connections.start_soon(self._contained, stream, peer, release)

    async def _contained(self, stream: PeerStream, peer: Peer, release: Release) -> None:
        """Run the handler; whatever it raises (but cancellation) stops here."""
        try:
            await self._handler(stream, peer, release)
        except* Exception as group:
            self.counters.connections_failed += 1
            failure = _first(group)
            # The peer's doing (a reset, a write to a closed socket) is ordinary; anything
            # else is our bug, and gets its traceback. Either way it concerns this
            # connection only.
            ordinary = isinstance(
                failure, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
            )
            details: dict[str, object] = {"peer": str(peer), "error": repr(failure)}
            if not ordinary:
                details["exc_info"] = failure
            self._throttle.emit(
                log.info if ordinary else log.error,
                "connection.failed",
                key=f"connection.failed:{type(failure).__name__}",
                **details,
            )
        finally:
            release()
            await trio.aclose_forcefully(stream)
            self._descriptor_released()

    def _descriptor_released(self) -> None:
        self._released.set()
        self._released = trio.Event()


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
