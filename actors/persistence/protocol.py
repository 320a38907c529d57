"""What crosses between the persistence client (trio) and the persistence actor (its thread):
messages, the reply to a shipment, and its configuration. The actor's status is the public
one, :class:`runtime.status_model.PersistenceStatus`, which it fills in itself (one model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from runtime import trace
from runtime.bridge import CallbackFuture
from runtime.status_model import PersistenceStatus
from storage.rows import Record, SessionRow, TaskCreated

#: Records that start new work: refused with StorageUnavailable when storage cannot take more.
ADMISSIONS = (SessionRow, TaskCreated)


class Point(StrEnum):
    """How far a record must have gone before its writer is answered."""

    #: Written to the journal: survives the process (the page cache does), not the machine.
    WRITTEN = "written"
    #: Written and fdatasync-ed (a group commit): survives the machine.
    SYNCED = "synced"
    #: In the database; while the database is down, SYNCED instead (the node keeps serving).
    COMMITTED = "committed"
    #: In the database, whatever it takes: for records another node must see at once.
    DATABASE = "database"


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a node's records stand, as logical journal positions (bytes of records ever
    appended; :mod:`storage.journal`): everything before ``synced`` survives the machine,
    before ``committed`` is in the database. Sent to the client's listener after every append,
    commit and failure, from the actor's or the database writer's thread.

    ``placed``: shipments appended by this report, each with the position after its records.
    ``errors``: records that were not kept, by (shipment, position): refused by the journal's
    bound, by admission, or by the database when written from memory.
    """

    appended: int
    synced: int
    committed: int
    database_down: bool
    available: bool
    placed: Mapping[int, int] = field(default_factory=dict)
    errors: Mapping[tuple[int, int], Exception] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ship:
    """Records from the client, in the order its callers wrote them. ``waits``: the positions
    a caller awaits, each with the point it waits for. ``listener`` receives every
    :class:`Progress` (the same function for every shipment of one client)."""

    shipment_id: int
    records: tuple[Record, ...]
    waits: Mapping[int, Point]
    listener: Callable[[Progress], None]
    #: One postmark per record written (re-sent ones excepted): whose traces this serves.
    marks: tuple[trace.Postmark, ...] = ()

    @property
    def sync(self) -> bool:
        """Its append must be fsynced before the actor answers."""
        return Point.SYNCED in self.waits.values()


@dataclass(frozen=True, slots=True)
class Flush:
    """Write everything held (batch, coalesced activity) now and wait until the database has
    everything appended, or has failed: answered through ``reply`` with a
    :class:`PersistenceStatus`.

    ``force`` tries the database even while the breaker waits; ``retire`` also records that
    this node is stopping cleanly.
    """

    reply: CallbackFuture[PersistenceStatus]
    force: bool = False
    retire: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """The client's periodic pulse: fsync due journal lines, sync activity, heartbeat, retry
    the database. Answered with a :class:`PersistenceStatus`. ``snapshot``: what the node
    says about itself, written with its next heartbeat (storage.membership.NodeSnapshot)."""

    snapshot: dict[str, JsonValue] | None = None


@dataclass(frozen=True, slots=True)
class GetStatus:
    """Answered with a :class:`PersistenceStatus`, nothing else done."""


class PersistenceConfig(BaseModel):
    """Tuning of the persistence actor; the defaults suit a local or LAN database."""

    model_config = ConfigDict(frozen=True)

    max_batch: int = Field(
        default=5000, ge=1, description="Records per append and per transaction, at most."
    )
    max_held_records: int = Field(
        default=50_000,
        ge=1,
        description="Records the database writer may hold in memory; past it, spans are "
        "handed over without them and read back from the journal.",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds (libpq minimum 2).")
    statement_timeout: float = Field(
        default=15.0, gt=0, description="Per statement, set for each transaction."
    )
    write_deadline: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a database write may take before the writer's connection is cut "
        "(a database that stopped answering without closing the connection: "
        "statement_timeout never reaches it, keepalives may still be answered).",
    )
    slow_commit: float = Field(
        default=5.0, gt=0, description="A batch slower than this counts as a database failure."
    )
    breaker_threshold: int = Field(default=1, ge=1, description="Failures that open it.")
    breaker_reset: float = Field(default=0.5, gt=0, description="First wait before a trial.")
    breaker_max_reset: float = Field(default=30.0, gt=0, description="Longest wait.")
    writer_linger: float = Field(
        default=0.050,
        ge=0,
        description="Seconds the database writer waits for more records when nobody waits "
        "for the database (journal and async durability), so that it commits less often. "
        "50 ms rather than 10: at 50 sessions the writer's CPU per call fell from ~92 to "
        "~58 us and the database's from ~114 to ~39 us (issue 17, docs/benchmarks.md); "
        "what another node reads may be that much older, a write that waits for the "
        "database never lingers.",
    )
    replay_chunk: int = Field(default=2000, ge=1, description="Journal records per replay step.")
    sync_interval: float = Field(
        default=30.0, gt=0, description="How often coalesced session activity is written."
    )
    heartbeat_interval: float = Field(default=10.0, gt=0, description="Node heartbeat period.")
