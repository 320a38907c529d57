"""Trace ids, and one log event per message an actor handles.

A *trace* is one request's path through the node: a ``tools/call`` taken by the session actor,
its tool task, the rate-limiter and provider calls it makes, the persistence writes it causes.
Every unit of that work logs one ``actor.message`` event carrying the same ``trace_id``, so
``exai trace --timeline TRACE_ID`` can lay them out in order with the time spent in each.

**Carrying the id.** Inside trio it travels in a context variable: :func:`handling` binds it
(with the actor path and session id, which every other log line made meanwhile carries too),
and trio copies the context into tasks started from there. A message to a pykka actor crosses
threads, where context variables do not follow, so the message carries a :class:`Postmark`
(trace id, session id, sender, and when it was posted, for the time it waited in the
mailbox); the actor passes it back to :func:`handling`. A trio mailbox whose messages cannot
carry one (the session's JSON-RPC messages) carries each in an :class:`Envelope` with its
postmark (:func:`post`).

**Sampling.** ``EXAI_TRACE_SAMPLE`` (0..1) keeps that share of *traces*, decided from the trace
id, so a kept trace is complete in every actor. A unit whose outcome is not ``ok`` is logged
whatever the sampling, since that is the one an operator looks for.

Usage, in an actor's handler::

    with trace.handling(self.path, message.method, postmark=mark, session_id=sid,
                        rpc_id=message.id, depth=ref.depth, capacity=ref.capacity) as h:
        ...                     # an exception sets outcome "error" ("cancelled" if cancelled)
        h.failed("-32602 ...")  # answered, but with a failure: outcome "error" too
        h.refused("-32602 ...", throttle=t, key="tools/call:-32602")  # as failed, log throttled
        h.outcome = "refused"   # or name another outcome
        h.note(tool="echo")     # extra fields for the event
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, MutableMapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Generic, TypeVar

import structlog
import trio

from runtime.log_throttle import LogThrottle

#: The ``event`` of the one-per-message log line.
TRACE_EVENT = "actor.message"
OK = "ok"
ERROR = "error"
CANCELLED = "cancelled"

RequestId = str | int

log = structlog.get_logger("trace")

M = TypeVar("M")

# Not cryptographic: trace ids need to be unique, not unguessable, and this costs ~0.2 µs.
_ids = random.Random(os.urandom(16))
_ALL = 1 << 32


class _Sampling:
    """The share of traces kept, as a threshold on the first 32 bits of the trace id."""

    threshold = _ALL


_sampling = _Sampling()


@dataclass(frozen=True, slots=True)
class _Context:
    trace_id: str | None = None
    session_id: str | None = None
    actor: str | None = None


_EMPTY = _Context()
_current: ContextVar[_Context] = ContextVar("exai_trace", default=_EMPTY)


def new_trace_id() -> str:
    """A fresh trace id: 16 hex digits."""
    return f"{_ids.getrandbits(64):016x}"


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def from_traceparent(value: object) -> str | None:
    """The trace id a W3C ``traceparent`` names (32 hex digits), so that a client's trace
    and exai's are one: MCP 2026-07-28 carries it in a request's ``_meta``
    (``basic/index.mdx``, "OpenTelemetry trace context"; W3C Trace Context, section 3.2).
    ``None`` for anything else: not a string, malformed, or the all-zero id the standard
    declares invalid."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match.group(1) == "0" * 32 or value.startswith("ff"):
        return None
    return match.group(1)


def current_trace_id() -> str | None:
    """The trace this code runs for, if any."""
    return _current.get().trace_id


def current_session_id() -> str | None:
    return _current.get().session_id


def set_sample_rate(rate: float) -> None:
    """Keep this share (0..1) of traces' per-message events; see the module doc."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sample rate must be within 0..1, got {rate}")
    _sampling.threshold = round(rate * _ALL)


def sampled(trace_id: str | None) -> bool:
    """Whether a trace's ``ok`` events are logged. The same answer for a trace everywhere."""
    threshold = _sampling.threshold
    if threshold >= _ALL:
        return True
    if trace_id is None:
        return _ids.getrandbits(32) < threshold
    try:
        return int(trace_id[:8], 16) < threshold
    except ValueError:
        return True


@dataclass(frozen=True, slots=True)
class Postmark:
    """Stamped on a message when it is posted: whose work it is, and when it went in."""

    trace_id: str | None
    session_id: str | None
    sender: str | None
    posted_at: float
    """``time.perf_counter()``; the same clock in every thread of the process."""


def postmark(sender: str | None = None) -> Postmark:
    """A postmark for a message posted now, from the current trace (if any).

    Made to be a dataclass field's ``default_factory``, so a message built where it is sent
    carries its trace: ``mark: Postmark = field(default_factory=trace.postmark)``.
    """
    context = _current.get()
    return Postmark(
        context.trace_id, context.session_id, sender or context.actor, time.perf_counter()
    )


