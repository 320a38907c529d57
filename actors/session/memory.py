"""A whole session over the in-memory transport (``runtime.memory_transport``), no socket.

The same session as over WebSocket (its row written, reader, mailbox, supervised actor, tool
calls, persistence, its end recorded), driven by a
:class:`~runtime.memory_transport.MemoryClient`::

    async with memory_session(services) as session:
        reply = await session.client.request(1, "initialize", {...})

What differs is only what is WebSocket's: nothing is parked (the client closing ends the
session, as a clean close does), and the outgoing side is unbounded (no stall, no 1008).
A session whose actor gives up is closed with 1011, as the sessions supervisor does.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio

from actors.session.config import SessionServices
from actors.session.runner import end_session, open_session, run_session
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime.connection import CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON, CLOSE_NORMAL
from runtime.memory_transport import MemoryClient, MemoryTransport, memory_pair
from runtime.supervision import Supervisor, run_root

__all__ = ["MemorySession", "memory_session"]

log = structlog.get_logger("session")


@dataclass(eq=False)
class MemorySession:
    """A running in-memory session: its client, its state (read only), and its end."""

    client: MemoryClient
    state: SessionState
    #: Set once the session is over and its end recorded.
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def session_id(self) -> str:
        return self.state.session_id


@asynccontextmanager
async def memory_session(
    services: SessionServices,
    *,
    session_id: str | None = None,
    identity: str = "default",
    remote: str = "memory",
) -> AsyncIterator[MemorySession]:
    """Open a session (its row written first: raises
    :class:`~actors.persistence.StorageUnavailable` if storage refuses it), run it in a task
    of this context, and on leaving close the client's side and wait for the session's
    recorded end. Cancelling the context cancels the session as a shutdown would.

    The session's actor is a child of ``services.sessions``, or, without one (no node), of
    a sessions supervisor of its own, run at ``/root/sessions`` for this context's duration.
    """
    state = await open_session(
        services,
        session_id=session_id or f"mem-{uuid.uuid4().hex}",
        remote=remote,
        identity=identity,
        transport="memory",
    )
    transport, client = memory_pair()
    session = MemorySession(client, state)
    async with trio.open_nursery() as nursery:
        supervisor = services.sessions
        stop_own: trio.Event | None = None
        if supervisor is None:
            supervisor, stop_own = Supervisor(concurrent_shutdown=True), trio.Event()
            await nursery.start(
                partial(run_root, supervisor, name="root/sessions", stop_requested=stop_own)
            )
        nursery.start_soon(_run, services, session, transport, supervisor)
        try:
            yield session
        finally:
            await client.aclose()
            await session.ended.wait()
            if stop_own is not None:
                stop_own.set()


async def _run(
    services: SessionServices,
    session: MemorySession,
    transport: MemoryTransport,
    supervisor: Supervisor,
) -> None:
    state = session.state
    try:
        await run_session(
            services,
            state,
            transport,
            transport.receive,
            attach=lambda ref: (
                services.registry.attach(
                    state.session_id,
                    state.identity,
                    LiveSession(state, ref, transport="memory"),
                    transport.close,
                ).session
            ),
            supervisor=supervisor,
        )
    except Exception:
        # Contained as the sessions supervisor contains a WebSocket session's failure.
        log.exception("session.crashed", session_id=state.session_id)
        await transport.close(CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON)
    finally:
        closed = transport.closed
        code, reason = (closed.code, closed.reason) if closed else (CLOSE_NORMAL, "closed")
        with trio.CancelScope(shield=True):
            await end_session(services, state, code, reason)
        session.ended.set()
