"""``exai bridge``: a stdio MCP server that relays to a remote exai-runtime over WebSocket.

IDE clients that only speak stdio launch this as their "server"; it forwards every line of
stdin as one WebSocket text frame and every frame back as one line of stdout (MCP's stdio
framing: newline-delimited JSON, no embedded newlines).

When the WebSocket drops, the bridge reconnects presenting the session id the server gave it
(``Mcp-Session-Id``), so the session resumes with its negotiated state. Requests that were in
flight at the drop are answered with an error right away (the server cancelled them; whether
they took effect is unknown). If the server no longer knows the session (its resume grace
passed, or it restarted), the bridge replays the client's own ``initialize`` on a new session
and swallows that answer, so the client carries on. While the server stays away longer than
``give_up_after``, requests are answered at once with a clear error instead of waiting.

A link can also die without either end being told (a NAT that forgot the mapping, a laptop
asleep): while the server has sent nothing for ``ping_interval`` seconds the bridge pings it
(RFC 6455 section 5.5.2, the same check the server makes of its peers,
:mod:`runtime.keepalive`), and a Pong missing for ``ping_timeout`` seconds counts as a drop.

Two things end the relaying for good:

* stdin closed. MCP's stdio transport ends that way ("the client SHOULD initiate shutdown by
  first closing the input stream to the child process", MCP specification, Lifecycle,
  Shutdown), and the client kills the process soon after (the SDKs wait about 2 s). The
  bridge closes its session with 1000 (the server then ends it instead of parking it) and
  returns, without reconnecting.
* the server refused the token (HTTP 401 or 403 at the handshake). Retrying cannot help, so
  the bridge says so once on stderr (``bridge.token_refused``) and answers every request
  with :data:`TOKEN_REFUSED` until stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from runtime.keepalive import keep_alive
from runtime.listener import PeerStream

log = structlog.get_logger("bridge")

#: JSON-RPC error codes of the bridge's own answers (the server-defined range, -32000..-32099,
#: of JSON-RPC 2.0 section 5.1). The server's own are in runtime/mcp/errors.py.
SERVER_UNREACHABLE = -32002
CONNECTION_LOST = -32003
TOKEN_REFUSED = -32006

#: Seconds a clean close (1000) may take before the bridge just closes the socket.
CLOSE_TIMEOUT = 5.0
MAX_MESSAGE_BYTES = 64 * 2**20
_REPLAYED_ID = "exai-bridge/replayed-initialize"
#: HTTP statuses of a refused credential (RFC 9110 sections 15.5.2 and 15.5.4).
_REFUSED = (401, 403)


@dataclass(frozen=True)
class _Target:
    """Where to connect, from a ``ws://`` or ``wss://`` URL (RFC 6455 section 3)."""

    host: str
    port: int
    resource: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> _Target:
        """Raises ``ValueError`` for anything but a ws/wss URL with a host."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {_redact(url)}")
        tls = parts.scheme == "wss"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, parts.port or (443 if tls else 80), resource, tls)

    @property
    def host_header(self) -> str:
        """``Host`` (RFC 9110 section 7.2): an IPv6 literal in brackets, a default port left
        out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


