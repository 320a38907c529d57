"""The node's one table of sessions: every session, in one explicit phase, and its operations.

Status (``exai status``, ``/status``), resume (409 or 404 at the handshake) and shutdown (the
drain) all read this one table, and the session lifecycle is the only writer, through its
operations; nothing else keeps a list of sessions. Phases and operations::

    (new) ──attach──> ATTACHED ──park──> PARKED ──claim──> CLAIMED ──attach──> ATTACHED
                         │                 │                  │  ▲
                        end             expire            unclaim │
                         ▼                 ▼               ──> PARKED
                       (gone)            (gone)              (end)  │
                                                       (new) ──adopt┘

* ``adopt``: a session another node held, claimed in the database by a reconnecting client
  (``storage/session_handover.py``), enters as ``CLAIMED``.

* ``ATTACHED``: a connection runs the session; :attr:`SessionEntry.close` closes it (drain).
* ``PARKED``: its connection dropped without a clean close; kept until
  :attr:`SessionEntry.deadline` (``grace`` seconds) for its client to come back with its id
  (docs/architecture.md, "Sessions that survive a dropped socket"). The reaper
  (:meth:`SessionRegistry.run`) expires it then.
* ``CLAIMED``: a reconnecting client presented its id and identity at the handshake; the
  session is promised to that connection, which attaches it once its 101 is sent, or gives
  it back (:meth:`SessionRegistry.unclaim`) if it failed before.

Generic over ``S``, what the session layer keeps per session (``actors``: its state, mailbox,
outgoing queue, meter): this module never looks inside it, so ``runtime`` stays below
``actors``. Trio thread only; every operation is O(1) but the reaper's (O(log n) per expiry).
"""

from __future__ import annotations

import enum
import heapq
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
import trio

from runtime.log_throttle import LogThrottle

__all__ = ["CloseConnection", "Ending", "SessionEntry", "SessionPhase", "SessionRegistry"]

log = structlog.get_logger("session")

S = TypeVar("S")

#: Closes an attached session's connection from the server's side: ``(code, reason)``, RFC
#: 6455 section 7.4.1 codes. Returns once closed; bounded in time by whoever provides it.
CloseConnection = Callable[[int, str], Awaitable[None]]


class SessionPhase(enum.StrEnum):
    """Where a session is (see the module docstring)."""

    ATTACHED = "attached"
    PARKED = "parked"
    CLAIMED = "claimed"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session's (last) connection ended, for its ``session.closed`` line."""

    code: int | None
    """The close code (RFC 6455 section 7.4.1); ``None`` if no close was seen at all."""
    reason: str
    """The close frame's reason, else the code's name (``ABNORMAL_CLOSURE``), else why."""


@dataclass(eq=False, slots=True)
class SessionEntry(Generic[S]):
    """One session of the node, from its first connection to its end, across resumes."""

    session_id: str
    identity: str
    """The client identity that owns it: only that identity may claim it."""
    session: S
    phase: SessionPhase
    close: CloseConnection | None = None
    """``ATTACHED`` only: closes its connection."""
    deadline: float | None = None
    """``PARKED`` only: when its grace ends, ``trio.current_time()`` seconds."""
    ending: Ending | None = None
    """``PARKED`` only: how the connection it lost ended."""
    opened_at: float = field(default_factory=time.monotonic)
    attached_at: float = field(default_factory=time.monotonic)


