"""The session's reader: frames in, typed messages to the actor's mailbox, control at once.

What needs no session actor is answered here, so that it never waits behind work:

* framing errors (not JSON, not JSON-RPC, a batch over the member cap, an id already in use);
* ``ping`` (MCP: the receiver "MUST respond promptly"), in every state of the session, even
  while every slot is busy or the mailbox is full;
* ``notifications/cancelled``, applied through the session state (:meth:`SessionState.cancel`).

It reads through a :data:`~runtime.connection.Receive` and answers through a
:class:`~runtime.connection.Connection`, so it knows no transport.

Two bounds shape the loop, both in bytes as well as items:

* *The mailbox is full* (the actor has more waiting than it may): the reader keeps reading, and
  each new request is refused at once with -32000 "server busy" and a retry hint; a
  notification that finds it full becomes a dead letter (nobody awaits it).
* *The connection is not writable* (the peer is not taking our output): the reader stops
  reading before the next frame (:meth:`Connection.wait_writable`), since every further
  request would only add output, and on WebSocket the socket's receive window does the rest
  (TCP back-pressure). A peer that stays so past the outgoing queue's ``stall_timeout`` is
  closed with 1008 by its transport (``runtime.websocket_transport``), and the session then
  *ends*: parking it would only let it resume and stall again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import structlog
import trio

from actors.session.mail import Mail
from actors.session.state import SessionState
from runtime import trace
from runtime.connection import Connection, ConnectionGone, Receive, message_size
from runtime.dead_letters import dead_letters
from runtime.log_throttle import LogThrottle
from runtime.mailbox import ActorRef, MailboxFull
from runtime.mcp import jsonrpc, versions
from runtime.mcp.errors import InvalidRequest, RpcError, ServerBusy
from runtime.trace import Meter, post
from storage.errors import ActorUnavailable

log = structlog.get_logger("session")

#: How long a client is told to wait before retrying a request refused as "server busy".
BUSY_RETRY_AFTER_S = 0.05
CANCELLED = "notifications/cancelled"
PING = "ping"
#: RFC 6455 section 7.4.1 close codes used here.
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    """The reader's own bounds."""

    #: Largest frame in bytes; a larger one closes the socket with 1009.
    max_message_bytes: int
    #: Most members of one JSON-RPC batch; more is one -32600 with id null.
    max_batch: int


async def pump(
    receive: Receive,
    mailbox: ActorRef[Mail],
    *,
    connection: Connection,
    state: SessionState,
    limits: ReaderLimits,
    meter: Meter | None = None,
) -> None:
    """Read frames until the peer goes, the actor stops, the connection is closing
    (:class:`~runtime.connection.ConnectionGone`), or a frame ends the session (then this
    closes the connection, and returns).

    Raises what ``receive`` raises when the peer goes (but ``ConnectionGone``: a plain end).
    """
    reader = _Reader(mailbox, connection, state, limits, meter=meter)
    try:
        while True:
            await connection.wait_writable()
            frame = await receive()
            size = message_size(frame) if isinstance(frame, str) else 0
            ending = reader.screen(frame, size)
            if ending is not None:
                await connection.close(*ending)  # nothing more goes out but the close
                return
            assert isinstance(frame, str)  # screen() ends the session on a binary frame
            if not reader.handle(frame, size):
                return
            if reader.refusing:
                # Fairness: a session being refused reads at the pace its mailbox frees
                # (at most the retry hint apart), not as fast as its peer sends: refusals
                # cost the node's time, which other sessions share.
                with trio.move_on_after(BUSY_RETRY_AFTER_S):
                    await mailbox.wait_for_room()
    except ConnectionGone:
        return  # the session is ending; whoever closed the connection closes the peer's end