@dataclass
class _Relay:
    """What the bridge must remember across connections."""

    url: str
    target: _Target
    token: str
    give_up_after: float
    ping_interval: float
    ping_timeout: float
    write_line: Callable[[str], Awaitable[None]]
    session_id: str | None = None
    #: The client's initialize, once it has reached a server: replayed on a new session.
    initialize: dict[str, Any] | None = None
    #: Requests sent to the server and not yet answered, by id.
    pending: set[str | int] = field(default_factory=set)
    ws: WebSocketConnection | None = None
    #: Set when a connection is attached or the token is refused; replaced on each detach.
    changed: trio.Event = field(default_factory=trio.Event)
    away_since: float | None = None
    #: Why every request is now refused (the server refused the token), once it did.
    refused: str | None = None
    #: stdin has ended: close the session with 1000 and connect no more.
    stdin_closed: trio.Event = field(default_factory=trio.Event)

    def attach(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.away_since = None
        self.changed.set()

    def detach(self, ws: WebSocketConnection) -> None:
        """``ws`` is dead. Idempotent, so that whoever notices first (a sender or the
        connection task) makes the one transition, and waiters see exactly one new event."""
        if self.ws is ws:
            self.ws = None
            self.changed = trio.Event()
            if self.away_since is None:
                self.away_since = trio.current_time()

    def refuse(self, status: int) -> None:
        self.refused = (
            f"the exai server at {_redact(self.url)} refused the token (HTTP {status}); "
            "the request was not sent. Check EXAI_TOKEN or --token-file"
        )
        log.error(
            "bridge.token_refused",
            url=_redact(self.url),
            status=status,
            hint="check EXAI_TOKEN or --token-file; requests are answered with an error",
        )
        self.changed.set()

    async def answer_error(self, request_id: str | int, code: int, message: str) -> None:
        error = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
        await self.write_line(json.dumps(error))


async def run_bridge(
    url: str,
    token: str,
    *,
    give_up_after: float = 30.0,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
    stdin: trio.abc.ReceiveStream | None = None,
    stdout: trio.abc.SendStream | None = None,
) -> None:
    """Relay until stdin ends; then close the session (1000) and return.

    ``give_up_after``, ``ping_interval`` and ``ping_timeout`` are seconds. Raises
    ``ValueError`` if ``url`` is not a ws:// or wss:// URL.
    """
    target = _Target.parse(url)
    stdin = stdin or trio.lowlevel.FdStream(0)
    stdout = stdout or trio.lowlevel.FdStream(1)
    out_lock = trio.Lock()

    async def write_line(line: str) -> None:
        async with out_lock:
            # A client that closed our stdout is going away: nobody left to tell.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stdout.send_all(line.encode() + b"\n")

    relay = _Relay(
        url=url,
        target=target,
        token=token,
        give_up_after=give_up_after,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        write_line=write_line,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_keep_connected, relay)
        await _pump_stdin(relay, stdin)
        relay.stdin_closed.set()
        if relay.ws is None:
            # Not connected (away, refused, or still connecting): no session to close.
            nursery.cancel_scope.cancel()
        # Else the connection task closes the session with 1000 and _keep_connected
        # returns, which ends the nursery.


async def _pump_stdin(relay: _Relay, stdin: trio.abc.ReceiveStream) -> None:
    buffer = b""
    while True:
        chunk = await stdin.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            if raw.strip():
                await _forward(relay, raw.decode("utf-8", errors="replace"))


async def _forward(relay: _Relay, line: str) -> None:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        message = None  # the server answers malformed input itself (-32700)
    request_id = _request_id(message)
    while True:
        if relay.refused is not None:
            if request_id is not None:
                await relay.answer_error(request_id, TOKEN_REFUSED, relay.refused)
            return
        ws = relay.ws
        if ws is None:
            if request_id is None:
                return  # a notification for a server that is away: nobody to tell
            if not await _wait_for_server(relay):
                await relay.answer_error(
                    request_id,
                    SERVER_UNREACHABLE,
                    f"exai server at {_redact(relay.url)} unreachable for "
                    f"{relay.give_up_after:g} s; the request was not sent",
                )
                return
            continue
        if request_id is not None:
            relay.pending.add(request_id)
        try:
            await ws.send_message(line)
        except ConnectionClosed:
            # Not sent: forget it here (it is not "lost") and wait for the next connection.
            if request_id is not None:
                relay.pending.discard(request_id)
            relay.detach(ws)
            continue
        if isinstance(message, dict) and message.get("method") == "initialize":
            relay.initialize = message
        return


async def _wait_for_server(relay: _Relay) -> bool:
    """Wait for a connection (or a refusal) for whatever is left of the give-up period."""
    away_since = relay.away_since if relay.away_since is not None else trio.current_time()
    with trio.move_on_at(away_since + relay.give_up_after):
        while relay.ws is None and relay.refused is None:
            await relay.changed.wait()
        return True
    return False


#: How a connection attempt or a live connection fails, short of a refused handshake.
_CONNECTION_FAILURES = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.TooSlowError,
)


