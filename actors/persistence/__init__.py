"""Persistence: the pykka actor that owns every database write, and its trio client.

See docs/persistence.md for the guarantees (delivery classes, journal, recovery) and
``actor``/``client`` for how they are kept.
"""

from actors.persistence.actor import PersistenceActor
from actors.persistence.client import PersistenceClient
from actors.persistence.protocol import PersistenceConfig
from runtime.pykka_client import Resolve
from runtime.status_model import PersistenceStatus
from storage.errors import ActorUnavailable, StorageUnavailable, WriteConflict, WriteRejected

__all__ = [
    "ActorUnavailable",
    "PersistenceActor",
    "PersistenceClient",
    "PersistenceConfig",
    "PersistenceStatus",
    "Resolve",
    "StorageUnavailable",
    "WriteConflict",
    "WriteRejected",
]
