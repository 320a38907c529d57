"""Sessions resumed on any node: the session's side of :mod:`storage.session_handover`.

WebSocket sessions:

A resume presenting an id this node holds parked is claimed locally, then confirmed in the
database at the session's epoch (:meth:`Handover.reclaim`: one round trip, only on resume);
an id this node does not hold is claimed from the database (:meth:`Handover.claim`), its
negotiated state rebuilt from the row (:func:`state_of`). Parking writes the row's
``parked_until`` through the journal, awaited until it is in the database
(:meth:`Handover.publish_park`), so the node the client lands on sees it at once.

A 2025-era Streamable HTTP request naming an ``Mcp-Session-Id`` this node does not hold is
served from a claim of its row too (``http=True``: whoever holds it), once per node: later
requests find the node's own copy.

Only park, resume, end and that first request pay a database round trip; a session's
requests never do.

A resume of an id this node does not hold costs a database round trip, which a hostile
(but authenticated: the token is checked first) client could ask for in a loop. Bounded by
:class:`ResumeLookups`: an id that is not a session id this runtime issues (a UUID) is
answered 404 at once; a 404 for a session that exists but is not this identity's, ended or
past its grace is remembered per identity and id for ``negative_ttl`` seconds (at most
``max_negative`` of them, the oldest forgotten first; an id with no row at all is not: its
row may be a moment behind its first answers); and lookups run at most
``rate`` a second over the node (a bucket of ``burst``), beyond which the handshake is
answered 503 with ``Retry-After`` (``session.resume_lookups_refused``, logged once per
throttle window).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable

import structlog
import trio

from actors.persistence import PersistenceClient
from actors.session.state import SessionState
from actors.status import LiveSession
from runtime.connection import CLOSE_NORMAL
from runtime.log_throttle import LogThrottle
from runtime.mcp.schema import LOG_LEVELS, Implementation, LogLevel
from runtime.session_registry import SessionPhase, SessionRegistry
from storage.errors import ExaiError
from storage.rows import SessionParked
from storage.session_handover import Claimed, Refusal, SessionClaimError, SessionClaims

__all__ = ["Handover", "ResumeLookups", "end_copies_ended_elsewhere", "state_of"]

log = structlog.get_logger("session")

#: Lookups of ids this node does not hold, per second over the node, and the bucket. A
#: reconnecting client looks up once; a load balancer moving 1,000 clients at once takes a
#: few seconds of 503s (each retried after 1 s) rather than 1,000 queries at once.
LOOKUP_RATE = 50.0
LOOKUP_BURST = 100
#: Seconds a 404 is remembered, and how many are.
NEGATIVE_TTL = 30.0
MAX_NEGATIVE = 4096
#: Seconds the park's row update may take before the session stays parked on this node only.
PARK_WRITE_TIMEOUT = 5.0


class ResumeLookups:
    """What resumes of ids this node does not hold may cost the database (module doc).
    Trio thread only; ``clock`` is seconds (``trio.current_time`` by default)."""

    def __init__(
        self,
        *,
        rate: float = LOOKUP_RATE,
        burst: int = LOOKUP_BURST,
        negative_ttl: float = NEGATIVE_TTL,
        max_negative: int = MAX_NEGATIVE,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.negative_ttl = negative_ttl
        self.max_negative = max_negative
        self._clock = clock
        self._tokens = float(burst)
        self._at: float | None = None
        self._negative: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._throttle = LogThrottle()
        #: Lookups allowed, and refused by the bucket (for tests and status).
        self.looked_up = 0
        self.refused = 0

    @staticmethod
    def plausible(session_id: str) -> bool:
        """Whether ``session_id`` could be one this runtime issued (``uuid4``, canonical)."""
        try:
            return str(uuid.UUID(session_id)) == session_id
        except ValueError:
            return False

    def known_unknown(self, identity: str, session_id: str) -> bool:
        """Whether a lookup of this id by this identity answered 404 within the TTL."""
        key = (identity, session_id)
        until = self._negative.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._negative[key]
            return False
        return True

    def unknown(self, identity: str, session_id: str) -> None:
        """Remember a 404 (bounded: the oldest is forgotten first)."""
        key = (identity, session_id)
        self._negative.pop(key, None)
        self._negative[key] = self._clock() + self.negative_ttl
        while len(self._negative) > self.max_negative:
            self._negative.popitem(last=False)

    def take(self) -> bool:
        """One lookup, if the bucket has one; ``False`` (logged, throttled) if not."""
        now = self._clock()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.looked_up += 1
            return True
        self.refused += 1
        self._throttle.emit(
            log.warning,
            "session.resume_lookups_refused",
            limit=f"{self.rate:g}/s, burst {self.burst}",
        )
        return False


def state_of(claimed: Claimed, *, identity: str, remote: str, http: bool = False) -> SessionState:
    """The state a session claimed from another node resumes with: its negotiated version,
    client, log level and totals from its row. ``initialized`` is taken as done for a session
    that negotiated a version: its client was past its handshake when its socket dropped."""
    client = (
        Implementation(name=claimed.client_name, version=claimed.client_version or "")
        if claimed.client_name is not None
        else None
    )
    level: LogLevel | None = None
    if claimed.log_level in LOG_LEVELS:
        level = claimed.log_level
    state = SessionState(
        session_id=claimed.session_id,
        remote=remote,
        identity=identity,
        protocol_version=claimed.protocol_version,
        client=client,
        initialized=claimed.protocol_version is not None,
        log_level=level,
        tool_calls=claimed.tool_calls,
        tool_errors=claimed.tool_errors,
        any_node=http,
    )
    state.claimed(claimed.epoch)
    return state


class Handover:
    """This node's claims of sessions (``claims``), bounded by ``lookups``."""

    def __init__(
        self,
        claims: SessionClaims,
        persistence: PersistenceClient,
        lookups: ResumeLookups | None = None,
    ) -> None:
        self.claims = claims
        self.persistence = persistence
        self.lookups = lookups or ResumeLookups()

    async def claim(
        self, session_id: str, identity: str, remote: str, *, http: bool = False
    ) -> SessionState | Refusal:
        """Claim a session this node does not hold: its state, or why not (404: ``UNKNOWN``
        or ``ABSENT``; 409: ``ATTACHED``).
        ``http``: a 2025-era Streamable HTTP session, claimed whoever holds it
        (:meth:`~storage.session_handover.SessionClaims.claim_http`). Raises
        :class:`LookupRefused` when the node cannot look now (503)."""
        lookups = self.lookups
        if not lookups.plausible(session_id) or lookups.known_unknown(identity, session_id):
            return Refusal.UNKNOWN
        if not lookups.take():
            raise LookupRefused
        try:
            # Not abandoned on cancel: a claim that committed is always adopted (and then
            # parked again by the handshake's failure path), never left attached to nobody.
            claim = self.claims.claim_http if http else self.claims.claim
            claimed = await trio.to_thread.run_sync(claim, session_id, identity, remote)
        except SessionClaimError as exc:
            log.warning("session.claim_failed", session_id=session_id, error=str(exc))
            raise LookupRefused from exc
        if isinstance(claimed, Refusal):
            if claimed is Refusal.UNKNOWN:
                lookups.unknown(identity, session_id)
            return claimed
        log.info(
            "session.claimed",
            session_id=session_id,
            from_node=claimed.previous_node,
            epoch=claimed.epoch,
        )
        return state_of(claimed, identity=identity, remote=remote, http=http)

    async def reclaim(self, state: SessionState, remote: str) -> bool:
        """Confirm a local resume in the database: ``False`` if another node claimed the
        session meanwhile (this copy is stale: drop it). A database that does not answer
        leaves the session this node's (a rival claim needs the database too)."""
        try:
            epoch = await trio.to_thread.run_sync(
                self.claims.reclaim, state.session_id, state.epoch, remote
            )
        except SessionClaimError as exc:
            log.warning("session.reclaim_unconfirmed", session_id=state.session_id, error=str(exc))
            return True
        if epoch is None:
            return False
        state.claimed(epoch)
        return True

    async def publish_park(self, state: SessionState) -> None:
        """Write the park to the session's row and wait until it is in the database (at
        most ``PARK_WRITE_TIMEOUT`` s; shielded: this runs as a connection ends). On failure
        the session is parked here only (resumable on this node), logged."""
        record = SessionParked(
            session_id=state.session_id,
            node_id=self.claims.me,
            epoch=state.epoch,
            grace_s=self.claims.grace,
            tool_calls=state.tool_calls,
            tool_errors=state.tool_errors,
            log_level=state.log_level,
        )
        with trio.move_on_after(PARK_WRITE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.persistence.write_through(record)
            except (ExaiError, trio.TooSlowError) as exc:
                log.warning(
                    "session.park_unpublished", session_id=state.session_id, error=repr(exc)
                )
        if scope.cancelled_caught:
            log.warning("session.park_unpublished", session_id=state.session_id, error="timeout")


async def end_copies_ended_elsewhere(
    handover: Handover, registry: SessionRegistry[LiveSession], *, interval: float
) -> None:
    """Every ``interval`` seconds, end this node's copies of 2025-era HTTP sessions whose row
    has ended (a DELETE, or an idle expiry, on the node that held them last): one query per
    pass for every ``ENDED_BATCH`` of them, never one per request. Bounds how long a
    copy answers a session its client ended elsewhere (the spec: 404 once it ended). Runs
    until cancelled; a database that does not answer is logged (throttled) and tried again
    at the next pass."""
    throttle = LogThrottle()
    while True:
        await trio.sleep(interval)
        copies = [
            entry
            for entry in registry
            if entry.phase is SessionPhase.ATTACHED
            and entry.session.state.any_node
            and entry.close is not None
        ]
        if not copies:
            continue
        try:
            ended = await trio.to_thread.run_sync(
                handover.claims.ended, [entry.session_id for entry in copies]
            )
        except SessionClaimError as exc:
            throttle.emit(log.warning, "session.ended_check_failed", error=str(exc))
            continue
        for entry in copies:
            if entry.session_id in ended and entry.close is not None:
                log.info("session.ended_elsewhere", session_id=entry.session_id)
                await entry.close(CLOSE_NORMAL, "the session ended on another node")


class LookupRefused(Exception):
    """This node cannot look the session up now (the bucket is empty, or the database did
    not answer): the handshake answers 503 with ``Retry-After``."""
