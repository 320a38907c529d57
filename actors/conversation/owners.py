"""Which database owner a client identity is: ``threads.owner_id`` is a UUID.

The column is a UUID because on Supabase it is compared with ``auth.uid()`` (a signed-in user
may read their own threads, db/migrations/*_supabase.sql). So an identity that *is* a UUID
(a Supabase user id used as a client name) is stored as itself, and any other name as a
name-based UUID (RFC 4122 version 5) in a namespace of our own: deterministic, so the same
name owns the same threads after a restart, on every node, with no table of names.
"""

from __future__ import annotations

from uuid import UUID, uuid5

#: Fixed forever: changing it would orphan every stored thread.
OWNER_NAMESPACE = UUID("6f1d3c2e-8b4a-5e7f-9c10-2a4b6d8e0f13")


def owner_id(identity: str) -> UUID:
    try:
        return UUID(identity)
    except ValueError:
        return uuid5(OWNER_NAMESPACE, identity)
