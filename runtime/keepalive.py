"""Noticing a WebSocket peer that is gone without a word (half-open TCP).

A laptop that sleeps, or a NAT that forgets a mapping, leaves a connection that neither side
sees closed: the server would keep the session attached for hours and refuse its resume with
409. So, while a connection is quiet (no byte received for ``interval`` seconds), the server
sends a Ping and waits ``pong_timeout`` seconds for the Pong that RFC 6455 section 5.5.2
obliges the peer to send. A peer that does not answer has its TCP connection closed without a
closing handshake (there is nobody to complete it), which the session sees as an abnormal
closure (1006, RFC 6455 section 7.1.5) and parks for resume, as any dropped socket.

Any byte counts as an answer, not only the Pong: a peer that is sending is alive, and the
check costs nothing while it does.
"""

from __future__ import annotations

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from runtime.listener import PeerStream

log = structlog.get_logger("server")


async def keep_alive(
    ws: WebSocketConnection,
    stream: PeerStream,
    *,
    interval: float,
    pong_timeout: float,
    session_id: str,
) -> None:
    """Ping ``ws`` whenever ``stream`` has been quiet for ``interval`` seconds; close
    ``stream`` if a Pong does not come within ``pong_timeout`` seconds, then return.

    Returns as well when the connection closes otherwise. Cancel it when the session ends.
    """
    while True:
        quiet_until = stream.last_received + interval
        if trio.current_time() < quiet_until:
            await trio.sleep_until(quiet_until)
            continue
        with trio.move_on_after(pong_timeout) as waited:
            try:
                await ws.ping()
            except ConnectionClosed:
                return  # closed meanwhile: the session is ending on its own
        if waited.cancelled_caught:
            log.info("connection.unresponsive", session_id=session_id, ping_timeout=pong_timeout)
            # Any task blocked reading or writing the socket wakes with an error and the
            # WebSocket records 1006; the session parks itself (actors/session/lifecycle.py).
            await stream.aclose()
            return
