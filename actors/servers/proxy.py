"""One proxied MCP server (a stdio child process, or a remote server reached over WebSocket or
Streamable HTTP): kept running (connected), restarted (reconnected), or marked down.

A :class:`ProxiedServer` is the body of one child of ``/root/servers``. Its :meth:`run` loops
for as long as the node runs:

1. start the command (``runtime.child_process``: its own process group, recorded in the
   state dir), or connect to the URL (``runtime.mcp.ws_client``, ``runtime.mcp.http_client``;
   :func:`open_endpoint`), speak MCP to it (``runtime.mcp.client``), ``initialize``, read
   ``tools/list``; the server is ``up``;
2. serve calls (:meth:`call`) until its stream ends (the process died, the connection
   dropped or was refused, or it sent something over the message bound: a remote server
   whose connection drops is treated as a process that crashed); calls in flight then fail
   at once with a clear error;
3. restart it after a back-off (``backoff`` doubling to ``max_backoff``), within a restart
   intensity (OTP's MaxR in MaxT: ``max_restarts`` in ``restart_period`` seconds). Past the
   intensity the server is ``down``: its calls are refused with :class:`ServerDown` (-32004,
   retry later) and nothing else is touched; it is tried again after ``retry_after``.

Its tools are read again after every start, and again when it sends
``notifications/tools/list_changed``; each change (and each up/down) calls
``on_tools_changed``, so the node can tell its clients.

Cancellation: :meth:`run` ends when its scope is cancelled (the node stops): the child is
stopped (stdin closed, then SIGTERM and SIGKILL to its group: ``Child.stop``), shielded; a
connection is closed (a Streamable HTTP session ended with ``DELETE``).
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from runtime.child_process import ChildRecord, start_child
from runtime.log_throttle import LogThrottle
from runtime.mcp import jsonrpc
from runtime.mcp.client import (
    ClientError,
    ClientSession,
    InitializedServer,
    MessageStream,
    Progress,
)
from runtime.mcp.http_client import open_http_stream
from runtime.mcp.schema import Implementation, ToolDescriptor
from runtime.mcp.stdio_client import StdioStream, log_stderr
from runtime.mcp.ws_client import open_ws_stream, public_url
from runtime.supervision import RestartIntensity
from storage.errors import RetryLater

__all__ = [
    "Connection",
    "Endpoint",
    "ProxiedServer",
    "RemoteEndpoint",
    "ServerDown",
    "ServerState",
    "StdioCommand",
    "open_endpoint",
]

log = structlog.get_logger("servers")

CLIENT_INFO = Implementation(name="exai-runtime", version="0.1.0")


class ServerState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


class ServerDown(RetryLater):
    """The proxied server cannot take calls now (starting, restarting, or down past its
    restart intensity); the message says which, and when it is tried again."""


@dataclass(frozen=True, slots=True)
class StdioCommand:
    """How to start a stdio server: ``command`` and ``args`` (never from a client: the
    config file only), its environment on top of the node's, its working directory."""

    command: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    """A server reached over the network: ``url`` (``ws://``/``wss://``: WebSocket;
    ``http://``/``https://``: Streamable HTTP) and the headers sent with it (the
    ``Authorization`` it needs, say)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


def describe(endpoint: Endpoint) -> str:
    """What an operator may be shown of ``endpoint``: a stdio server's command without its
    arguments and environment, a remote server's URL without its user info and query
    (any of them may hold a secret), never the headers."""
    if isinstance(endpoint, RemoteEndpoint):
        return public_url(endpoint.url)
    return endpoint.command


#: How a proxied server is reached.
Endpoint = StdioCommand | RemoteEndpoint


@dataclass(frozen=True, slots=True)
class Connection:
    """One incarnation's stream to the server; ``pid`` for a child process, ``url`` (no
    query) for a remote one, and what to call its end when the stream just ended."""

    stream: MessageStream
    pid: int | None = None
    url: str | None = None
    ended: str = "it exited"


@asynccontextmanager
async def open_endpoint(
    endpoint: Endpoint,
    *,
    name: str,
    record: ChildRecord,
    max_message_bytes: int,
    stop_grace: float,
    exited: Callable[[int | None], None] | None = None,
) -> AsyncIterator[Connection]:
    """Reach the server: start its process (its stderr logged meanwhile; stopped on exit:
    stdin closed, then SIGTERM and SIGKILL to its group), or connect to its URL (closed on
    exit). Raises ``OSError`` (a command that cannot start) or
    :class:`~runtime.mcp.client.ServerGone` (a URL that cannot be reached or refuses us)."""
    if isinstance(endpoint, RemoteEndpoint):
        where = public_url(endpoint.url)
        ended = "its connection closed"
        if endpoint.url.startswith(("ws://", "wss://")):
            async with open_ws_stream(
                endpoint.url, endpoint.headers, name=name, max_message_bytes=max_message_bytes
            ) as ws:
                yield Connection(ws, url=where, ended=ended)
        else:
            async with open_http_stream(
                endpoint.url, endpoint.headers, name=name, max_message_bytes=max_message_bytes
            ) as http:
                yield Connection(http, url=where, ended=ended)
        return
    env = {**os.environ, **endpoint.env} if endpoint.env else None
    child = await start_child(
        [endpoint.command, *endpoint.args], name=name, record=record, env=env, cwd=endpoint.cwd
    )
    process = child.process
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log_stderr, process.stderr, name)
            yield Connection(
                StdioStream(
                    process.stdin, process.stdout, name=name, max_message_bytes=max_message_bytes
                ),
                pid=child.pid,
            )
            nursery.cancel_scope.cancel()
    finally:
        status = await child.stop(stop_grace)
        if exited is not None:
            exited(status)  # how the process ended, for the server's last error


class ProxiedServer:
    """One proxied server (module doc): a stdio child process or a remote endpoint.
    ``name`` names it in logs, errors, status."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        record: ChildRecord,
        max_message_bytes: int,
        max_pending: int = 64,
        max_restarts: int = 5,
        restart_period: float = 60.0,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        retry_after: float = 60.0,
        stop_grace: float = 2.0,
        on_tools_changed: Callable[[ProxiedServer], None] | None = None,
    ) -> None:
        self.name = name
        self._endpoint = endpoint
        #: What ``exai status`` shows of how it is reached (:func:`describe`).
        self.endpoint = describe(endpoint)
        self._record = record
        self._max_message_bytes = max_message_bytes
        self._max_pending = max_pending
        self._intensity = RestartIntensity(max_restarts, restart_period)
        self._backoff = (backoff, max_backoff)
        self._retry_after = retry_after
        self._stop_grace = stop_grace
        self._on_tools_changed = on_tools_changed
        self.state = ServerState.STARTING
        self.tools: tuple[ToolDescriptor, ...] = ()
        self.server: InitializedServer | None = None
        #: Starts after the first, and why the last incarnation ended.
        self.restarts = 0
        self.last_error: str | None = None
        self.pid: int | None = None
        #: How the last incarnation's process ended (``Child.stop``): for ``last_error``.
        self._exit_status: int | None = None
        self._session: ClientSession | None = None
        self._nursery: trio.Nursery | None = None
        self._relisting = False
        self._relist_owed = False
        self._log_throttle = LogThrottle()
        self._up = trio.Event()
        #: Set once the first start ended, up or not (the node waits for it: docs/tools.md).
        self.first_start = trio.Event()
        self._changed = trio.Event()

    # -- what calls use -----------------------------------------------------------------------

    async def wait_up(self) -> None:
        """Return once the server is up the first time (tests, start-up ordering)."""
        await self._up.wait()

    async def wait_for(self, state: ServerState) -> None:
        """Return once the server is in ``state`` (at once if it is)."""
        while self.state is not state:
            await self._changed.wait()

    async def call(
        self,
        tool: str,
        arguments: Mapping[str, Any] | None,
        *,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """``tools/call`` on the server: its ``CallToolResult`` as it sent it.

        Raises :class:`ServerDown` (not up now), and what
        :meth:`~runtime.mcp.client.ClientSession.request` raises (``ServerGone`` if it died
        mid-call, ``ServerError`` for its JSON-RPC error). Cancellation: the server is sent
        ``notifications/cancelled``.
        """
        session = self._session
        if session is None or self.state is not ServerState.UP:
            raise ServerDown(self._why_not_up())
        return await session.request(
            "tools/call",
            {"name": tool, "arguments": dict(arguments or {})},
            on_progress=on_progress,
        )

    def _why_not_up(self) -> str:
        if self.state is ServerState.DOWN:
            return (
                f"proxied server {self.name!r} is down (it failed {self.restarts} times: "
                f"{self.last_error}); it is tried again within {self._retry_after:g} s"
            )
        return f"proxied server {self.name!r} is starting; retry in a moment"

    # -- the child ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the server running (module doc). Returns only when cancelled."""
        delay, max_delay = self._backoff
        while True:
            started_at = trio.current_time()
            self._exit_status = None
            try:
                self.last_error = await self._serve_once()
            except* (OSError, ClientError) as failed:
                # Raised in the incarnation's nursery, so grouped: the first says why.
                self.last_error = str(_first(failed))[:500]
            self.last_error += _exit_text(self._exit_status)
            self._set_state(ServerState.STARTING)
            self.first_start.set()
            log.warning("server.ended", server=self.name, why=self.last_error)
            now = trio.current_time()
            if now - started_at > self._intensity.period:
                delay = self._backoff[0]  # it ran long enough: a fresh start
            self.restarts += 1
            if not self._intensity.allow(now):
                self._set_state(ServerState.DOWN)
                log.error(
                    "server.down",
                    server=self.name,
                    restarts=self.restarts,
                    retry_after=self._retry_after,
                    why=self.last_error,
                )
                await trio.sleep(self._retry_after)
                self._intensity = RestartIntensity(
                    self._intensity.max_restarts, self._intensity.period
                )
                delay = self._backoff[0]
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def _serve_once(self) -> str:
        """One incarnation: connect, handshake, list, serve until the stream ends; why it
        ended."""
        async with open_endpoint(
            self._endpoint,
            name=self.name,
            record=self._record,
            max_message_bytes=self._max_message_bytes,
            stop_grace=self._stop_grace,
            exited=self._exited,
        ) as connection:
            return await self._serve(connection)

    def _exited(self, status: int | None) -> None:
        self._exit_status = status

    async def _serve(self, connection: Connection) -> str:
        self.pid = connection.pid
        session = ClientSession(
            connection.stream,
            name=f"proxied server {self.name!r}",
            client_info=CLIENT_INFO,
            max_pending=self._max_pending,
            on_notification=self._notified,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                reader_done = trio.Event()

                async def read() -> None:
                    try:
                        await session.run()
                    finally:
                        # At once, before any failed call's caller runs again: nobody
                        # may see the server "up" with its stream gone.
                        self._session = None
                        self._set_state(ServerState.STARTING)
                        reader_done.set()
                        nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                with trio.fail_after(30):
                    self.server = await session.initialize()
                    tools = await session.list_tools()
                self._session = session
                self.tools = tuple(tools)
                self._set_state(ServerState.UP)
                self._up.set()
                self.first_start.set()
                log.info(
                    "server.up",
                    server=self.name,
                    pid=connection.pid,
                    url=connection.url,
                    tools=len(tools),
                    version=self.server.protocol_version,
                )
                await reader_done.wait()
        except* trio.TooSlowError:
            raise ClientError(
                f"proxied server {self.name!r} did not answer initialize in 30 s"
            ) from None
        finally:
            self._session = None
            self._nursery = None
            self.pid = None
        return session.broke or connection.ended

    def _notified(self, note: jsonrpc.Notification) -> None:
        if note.method == "notifications/tools/list_changed" and self._nursery is not None:
            # At most one listing runs, and one more is owed however many notifications
            # come meanwhile: a server that floods them costs one tools/list at a time.
            if self._relisting:
                self._relist_owed = True
            else:
                self._relisting = True
                self._nursery.start_soon(self._relist)
        elif note.method == "notifications/message":
            self._log_throttle.emit(
                log.info,
                "server.log",
                key=f"server.log:{self.name}",
                server=self.name,
                level=str((note.params or {}).get("level"))[:16],
            )

    async def _relist(self) -> None:
        try:
            while True:
                self._relist_owed = False
                session = self._session
                if session is None:
                    return
                try:
                    self.tools = tuple(await session.list_tools())
                except ClientError as error:
                    log.warning("server.relist_failed", server=self.name, error=str(error)[:500])
                    return
                if self._on_tools_changed is not None:
                    self._on_tools_changed(self)
                if not self._relist_owed:
                    return
        finally:
            self._relisting = False

    def _set_state(self, state: ServerState) -> None:
        changed = state is not self.state
        self.state = state
        if changed:
            self._changed.set()
            self._changed = trio.Event()
            if self._on_tools_changed is not None:
                self._on_tools_changed(self)


def _exit_text(status: int | None) -> str:
    """`` (exit status 1)``, `` (killed by SIGKILL)``: how a process ended, as
    :attr:`trio.Process.returncode` says it (negative: the signal); empty if unknown."""
    if status is None:
        return ""
    if status < 0:
        try:
            return f" (killed by {signal.Signals(-status).name})"
        except ValueError:
            return f" (killed by signal {-status})"
    return f" (exit status {status})"


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first
