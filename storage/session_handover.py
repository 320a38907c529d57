"""A session claimed by the node its client reconnects to, whichever node held it.

A session's row (``sessions``, db/migrations/..._session_handover.sql) names its holder
(``node_id``) and an ``epoch`` that every claim bumps. A session is *claimable* by a node
that does not hold it when, by the database's clock:

* it is parked (``parked_until`` in the future: its holder saw its socket drop and wrote
  :class:`~storage.rows.SessionParked`), or
* its holder is dead (no live row in ``nodes``: silent past the node timeout, or swept; see
  :mod:`storage.membership`) and died less than the resume grace ago (its last heartbeat
  within ``node_timeout + grace``): a node SIGKILLed never parked anything;

and it is ``active`` (or ``interrupted`` by the sweep of its dead holder), and the caller is
its identity. The claim is one conditional ``UPDATE`` (:meth:`SessionClaims.claim`): holder =
the caller, epoch + 1, no longer parked; two nodes claiming at once serialise on the row
lock, and the second finds it no longer claimable. A refusal then reads the row once more
to tell an attached session (409: its client is still connected to a live node) from one
that is unknown, ended, past its grace or another identity's (404, the same answer for all,
so a stranger learns nothing).

The node that held the session keeps a local copy until it next touches it: its own resume
(:meth:`SessionClaims.reclaim`, conditional on holder and epoch) finds it lost and drops the
copy; its park and its end are written only at its epoch (:mod:`storage.writes`), so a stale
copy never parks or ends the session its new holder runs.

A 2025-era Streamable HTTP session has no connection to be attached to, so it is claimed
whoever holds it (:meth:`SessionClaims.claim_http`), and a node ends its copies of sessions
whose row was closed elsewhere (:meth:`SessionClaims.ended`). A row records its
``transport``: a WebSocket resume never takes an HTTP session, nor the reverse.

Every method blocks (a pool of its own, :class:`~storage.read_pool.ReadPool`): call it
through ``trio.to_thread.run_sync``. Nothing here is session-level SQL, so it works through a
transaction-mode pooler (docs/deployment.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from storage.errors import StorageError
from storage.membership import LIVE
from storage.read_pool import ReadPool

__all__ = ["Claimed", "Refusal", "SessionClaimError", "SessionClaims"]


class SessionClaimError(StorageError):
    """The database could not be asked (unreachable, too slow, no connection)."""


class Refusal(enum.Enum):
    """Why a claim was refused (see the module doc)."""

    UNKNOWN = "unknown"
    """Another identity's session, ended, or past its resume grace: 404, for good."""
    ABSENT = "absent"
    """No row by that id (yet: a session a moment old may have its row on its way to the
    database behind its first answers): 404 as well, but not for good."""
    ATTACHED = "attached"
    """Its client is still connected to a live node: 409."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """The session's negotiated state, as its row holds it, now held by the caller."""

    session_id: str
    epoch: int
    previous_node: str | None
    protocol_version: str | None
    client_name: str | None
    client_version: str | None
    log_level: str | None
    tool_calls: int
    tool_errors: int


#: Session ids one :meth:`SessionClaims.ended` looks at, at most.
ENDED_BATCH = 1000

#: :data:`~storage.membership.LIVE` with a named parameter.
_HOLDER_LIVE = LIVE.replace("%s", "%(timeout)s")

_CLAIM = f"""
with before as (
    select node_id from sessions where session_id = %(id)s
)
update sessions s
   set node_id = %(me)s, epoch = s.epoch + 1, parked_until = null, status = 'active',
       closed_at = null, remote_addr = %(remote)s, version = s.version + 1,
       last_activity = greatest(s.last_activity, now())
 where s.session_id = %(id)s
   and s.identity = %(identity)s
   and s.transport = 'websocket'
   and s.status in ('active', 'interrupted')
   and (
        s.parked_until > now()
        or (
            s.parked_until is null
            and s.node_id is distinct from %(me)s
            and not exists (
                select 1 from nodes where node_id = s.node_id and {_HOLDER_LIVE}
            )
            and exists (
                select 1 from nodes
                 where node_id = s.node_id
                   and heartbeat_at > now() - make_interval(secs => %(window)s)
            )
        )
   )
returning s.epoch, (select node_id from before) as previous_node, s.protocol_version,
          s.client_name, s.client_version, s.log_level, s.tool_calls, s.tool_errors
"""

#: A 2025-era Streamable HTTP session (``Mcp-Session-Id``) has no connection to be attached
#: to: each request stands alone, and a load balancer may send each to another node. So a
#: node that receives a request for an id it does not hold claims the row whoever holds it,
#: alive or dead (same identity, not ended): the node that held it keeps a copy it serves on
#: without asking the database (no round trip per request), and whose end, written at its
#: old epoch, changes nothing; the row ends with the last claimer's copy.
_CLAIM_HTTP = """
with before as (
    select node_id from sessions where session_id = %(id)s
)
update sessions s
   set node_id = %(me)s, epoch = s.epoch + 1, status = 'active', closed_at = null,
       remote_addr = %(remote)s, version = s.version + 1,
       last_activity = greatest(s.last_activity, now())
 where s.session_id = %(id)s
   and s.identity = %(identity)s
   and s.transport = 'http'
   and s.status in ('active', 'interrupted')
returning s.epoch, (select node_id from before) as previous_node, s.protocol_version,
          s.client_name, s.client_version, s.log_level, s.tool_calls, s.tool_errors
"""

