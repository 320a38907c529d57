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
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

log = structlog.get_logger("bridge")

SERVER_UNREACHABLE = -32002
CONNECTION_LOST = -32003
_REPLAYED_ID = "exai-bridge/replayed-initialize"


@dataclass
class _Relay:
    """What the bridge must remember across connections."""

    url: str
    token: str
    give_up_after: float
    write_line: Callable[[str], Awaitable[None]]
    session_id: str | None = None
    #: The client's initialize, once it has reached a server: replayed on a new session.
    initialize: dict[str, Any] | None = None
    #: Requests sent to the server and not yet answered, by id.
    pending: set[str | int] = field(default_factory=set)
    ws: WebSocketConnection | None = None
    connected: trio.Event = field(default_factory=trio.Event)
    away_since: float | None = None

    def attach(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.away_since = None
        self.connected.set()

    def detach(self, ws: WebSocketConnection) -> None:
        """``ws`` is dead. Idempotent, so that whoever notices first (a sender or the
        connection task) makes the one transition, and waiters see exactly one new event."""
        if self.ws is ws:
            self.ws = None
            self.connected = trio.Event()
            if self.away_since is None:
                self.away_since = trio.current_time()

    async def answer_error(self, request_id: str | int, code: int, message: str) -> None:
        error = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
        await self.write_line(json.dumps(error))


async def run_bridge(
    url: str,
    token: str,
    *,
    give_up_after: float = 30.0,
    stdin: trio.abc.ReceiveStream | None = None,
    stdout: trio.abc.SendStream | None = None,
) -> None:
    """Relay until stdin ends; then close the WebSocket cleanly (ending the session)."""
    stdin = stdin or trio.lowlevel.FdStream(0)
    stdout = stdout or trio.lowlevel.FdStream(1)
    out_lock = trio.Lock()

    async def write_line(line: str) -> None:
        async with out_lock:
            await stdout.send_all(line.encode() + b"\n")

    relay = _Relay(url=url, token=token, give_up_after=give_up_after, write_line=write_line)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_keep_connected, relay)
        await _pump_stdin(relay, stdin)
        if relay.ws is not None:
            with trio.move_on_after(5):
                await relay.ws.aclose(1000, "client ended the session")
        nursery.cancel_scope.cancel()


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
    """Wait for a connection for whatever is left of the give-up period."""
    away_since = relay.away_since if relay.away_since is not None else trio.current_time()
    with trio.move_on_at(away_since + relay.give_up_after):
        while relay.ws is None:
            await relay.connected.wait()
        return True
    return False


async def _keep_connected(relay: _Relay) -> None:
    delay = 0.05
    while True:
        try:
            await _one_connection(relay)
            delay = 0.05
        except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
            if isinstance(exc, ConnectionRejected) and exc.status_code == 404:
                log.warning("bridge.session_expired", session_id=relay.session_id)
                relay.session_id = None  # start over; initialize is replayed
                continue
            log.info("bridge.reconnecting", error=repr(exc), delay=delay)
        if relay.away_since is None:  # never connected yet
            relay.away_since = trio.current_time()
        await trio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def _one_connection(relay: _Relay) -> None:
    headers = [(b"authorization", f"Bearer {relay.token}".encode())]
    if relay.session_id is not None:
        headers.append((b"mcp-session-id", relay.session_id.encode()))
    async with open_websocket_url(
        relay.url, subprotocols=["mcp"], extra_headers=headers, max_message_size=64 * 2**20
    ) as ws:
        resumed = relay.session_id is not None
        relay.session_id = dict(ws.handshake_headers).get(b"mcp-session-id", b"").decode() or None
        log.info("bridge.connected", session_id=relay.session_id, resumed=resumed)
        if not resumed and relay.initialize is not None:
            await _replay_initialize(ws, relay.initialize)
        relay.attach(ws)
        try:
            while True:
                frame = await ws.get_message()
                text = frame if isinstance(frame, str) else frame.decode()
                relay.pending.discard(_response_id(text))
                await relay.write_line(text.replace("\n", " "))
        finally:
            relay.detach(ws)
            lost, relay.pending = relay.pending, set()
            with trio.CancelScope(shield=True):
                for request_id in sorted(lost, key=str):
                    await relay.answer_error(
                        request_id,
                        CONNECTION_LOST,
                        "connection to the exai server was lost while this request ran; "
                        "it may or may not have completed",
                    )


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


def _redact(url: str) -> str:
    return url.split("?", 1)[0]
