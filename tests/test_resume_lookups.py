"""Resumes of ids a node does not hold cost the database a bounded amount
(actors/session/handover.py): a flood of unknown ids, distinct or repeated, is answered
without a round trip each; the refusal beyond the rate is logged once.

The claims are a counting stand-in for :class:`storage.session_handover.SessionClaims` (what
the database would answer is not the point; how often it is asked is), the clock a fake one.
"""

from __future__ import annotations

import uuid
from typing import cast

import psycopg
import pytest
import structlog

from actors.persistence import PersistenceClient
from actors.session.handover import Handover, LookupRefused, ResumeLookups
from storage.session_handover import ENDED_BATCH, Claimed, Refusal, SessionClaims
from tests.memory_support import migrated_database


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _CountingClaims:
    """Answers every claim as the database would for an unknown id, counting them."""

    me = "node-test"
    grace = 60.0

    def __init__(self, answer: Claimed | Refusal = Refusal.UNKNOWN) -> None:
        self.calls = 0
        self.answer = answer

    def claim(self, session_id: str, identity: str, remote: str) -> Claimed | Refusal:
        self.calls += 1
        return self.answer


def _handover(claims: _CountingClaims, lookups: ResumeLookups) -> Handover:
    return Handover(cast(SessionClaims, claims), cast(PersistenceClient, None), lookups)


def test_only_canonical_uuids_are_plausible() -> None:
    issued = str(uuid.uuid4())
    assert ResumeLookups.plausible(issued)
    assert not ResumeLookups.plausible(issued.upper())
    assert not ResumeLookups.plausible("not-a-session")
    assert not ResumeLookups.plausible(issued + "x")
    assert not ResumeLookups.plausible("")


def test_the_bucket_refills_at_its_rate() -> None:
    clock = _Clock()
    lookups = ResumeLookups(rate=4, burst=5, clock=clock)
    assert [lookups.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.25  # one more token
    assert [lookups.take() for _ in range(2)] == [True, False]
    clock.now += 60  # refilled to the burst, no more
    assert sum(lookups.take() for _ in range(10)) == 5


def test_remembered_404s_expire_and_are_bounded() -> None:
    clock = _Clock()
    lookups = ResumeLookups(negative_ttl=30, max_negative=3, clock=clock)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for session_id in ids:
        lookups.unknown("alice", session_id)
    assert not lookups.known_unknown("alice", ids[0])  # the oldest, forgotten past the bound
    assert all(lookups.known_unknown("alice", i) for i in ids[1:])
    assert not lookups.known_unknown("bob", ids[1])  # per identity
    clock.now += 30
    assert not lookups.known_unknown("alice", ids[1])  # expired


async def test_a_flood_of_distinct_unknown_ids_costs_at_most_the_burst() -> None:
    clock = _Clock()
    claims = _CountingClaims()
    handover = _handover(claims, ResumeLookups(rate=50, burst=100, clock=clock))
    refused = 0
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            try:
                answer = await handover.claim(str(uuid.uuid4()), "mallory", "1.2.3.4:5")
            except LookupRefused:
                refused += 1
            else:
                assert answer is Refusal.UNKNOWN
    assert claims.calls == 100  # the burst; the clock did not move
    assert refused == 900  # each answered 503 + Retry-After at once
    assert [e["event"] for e in logs].count("session.resume_lookups_refused") == 1


async def test_a_repeated_unknown_id_and_malformed_ids_cost_one_lookup_and_none() -> None:
    claims = _CountingClaims()
    handover = _handover(claims, ResumeLookups(clock=_Clock()))
    unknown = str(uuid.uuid4())
    for _ in range(1000):
        assert await handover.claim(unknown, "mallory", "1.2.3.4:5") is Refusal.UNKNOWN
        assert await handover.claim("../../etc", "mallory", "1.2.3.4:5") is Refusal.UNKNOWN
    assert claims.calls == 1


@pytest.mark.parametrize("answer", [Refusal.ATTACHED, Refusal.ABSENT])
async def test_a_409_or_an_absent_row_is_not_remembered(answer: Refusal) -> None:
    """An attached session may be parked a moment later, and a session a moment old may
    have its row on its way: asked again each time (the bucket still bounds the cost)."""
    claims = _CountingClaims(answer)
    handover = _handover(claims, ResumeLookups(clock=_Clock()))
    session_id = str(uuid.uuid4())
    for _ in range(3):
        assert await handover.claim(session_id, "alice", "1.2.3.4:5") is answer
    assert claims.calls == 3


async def test_a_claimed_row_becomes_the_state_it_negotiated() -> None:
    session_id = str(uuid.uuid4())
    claimed = Claimed(
        session_id=session_id,
        epoch=3,
        previous_node="node-a",
        protocol_version="2025-06-18",
        client_name="ide",
        client_version="1.2",
        log_level="warning",
        tool_calls=7,
        tool_errors=2,
    )
    handover = _handover(_CountingClaims(claimed), ResumeLookups(clock=_Clock()))
    state = await handover.claim(session_id, "alice", "1.2.3.4:5")
    assert not isinstance(state, Refusal)
    assert (state.session_id, state.identity, state.remote) == (session_id, "alice", "1.2.3.4:5")
    assert (state.protocol_version, state.initialized, state.log_level) == (
        "2025-06-18",
        True,
        "warning",
    )
    assert state.client is not None
    assert (state.client.name, state.client.version) == ("ide", "1.2")
    assert (state.tool_calls, state.tool_errors, state.epoch) == (7, 2, 3)


def test_every_copy_is_checked_for_an_end_elsewhere_past_one_batch(database_url: str) -> None:
    """A node with more 2025-era HTTP copies than one query's batch asks about all of them
    (the first version cut the list at the batch, so the same first 1,000 were asked about
    on every pass and an end elsewhere never reached the rest)."""
    with migrated_database(database_url) as url:
        ids = [f"s-{n:05d}" for n in range(ENDED_BATCH + 5)]
        last = ids[-1]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "insert into sessions (session_id, status)"
                " select s, 'active' from unnest(%s::text[]) s",
                (ids,),
            )
            conn.execute("update sessions set status = 'closed' where session_id = %s", (last,))
        claims = SessionClaims(url, "me", node_timeout=30, grace=60)
        claims.open()
        try:
            assert claims.ended(ids) == {last}
        finally:
            claims.close()