@dataclass(frozen=True, slots=True)
class Envelope(Generic[M]):
    """A message in a trio mailbox with its postmark: the envelope carries the trace context,
    so nothing is kept beside the mailbox (a message of the peer's, such as a session's
    JSON-RPC request, has no room for one). Made by :func:`post`."""

    message: M
    mark: Postmark


def post(message: M, *, sender: str | None = None, trace_id: str | None = None) -> Envelope[M]:
    """``message`` in its envelope, stamped now, for a trio mailbox; starts a trace if none is
    bound (``trace_id``: continue that one instead)."""
    context = _current.get()
    mark = Postmark(
        trace_id or context.trace_id or new_trace_id(),
        context.session_id,
        sender or context.actor,
        time.perf_counter(),
    )
    return Envelope(message, mark)


class _Sink:
    """Where ``actor.message`` events go: ``write(level, event)``; ``None``: through
    structlog like any event. :mod:`runtime.logs` installs its direct path
    (:func:`set_event_sink`), the same steps without the general pipeline's: one of these
    per message every actor handles."""

    write: Callable[[str, dict[str, Any]], None] | None = None


_sink = _Sink()


def set_event_sink(sink: Callable[[str, dict[str, Any]], None] | None) -> None:
    """Send every ``actor.message`` event to ``sink(level, event)`` (``level``: ``"info"`` or
    ``"warning"``; ``event``: its fields, ``event`` itself not included), or back to
    structlog with ``None``."""
    _sink.write = sink


@dataclass(slots=True)
class Meter:
    """One actor's running counts, kept across its restarts, for the status command.

    Written by the actor's own thread, read by the status command from the trio thread:
    plain counters whose reads may be one message late, which a status display tolerates.
    """

    handled: int = 0
    failed: int = 0
    last_activity: float | None = None
    """``time.monotonic()`` when it last finished handling a message."""


