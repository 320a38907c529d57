"""Durability: what a node waits for before it answers a call, and so what survives a crash.

One setting per node (``EXAI_DURABILITY``, ``exai serve --durability``). Two failures are told
apart, because they lose different things:

* **process killed** (SIGKILL, an OOM kill, a crash of the interpreter): the kernel's page
  cache survives, so whatever was ``write(2)``-n to the journal survives;
* **machine lost** (power, a kernel panic, a VM destroyed): only what was ``fdatasync``-ed
  survives (on disks that honour it).

=========  ===================================  ==================================================
mode       the answer waits for                 guarantees
=========  ===================================  ==================================================
commit     the database's commit of the call's  Both failures: an answered call is never lost;
           final state (the journal's fsync     every admitted call leaves a row (its intent,
           while the database is away); the     ``running``, is committed before the tool runs):
           intent is committed before the tool  completed, failed, cancelled, or ``interrupted``
           runs                                 when the node died under it.
journal    the journal's group ``fdatasync``    Process killed: as ``commit``. Machine lost: an
(default)  of the call's final state; records   answered call is never lost; every call of a tool
           reach the database in batches,       not declared read-only leaves a row (its intent
           behind the answer; a read-only       is fsynced before the tool runs); a read-only
           tool's intent is not waited for      call that was never answered may leave none.
async      nothing: records are written in the  Both failures: no row in an impossible state; a
           background                           call answered before the last confirmed flush
                                                (``PersistenceStatus.confirmed_at``) is present;
                                                the last moments' calls may be lost or left
                                                ``running`` (then ``interrupted`` by recovery).
=========  ===================================  ==================================================

Whatever the mode, :meth:`PersistenceClient.write_through` puts a record in the *database*
before the caller goes on, for the few records another node must see at once.
"""

from __future__ import annotations

from enum import StrEnum


class Durability(StrEnum):
    """The node's durability mode (module doc)."""

    COMMIT = "commit"
    JOURNAL = "journal"
    ASYNC = "async"
