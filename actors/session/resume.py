"""Sessions that lost their socket, kept for a grace period so the client can come back.

A session whose socket dropped without a clean close (1000 is the client ending it on
purpose) is parked. A client that reconnects within ``grace`` seconds presenting its session id (the
``Mcp-Session-Id`` header, or ``?session=`` for clients that cannot set headers) continues the
same session: id, negotiated version, client info and log level. What was running when the
socket dropped was cancelled (nobody could receive its answer) and is not replayed.

After the grace period the id is forgotten and its row is closed; presenting it then is
refused at the handshake. While the node shuts down nothing is parked: a process that is
going away cannot honour a resume.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable

import structlog
import trio

from actors.session.state import SessionState

log = structlog.get_logger("session")


class ResumableSessions:
    """Detached sessions by id, each with a deadline; one reaper task closes expired ones."""

    def __init__(self, grace: float, on_expire: Callable[[SessionState], Awaitable[None]]) -> None:
        self.grace = grace
        self._on_expire = on_expire
        self._parked: dict[str, tuple[SessionState, float]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._changed = trio.Event()
        self.parking = True

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, state: SessionState) -> bool:
        """Keep ``state`` for the grace period; ``False`` if parking has stopped (shutdown)."""
        if not self.parking or self.grace <= 0:
            return False
        deadline = trio.current_time() + self.grace
        self._parked[state.session_id] = (state, deadline)
        heapq.heappush(self._deadlines, (deadline, state.session_id))
        self._changed.set()
        log.info("session.detached", session_id=state.session_id, grace=self.grace)
        return True

    def claim(self, session_id: str, identity: str) -> SessionState | None:
        """The parked state, handed to a new connection; ``None`` if unknown, expired, or
        another client identity's (left parked: its owner may still come back)."""
        entry = self._parked.get(session_id)
        if entry is None or entry[0].identity != identity:
            return None
        del self._parked[session_id]
        return entry[0]

    async def run(self) -> None:
        """The reaper: close each session whose grace ran out. Cancel it to stop it."""
        while True:
            while self._deadlines and self._deadlines[0][1] not in self._parked:
                heapq.heappop(self._deadlines)  # claimed meanwhile
            changed = self._changed = trio.Event()
            if not self._deadlines:
                await changed.wait()
                continue
            deadline, session_id = self._deadlines[0]
            with trio.move_on_at(deadline):
                await changed.wait()
                continue
            heapq.heappop(self._deadlines)
            entry = self._parked.get(session_id)
            if entry is not None and entry[1] == deadline:
                del self._parked[session_id]
                await self._on_expire(entry[0])

    async def expire_all(self) -> None:
        """Shutdown: stop parking and close every parked session now."""
        self.parking = False
        parked, self._parked = self._parked, {}
        self._deadlines.clear()
        for state, _ in parked.values():
            await self._on_expire(state)
