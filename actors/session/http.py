"""A session over Streamable HTTP (2025-era ``Mcp-Session-Id`` sessions): opened, run, ended.

The session itself is the one every transport runs (:func:`~actors.session.runner.
run_session`: its reader and its supervised actor, a child of ``/root/sessions``); what is
HTTP's lives in :mod:`runtime.streamable_http` (the exchanges, the response streams, the idle
expiry). Unlike a WebSocket session it is never parked: it does not depend on any one
connection, so a dropped connection changes nothing for it. A request naming its id on
another node is served there from a claim of its row (``actors.session.handover``). It
ends when its transport closes (DELETE: 1000; idle expiry: 1000; the drain: 1001) or its
actor gives up (1011), and its end is recorded as every session's is (``session.closed``).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors.session.actor import Mail
from actors.session.config import SessionServices
from actors.session.runner import end_session, open_session, run_session
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INTERNAL_ERROR_REASON,
)
from runtime.mailbox import ActorRef
from runtime.streamable_http.session_transport import HttpSessionTransport
from runtime.supervision import Supervisor

__all__ = ["serve_http_session"]


async def serve_http_session(
    services: SessionServices,
    supervisor: Supervisor,
    transport: HttpSessionTransport,
    *,
    remote: str,
    idle_timeout: float,
    started: Callable[[], None],
    adopted: SessionState | None = None,
) -> None:
    """Open the session (its row written: raises
    :class:`~storage.errors.StorageUnavailable` before ``started`` if storage refuses it),
    call ``started``, and run it until ``transport`` closes, which its idle expiry does
    after ``idle_timeout`` seconds with no request, no stream open and nothing pending (a
    call whose client went away finishes first). Raises only if the session's actor gave
    up (the endpoint logs ``session.crashed``). ``adopted``: the state of a session another
    node held, claimed from its row (``actors.session.handover``): it goes on here, no row
    written."""
    session_id = transport.session_id
    if adopted is not None:
        state = adopted
    else:
        state = await open_session(
            services,
            session_id=session_id,
            remote=remote,
            identity=transport.identity,
            sessionless=transport.sessionless,
            transport="http-sessionless" if transport.sessionless else "http",
        )
    started()

    def attach(ref: ActorRef[Mail]) -> LiveSession:
        live = LiveSession(
            state, ref, transport, transport="http-sessionless" if transport.sessionless else "http"
        )
        services.registry.attach(session_id, transport.identity, live, transport.close)
        return live

    gave_up = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.expire_when_idle, idle_timeout, state.has_pending)
            await run_session(
                services, state, transport, transport.receive, attach=attach, supervisor=supervisor
            )
            nursery.cancel_scope.cancel()
    except* Exception:
        gave_up = True
        raise
    finally:
        if gave_up:
            transport.close_now(CLOSE_INTERNAL_ERROR, CLOSE_INTERNAL_ERROR_REASON)
        else:
            transport.close_now(CLOSE_GOING_AWAY, "server shutting down")
        code, reason = transport.closed or (CLOSE_GOING_AWAY, "server shutting down")
        with trio.CancelScope(shield=True):
            await end_session(services, state, code, reason, everywhere=transport.ended_by_client)
