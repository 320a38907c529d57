"""The admin interface: ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus text format).

HTTP/1.1 over trio and h11, with no framework: two read-only endpoints do not need one. It
listens on **loopback only** (a non-loopback host is refused at start) and every request must
present the admin token as ``Authorization: Bearer <token>``. The admin token is not the
client token: a client that may call tools must not thereby see every session. It lives in
``<state-dir>/admin-token`` (0600), created on first start and kept across restarts so that a
Prometheus scrape config (``authorization.credentials_file``) stays valid.

The snapshot comes from a :class:`~runtime.status_model.StatusSource`; this module only
serves and renders it. Each connection is a task in the listener's nursery; a slow or silent
peer is cut off after ``REQUEST_TIMEOUT`` so it cannot pin a task forever.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import get_args

import h11
import structlog
import trio

from runtime.auth import load_or_create_token
from runtime.http1 import Response, send_response
from runtime.logs import register_secret
from runtime.status_model import (
    BreakerStatus,
    ClusterSource,
    LimitsStatus,
    ListenerStatus,
    NodeStatus,
    PersistenceStatus,
    StatusSource,
)
from storage.rows import SessionTransport

log = structlog.get_logger("admin")

ADMIN_TOKEN_FILE = "admin-token"
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
MAX_REQUEST_BYTES = 16 * 1024
PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class AdminConfigError(Exception):
    """The admin interface was asked to listen somewhere it must not."""


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    url: str
    """``http://127.0.0.1:PORT``: what ``server.json`` records as ``admin_url``."""
    token_file: Path


def admin_token_path(state_dir: Path) -> Path:
    return state_dir / ADMIN_TOKEN_FILE


def load_admin_token(state_dir: Path) -> str:
    """The admin token of this state dir, created (0600) if there is none yet."""
    path = admin_token_path(state_dir)
    token = load_or_create_token(path, None)
    os.chmod(path, 0o600)  # a file copied in with looser permissions is tightened
    return token


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AdminConfigError(
            f"the admin interface listens on loopback only; {host!r} is not a loopback address"
        )


