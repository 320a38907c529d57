"""The node's one session registry: phases, operations, the reaper and the drain's view.

Unit tests on the autojump ``MockClock`` (time moves only where a test waits for a deadline);
the same registry under a real server is exercised by test_resume.py, test_drain.py,
test_status.py and test_identities.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runtime.server import Sessions
from runtime.session_registry import Ending, SessionEntry, SessionPhase, SessionRegistry

DROPPED = Ending(1006, "ABNORMAL_CLOSURE")


class Closed:
    """A connection's close function that remembers how it was closed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    async def __call__(self, code: int, reason: str) -> None:
        self.calls.append((code, reason))


class EndsOnClose(Closed):
    """As a session does: once its connection is closed, it ends (leaves the registry)."""

    def __init__(self, reg: SessionRegistry[str], session_id: str) -> None:
        super().__init__()
        self.reg = reg
        self.session_id = session_id

    async def __call__(self, code: int, reason: str) -> None:
        await super().__call__(code, reason)
        self.reg.end(self.session_id)


def registry(grace: float = 60.0) -> tuple[SessionRegistry[str], list[tuple[str, str | None]]]:
    """A registry of plain strings, and the list its ``on_expire`` appends to."""
    expired: list[tuple[str, str | None]] = []

    async def on_expire(entry: SessionEntry[str]) -> None:
        expired.append((entry.session, entry.ending.reason if entry.ending else None))

    return SessionRegistry(grace, on_expire), expired


async def test_attach_park_claim_attach_end_walks_the_phases() -> None:
    reg, _ = registry()
    entry = reg.attach("s1", "alice", "state-1", Closed())
    assert (entry.phase, reg.attached, reg.parked, len(reg)) == (SessionPhase.ATTACHED, 1, 0, 1)
    opened = entry.opened_at

    assert reg.park("s1", DROPPED)
    assert (entry.phase, entry.close, entry.ending, reg.attached, reg.parked) == (
        SessionPhase.PARKED,
        None,
        DROPPED,
        0,
        1,
    )
    assert reg.connections() == []

    assert reg.claim("s1", "alice") == "state-1"
    assert (reg.phase("s1"), reg.attached, reg.parked) == (SessionPhase.CLAIMED, 1, 0)

    again = reg.attach("s1", "alice", "state-1", Closed())
    assert again is entry  # the same session goes on, with its opening time
    assert (again.phase, again.opened_at) == (SessionPhase.ATTACHED, opened)

    assert reg.end("s1") is entry
    assert (len(reg), reg.attached, reg.phase("s1"), reg.end("s1")) == (0, 0, None, None)


async def test_a_claim_needs_a_parked_session_of_the_same_identity() -> None:
    reg, _ = registry()
    assert reg.claim("nobody", "alice") is None
    reg.attach("s1", "alice", "x", Closed())
    assert reg.claim("s1", "alice") is None  # attached: the handshake answers 409 before
    reg.park("s1", DROPPED)
    assert reg.claim("s1", "mallory") is None
    assert reg.phase("s1") is SessionPhase.PARKED  # its owner may still come back
    assert reg.claim("s1", "alice") == "x"
    assert reg.claim("s1", "alice") is None  # promised to one connection only


async def test_operations_out_of_phase_are_bugs_and_refused() -> None:
    reg, _ = registry()
    reg.attach("s1", "alice", "x", Closed())
    with pytest.raises(ValueError, match="attached"):
        reg.attach("s1", "alice", "x", Closed())
    with pytest.raises(ValueError, match="not claimed"):
        reg.unclaim("s1")
    reg.park("s1", DROPPED)
    with pytest.raises(ValueError, match="not attached"):
        reg.park("s1", DROPPED)


async def test_nothing_is_parked_without_grace_or_once_parking_stopped() -> None:
    reg, _ = registry(grace=0)
    reg.attach("s1", "alice", "x", Closed())
    assert not reg.park("s1", DROPPED)
    assert reg.phase("s1") is SessionPhase.ATTACHED  # the caller ends it
    reg2, _ = registry()
    reg2.attach("s1", "alice", "x", Closed())
    reg2.parking = False
    assert not reg2.park("s1", DROPPED)