class _Reader:
    """One session's reading, frame by frame (the loop itself is :func:`pump`)."""

    def __init__(
        self,
        mailbox: ActorRef[Mail],
        connection: Connection,
        state: SessionState,
        limits: ReaderLimits,
        *,
        meter: Meter | None,
    ) -> None:
        self._mailbox = mailbox
        self._meter = meter
        self._connection = connection
        self._state = state
        self._limits = limits
        self._sender = f"/root/sessions/{state.session_id}/reader"
        self._log = log.bind(session_id=state.session_id)
        #: Requests refused as "server busy": in this episode (since the mailbox last took
        #: one), and in all.
        self._busy_refusals = 0
        self._busy_total = 0
        #: Lines this peer can cause (bad frames, stray responses, busy) are throttled.
        self._throttle = LogThrottle()

    @property
    def refusing(self) -> bool:
        """Whether the last request was refused as "server busy"."""
        return self._busy_refusals > 0

    def screen(self, frame: str | bytes, size: int) -> tuple[int, str] | None:
        """The close code and reason if this frame (of ``size`` bytes) ends the session,
        else ``None``."""
        if isinstance(frame, bytes):
            # MCP over WebSocket is one JSON-RPC message per *text* frame (SEP-1288: 1003).
            self._log.info("session.closed_binary_frame")
            return CLOSE_UNSUPPORTED_DATA, "binary frames are not supported: send text"
        limit = self._limits.max_message_bytes
        # trio-websocket limits characters; the limit is in bytes.
        if size > limit:
            self._log.info("session.closed_oversized", limit=limit)
            return CLOSE_TOO_BIG, f"message larger than {limit} bytes"
        return None

    def handle(self, frame: str, size: int) -> bool:
        """Answer, apply or queue one frame of ``size`` bytes; ``False`` once the actor has
        stopped."""
        send_nowait = self._connection.send_nowait
        decoded: jsonrpc.Inbound | jsonrpc.Batch | list[object]
        try:
            decoded = jsonrpc.decode(frame)
        except jsonrpc.InvalidRequestWithId as error:
            send_nowait(jsonrpc.encode_error(error.request_id, error), error.request_id)
            return True
        except RpcError as error:
            self._note("session.bad_frame", code=error.code, reason=error.message)
            send_nowait(jsonrpc.encode_error(None, error), None)
            return True
        if isinstance(decoded, list):
            if len(decoded) > self._limits.max_batch:
                refusal = InvalidRequest(
                    f"invalid request: a batch of {len(decoded)} messages; at most "
                    f"{self._limits.max_batch} are accepted in one batch"
                )
                send_nowait(jsonrpc.encode_error(None, refusal), None)
                return True
            # Whether batches are allowed depends on the negotiated version: the actor knows.
            decoded = jsonrpc.Batch(items=decoded)
        elif self._answered_here(decoded):
            return True
        try:
            # In its envelope, stamped as it goes in: the message's trace starts here, or goes
            # on from the client's own (``_meta.traceparent``).
            envelope: Mail = post(decoded, sender=self._sender, trace_id=_client_trace(decoded))
            self._mailbox.tell(envelope, sender=self._sender, size=size)
        except MailboxFull:
            self._refuse(decoded)
            return True
        except ActorUnavailable:
            return False
        self._busy_refusals = 0
        if isinstance(decoded, jsonrpc.Request):
            self._state.enqueued(decoded.id)  # cancellable until the actor takes it
        return True

    def _answered_here(self, message: jsonrpc.Inbound) -> bool:
        """Control that never enters the mailbox: cancellation, ``ping``, a request whose id
        is already in use (refused with -32600), and responses (we send no requests, so they
        correlate with nothing)."""
        state = self._state
        if isinstance(message, jsonrpc.Notification):
            if message.method != CANCELLED:
                return False
            state.cancel((message.params or {}).get("requestId"))
            return True
        if not isinstance(message, jsonrpc.Request):
            self._note("session.unexpected_response", id=message.id)
            return True
        if state.in_use(message.id):
            refusal = InvalidRequest(
                f"invalid request: request id {message.id!r} is already in use by a "
                "request of this session that has not been answered"
            )
            self._connection.send_nowait(jsonrpc.encode_error(message.id, refusal), message.id)
            return True
        if message.method == PING and _answers_ping(state, message):
            # Traced and metered as the session's: status and `exai trace` show it.
            with trace.handling(
                self._sender,
                PING,
                session_id=state.session_id,
                rpc_id=message.id,
                meter=self._meter,
            ):
                self._connection.send_nowait(jsonrpc.encode_result(message.id, {}), message.id)
            return True
        return False

    def _note(self, event: str, **fields: str | int | None) -> None:
        """Log something the peer did, throttled per event (``runtime.log_throttle``)."""
        self._throttle.emit(self._log.info, event, key=event, **fields)

    def _refuse(self, message: jsonrpc.Inbound | jsonrpc.Batch) -> None:
        """The mailbox is full: a request is told to retry, anything else is a dead letter."""
        if not isinstance(message, jsonrpc.Request):
            dead_letters.record(
                target=self._mailbox.path,
                sender=self._sender,
                reason="mailbox full",
                kind=type(message).__name__,
            )
            return
        self._busy_refusals += 1
        self._busy_total += 1
        if self._busy_refusals == 1:
            # Once per episode, and episodes within the log rate: a flooding client would
            # otherwise flood the log too.
            self._note(
                "session.busy",
                mailbox_bytes=self._mailbox.queued_bytes,
                refused_total=self._busy_total,
            )
        busy = ServerBusy(
            "server busy: too many requests queued in this session; retry later",
            {"retryAfterMs": math.ceil(BUSY_RETRY_AFTER_S * 1000)},
        )
        self._connection.send_nowait(jsonrpc.encode_error(message.id, busy), message.id)


def _client_trace(message: jsonrpc.Inbound | jsonrpc.Batch) -> str | None:
    """The trace id of a request's ``_meta.traceparent``, if it carries a valid one
    (:func:`runtime.trace.from_traceparent`)."""
    if not isinstance(message, jsonrpc.Request) or not message.params:
        return None
    meta = message.params.get("_meta")
    if not isinstance(meta, dict):
        return None
    return trace.from_traceparent(meta.get("traceparent"))


def _answers_ping(state: SessionState, request: jsonrpc.Request) -> bool:
    """Whether this ``ping`` is answered here: it names no protocol version of its own (a
    2026-07-28 request has no ``ping``; the actor refuses those in their era) and the session
    is not a 2026-07-28 one."""
    meta = (request.params or {}).get("_meta")
    if isinstance(meta, dict) and versions.PROTOCOL_VERSION_META in meta:
        return False
    version = state.protocol_version
    return version is None or versions.has_ping(version)