async def serve_admin(
    source: StatusSource,
    *,
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    cluster: ClusterSource | None = None,
    task_status: trio.TaskStatus[AdminEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the :class:`AdminEndpoint` once listening.

    Run it in the node's nursery: ``endpoint = await nursery.start(partial(serve_admin,
    source, state_dir=...))``. ``cluster`` answers ``GET /status?cluster=1`` (the
    snapshot's ``nodes``); without it that list stays ``None``, with a problem saying why.
    """
    _require_loopback(host)
    token = load_admin_token(state_dir)
    register_secret(token)
    handler = _Handler(source, token, cluster)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler.handle, port, host=host))
        bound_port = listeners[0].socket.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        endpoint = AdminEndpoint(f"http://{shown_host}:{bound_port}", admin_token_path(state_dir))
        log.info("admin.listening", url=endpoint.url)
        task_status.started(endpoint)


class _Handler:
    def __init__(self, source: StatusSource, token: str, cluster: ClusterSource | None) -> None:
        self._source = source
        self._cluster = cluster
        self._token = token.encode()
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, stream: trio.SocketStream) -> None:
        # Nothing may escape: an exception here would take the listener (and node) down.
        try:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                return  # closed at once: a loopback client that opens 32 connections can wait
            try:
                await self._serve(stream)
            finally:
                self._slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("admin.connection_failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                request = await _read_request(conn, stream)
            if timer.cancelled_caught or request is None:
                return
            response = await self._respond(request)
            await send_response(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _respond(self, request: h11.Request) -> Response:
        if not self._authorized(request.headers):
            return Response(
                401,
                b"unauthorized: present <state-dir>/admin-token as 'Authorization: Bearer'\n",
                extra=((b"www-authenticate", b'Bearer realm="exai-admin"'),),
            )
        path, _, query = request.target.partition(b"?")
        if path not in (b"/status", b"/metrics"):
            return Response(404, b"not found: GET /status or /metrics\n")
        if request.method != b"GET":
            return Response(405, b"method not allowed: GET only\n", extra=((b"allow", b"GET"),))
        try:
            status = await self._source.status()
        except Exception:
            log.exception("admin.status_failed")
            return Response(500, b"status snapshot failed; see the server log\n")
        if path == b"/status" and b"cluster=1" in query.split(b"&"):
            status = await self._with_nodes(status)
        if path == b"/status":
            return Response(200, status.model_dump_json().encode(), b"application/json")
        return Response(200, render_metrics(status).encode(), PROMETHEUS_CONTENT_TYPE)

    async def _with_nodes(self, status: NodeStatus) -> NodeStatus:
        if self._cluster is None:
            problem = "cluster: this node reads no database"
            return status.model_copy(update={"problems": [*status.problems, problem]})
        try:
            nodes, limits = await self._cluster()
        except Exception as exc:  # the database's failure is the operator's to read
            problem = f"cluster: the nodes table could not be read ({type(exc).__name__})"
            log.warning("admin.cluster_failed", error=repr(exc))
            return status.model_copy(update={"problems": [*status.problems, problem]})
        return status.model_copy(update={"nodes": nodes, "cluster_limits": limits})

    def _authorized(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(self._token, credential.strip())
        return False


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request (its body, if any, read and dropped), or ``None`` at end of stream."""
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


# -- Prometheus text format (exposition format 0.0.4) ----------------------------------------


class _Metrics:
    """Collects samples grouped by metric, each metric with one HELP and TYPE line."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[str]] = {}

    def add(
        self,
        name: str,
        kind: str,
        help_text: str,
        value: float | int | bool | None,
        labels: dict[str, str] | None = None,
    ) -> None:
        if value is None:
            return
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (kind, help_text)
            self._samples[name] = []
        label_text = ""
        if labels:
            label_text = (
                "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"
            )
        self._samples[name].append(f"{name}{label_text} {_number(value)}")

    def render(self) -> str:
        lines: list[str] = []
        for name in self._order:
            kind, help_text = self._meta[name]
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(self._samples[name])
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_metrics(status: NodeStatus) -> str:
    """The snapshot as Prometheus metrics. Sessions are aggregated, never one series per
    session: 10,000 sessions must not mean 10,000 series per metric."""
    m = _Metrics()
    _node_metrics(m, status)
    _actor_metrics(m, status)
    if status.limits is not None:
        _limit_metrics(m, status.limits)
    _breaker_metrics(m, status.breakers)
    if status.persistence is not None:
        _persistence_metrics(m, status.persistence)
    for reason, count in sorted(status.dead_letters.by_reason.items()):
        m.add(
            "exai_dead_letters_total",
            "counter",
            "Undeliverable messages.",
            count,
            {"reason": reason},
        )
    if status.listener is not None:
        _listener_metrics(m, status.listener)
    m.add("exai_status_problems", "gauge", "Parts not inspected.", len(status.problems))
    return m.render()


def _node_metrics(m: _Metrics, status: NodeStatus) -> None:
    node = status.node
    m.add("exai_up", "gauge", "1 while the node serves.", 1)
    m.add("exai_uptime_seconds", "gauge", "Seconds since the node started.", node.uptime_s)
    m.add(
        "exai_log_lines_dropped_total",
        "counter",
        "Log lines dropped, the log writer's queue being full.",
        node.log_lines_dropped,
    )
    for state, count in (("attached", node.sessions_live), ("detached", node.sessions_detached)):
        m.add("exai_sessions", "gauge", "Sessions by state.", count, {"state": state})
    transports = Counter(s.transport for s in status.sessions if s.transport is not None)
    for transport in get_args(SessionTransport):  # every one, 0 included: steady series
        m.add(
            "exai_sessions_by_transport",
            "gauge",
            "Sessions by transport.",
            transports[transport],
            {"transport": transport},
        )
    m.add("exai_sessions_max", "gauge", "Session limit.", node.sessions_max)
    m.add("exai_tool_calls_in_flight", "gauge", "Running tool calls.", node.tool_calls_in_flight)
    m.add("exai_tool_calls_max", "gauge", "Node-wide tool call limit.", node.tool_calls_max)
    threads = status.tool_threads
    if threads is not None:
        m.add("exai_tool_threads", "gauge", "Worker threads of def tools running.", threads.running)
        m.add(
            "exai_tool_threads_outliving",
            "gauge",
            "Worker threads still running after their call was answered.",
            len(threads.outliving),
        )
    for server in status.servers:
        labels = {"server": server.name}
        up = server.state == "up"
        m.add("exai_proxied_server_up", "gauge", "1 if the proxied server is up.", up, labels)
        m.add(
            "exai_proxied_server_down",
            "gauge",
            "1 if the proxied server is down (past its restart intensity).",
            server.state == "down",
            labels,
        )
        m.add(
            "exai_proxied_server_restarts",
            "gauge",
            "Starts of the proxied server after its first.",
            server.restarts,
            labels,
        )
    queued = [s.queued for s in status.sessions]
    m.add(
        "exai_session_mailbox_depth_max",
        "gauge",
        "Deepest session mailbox.",
        max(queued, default=0),
    )
    m.add("exai_session_mailbox_depth_sum", "gauge", "Queued in all sessions.", sum(queued))
    m.add(
        "exai_session_mailbox_bytes", "gauge", "Bytes queued in all mailboxes.", node.mailbox_bytes
    )
    m.add(
        "exai_session_mailbox_bytes_max",
        "gauge",
        "Node-wide bound of mailbox bytes.",
        node.mailbox_bytes_max,
    )
    m.add(
        "exai_session_outgoing_bytes",
        "gauge",
        "Bytes queued for peers, not yet taken.",
        node.outgoing_bytes,
    )
    m.add(
        "exai_session_outgoing_bytes_max",
        "gauge",
        "Node-wide bound of outgoing bytes.",
        node.outgoing_bytes_max,
    )
    restarts = sum(s.restarts for s in status.sessions)
    m.add("exai_session_restarts", "gauge", "Actor restarts of live sessions.", restarts)


def _actor_metrics(m: _Metrics, status: NodeStatus) -> None:
    for actor in status.actors:
        if actor.kind == "session":
            continue  # aggregated above
        labels = {"actor": actor.path}
        up = actor.state == "running"
        m.add("exai_actor_up", "gauge", "1 if the actor is running.", up, labels)
        m.add("exai_actor_restarts", "gauge", "Restarts of the actor.", actor.restarts, labels)
        m.add("exai_actor_mailbox_depth", "gauge", "Messages waiting.", actor.mailbox_depth, labels)
        handled, failed = actor.messages_handled, actor.messages_failed
        m.add("exai_actor_messages_handled_total", "counter", "Messages handled.", handled, labels)
        m.add("exai_actor_messages_failed_total", "counter", "Handling failed.", failed, labels)


def _limit_metrics(m: _Metrics, limits: LimitsStatus) -> None:
    for p in limits.providers:
        labels = {"provider": p.name}
        m.add("exai_limiter_in_flight", "gauge", "Upstream calls in flight.", p.in_flight, labels)
        m.add("exai_limiter_waiting", "gauge", "Calls waiting for capacity.", p.waiting, labels)
        requests, tokens = p.requests_available, p.tokens_available
        m.add("exai_limiter_requests_available", "gauge", "Requests admissible.", requests, labels)
        m.add("exai_limiter_tokens_available", "gauge", "Tokens admissible.", tokens, labels)


def _breaker_metrics(m: _Metrics, breakers: Iterable[BreakerStatus]) -> None:
    for b in breakers:
        for state in ("closed", "open", "half_open"):
            labels = {"breaker": b.name, "state": state}
            m.add(
                "exai_breaker_state", "gauge", "1 for the current state.", b.state == state, labels
            )
        labels = {"breaker": b.name}
        m.add("exai_breaker_opened_total", "counter", "Times opened.", b.times_opened, labels)
        m.add("exai_breaker_rejected_total", "counter", "Calls refused.", b.rejected, labels)


def _persistence_metrics(m: _Metrics, store: PersistenceStatus) -> None:
    m.add("exai_persistence_available", "gauge", "Storage takes new work.", store.available)
    m.add("exai_database_up", "gauge", "The storage breaker is closed.", store.database == "up")
    m.add("exai_persistence_queue", "gauge", "Persistence inbox depth.", store.queue)
    m.add("exai_journal_bytes", "gauge", "Write journal size.", store.journal_bytes)
    pending = store.journal_pending_records
    m.add("exai_journal_pending_records", "gauge", "Accepted, not in the database.", pending)
    for name, help_text, value in (
        ("batches", "Transactions.", store.batches),
        ("records_written", "Rows written.", store.records_written),
        ("records_journaled", "Records journaled.", store.records_journaled),
        ("records_replayed", "Journal records replayed.", store.records_replayed),
        ("conflicts", "Stale steps refused.", store.conflicts),
        ("rejected", "Records refused.", store.rejected),
    ):
        m.add(f"exai_persistence_{name}_total", "counter", help_text, value)


def _listener_metrics(m: _Metrics, listener: ListenerStatus) -> None:
    in_progress = listener.handshakes_in_progress
    m.add("exai_handshakes_in_progress", "gauge", "Handshakes not over yet.", in_progress)
    m.add(
        "exai_handshakes_max", "gauge", "Handshake limit, all addresses.", listener.handshakes_max
    )
    for reason in ("total", "per address"):
        refused = listener.handshakes_refused.get(reason, 0)
        labels = {"bound": reason.replace(" ", "_")}
        m.add("exai_handshakes_refused_total", "counter", "Closed unread.", refused, labels)
    timed_out = listener.handshakes_timed_out
    m.add("exai_handshakes_timed_out_total", "counter", "Past the deadline.", timed_out)
    m.add("exai_accept_pauses_total", "counter", "Out of descriptors.", listener.accept_pauses)
    failed = listener.failed_accepts
    m.add("exai_accept_failures_total", "counter", "accept(2) out of resources.", failed)
    errors = listener.connections_failed
    m.add("exai_connections_failed_total", "counter", "Connections ended by an error.", errors)
    m.add(
        "exai_http_connections",
        "gauge",
        "Streamable HTTP connections open.",
        listener.http_connections,
    )
    m.add(
        "exai_http_connections_max",
        "gauge",
        "Streamable HTTP connection limit.",
        listener.http_connections_max,
    )
