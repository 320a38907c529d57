"""The node's :class:`~runtime.status_model.StatusSource`: one snapshot from the live parts.

It holds references to what the node already runs (the WebSocket server and its sessions
supervisor, the persistence client, the rate limiter, breakers, supervisors, pykka actors)
and reads them when asked; it owns none of them and keeps no copy, so a snapshot is never
stale. Two parts are pykka actors that must be *asked*: each ask is bounded by
``ask_timeout`` and a part that does not answer in time is reported in ``problems`` instead of
hanging the status command, which is when an operator needs it most.

Sessions are read from the node's one session registry (:mod:`runtime.session_registry`),
which the session lifecycle keeps: each entry's phase (attached, parked) and its
:class:`LiveSession`, on which its actor counts restarts and, on the
:class:`~runtime.trace.Meter` it passes to :func:`runtime.trace.handling`, messages.

A proxied MCP server's node (``/root/servers/<name>``) shows the server's own state over its
child's (:class:`~actors.servers.proxy.ProxiedServer`: ``running`` while up, ``starting`` /
``restarting`` between incarnations, ``down`` past its restart intensity), the restarts of its
process and why its last incarnation ended: its child task runs on through all of these, so
the supervisor's view alone would show it ``running``, never restarted (docs/tools.md).
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

import pykka
import trio

from actors.servers.proxy import ProxiedServer, ServerState
from runtime.breaker import BreakerSnapshot, FailureRateBreaker
from runtime.budget import NodeBudget
from runtime.dead_letters import DeadLetters, dead_letters
from runtime.log_throttle import LogThrottle
from runtime.logs import dropped_log_lines
from runtime.mailbox import ActorRef
from runtime.mcp.tool_api import FunctionTool
from runtime.mcp.tools import ToolRegistry
from runtime.mcp.versions import SUPPORTED_VERSIONS
from runtime.pykka_supervision import ActorName
from runtime.server import Sessions
from runtime.session_registry import SessionEntry, SessionPhase, SessionRegistry
from runtime.status_model import (
    ActorState,
    ActorStatus,
    BreakerStatus,
    DeadLettersStatus,
    LimitsStatus,
    ListenerStatus,
    NodeInfo,
    NodeStatus,
    PersistenceStatus,
    ProxiedServerStatus,
    SessionStatus,
    ToolStatus,
)
from runtime.supervision import Supervisor
from runtime.tool_workers import ToolWorkers
from runtime.trace import Meter
from storage.rows import SessionTransport

if TYPE_CHECKING:  # at run time these would import the session package, which imports us
    from actors.persistence import PersistenceClient
    from actors.rate_limiter import RateLimiter, SessionUsage
    from actors.session.state import SessionState

ROOT = "/root"
SESSIONS = "/root/sessions"
PERSISTENCE = "/root/persistence"


def _version() -> str:
    try:
        return metadata.version("exai-runtime")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class OutgoingQueue(Protocol):
    """What status and the drain read of a session's output not yet taken by its peer: a
    WebSocket session's :class:`~runtime.outbox.Outbox`, or an HTTP session's transport
    (every stream of it together)."""

    def __len__(self) -> int: ...

    @property
    def queued_bytes(self) -> int: ...


@dataclass(eq=False, slots=True)
class LiveSession:
    """What the node keeps of one session in its registry (the ``S`` of
    :class:`~runtime.session_registry.SessionRegistry`); lives from connect to the session's
    end, across resumes (a resumed session continues the same one)."""

    state: SessionState
    mailbox: ActorRef[Any] | None
    """``None`` while parked: its mailbox went with its socket."""
    outbox: OutgoingQueue | None = None
    """Its outgoing queue; ``None`` while parked."""
    transport: SessionTransport = field(kw_only=True)
    """How its client reaches it, for status (a resumed session keeps its own)."""
    meter: Meter = field(default_factory=Meter)
    #: Its refusals' log lines, throttled per kind (``SessionActor``), across restarts.
    refusals: LogThrottle = field(default_factory=LogThrottle)
    restarts: int = 0
    last_error: str | None = None

    @property
    def path(self) -> str:
        return f"{SESSIONS}/{self.state.session_id}"

    def restarted(self, error: BaseException) -> None:
        """The session actor crashed and is being restarted over the same state."""
        self.restarts += 1
        self.last_error = repr(error)


PykkaActor = ActorName[Any] | pykka.ActorRef[Any]


class NodeStatusSource:
    """Builds a :class:`NodeStatus` from the node's parts; see the module doc.

    Everything but ``node_id``, ``sessions``, ``url`` and ``registry`` is optional, because
    the parts arrive with their issues; a part not given is simply absent from the snapshot.
    ``url``, ``http_url``, ``limiter`` and ``breakers`` are asked at each snapshot: those parts
    come and go with the root's children (a restarted child brings a new one).
    """

    def __init__(
        self,
        *,
        node_id: str,
        sessions: Sessions,
        url: Callable[[], str | None],
        registry: SessionRegistry[LiveSession],
        persistence: PersistenceClient | None = None,
        limiter: Callable[[], RateLimiter | None] | None = None,
        breakers: Callable[[], Iterable[FailureRateBreaker | BreakerSnapshot]] | None = None,
        supervisors: Sequence[Supervisor] = (),
        pykka_actors: Mapping[str, PykkaActor] | None = None,
        meters: Mapping[str, Meter] | None = None,
        tool_slots: trio.CapacityLimiter | None = None,
        tool_workers: ToolWorkers | None = None,
        byte_budgets: Sequence[NodeBudget] = (),
        letters: DeadLetters = dead_letters,
        ask_timeout: float = 2.0,
        listener: Callable[[], ListenerStatus] | None = None,
        http_url: Callable[[], str | None] | None = None,
        servers: Callable[[], list[ProxiedServerStatus]] | None = None,
        proxied: Mapping[str, ProxiedServer] | None = None,
        tools: ToolRegistry | None = None,
    ) -> None:
        self._node_id = node_id
        self._sessions = sessions
        self._url = url
        self._registry = registry
        self._persistence = persistence
        self._limiter = limiter
        self._breakers = breakers
        self._supervisors = supervisors
        self._pykka = dict(pykka_actors or {})
        self._meters = dict(meters or {})
        self._tool_slots = tool_slots
        self._tool_workers = tool_workers
        self._byte_budgets = {budget.name: budget for budget in byte_budgets}
        self._letters = letters
        self._ask_timeout = ask_timeout
        self._listener = listener
        self._http_url = http_url
        self._servers = servers
        self._tools = tools
        #: Tree path (``/root/servers/<name>``) to the proxied server its child runs.
        self._proxied = dict(proxied or {})
        self._started_at = datetime.now(UTC)
        self._started = time.monotonic()

    async def status(self) -> NodeStatus:
        problems: list[str] = []
        now = time.monotonic()
        persistence = await self._persistence_status(problems)
        limits, usage = await self._limits(problems)
        actors = self._actors(now)
        sessions = [self._session(entry, now, usage) for entry in self._registry]
        sessions.sort(key=lambda s: s.session_id)
        slots = self._tool_slots
        node = NodeInfo(
            node_id=self._node_id,
            hostname=os.uname().nodename,
            pid=os.getpid(),
            version=_version(),
            url=self._url() or None,
            http_url=(self._http_url() or None) if self._http_url is not None else None,
            started_at=self._started_at,
            uptime_s=round(now - self._started, 3),
            protocol_versions=list(SUPPORTED_VERSIONS),
            sessions_live=self._registry.attached,
            sessions_detached=self._registry.parked,
            sessions_max=self._sessions.max_sessions,
            tool_calls_in_flight=int(slots.borrowed_tokens)
            if slots is not None
            else sum(s.in_flight for s in sessions),
            tool_calls_max=int(slots.total_tokens) if slots is not None else None,
            mailbox_bytes=self._budget_used("mailbox", sum(s.queued_bytes for s in sessions)),
            outgoing_bytes=self._budget_used("outgoing", sum(s.outgoing_bytes for s in sessions)),
            mailbox_bytes_max=self._budget_limit("mailbox"),
            outgoing_bytes_max=self._budget_limit("outgoing"),
            log_lines_dropped=dropped_log_lines(),
        )
        if persistence is not None:
            queue = next((a.mailbox_depth for a in actors if a.path == PERSISTENCE), None)
            persistence = persistence.model_copy(update={"queue": queue or 0})
        return NodeStatus(
            taken_at=datetime.now(UTC),
            node=node,
            actors=actors,
            sessions=sessions,
            limits=limits,
            breakers=[_breaker(b) for b in self._breaker_list()],
            persistence=persistence,
            dead_letters=DeadLettersStatus(
                total=self._letters.total, by_reason=self._letters.by_reason()
            ),
            listener=self._listener() if self._listener is not None else None,
            tool_threads=(
                self._tool_workers.snapshot() if self._tool_workers is not None else None
            ),
            tools=tool_statuses(self._tools) if self._tools is not None else [],
            servers=self._servers() if self._servers is not None else [],
            problems=problems,
        )

    def _budget_used(self, name: str, fallback: int) -> int:
        budget = self._byte_budgets.get(name)
        return budget.used if budget is not None else fallback

    def _budget_limit(self, name: str) -> int | None:
        budget = self._byte_budgets.get(name)
        return budget.limit if budget is not None else None

    # -- pykka parts, asked with a deadline ----------------------------------------------------

    async def _persistence_status(self, problems: list[str]) -> PersistenceStatus | None:
        if self._persistence is None:
            return None
        try:
            with trio.fail_after(self._ask_timeout):
                status = await self._persistence.status()
        except trio.TooSlowError:
            problems.append(f"persistence: no answer within {self._ask_timeout:g} s")
            return None
        except Exception as exc:
            problems.append(f"persistence: {exc!r}")
            return None
        return status  # the actor's own model, as it answered

    async def _limits(
        self, problems: list[str]
    ) -> tuple[LimitsStatus | None, dict[str, SessionUsage]]:
        if self._limiter is None:
            return None, {}
        limiter = self._limiter()
        if limiter is None:
            problems.append("rate limiter: not running (starting or restarting)")
            return None, {}
        try:
            with trio.fail_after(self._ask_timeout):
                snapshot = await limiter.snapshot()
        except trio.TooSlowError:
            problems.append(f"rate limiter: no answer within {self._ask_timeout:g} s")
            return None, {}
        except Exception as exc:
            problems.append(f"rate limiter: {exc!r}")
            return None, {}
        usage = {s.session_id: s for s in snapshot.sessions}
        # The limiter's own model of each provider, as it answered.
        limits = LimitsStatus(
            providers=snapshot.providers,
            sessions_tracked=len(usage),
            mode=snapshot.mode,
            live_nodes=snapshot.live_nodes,
        )
        return limits, usage

    def _breaker_list(self) -> Iterable[FailureRateBreaker | BreakerSnapshot]:
        return self._breakers() if self._breakers is not None else ()

    # -- the tree ------------------------------------------------------------------------------

    def _actors(self, now: float) -> list[ActorStatus]:
        # Insertion order is display order among siblings: the supervisors' start order.
        found: dict[str, dict[str, Any]] = {
            ROOT: {"kind": "node", "state": "running", "uptime_s": round(now - self._started, 3)},
        }
        supervisor_paths = set()
        for supervisor in self._supervisors:
            snapshot = supervisor.snapshot()
            if snapshot.path is None:
                continue
            supervisor_paths.add(snapshot.path)
            entry = found.setdefault(snapshot.path, {})
            entry.setdefault("kind", "supervisor")
            entry["state"] = "running" if snapshot.running else "stopped"
            taken = snapshot.taken_at
            for child in snapshot.children:
                child_entry = found.setdefault(child.path, {})
                child_entry.setdefault("kind", "task")
                child_entry["state"] = child.state.value
                child_entry["restarts"] = child.restarts
                child_entry["last_error"] = child.last_error
                if taken is not None and child.started_at is not None:
                    child_entry["uptime_s"] = round(taken - child.started_at, 3)
        for path in supervisor_paths:
            found[path]["kind"] = "node" if path == ROOT else "supervisor"
        for path, server in self._proxied.items():
            proxied = found.get(path)
            if proxied is not None and proxied.get("state") == "running":
                # Its child runs: what it runs is the server, whose state the tree shows.
                proxied.update(_proxied_view(server, proxied))
        sessions = found.setdefault(SESSIONS, {"state": "running"})
        sessions["kind"] = "supervisor"  # runtime.server.Sessions, whatever runs it
        for path, actor in self._pykka.items():
            entry = found.setdefault(path, {"state": "running"})
            entry["kind"] = "pykka"
            entry.update(_pykka_view(actor))
        for path, meter in self._meters.items():
            found.setdefault(path, {"kind": "task", "state": "running"}).update(
                _meter_view(meter, now)
            )
        for registered in sorted(self._registry, key=lambda e: e.session_id):
            session = registered.session
            # Re-inserted, so that sessions are siblings in id order, whatever their actors'
            # start order under the sessions supervisor (parked ones have no actor).
            found.pop(session.path, None)
            found[session.path] = {
                "kind": "session",
                "state": "detached" if registered.phase is SessionPhase.PARKED else "running",
                "mailbox_depth": session.mailbox.depth if session.mailbox is not None else None,
                "mailbox_capacity": (
                    session.mailbox.capacity if session.mailbox is not None else None
                ),
                "restarts": session.restarts,
                "uptime_s": round(now - registered.opened_at, 3),
                "last_error": session.last_error,
                **_meter_view(session.meter, now),
            }
        return [
            ActorStatus(
                path=path,
                kind=info.get("kind", "task"),
                state=info.get("state", "running"),
                mailbox_depth=info.get("mailbox_depth"),
                mailbox_capacity=info.get("mailbox_capacity"),
                restarts=info.get("restarts", 0),
                uptime_s=info.get("uptime_s"),
                last_activity_s=info.get("last_activity_s"),
                messages_handled=info.get("messages_handled"),
                messages_failed=info.get("messages_failed"),
                last_error=info.get("last_error"),
            )
            for path, info in ((path, found[path]) for path in _tree_order(list(found)))
        ]

    def _session(
        self, registered: SessionEntry[LiveSession], now: float, usage: Mapping[str, SessionUsage]
    ) -> SessionStatus:
        entry = registered.session
        state = entry.state
        used = usage.get(state.session_id)
        client = state.client
        last = entry.meter.last_activity
        return SessionStatus(
            session_id=state.session_id,
            state="detached" if registered.phase is SessionPhase.PARKED else "attached",
            transport=entry.transport,
            remote=state.remote,
            client_name=client.name if client is not None else None,
            client_version=client.version if client is not None else None,
            protocol_version=state.protocol_version,
            initialized=state.initialized,
            in_flight=state.in_flight,
            queued=entry.mailbox.depth if entry.mailbox is not None else 0,
            queued_bytes=entry.mailbox.queued_bytes if entry.mailbox is not None else 0,
            outgoing=len(entry.outbox) if entry.outbox is not None else 0,
            outgoing_bytes=entry.outbox.queued_bytes if entry.outbox is not None else 0,
            restarts=entry.restarts,
            uptime_s=round(now - registered.opened_at, 3),
            last_activity_s=round(now - last, 3) if last is not None else None,
            requests=used.requests if used else 0,
            input_tokens=used.input_tokens if used else 0,
            output_tokens=used.output_tokens if used else 0,
            cost_usd=used.cost_usd if used else 0.0,
            refused=used.refused if used else 0,
        )


def _tree_order(paths: list[str]) -> list[str]:
    """Parents before their children, siblings in the order given (depth first)."""
    known = set(paths)
    children: dict[str | None, list[str]] = {}
    for path in paths:
        parent = path.rsplit("/", 1)[0]
        while parent and parent not in known:
            parent = parent.rsplit("/", 1)[0]
        children.setdefault(parent or None, []).append(path)
    ordered: list[str] = []
    stack = list(reversed(children.get(None, [])))
    while stack:
        path = stack.pop()
        ordered.append(path)
        stack.extend(reversed(children.get(path, [])))
    return ordered


def _pykka_view(actor: PykkaActor) -> dict[str, Any]:
    view: dict[str, Any] = {"mailbox_capacity": None}
    ref: pykka.ActorRef[Any] | None
    if isinstance(actor, ActorName):
        view["restarts"] = max(actor.incarnations - 1, 0)
        ref = None
        with contextlib.suppress(Exception):  # between incarnations: no ref
            ref = actor.ref
    else:
        ref = actor
    if ref is None:
        view["state"] = "restarting"
        return view
    alive = ref.is_alive()
    state: ActorState = "running" if alive else "dead"
    view["state"] = state
    inbox = ref.actor_inbox  # pykka's ThreadingActor inbox is a queue.Queue
    view["mailbox_depth"] = inbox.qsize() if alive and isinstance(inbox, queue.Queue) else None
    return view


def _proxied_view(server: ProxiedServer, child: Mapping[str, Any]) -> dict[str, Any]:
    """A running child's entry with its proxied server's state; restarts add up (the child's
    own, rare: a bug in it; and its server's process), the server's last error first."""
    state: ActorState
    if server.state is ServerState.UP:
        state = "running"
    elif server.state is ServerState.DOWN:
        state = "down"
    else:
        state = "restarting" if server.restarts else "starting"
    return {
        "state": state,
        "restarts": child.get("restarts", 0) + server.restarts,
        "last_error": server.last_error or child.get("last_error"),
    }


def _meter_view(meter: Meter, now: float) -> dict[str, Any]:
    last = meter.last_activity
    return {
        "messages_handled": meter.handled,
        "messages_failed": meter.failed,
        "last_activity_s": round(now - last, 3) if last is not None else None,
    }


def _breaker(breaker: FailureRateBreaker | BreakerSnapshot) -> BreakerStatus:
    """The breaker's own model: its snapshot is a :class:`BreakerStatus`, served as that."""
    return breaker.snapshot() if isinstance(breaker, FailureRateBreaker) else breaker


def tool_statuses(registry: ToolRegistry) -> list[ToolStatus]:
    """The node's own tools (:meth:`ToolRegistry.own`) as ``exai status`` shows them."""
    shown: list[ToolStatus] = []
    for tool in registry.own():
        module = type(tool).__module__
        if isinstance(tool, FunctionTool):
            limiter = tool.concurrency
            shown.append(
                ToolStatus(
                    name=tool.name,
                    origin=tool.origin,
                    runs="event loop" if tool.is_async else "worker thread",
                    running=int(limiter.borrowed_tokens) if limiter is not None else None,
                    max_concurrency=tool.max_concurrency,
                    timeout=tool.timeout,
                )
            )
        else:
            builtin = module.startswith("actors.tools.")
            shown.append(
                ToolStatus(
                    name=tool.name,
                    origin="built-in" if builtin else f"{module}.{type(tool).__qualname__}",
                    runs="event loop",
                    running=None,
                    max_concurrency=None,
                    timeout=None,
                )
            )
    return shown
