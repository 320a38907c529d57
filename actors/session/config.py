"""What every session is given by the node: its settings, its bounds, the shared services.

Shared by every session and never owned by one; built once by ``actors.node``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from actors.persistence import PersistenceClient
from actors.session.handover import Handover
from actors.status import LiveSession
from actors.tasks import TaskHost
from runtime.budget import NodeBudget
from runtime.mcp.tools import ToolRegistry
from runtime.session_registry import SessionRegistry
from runtime.supervision import Supervisor
from storage.tasks import MAX_RESULT_BYTES


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How a session's actor works (``EXAI_*`` settings, docs/operations.md)."""

    #: Tool calls one session runs at once (EXAI_MAX_INFLIGHT_PER_SESSION).
    max_inflight: int
    #: Whether the test-only fault methods (``$/exai/test/...``) exist.
    test_faults: bool
    #: This process's id in the database (sessions, tasks, heartbeats).
    node_id: str
    #: Shared by every session of the node: the total of running tool calls.
    total_slots: trio.CapacityLimiter
    #: Seconds of silence after which a call that asked for progress gets a heartbeat.
    heartbeat_interval: float = 5.0
    #: Tools per ``tools/list`` page.
    page_size: int = 50
    #: Bytes of a tool result kept in its task row (EXAI_MAX_STORED_RESULT_BYTES).
    max_result_bytes: int = MAX_RESULT_BYTES
    #: The node's MCP task host (docs/tasks.md); ``None``: tasks are not offered.
    tasks: TaskHost | None = None
    #: ``tasks/result`` requests one session may have waiting (EXAI_MAX_TASK_RESULT_WAITERS).
    max_task_result_waiters: int = 16
    #: 2026-07-28, the Tasks extension: seconds a server-directed task may take and still be
    #: answered as a plain call (EXAI_TASK_AFTER); past it the client gets the task's handle.
    task_after: float = 5.0
    #: Whether the node's tools may change while it runs (proxied servers): the
    #: ``tools.listChanged`` capability, and ``notifications/tools/list_changed``.
    tools_list_changed: bool = False


@dataclass(frozen=True, slots=True)
class SessionBounds:
    """What one session may hold, in items and bytes, and the node-wide byte budgets all
    sessions share (docs/operations.md, "Limits"). The outgoing bounds and the stall are the
    socket transport's (``runtime.websocket_transport``); the mailbox's are the session's."""

    #: Bytes of requests waiting in one session's mailbox (beyond: "server busy").
    mailbox_bytes: int = 8 * 2**20
    #: Bytes not yet taken by one session's peer (beyond: the session stops reading).
    outgoing_bytes: int = 8 * 2**20
    #: Messages not yet taken by one session's peer.
    outgoing_messages: int = 1024
    #: Seconds a peer may take nothing while output waits for it before it is closed (1008).
    stall_timeout: float = 30.0
    #: Seconds the close frame to such a peer may take before the TCP connection is dropped.
    close_timeout: float = 5.0
    #: Most members of one JSON-RPC batch.
    max_batch: int = 64
    #: Mailboxes of every session together.
    node_mailbox: NodeBudget = field(default_factory=lambda: NodeBudget("mailbox", 256 * 2**20))
    #: Outgoing queues of every session together.
    node_outgoing: NodeBudget = field(default_factory=lambda: NodeBudget("outgoing", 256 * 2**20))


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session is given by the node: shared, never owned by one session."""

    tools: ToolRegistry
    persistence: PersistenceClient
    config: SessionConfig
    mailbox_capacity: int
    max_message_bytes: int
    max_restarts: int
    restart_period: float
    #: Every session of the node (runtime/session_registry.py): what status, resume and the
    #: drain read. The node's has its resume grace; this default parks nothing.
    registry: SessionRegistry[LiveSession] = field(default_factory=lambda: SessionRegistry(0.0))
    #: The sessions supervisor (``/root/sessions``): each session's actor is its dynamic
    #: child. ``None`` outside a node: an in-memory session then runs one of its own.
    sessions: Supervisor | None = None
    bounds: SessionBounds = field(default_factory=SessionBounds)
    #: Called once a session is over for good (not while it is parked for resume), after its
    #: end is recorded: the rate limiter forgets its counters there.
    session_ended: Callable[[str], Awaitable[None]] | None = None
    #: Resumes on any node (actors/session/handover.py): parks published in the database,
    #: ids held elsewhere claimed from it. ``None``: resumes of this node's sessions only.
    handover: Handover | None = None