async def _keep_connected(relay: _Relay) -> None:
    """Connect, and reconnect after each drop, until stdin closes or the token is refused."""
    delay = 0.05
    while True:
        rejected: int | None = None
        failure: BaseException | None = None
        try:
            await _one_connection(relay)
        except* ConnectionRejected as group:
            failure = _first(group)
            rejected = cast(ConnectionRejected, failure).status_code
        except* _CONNECTION_FAILURES as group:
            failure = _first(group)
        if relay.stdin_closed.is_set():
            return
        if rejected is not None and rejected in _REFUSED:
            relay.refuse(rejected)
            return
        if rejected == 404:
            log.warning("bridge.session_expired", session_id=relay.session_id)
            relay.session_id = None  # start over; initialize is replayed
            continue
        if failure is None:
            delay = 0.05  # it was up: try again at once
        log.info(
            "bridge.reconnecting",
            error=None if failure is None else repr(failure),
            delay=delay,
        )
        if relay.away_since is None:  # never connected yet
            relay.away_since = trio.current_time()
        await trio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def _one_connection(relay: _Relay) -> None:
    """One WebSocket connection, from the TCP connect to its end; raises how it failed.

    Built by hand (trio-websocket's ``wrap_client_stream``) rather than with
    ``open_websocket_url`` so that the socket is a :class:`PeerStream`, which records when
    bytes last arrived: the ping check (:func:`runtime.keepalive.keep_alive`) counts any byte
    as a sign of life, so a long message still arriving is not taken for silence. Connecting
    and the opening handshake get ``ping_timeout`` seconds, as a Pong does.
    """
    target = relay.target
    with trio.fail_after(relay.ping_timeout):
        socket = await trio.open_tcp_stream(target.host, target.port)
    stream = PeerStream(socket)
    transport: trio.abc.Stream = stream
    if target.tls:
        transport = trio.SSLStream(
            stream,
            ssl.create_default_context(),
            server_hostname=target.host,
            https_compatible=True,  # as trio-websocket: a close_notify is not required
        )
    headers = [(b"authorization", f"Bearer {relay.token}".encode())]
    if relay.session_id is not None:
        headers.append((b"mcp-session-id", relay.session_id.encode()))
    try:
        async with trio.open_nursery() as nursery:  # the connection's own tasks
            with trio.fail_after(relay.ping_timeout):
                ws = await wrap_client_stream(
                    nursery,
                    # Typed for the two stream classes trio-websocket opens itself; it uses
                    # only the trio.abc.Stream interface.
                    cast(trio.SocketStream, transport),
                    target.host_header,
                    target.resource,
                    subprotocols=["mcp"],
                    extra_headers=headers,
                    max_message_size=MAX_MESSAGE_BYTES,
                )
            await _relay_frames(relay, ws, stream, nursery)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(transport)


async def _relay_frames(
    relay: _Relay, ws: WebSocketConnection, stream: PeerStream, nursery: trio.Nursery
) -> None:
    """Relay frames to stdout until the connection ends; at stdin's end, close it with 1000
    (the reader task in ``nursery`` completes the closing handshake)."""
    resumed = relay.session_id is not None
    relay.session_id = dict(ws.handshake_headers).get(b"mcp-session-id", b"").decode() or None
    log.info("bridge.connected", session_id=relay.session_id, resumed=resumed)
    if not resumed and relay.initialize is not None:
        await _replay_initialize(ws, relay.initialize)
    nursery.start_soon(
        partial(
            keep_alive,
            ws,
            stream,
            interval=relay.ping_interval,
            pong_timeout=relay.ping_timeout,
            session_id=relay.session_id or "",
        )
    )
    with trio.CancelScope() as reading:
        nursery.start_soon(_cancel_when_set, relay.stdin_closed, reading)
        relay.attach(ws)
        try:
            while True:
                frame = await ws.get_message()
                text = frame if isinstance(frame, str) else frame.decode()
                relay.pending.discard(_response_id(text))
                await relay.write_line(text.replace("\n", " "))
        except ConnectionClosed:
            pass
        finally:
            relay.detach(ws)
            lost, relay.pending = relay.pending, set()
            if not relay.stdin_closed.is_set():  # else the client is leaving: nobody waits
                with trio.CancelScope(shield=True):
                    for request_id in sorted(lost, key=str):
                        await relay.answer_error(
                            request_id,
                            CONNECTION_LOST,
                            "connection to the exai server was lost while this request "
                            "ran; it may or may not have completed",
                        )
    if relay.stdin_closed.is_set():
        # The client ended the session: 1000 tells the server not to park it for a resume.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose(1000, "the client closed stdin")


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _replay_initialize(ws: WebSocketConnection, initialize: dict[str, Any]) -> None:
    """A new session behind the client's back: negotiate it as the client did."""
    await ws.send_message(json.dumps({**initialize, "id": _REPLAYED_ID}))
    while _response_id(await _text(ws)) != _REPLAYED_ID:
        pass
    await ws.send_message(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))


async def _text(ws: WebSocketConnection) -> str:
    frame = await ws.get_message()
    return frame if isinstance(frame, str) else frame.decode()


def _request_id(message: object) -> str | int | None:
    if isinstance(message, dict) and "method" in message:
        request_id = message.get("id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            return request_id
    return None


def _response_id(text: str) -> str | int | None:
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(message, dict) and "method" not in message:
        request_id = message.get("id")
        if isinstance(request_id, str | int):
            return request_id
    return None


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of ``group`` (nested groups flattened)."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _redact(url: str) -> str:
    return url.split("?", 1)[0]
