"""The session's reader: frames in, typed messages to the actor's mailbox.

Framing errors are answered here because they need no session state, and answering them
before the mailbox means a flood of garbage cannot queue behind real requests. A request that
finds the mailbox full is refused at once with "server busy" and a retry hint; a notification
that finds it full becomes a dead letter (nobody awaits it).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import structlog

from runtime.dead_letters import dead_letters
from runtime.mailbox import ActorRef, ActorStopped, MailboxFull
from runtime.mcp import jsonrpc
from runtime.mcp.errors import RpcError, ServerBusy
from runtime.trace import Postmarks

log = structlog.get_logger("session")

#: How long a client is told to wait before retrying a request refused as "server busy".
BUSY_RETRY_AFTER_S = 0.05
CANCELLED = "notifications/cancelled"
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009


async def pump(
    frames: Callable[[], Awaitable[str | bytes]],
    mailbox: ActorRef[jsonrpc.Inbound | jsonrpc.Batch],
    *,
    send: Callable[[str], Awaitable[None]],
    close: Callable[[int, str], Awaitable[None]],
    session_id: str,
    queued: dict[str | int, bool],
    cancel: Callable[[object], None],
    max_bytes: int,
    postmarks: Postmarks | None = None,
) -> None:
    """Read frames until the socket closes (``ConnectionClosed``), the actor stops, or a frame
    forces a close (then this closes the socket and returns).

    ``notifications/cancelled`` is applied here through ``cancel``, not queued: it is
    control, and must reach a call even when every slot is busy and the mailbox is full.
    """
    reader_log = log.bind(session_id=session_id)
    sender = f"/root/sessions/{session_id}/reader"
    while True:
        frame = await frames()
        if isinstance(frame, bytes):
            # MCP over WebSocket is one JSON-RPC message per *text* frame (SEP-1288: 1003).
            reader_log.info("session.closed_binary_frame")
            await close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported: send text")
            return
        # trio-websocket limits characters; the limit is in bytes. Only frames that could
        # exceed it (4 bytes per character at most) pay for the exact count.
        if len(frame) * 4 > max_bytes and len(frame.encode()) > max_bytes:
            reader_log.info("session.closed_oversized", limit=max_bytes)
            await close(CLOSE_TOO_BIG, f"message larger than {max_bytes} bytes")
            return
        decoded: jsonrpc.Inbound | jsonrpc.Batch | list[object]
        try:
            decoded = jsonrpc.decode(frame)
        except jsonrpc.InvalidRequestWithId as error:
            await send(jsonrpc.encode_error(error.request_id, error))
            continue
        except RpcError as error:
            reader_log.info("session.bad_frame", code=error.code, reason=error.message)
            await send(jsonrpc.encode_error(None, error))
            continue
        if isinstance(decoded, list):
            # Whether batches are allowed depends on the negotiated version: the actor knows.
            decoded = jsonrpc.Batch(items=decoded)
        elif isinstance(decoded, jsonrpc.Notification) and decoded.method == CANCELLED:
            cancel((decoded.params or {}).get("requestId"))
            continue
        try:
            mailbox.tell(decoded, sender=sender)
            if postmarks is not None:
                postmarks.post(decoded, sender=sender)  # starts the message's trace
            if isinstance(decoded, jsonrpc.Request):
                queued[decoded.id] = False  # cancellable until the actor takes it
        except MailboxFull:
            if isinstance(decoded, jsonrpc.Request):
                busy = ServerBusy(
                    "server busy: too many requests queued in this session; retry later",
                    {"retryAfterMs": math.ceil(BUSY_RETRY_AFTER_S * 1000)},
                )
                await send(jsonrpc.encode_error(decoded.id, busy))
            else:
                dead_letters.record(
                    target=mailbox.path,
                    sender=sender,
                    reason="mailbox full",
                    kind=type(decoded).__name__,
                )
        except ActorStopped:
            return