class SessionRegistry(Generic[S]):
    """Every session of the node by id; see the module docstring.

    ``grace`` is the resume grace in seconds (``EXAI_RESUME_GRACE``; ``0`` parks nothing).
    ``on_expire`` is awaited for each parked session whose grace ran out, or that
    :meth:`expire_all` ends, after it has left the table: it records the session's end.
    """

    def __init__(
        self,
        grace: float,
        on_expire: Callable[[SessionEntry[S]], Awaitable[None]] | None = None,
        *,
        max_parked: int | None = None,
    ) -> None:
        self.grace = grace
        self.on_expire = on_expire
        #: Most sessions parked at once (the node: ``EXAI_MAX_SESSIONS``); beyond it a dropped
        #: session ends instead, so clients that connect and drop over and over cannot grow
        #: the table without bound. ``None``: no bound.
        self.max_parked = max_parked
        self._throttle = LogThrottle()
        self.parking = True
        """Whether :meth:`park` keeps sessions; the node turns it off when it stops (a process
        that is going away cannot honour a resume)."""
        self._entries: dict[str, SessionEntry[S]] = {}
        self._attached = 0  # ATTACHED or CLAIMED
        self._deadlines: list[tuple[float, str]] = []  # a heap; stale items are skipped
        self._changed = trio.Event()
        self._drained = trio.Event()
        self._drained.set()

    # -- views ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[SessionEntry[S]]:
        """Every entry, in no particular order; a copy, so operations may run meanwhile."""
        return iter(list(self._entries.values()))

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    def get(self, session_id: str) -> SessionEntry[S] | None:
        return self._entries.get(session_id)

    def phase(self, session_id: str) -> SessionPhase | None:
        entry = self._entries.get(session_id)
        return entry.phase if entry is not None else None

    @property
    def attached(self) -> int:
        """Sessions a connection runs or is about to run (``ATTACHED`` or ``CLAIMED``)."""
        return self._attached

    @property
    def parked(self) -> int:
        return len(self._entries) - self._attached

    def connections(self) -> list[tuple[str, CloseConnection]]:
        """``(session_id, close)`` of every attached session: what a drain closes."""
        return [
            (entry.session_id, entry.close)
            for entry in self._entries.values()
            if entry.close is not None and entry.phase is SessionPhase.ATTACHED
        ]

    async def wait_drained(self) -> None:
        """Return once no session is attached or claimed (parked ones do not count)."""
        await self._drained.wait()

    # -- operations ----------------------------------------------------------------------------

    def attach(
        self, session_id: str, identity: str, session: S, close: CloseConnection
    ) -> SessionEntry[S]:
        """A connection runs the session now: a new one, or the one it claimed (its entry,
        with its opening time, goes on). ``ValueError`` for an id that is attached or parked:
        the handshake refuses those (409, or a claim first)."""
        entry = self._entries.get(session_id)
        if entry is None:
            entry = SessionEntry(session_id, identity, session, SessionPhase.ATTACHED)
            self._entries[session_id] = entry
            self._count_attached(+1)
        elif entry.phase is SessionPhase.CLAIMED:
            entry.phase = SessionPhase.ATTACHED
            entry.session = session
            entry.attached_at = time.monotonic()
        else:
            raise ValueError(f"session {session_id} is {entry.phase.value}, not claimable")
        entry.close = close
        return entry

    def park(self, session_id: str, ending: Ending) -> bool:
        """The session's connection dropped: keep it for ``grace`` seconds. ``False`` (and
        nothing changes) if parking has stopped, ``grace`` is 0 or ``max_parked`` sessions
        are parked already (logged ``session.not_parked``, throttled): the caller ends it."""
        entry = self._entries.get(session_id)
        if entry is None or entry.phase is SessionPhase.PARKED:
            raise ValueError(f"session {session_id} is not attached")
        if not self.parking or self.grace <= 0:
            return False
        if self.max_parked is not None and self.parked >= self.max_parked:
            self._throttle.emit(
                log.warning, "session.not_parked", reason="parking full", limit=self.max_parked
            )
            return False
        entry.phase = SessionPhase.PARKED
        entry.close = None
        entry.ending = ending
        entry.deadline = trio.current_time() + self.grace
        heapq.heappush(self._deadlines, (entry.deadline, session_id))
        self._count_attached(-1)
        self._changed.set()
        log.info("session.detached", session_id=session_id, grace=self.grace)
        return True

    def claim(self, session_id: str, identity: str) -> S | None:
        """Promise a parked session to a new connection; ``None`` if it is unknown, expired,
        not parked, or another identity's (then it stays parked: its owner may come back)."""
        entry = self._entries.get(session_id)
        if entry is None or entry.phase is not SessionPhase.PARKED or entry.identity != identity:
            return None
        entry.phase = SessionPhase.CLAIMED
        entry.deadline = None
        self._count_attached(+1)
        return entry.session

    def adopt(self, session_id: str, identity: str, session: S) -> SessionEntry[S]:
        """A session this node did not hold, claimed for a new connection (its state from
        the database): enters ``CLAIMED``, attached by its connection or unclaimed as a local
        claim is. ``ValueError`` if the id is already here."""
        if session_id in self._entries:
            raise ValueError(f"session {session_id} is already held here")
        entry = SessionEntry(session_id, identity, session, SessionPhase.CLAIMED)
        self._entries[session_id] = entry
        self._count_attached(+1)
        return entry

    def unclaim(self, session_id: str) -> bool:
        """The claiming connection failed before it attached: park the session again, with
        a fresh grace. ``False`` if parking has stopped: the caller ends it."""
        entry = self._entries.get(session_id)
        if entry is None or entry.phase is not SessionPhase.CLAIMED:
            raise ValueError(f"session {session_id} is not claimed")
        if not self.parking or self.grace <= 0:
            return False
        entry.phase = SessionPhase.ATTACHED  # for park's bookkeeping
        return self.park(session_id, entry.ending or Ending(None, "resume failed"))

    def end(self, session_id: str) -> SessionEntry[S] | None:
        """The session is over for good (whatever its phase): it leaves the table. Returns
        its entry, ``None`` if it had already left."""
        entry = self._entries.pop(session_id, None)
        if entry is not None and entry.phase is not SessionPhase.PARKED:
            self._count_attached(-1)
        return entry

    async def run(self) -> None:
        """The reaper: expire each parked session whose grace ran out (``on_expire``).
        Runs until cancelled."""
        while True:
            while self._deadlines and not self._due(*self._deadlines[0]):
                heapq.heappop(self._deadlines)  # claimed or ended meanwhile
            changed = self._changed = trio.Event()
            if not self._deadlines:
                await changed.wait()
                continue
            deadline, session_id = self._deadlines[0]
            with trio.move_on_at(deadline):
                await changed.wait()
                continue
            heapq.heappop(self._deadlines)
            if self._due(deadline, session_id):
                await self._expire(session_id)

    async def expire_all(self) -> None:
        """Shutdown: stop parking, and end every parked session now (``on_expire``)."""
        self.parking = False
        self._deadlines.clear()
        for entry in list(self._entries.values()):
            if entry.phase is SessionPhase.PARKED:
                await self._expire(entry.session_id)

    # -- internals -----------------------------------------------------------------------------

    def _due(self, deadline: float, session_id: str) -> bool:
        entry = self._entries.get(session_id)
        return (
            entry is not None and entry.phase is SessionPhase.PARKED and entry.deadline == deadline
        )

    async def _expire(self, session_id: str) -> None:
        entry = self.end(session_id)
        if entry is not None and self.on_expire is not None:
            await self.on_expire(entry)

    def _count_attached(self, delta: int) -> None:
        self._attached += delta
        if self._attached == 0:
            self._drained.set()
        elif delta > 0 and self._drained.is_set():
            self._drained = trio.Event()