def merge_trace(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add the bound trace id, session id and actor path to an event
    (fields the event names itself win). One context variable, read once per event."""
    context = _current.get()
    if context is not _EMPTY:
        if context.trace_id is not None:
            event_dict.setdefault("trace_id", context.trace_id)
        if context.session_id is not None:
            event_dict.setdefault("session_id", context.session_id)
        if context.actor is not None:
            event_dict.setdefault("actor", context.actor)
    return event_dict


class bound:  # lower case: used like a function, `with trace.bound(...)`
    """Bind a trace id, session id and actor path to everything logged inside the block
    (and to trio tasks started from it). Unset values are inherited from the outer context.

    Logged events get them through :func:`merge_trace`, which ``runtime.logs`` installs.
    """

    __slots__ = ("_fields", "_token")

    def __init__(
        self,
        *,
        trace_id: str | None = None,
        session_id: str | None = None,
        actor: str | None = None,
    ) -> None:
        outer = _current.get()
        self._fields = _Context(
            trace_id or outer.trace_id, session_id or outer.session_id, actor or outer.actor
        )
        self._token: Token[_Context] | None = None

    @property
    def trace_id(self) -> str | None:
        return self._fields.trace_id

    def __enter__(self) -> bound:
        self._token = _current.set(self._fields)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)


def _posted_at(mark: Postmark) -> float:
    return mark.posted_at


class handling:  # lower case: used like a function, `with trace.handling(...) as h`
    """One message handled by one actor: binds the trace (see :class:`bound`) while it runs,
    then logs one ``actor.message`` event and updates the actor's :class:`Meter`.

    ``postmark``: the message's postmark (a sequence of them for a message that gathers
    several, e.g. a persistence shipment: the wait is the oldest one's, and every trace id
    is listed in ``trace_ids`` so each trace's timeline finds it). ``trace_id`` defaults to
    the postmark's, else the current trace's, else a new one. ``depth`` / ``capacity``: the
    mailbox as the actor found it.
    """

    __slots__ = (
        "_actor",
        "_bound",
        "_capacity",
        "_depth",
        "_fields",
        "_kind",
        "_meter",
        "_rpc_id",
        "_sender",
        "_started",
        "_throttle",
        "_throttle_key",
        "_trace_ids",
        "_waited",
        "outcome",
    )

    def __init__(
        self,
        actor: str,
        kind: str,
        *,
        postmark: Postmark | Sequence[Postmark] | None = None,
        trace_id: str | None = None,
        session_id: str | None = None,
        rpc_id: RequestId | None = None,
        depth: int | None = None,
        capacity: int | None = None,
        meter: Meter | None = None,
        **fields: Any,
    ) -> None:
        first: Postmark | None
        if postmark is None:
            first = None
            self._trace_ids: tuple[str, ...] = ()
        elif isinstance(postmark, Postmark):
            # The common case (one message, one postmark), without the general case's
            # generator and sort: this runs for every message every actor handles.
            first = postmark
            self._trace_ids = (postmark.trace_id,) if postmark.trace_id else ()
        else:
            first = min(postmark, key=_posted_at) if postmark else None
            self._trace_ids = tuple(dict.fromkeys(m.trace_id for m in postmark if m.trace_id))
        outer = _current.get()
        trace_id = (
            trace_id
            or (self._trace_ids[0] if self._trace_ids else None)
            or outer.trace_id
            or new_trace_id()
        )
        session_id = session_id or (first.session_id if first else None)
        self._bound = bound(trace_id=trace_id, session_id=session_id, actor=actor)
        self._actor = actor
        self._kind = kind
        self._rpc_id = rpc_id
        self._depth = depth
        self._capacity = capacity
        self._meter = meter
        self._sender = first.sender if first else None
        self._fields = fields
        self._throttle: LogThrottle | None = None
        self._throttle_key = ""
        self._started = 0.0
        self._waited: float | None = None
        if first is not None:
            self._waited = time.perf_counter() - first.posted_at
        self.outcome = OK

    @property
    def trace_id(self) -> str:
        trace_id = self._bound.trace_id
        assert trace_id is not None
        return trace_id

    def note(self, **fields: Any) -> None:
        """Add fields to this message's event (say, the tool's name)."""
        self._fields.update(fields)

    def failed(self, error: str) -> None:
        """The message was handled without an exception, but what it produced is a failure
        (a JSON-RPC error response, a tool result with ``isError: true``): the event's outcome
        is ``error`` all the same, with ``error`` saying what failed. A failure is what an
        operator looks for, so it counts in the meter and is logged whatever the sampling."""
        self.outcome = ERROR
        self._fields["error"] = error

    def refused(self, error: str, *, throttle: LogThrottle, key: str) -> None:
        """:meth:`failed`, for a message refused before any work was done (a call its
        session would not admit, arguments that do not parse): a peer can send those as fast
        as it likes, so the event's line goes through ``throttle`` under ``key`` (at most
        one per key and period; the next carries ``suppressed``, how many were left out),
        while the meter still counts every one. ``key`` must come from a small set (the
        method and the error's code), never from what the peer sent."""
        self.failed(error)
        self._throttle = throttle
        self._throttle_key = key

    def __enter__(self) -> handling:
        self._bound.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handled = time.perf_counter() - self._started
        self._bound.__exit__(exc_type, exc, tb)
        if exc is not None:
            self._throttle = None  # what raised is not the refusal: logged as it is
            if isinstance(exc, trio.Cancelled | KeyboardInterrupt | GeneratorExit):
                self.outcome = CANCELLED
            else:
                self.outcome = ERROR
                self._fields.setdefault("error", repr(exc))
        meter = self._meter
        if meter is not None:
            meter.handled += 1
            if self.outcome == ERROR:
                meter.failed += 1
            meter.last_activity = time.monotonic()
        if self.outcome == OK and not sampled(self._bound.trace_id):
            return
        self._emit(handled)

    def _emit(self, handled: float) -> None:
        event: dict[str, Any] = {
            "actor": self._actor,
            "kind": self._kind,
            "trace_id": self._bound.trace_id,
        }
        session_id = self._bound._fields.session_id
        if session_id is not None:
            event["session_id"] = session_id
        if self._rpc_id is not None:
            event["rpc_id"] = self._rpc_id
        if len(self._trace_ids) > 1:
            event["trace_ids"] = list(self._trace_ids)
        if self._sender is not None:
            event["sender"] = self._sender
        if self._depth is not None:
            event["depth"] = self._depth
        if self._capacity is not None:
            event["capacity"] = self._capacity
        if self._waited is not None:
            event["waited_ms"] = round(self._waited * 1000, 3)
        event["handled_ms"] = round(handled * 1000, 3)
        event["outcome"] = self.outcome
        event.update(self._fields)
        level = "warning" if self.outcome == ERROR else "info"
        throttle = self._throttle
        if throttle is not None:
            # A refusal's line: at most one per key and period (``refused``).
            throttle.emit(partial(_write, level), TRACE_EVENT, key=self._throttle_key, **event)
            return
        sink = _sink.write  # the hot path, inline: one event per message of every actor
        if sink is not None:
            sink(level, event)
        elif level == "warning":
            log.warning(TRACE_EVENT, **event)
        else:
            log.info(TRACE_EVENT, **event)


def _write(level: str, name: str, /, **event: Any) -> None:
    """One ``actor.message`` event at ``level``: to the installed sink, else structlog (as
    ``handling._emit`` writes it inline)."""
    sink = _sink.write
    if sink is not None:
        sink(level, event)
    elif level == "warning":
        log.warning(name, **event)
    else:
        log.info(name, **event)
