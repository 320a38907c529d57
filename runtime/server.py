"""The WebSocket endpoint ``ws://HOST:PORT/mcp`` and the sessions supervisor that owns sessions.

trio-websocket runs each connection's handler in a nursery it is given, and an exception that
escapes one handler cancels that nursery: every other client would be cut off with 1006 (it
serves through ``trio.serve_listeners``, whose docs warn that a handler's exception crashes the
server). So every connection runs inside :meth:`Sessions.run`, which is the one place a
session's failure stops: it is logged once with the session id, and only that socket is closed
(1011). The listener and the other sessions never see it.

Shutdown order (``stop()``): stop accepting (close the listener), close every session with 1001,
give them ``grace`` seconds to finish their last writes, then cancel what remains.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import partial
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import structlog
import trio
from trio_websocket import Endpoint, WebSocketConnection, WebSocketRequest, serve_websocket

from runtime.auth import ClientTokens, presented_token

log = structlog.get_logger("server")

MCP_PATH = "/mcp"
SUBPROTOCOL = "mcp"
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the handshake established about a connection before its session started.

    ``identity`` is the client identity the token named (``default`` for the node's own
    token); ``resumed`` is the state a :class:`SessionHost` handed back for a resumed session;
    the server never looks inside it.
    """

    session_id: str
    remote: str
    subprotocol: str | None
    identity: str
    resumed: object | None = None


class SessionHost(Protocol):
    """What runs sessions, as the server sees it (the actors implement it)."""

    def claim(self, session_id: str, identity: str) -> object | None:
        """Hand over a detached session's state to a new connection; ``None`` if there is no
        such session any more (unknown, or its resume grace has passed), or if it belongs to
        another client identity (a session carries its owner's identity)."""

    async def serve(self, ws: WebSocketConnection, handshake: Handshake) -> None:
        """Run the session to its end; raising ends only this session (see :class:`Sessions`)."""


class Sessions:
    """The sessions supervisor: every live session, its failures contained, its shutdown."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._live: dict[str, WebSocketConnection] = {}
        self._drained = trio.Event()
        self._drained.set()

    def __len__(self) -> int:
        return len(self._live)

    @property
    def full(self) -> bool:
        return len(self._live) >= self.max_sessions

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._live

    async def run(self, host: SessionHost, ws: WebSocketConnection, handshake: Handshake) -> None:
        """Run one session to its end. Never raises: a failure ends this session alone."""
        self._live[handshake.session_id] = ws
        self._drained = trio.Event() if len(self._live) == 1 else self._drained
        try:
            await host.serve(ws, handshake)
        except Exception:
            log.exception("session.crashed", session_id=handshake.session_id)
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await ws.aclose(CLOSE_INTERNAL_ERROR, "internal error; see server log")
        finally:
            del self._live[handshake.session_id]
            if not self._live:
                self._drained.set()

    async def close_all(self, code: int, reason: str) -> None:
        """Ask every session to end by closing its socket; returns when all have ended."""
        async with trio.open_nursery() as nursery:
            for ws in list(self._live.values()):
                nursery.start_soon(ws.aclose, code, reason)
        await self._drained.wait()


class McpWebSocketServer:
    """Accepts authenticated WebSocket connections on ``/mcp`` and hands each to a session."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        clients: ClientTokens,
        session_host: SessionHost,
        sessions: Sessions,
        max_message_bytes: int,
        grace: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._clients = clients
        self._session_host = session_host
        self.sessions = sessions
        self._max_message_bytes = max_message_bytes
        self._grace = grace
        self._stop = trio.Event()
        self.url = ""

    def stop(self) -> None:
        """Begin the shutdown described in the module docstring; ``run`` returns when done."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; reports the URL through ``task_status`` once listening."""
        async with trio.open_nursery() as session_nursery:
            async with trio.open_nursery() as listener_nursery:
                server = await listener_nursery.start(
                    partial(
                        serve_websocket,
                        self._accept,
                        self._host,
                        self._port,
                        None,
                        handler_nursery=session_nursery,
                        max_message_size=self._max_message_bytes,
                        # None: trio's 64 KiB reads, not trio-websocket's 4 KiB default, so a
                        # large message takes far fewer reads.
                        receive_buffer_size=None,
                    )
                )
                self.url = f"ws://{self._host}:{server.port}{MCP_PATH}"
                task_status.started(self.url)
                await self._stop.wait()
                listener_nursery.cancel_scope.cancel()
            log.info("server.draining", sessions=len(self.sessions))
            with trio.move_on_after(self._grace):
                await self.sessions.close_all(CLOSE_GOING_AWAY, "server shutting down")
            session_nursery.cancel_scope.cancel()

    async def _accept(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler: nothing may escape it (see the module docstring)."""
        try:
            await self._handshake(request)
        except Exception:
            # A peer vanishing mid-handshake is ordinary; anything else is our bug. Either way
            # it concerns this connection only.
            log.exception("handshake.failed", remote=str(request.remote))

    async def _handshake(self, request: WebSocketRequest) -> None:
        """Path, token and capacity are checked before anything else happens."""
        path = request.path.partition("?")[0]
        if path != MCP_PATH:
            await request.reject(404, body=b"not found: the MCP endpoint is /mcp\n")
            return
        identity = self._clients.identify(presented_token(request.path, request.headers))
        if identity is None:
            log.info("handshake.unauthorized", remote=str(request.remote))
            await request.reject(
                401,
                extra_headers=[(b"www-authenticate", b'Bearer realm="exai"')],
                body=b"unauthorized: present the token as 'Authorization: Bearer' or ?token=\n",
            )
            return
        if self.sessions.full:
            log.warning(
                "handshake.refused", reason="max sessions", limit=self.sessions.max_sessions
            )
            await request.reject(
                503,
                extra_headers=[(b"retry-after", b"1")],
                body=b"server busy: session limit reached, retry later\n",
            )
            return
        resume_id = _presented_session_id(request)
        resumed: object | None = None
        if resume_id is not None:
            if resume_id in self.sessions:
                await request.reject(
                    409,
                    body=f"session {resume_id} is attached to another connection\n".encode(),
                )
                return
            resumed = self._session_host.claim(resume_id, identity)
            if resumed is None:
                log.info("handshake.resume_refused", session_id=resume_id)
                await request.reject(
                    404,
                    body=(
                        f"session {resume_id} is unknown or its resume grace period has "
                        "passed; connect without a session id to start a new session\n"
                    ).encode(),
                )
                return
        offered = request.proposed_subprotocols
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        session_id = resume_id or str(uuid.uuid4())
        ws = await request.accept(
            subprotocol=subprotocol,
            extra_headers=[(b"mcp-session-id", session_id.encode())],
        )
        remote = request.remote
        handshake = Handshake(
            session_id=session_id,
            remote=f"{remote.address}:{remote.port}" if isinstance(remote, Endpoint) else remote,
            subprotocol=subprotocol,
            identity=identity,
            resumed=resumed,
        )
        await self.sessions.run(self._session_host, ws, handshake)


def _presented_session_id(request: WebSocketRequest) -> str | None:
    """``Mcp-Session-Id`` header, else ``?session=`` (the official clients set no headers)."""
    for name, value in request.headers:
        if name.lower() == b"mcp-session-id":
            return value.decode("latin-1").strip() or None
    values = parse_qs(urlsplit(request.path).query).get("session")
    return values[0] if values else None
