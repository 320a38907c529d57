"""The session actor's loop: one mailbox message at a time, each to the part that handles it.

A request goes to the method table (``methods``), a ``tools/call`` to the call runner
(``calls``, which runs it as a task), a batch to the call runner too, a notification to the
method table. It handles its mailbox one message at a time, so the session's state needs no
locks. ``ping`` and ``notifications/cancelled`` normally never enter the mailbox at all (see
``reader``).

What survives a crash lives in :class:`~actors.session.state.SessionState`, owned by the
session, not the actor: the session id, negotiated version, client info, log level, and the
ids of requests being handled. When an incarnation crashes, every request it was handling is
answered with ``SessionRestarted`` (-32001) and the next incarnation (``runner``'s restart
loop) reads the same mailbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from actors.persistence import PersistenceClient
from actors.session.calls import CallRunner
from actors.session.config import SessionConfig
from actors.session.mail import Mail, Message, ToolsChanged
from actors.session.methods import SessionMethods
from actors.session.state import RequestId, SessionState
from runtime import trace
from runtime.actor import Actor
from runtime.connection import Connection, ConnectionGone
from runtime.log_throttle import LogThrottle
from runtime.mailbox import ActorRef
from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import RpcError, SessionRestarted
from runtime.mcp.tools import ToolRegistry

__all__ = ["Mail", "Message", "SessionActor", "ToolsChanged"]


class SessionActor(Actor[Mail]):
    """One incarnation of a session's actor. A restart makes a new one over the same state."""

    def __init__(
        self,
        state: SessionState,
        connection: Connection,
        tools: ToolRegistry,
        persistence: PersistenceClient,
        config: SessionConfig,
        *,
        mailbox: ActorRef[Any] | None = None,
        meter: trace.Meter | None = None,
        refusals: LogThrottle | None = None,
    ) -> None:
        self.path = f"/root/sessions/{state.session_id}"
        self._mailbox = mailbox
        self._meter = meter
        #: The session's refusals (calls it would not admit) are logged through this, at
        #: most one line per kind and period: a client may send them as fast as it likes.
        #: The session's own (``LiveSession.refusals``), so a restart does not reset it.
        self._refusals = refusals if refusals is not None else LogThrottle()
        self.state = state
        self._connection = connection
        self._send = connection.send
        self.methods = SessionMethods(state, tools, persistence, config)
        self.calls = CallRunner(
            state,
            connection,
            self.methods,
            tools=tools,
            persistence=persistence,
            config=config,
            path=self.path,
            refusals=self._refusals,
        )
        #: The request taken from the mailbox and not yet answered or handed to a task: a
        #: crash here must still answer it.
        self._current: RequestId | None = None

    @asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        # Tool calls belong to the incarnation that started them: a crash cancels them.
        async with self.calls.lifetime():
            yield

    async def receive(self, mail: Mail) -> None:
        # One trace event per message: the trace it starts (or continues) is bound while it
        # is handled, and tool-call tasks started here inherit it.
        message, mark = mail.message, mail.mark
        kind, rpc_id = _describe(message)
        mailbox = self._mailbox
        with trace.handling(
            self.path,
            kind,
            postmark=mark,
            session_id=self.state.session_id,
            rpc_id=rpc_id,
            depth=mailbox.depth if mailbox is not None else None,
            capacity=mailbox.capacity if mailbox is not None else None,
            meter=self._meter,
        ) as traced:
            refusal = await self._receive(message)
            if refusal is not None:
                # One line per kind of refusal (method and code) and period; the meter (status'
                # messages_failed, the exai_actor_messages_failed_total metric) counts each.
                traced.refused(
                    refusal.message, throttle=self._refusals, key=f"{kind}:{refusal.code}"
                )

    async def _receive(self, message: Message) -> RpcError | None:
        """Handle one message; the error a ``tools/call`` was refused with, if it was."""
        refusal = None
        if isinstance(message, jsonrpc.Request):
            if self.state.dequeued(message.id) and message.method != "initialize":
                self.methods.log.debug("session.dropped_cancelled", id=message.id)
                return None  # cancelled while queued: no response, as for any cancelled one
            self._current = message.id
            if message.method == "tools/call":
                refusal = await self.calls.start(message)
            elif message.method == "tasks/result":
                # It may wait as long as its task runs: a task of the call runner, as a call.
                refusal = await self.calls.task_result(message)
            else:
                await self._answer(message)
            self._current = None
        elif isinstance(message, jsonrpc.Notification):
            self.methods.notify(message)
        elif isinstance(message, jsonrpc.Batch):
            await self.calls.batch(message)
        elif isinstance(message, ToolsChanged):
            await self._tools_changed()
        else:
            # We send no requests, so a response correlates with nothing (the reader drops
            # them before the mailbox; this is only a guard).
            self.methods.log.debug("session.unexpected_response", id=message.id)
        return refusal

    async def _tools_changed(self) -> None:
        """``notifications/tools/list_changed`` to a client of the handshake era once it is
        initialized (MCP ``server/tools``: sent by a server that declared
        ``tools.listChanged``). A 2026-07-28 client asks for it on ``subscriptions/listen``
        instead, and a sessionless session has no stream of its own to carry it."""
        state = self.state
        version = state.protocol_version
        if not state.initialized or version is None or versions.is_modern(version):
            return
        if state.sessionless:
            return
        with contextlib.suppress(ConnectionGone):
            await self._send(jsonrpc.encode_notification("notifications/tools/list_changed"), None)

    async def _answer(self, request: jsonrpc.Request) -> None:
        """A request other than ``tools/call``: answered here, in order."""
        state = self.state
        state.handling(request.id)
        await self._send(await self.methods.reply(request), request.id)
        state.answered(request.id)

    async def on_failure(self, error: Exception) -> None:
        """Tell each request this incarnation was handling that it did not complete."""
        orphans = self.state.take_unanswered()
        if self._current is not None:
            orphans.add(self._current)
        # Said before the supervisor decides whether this incarnation is restarted or the
        # session gives up (then its connection closes with 1011): true in both cases.
        failure = SessionRestarted(
            "session failed with an internal error and is restarted, or closed if it keeps "
            "failing; this request did not complete and may be retried"
        )
        for request_id in sorted(orphans, key=str):
            try:
                self._connection.send_nowait(jsonrpc.encode_error(request_id, failure), request_id)
            except ConnectionGone:
                return


def _describe(message: Message) -> tuple[str, RequestId | None]:
    """The trace event's ``kind`` and ``rpc_id`` for a mailbox message."""
    if isinstance(message, jsonrpc.Request):
        return message.method, message.id
    if isinstance(message, jsonrpc.Notification):
        return message.method, None
    if isinstance(message, jsonrpc.Batch):
        return "batch", None
    if isinstance(message, ToolsChanged):
        return "tools_changed", None
    return "response", message.id