_WHY_NOT = f"""
select s.identity = %(identity)s and s.transport = 'websocket' as mine,
       s.status = 'active' as active, s.node_id = %(me)s as here,
       coalesce(s.parked_until > now(), false) as parked,
       exists (
           select 1 from nodes where node_id = s.node_id and {_HOLDER_LIVE}
       ) as holder_live
  from sessions s
 where s.session_id = %(id)s
"""

_RECLAIM = """
with claimed as (
    update sessions
       set epoch = epoch + 1, parked_until = null, status = 'active', remote_addr = %(remote)s,
           version = version + 1, last_activity = greatest(last_activity, now())
     where session_id = %(id)s and node_id = %(me)s and epoch = %(epoch)s
       and status in ('active', 'interrupted')
    returning epoch
)
select (select epoch from claimed) as epoch,
       exists (select 1 from sessions where session_id = %(id)s) as known
"""


class SessionClaims:
    """Claims of sessions by this node (``me``), on its own small pool to ``url``.

    ``node_timeout`` is when a silent node counts as dead, ``grace`` the resume grace
    (``EXAI_NODE_TIMEOUT``, ``EXAI_RESUME_GRACE``; seconds)."""

    def __init__(self, url: str, me: str, *, node_timeout: float, grace: float) -> None:
        self.me = me
        self.node_timeout = node_timeout
        self.grace = grace
        self._url = url
        self._pool: ReadPool | None = None

    def open(self) -> None:
        """A fresh pool (connecting in its own threads; returns at once): the listener
        child opens one per incarnation, and a closed pool cannot be opened again."""
        self._pool = ReadPool(
            self._url,
            name="exai-session-claims",
            what="sessions",
            error=SessionClaimError,
            max_connections=2,
            wait_seconds=5.0,
            statement_timeout_ms=5_000,
        )
        self._pool.open()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        pool = self._pool
        if pool is None:
            raise SessionClaimError("the session claims' pool is not open")
        return pool.query(sql, params)

    def claim(self, session_id: str, identity: str, remote: str) -> Claimed | Refusal:
        """Claim a session this node does not hold (see the module doc). One round trip if
        claimed, two if refused. Raises :class:`SessionClaimError`."""
        params = {
            "id": session_id,
            "identity": identity,
            "me": self.me,
            "remote": remote,
            "timeout": self.node_timeout,
            "window": self.node_timeout + self.grace,
        }
        rows = self._query(_CLAIM, params)
        if rows:
            return _claimed(session_id, rows[0])
        why = self._query(_WHY_NOT, params)
        if not why:
            return Refusal.ABSENT
        row = why[0]
        # Held by this node, which holds no such session (its caller looked first): it
        # ended here, its end on its way to the database.
        attached = row["holder_live"] and not row["here"]
        if row["mine"] and row["active"] and not row["parked"] and attached:
            return Refusal.ATTACHED
        return Refusal.UNKNOWN

    def claim_http(self, session_id: str, identity: str, remote: str) -> Claimed | Refusal:
        """Claim a 2025-era HTTP session, whoever holds it (see ``_CLAIM_HTTP``): one round
        trip; ``Refusal.ABSENT`` if it is no such session of this identity, or ended (not
        told apart: an HTTP session's row is committed before its id is given out, but an
        ended one may be on its way; never remembered).
        Raises :class:`SessionClaimError`."""
        rows = self._query(
            _CLAIM_HTTP,
            {"id": session_id, "identity": identity, "me": self.me, "remote": remote},
        )
        return _claimed(session_id, rows[0]) if rows else Refusal.ABSENT

    def ended(self, session_ids: list[str]) -> set[str]:
        """Which of ``session_ids`` are closed, asked :data:`ENDED_BATCH` ids per query: a
        2025-era HTTP session's copy ends once its row has (a DELETE on another node). An
        ``interrupted`` row (its last holder died) is not: a copy goes on, and takes it over
        when asked. Raises :class:`SessionClaimError`."""
        closed: set[str] = set()
        for start in range(0, len(session_ids), ENDED_BATCH):
            rows = self._query(
                "select session_id from sessions"
                " where session_id = any(%(ids)s) and status = 'closed'",
                {"ids": session_ids[start : start + ENDED_BATCH]},
            )
            closed.update(row["session_id"] for row in rows)
        return closed

    def reclaim(self, session_id: str, epoch: int, remote: str) -> int | None:
        """Resume a session this node holds parked at ``epoch``: its new epoch, or ``None``
        if another node claimed it meanwhile (this node's copy is stale). A session whose row
        is not written yet (the journal behind) is still this node's: its epoch is returned
        unchanged. Raises :class:`SessionClaimError`."""
        rows = self._query(
            _RECLAIM, {"id": session_id, "me": self.me, "epoch": epoch, "remote": remote}
        )
        row = rows[0]
        if row["epoch"] is not None:
            return int(row["epoch"])
        return None if row["known"] else epoch


def _claimed(session_id: str, row: dict[str, Any]) -> Claimed:
    return Claimed(
        session_id=session_id,
        epoch=row["epoch"],
        previous_node=row["previous_node"],
        protocol_version=row["protocol_version"],
        client_name=row["client_name"],
        client_version=row["client_version"],
        log_level=row["log_level"],
        tool_calls=row["tool_calls"],
        tool_errors=row["tool_errors"],
    )
