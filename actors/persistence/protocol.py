"""What crosses between the persistence client (trio) and the persistence actor (its thread):
messages, the reply to a shipment, and its configuration. The actor's status is the public
one, :class:`runtime.status_model.PersistenceStatus`, which it fills in itself (one model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from runtime import trace
from storage.rows import Record, SessionRow, TaskCreated

#: Records that start new work: refused with StorageUnavailable when storage cannot take more.
ADMISSIONS = (SessionRow, TaskCreated)


@dataclass(frozen=True, slots=True)
class ShipmentResult:
    """How a shipment went. ``errors`` by position (absent: the record is committed, or durably
    journaled while the database is away); ``failure``: the actor died before it answered,
    nothing is known about any record."""

    errors: dict[int, Exception] = field(default_factory=dict)
    available: bool = True
    failure: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Ship:
    """Records from the client, in the order its callers wrote them. ``critical`` are the
    positions a caller awaits. ``reply`` is called exactly once, from the actor's thread."""

    records: tuple[Record, ...]
    critical: frozenset[int]
    reply: Callable[[ShipmentResult], None]
    #: One postmark per record written (re-sent ones excepted): whose traces this serves.
    marks: tuple[trace.Postmark, ...] = ()


@dataclass(frozen=True, slots=True)
class Flush:
    """Write everything held (batch, coalesced activity) now and try to empty the journal.

    ``force`` tries the database even while the breaker waits; ``retire`` also records that
    this node is stopping cleanly. Answered with a :class:`PersistenceStatus`.
    """

    force: bool = False
    retire: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """The client's periodic pulse: fsync due journal lines, sync activity, heartbeat, retry
    the database. Answered with a :class:`PersistenceStatus`."""


@dataclass(frozen=True, slots=True)
class GetStatus:
    """Answered with a :class:`PersistenceStatus`, nothing else done."""


class PersistenceConfig(BaseModel):
    """Tuning of the persistence actor; the defaults suit a local or LAN database."""

    model_config = ConfigDict(frozen=True)

    max_batch: int = Field(default=5000, ge=1, description="Records per transaction, at most.")
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds (libpq minimum 2).")
    statement_timeout: float = Field(
        default=15.0, gt=0, description="Per statement, set for each transaction."
    )
    slow_commit: float = Field(
        default=5.0, gt=0, description="A batch slower than this counts as a database failure."
    )
    breaker_threshold: int = Field(default=1, ge=1, description="Failures that open it.")
    breaker_reset: float = Field(default=0.5, gt=0, description="First wait before a trial.")
    breaker_max_reset: float = Field(default=30.0, gt=0, description="Longest wait.")
    replay_chunk: int = Field(default=2000, ge=1, description="Journal records per replay step.")
    sync_interval: float = Field(
        default=30.0, gt=0, description="How often coalesced session activity is written."
    )
    heartbeat_interval: float = Field(default=10.0, gt=0, description="Node heartbeat period.")