async def test_the_reaper_expires_a_parked_session_at_its_deadline_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg, expired = registry(grace=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reg.run)
        reg.attach("stays", "alice", "a", Closed())
        reg.attach("goes", "alice", "b", Closed())
        reg.attach("comes-back", "alice", "c", Closed())
        reg.park("goes", DROPPED)
        reg.park("comes-back", DROPPED)
        await trio.sleep(30)
        assert reg.claim("comes-back", "alice") == "c"
        await trio.sleep(29.5)
        assert expired == []
        await trio.sleep(1)
        assert expired == [("b", "ABNORMAL_CLOSURE")]
        assert (reg.phase("goes"), reg.phase("comes-back"), reg.phase("stays")) == (
            None,
            SessionPhase.CLAIMED,
            SessionPhase.ATTACHED,
        )
        nursery.cancel_scope.cancel()


async def test_an_unclaimed_session_is_parked_again_with_a_fresh_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg, expired = registry(grace=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reg.run)
        reg.attach("s1", "alice", "x", Closed())
        reg.park("s1", DROPPED)
        await trio.sleep(50)
        reg.claim("s1", "alice")
        assert reg.unclaim("s1")  # the new connection failed before its 101
        await trio.sleep(59)
        assert (reg.phase("s1"), expired) == (SessionPhase.PARKED, [])
        await trio.sleep(2)
        assert expired == [("x", "ABNORMAL_CLOSURE")]
        nursery.cancel_scope.cancel()


async def test_expire_all_stops_parking_and_ends_every_parked_session() -> None:
    reg, expired = registry()
    for i in range(3):
        reg.attach(f"s{i}", "alice", f"x{i}", Closed())
    reg.park("s0", DROPPED)
    reg.park("s2", DROPPED)
    await reg.expire_all()
    assert sorted(expired) == [("x0", "ABNORMAL_CLOSURE"), ("x2", "ABNORMAL_CLOSURE")]
    assert (reg.parking, len(reg), reg.phase("s1")) == (False, 1, SessionPhase.ATTACHED)
    reg.claim("s1", "alice")
    assert not reg.park("s1", DROPPED)


async def test_the_server_view_counts_refuses_and_drains_from_the_registry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What runtime.server reads: the limit counts attached and claimed sessions, not parked
    ones; ``in`` is "attached to a connection" (409); the drain closes attached ones only
    and returns once none is left."""
    reg, _ = registry()
    sessions = Sessions(reg, max_sessions=2)
    closes = {name: EndsOnClose(reg, name) for name in ("a", "b", "c")}
    for name, close in closes.items():
        reg.attach(name, "alice", name, close)
    reg.park("c", DROPPED)
    assert (len(sessions), sessions.full, "a" in sessions, "c" in sessions) == (
        2,
        True,
        True,
        False,
    )
    reg.claim("c", "alice")
    assert "c" in sessions  # promised to a connection: a second resume gets 409 too
    reg.unclaim("c")

    assert await sessions.drain(None, within=10, code=1001, reason="server shutting down")
    assert closes["a"].calls == closes["b"].calls == [(1001, "server shutting down")]
    assert closes["c"].calls == []
    assert (reg.attached, reg.phase("c")) == (0, SessionPhase.PARKED)


async def test_a_slot_is_taken_with_the_capacity_check_and_given_back_once() -> None:
    """What the handshake does: the check and the taking are one step, so two handshakes
    cannot both pass the last free place; a place is given back once, however often its
    connection's end releases it."""
    reg, _ = registry()
    sessions = Sessions(reg, max_sessions=2)
    first, second, third = sessions.slot(), sessions.slot(), sessions.slot()
    assert (first.take(), second.take()) == (True, True)
    assert (sessions.full, third.take()) == (True, False)
    first.release()
    first.release()
    assert (sessions.full, third.take(), sessions.full) == (False, True, True)
    reg.attach("s1", "alice", "state-1", Closed())
    second.release()
    third.release()
    assert not sessions.full  # one attached session: the limit of 2 has room


async def test_parking_is_bounded_and_a_session_past_the_bound_is_left_to_end() -> None:
    """Clients that connect and drop over and over cannot grow the table without bound: past
    ``max_parked`` a dropped session is not parked (the caller ends it), and once a parked
    one is claimed or expires there is room again."""
    reg: SessionRegistry[str] = SessionRegistry(60.0, max_parked=2)
    for name in ("a", "b", "c"):
        reg.attach(name, "alice", name, Closed())
    assert (reg.park("a", DROPPED), reg.park("b", DROPPED), reg.park("c", DROPPED)) == (
        True,
        True,
        False,
    )
    assert (reg.parked, reg.phase("c")) == (2, SessionPhase.ATTACHED)
    reg.end("c")
    reg.claim("a", "alice")
    reg.attach("d", "alice", "d", Closed())
    assert reg.park("d", DROPPED)
