"""Byte budgets: how many bytes a queue holds, against its own bound and the node's.

Every queue a client can fill (a session's mailbox, a session's outgoing queue) is bounded in
items by its own structure and in bytes by a :class:`ByteBudget`. Each session's budget also
counts against one :class:`NodeBudget` per kind of queue, so that ten thousand sessions each
within their own bound still cannot exhaust the machine together.

The admission rule is the same at both levels: *a queue takes a message when it is empty, or
when the message fits under its bound*. The "empty" clause guarantees progress: one message,
however large (within the frame limit), always gets through an otherwise idle queue, so a bound
smaller than a message can slow a client down but never wedge it. Consequently a queue holds at
most ``max(limit, one message)`` bytes.

All of it runs in the trio thread: plain integers, no locks.
"""

from __future__ import annotations

__all__ = ["ByteBudget", "NodeBudget"]


class NodeBudget:
    """The bytes held by every queue of one kind on this node (``used``), and their bound.

    ``name`` names the kind in status and metrics (``mailbox``, ``outgoing``).
    """

    __slots__ = ("limit", "name", "used")

    def __init__(self, name: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{name}: a byte bound must be positive, got {limit}")
        self.name = name
        self.limit = limit
        self.used = 0

    def admits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes fits (see the module doc's rule)."""
        return self.used == 0 or self.used + size <= self.limit


class ByteBudget:
    """The bytes one queue holds, under ``limit`` and under its node's budget."""

    __slots__ = ("limit", "node", "used")

    def __init__(self, limit: int, node: NodeBudget | None = None) -> None:
        if limit < 1:
            raise ValueError(f"a byte bound must be positive, got {limit}")
        self.limit = limit
        self.node = node
        self.used = 0

    def admits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes fits here and on the node."""
        if self.used != 0 and self.used + size > self.limit:
            return False
        return self.node is None or self.node.admits(size)

    def add(self, size: int) -> None:
        """Count ``size`` bytes as held (call only after :meth:`admits` said yes, or for
        control messages that are allowed to overshoot by their few bytes)."""
        self.used += size
        if self.node is not None:
            self.node.used += size

    def remove(self, size: int) -> None:
        """The queue let go of ``size`` bytes (taken by the actor, written to the peer)."""
        self.used -= size
        if self.node is not None:
            self.node.used -= size

    def release_all(self) -> None:
        """The queue is gone: give back whatever it still held, so the node's total stays
        true whatever path ended the queue (cannot raise)."""
        if self.node is not None:
            self.node.used -= self.used
        self.used = 0
