"""``exai status``: find the running server, ask its admin interface, show the answer.

The server is found through ``<state-dir>/server.json`` (its ``admin_url``) unless ``--url``
names the admin interface. The admin token is ``<state-dir>/admin-token`` unless given.
Every string the document carries is shown through :func:`storage.untrusted.printable`:
sessions' client names are a client's choice, and must not act on the operator's terminal.
Every way of failing has its own exit code and a sentence saying what to do, because this is
what an operator runs when something is already wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from runtime.admin import admin_token_path
from runtime.statefile import read_server_info
from runtime.status_model import ActorStatus, LimitsStatus, NodeStatus
from storage.membership import NodeLimits
from storage.shared_limits import ClusterLimitsView
from storage.untrusted import printable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_SERVER = 3
EXIT_UNREACHABLE = 4
EXIT_BAD_TOKEN = 5


class StatusFailure(Exception):
    """The status could not be had; ``code`` is the exit code, the message is for people."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    admin_url: str
    token: str
    #: The worker's index (1..N) when the server runs ``--workers``; ``None`` for one node.
    worker: int | None = None


def locate(
    state_dir: Path, *, url: str | None, token: str | None, worker: int | None = None
) -> list[Target]:
    """Where the admin interfaces are and the token they want: one for a single node (or
    ``url``), one per worker of a ``--workers`` server (its ``server.json`` lists them), or
    worker ``worker`` alone. Raises :class:`StatusFailure`."""
    server_file = state_dir / "server.json"
    workers: list[tuple[int, str | None]] = []
    if url is None:
        try:
            info = read_server_info(server_file)
        except (ValidationError, ValueError, OSError) as exc:
            raise StatusFailure(
                EXIT_NO_SERVER, f"{server_file} is unreadable ({exc}); is a server running?"
            ) from None
        if info is None:
            raise StatusFailure(
                EXIT_NO_SERVER,
                f"no server running: {server_file} does not exist (start one with "
                f"'exai serve --state-dir {state_dir}', or pass --url)",
            )
        if not _alive(info.pid):
            raise StatusFailure(
                EXIT_NO_SERVER,
                f"no server running: {server_file} names pid {info.pid}, which is not "
                "running (the server was killed; the file is stale)",
            )
        serving = {entry.index: entry.admin_url for entry in info.workers}
        # A worker being restarted is not listed until its successor serves: it is still
        # one of the server's, shown as unreachable (fetch) rather than left out.
        count = max([info.worker_count, *serving])
        workers = [(index, serving.get(index)) for index in range(1, count + 1)]
        if info.admin_url is None and not workers:
            raise StatusFailure(
                EXIT_UNREACHABLE,
                f"the server (pid {info.pid}) announces no admin interface in {server_file}",
            )
        url = info.admin_url
    if worker is not None:
        workers = [entry for entry in workers if entry[0] == worker]
        if not workers:
            raise StatusFailure(
                EXIT_NO_SERVER,
                f"no worker {worker} in {server_file} (is it a --workers server with that "
                "many workers?)",
            )
    if token is None:
        path = admin_token_path(state_dir)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise StatusFailure(
                EXIT_BAD_TOKEN,
                f"cannot read the admin token {path} ({exc.strerror}); pass --admin-token",
            ) from None
    if workers:
        return [Target((admin or "").rstrip("/"), token, worker=index) for index, admin in workers]
    assert url is not None
    return [Target(url.rstrip("/"), token)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def fetch(target: Target, *, timeout: float = 10.0, cluster: bool = False) -> NodeStatus:
    """``GET /status`` (``?cluster=1``: with ``nodes``, every node of the database); raises
    :class:`StatusFailure` with the matching exit code."""
    if not target.admin_url:
        raise StatusFailure(
            EXIT_UNREACHABLE,
            f"worker {target.worker} is not serving (being restarted, or starting)",
        )
    try:
        response = httpx.get(
            f"{target.admin_url}/status" + ("?cluster=1" if cluster else ""),
            headers={"authorization": f"Bearer {target.token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise StatusFailure(
            EXIT_UNREACHABLE, f"server unreachable at {target.admin_url}: {exc}"
        ) from None
    if response.status_code in (401, 403):
        raise StatusFailure(
            EXIT_BAD_TOKEN,
            f"the admin interface at {target.admin_url} refused the admin token "
            "(wrong state dir, or a stale --admin-token?)",
        )
    if response.status_code != 200:
        raise StatusFailure(
            EXIT_ERROR,
            f"the admin interface answered HTTP {response.status_code}: {response.text.strip()}",
        )
    try:
        return NodeStatus.model_validate_json(response.content)
    except ValidationError as exc:
        raise StatusFailure(EXIT_ERROR, f"unexpected status document: {exc}") from None


# -- text rendering --------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    # Cells carry client text (names, errors quoting requests): escaped for the terminal.
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return lines


def _tree_labels(actors: Sequence[ActorStatus]) -> list[str]:
    """Each actor's path drawn as a tree (parents come before children in the list)."""
    paths = [a.path for a in actors]
    known = set(paths)

    def parent(path: str) -> str | None:
        head = path.rsplit("/", 1)[0]
        while head:
            if head in known:
                return head
            head = head.rsplit("/", 1)[0]
        return None

    children: dict[str | None, list[str]] = {}
    for path in paths:
        children.setdefault(parent(path), []).append(path)
    labels: dict[str, str] = {}

    def walk(path: str, prefix: str, last: bool, top: bool) -> None:
        up = parent(path)
        name = path if up is None else path[len(up) + 1 :]
        labels[path] = name if top else f"{prefix}{'└─ ' if last else '├─ '}{name}"
        below = children.get(path, [])
        for index, child in enumerate(below):
            extension = "" if top else ("   " if last else "│  ")
            walk(child, prefix + extension, index == len(below) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return [labels[path] for path in paths]


def _tools(status: NodeStatus) -> list[str]:
    """The TOOLS section: the node's own tools (a proxied server's are counted under it)."""
    if not status.tools:
        return []
    proxied = sum(server.tools for server in status.servers)
    out = ["", "TOOLS"]
    out += _table(
        ["TOOL", "FROM", "RUNS ON", "RUNNING", "TIMEOUT"],
        [
            [
                printable(t.name),
                printable(t.origin),
                t.runs,
                (
                    f"{t.running}/{t.max_concurrency}"
                    if t.running is not None and t.max_concurrency is not None
                    else "-"
                ),
                f"{t.timeout:g} s" if t.timeout is not None else "-",
            ]
            for t in status.tools
        ],
    )
    if status.servers:
        out.append(f"and {proxied} tools of proxied servers (PROXIED SERVERS)")
    return out


def render(status: NodeStatus) -> str:
    node = status.node
    out = [
        f"exai-runtime {node.version} · node {node.node_id} · pid {node.pid} · "
        f"up {age(node.uptime_s)}",
        f"MCP {node.url or '(not listening)'}"
        + (f" · {node.http_url}" if node.http_url else "")
        + f" · protocols {', '.join(node.protocol_versions)}",
        f"sessions {node.sessions_live} attached, {node.sessions_detached} detached "
        f"(max {node.sessions_max})"
        + _http_connections(status)
        + f" · tool calls in flight {node.tool_calls_in_flight}"
        + (f"/{node.tool_calls_max}" if node.tool_calls_max is not None else "")
        + f" · dead letters {status.dead_letters.total}"
        + (
            " ("
            + ", ".join(f"{r} {n}" for r, n in sorted(status.dead_letters.by_reason.items()))
            + ")"
            if status.dead_letters.by_reason
            else ""
        ),
        "",
        "SUPERVISION TREE",
    ]
    rows = []
    for label, actor in zip(_tree_labels(status.actors), status.actors, strict=True):
        mailbox = "-"
        if actor.mailbox_depth is not None:
            capacity = "∞" if actor.mailbox_capacity is None else str(actor.mailbox_capacity)
            mailbox = f"{actor.mailbox_depth}/{capacity}"
        rows.append(
            [
                label,
                actor.kind,
                actor.state,
                mailbox,
                str(actor.restarts),
                age(actor.uptime_s),
                "-" if actor.last_activity_s is None else f"{age(actor.last_activity_s)} ago",
                actor.last_error or "",
            ]
        )
    out += _table(
        ["PATH", "KIND", "STATE", "MAILBOX", "RESTARTS", "UPTIME", "LAST ACTIVITY", "LAST ERROR"],
        rows,
    )
    out += ["", "SESSIONS"]
    if status.sessions:
        out += _table(
            [
                "ID",
                "STATE",
                "TRANSPORT",
                "CLIENT",
                "PROTOCOL",
                "IN-FLIGHT",
                "QUEUED",
                "RESTARTS",
                "TOKENS IN/OUT",
                "COST",
                "UPTIME",
            ],
            [
                [
                    s.session_id,
                    s.state,
                    s.transport or "?",
                    f"{s.client_name or '?'} {s.client_version or ''}".strip(),
                    s.protocol_version or "-",
                    str(s.in_flight),
                    str(s.queued),
                    str(s.restarts),
                    f"{s.input_tokens}/{s.output_tokens}",
                    f"${s.cost_usd:.4f}",
                    age(s.uptime_s),
                ]
                for s in status.sessions
            ],
        )
    else:
        out.append("(none)")
    out += _tools(status)
    threads = status.tool_threads
    if threads is not None:
        out += [
            "",
            "TOOL THREADS",
            f"worker threads {threads.running}/{threads.max} running · "
            f"{len(threads.outliving)} still running after their call was answered",
        ]
        if threads.outliving:
            out += _table(
                ["TOOL", "SESSION", "REQUEST ID", "ANSWERED", "SINCE", "RUNNING"],
                [
                    [
                        printable(t.tool),
                        printable(t.session_id),
                        printable(str(t.request_id)),
                        t.answered or "-",
                        age(t.answered_s),
                        age(t.running_s),
                    ]
                    for t in threads.outliving
                ],
            )
    if status.servers:
        out += ["", "PROXIED SERVERS"]
        out += _table(
            ["SERVER", "STATE", "SHARE", "ENDPOINT", "PID", "TOOLS", "RESTARTS", "LAST ERROR"],
            [
                [
                    printable(server.name),
                    server.state,
                    server.share
                    + (f" ({server.instances})" if server.instances is not None else ""),
                    printable(server.endpoint[:60] or "-"),
                    str(server.pid) if server.pid is not None else "-",
                    str(server.tools),
                    str(server.restarts),
                    printable((server.last_error or "-")[:80]),
                ]
                for server in status.servers
            ],
        )
    out += ["", "RATE LIMITS", *_rate_limits(status.limits)]
    out += ["", "CIRCUIT BREAKERS"]
    if status.breakers:
        out += _table(
            ["NAME", "STATE", "FAILURE RATE", "WINDOW", "OPENED", "REJECTED", "RETRY IN"],
            [
                [
                    b.name,
                    b.state,
                    "-" if b.failure_rate is None else f"{b.failure_rate:.0%}",
                    f"{b.window_failures}/{b.window_calls}",
                    str(b.times_opened),
                    str(b.rejected),
                    age(b.retry_after_s),
                ]
                for b in status.breakers
            ],
        )
    else:
        out.append("(none)")
    out += ["", "PERSISTENCE"]
    p = status.persistence
    if p is None:
        out.append("(not reported)")
    else:
        out.append(
            f"database {p.database} · {'available' if p.available else 'UNAVAILABLE'} · "
            f"queue {p.queue} · journal {_size(p.journal_bytes)} "
            f"({p.journal_pending_records} pending{', FULL' if p.journal_full else ''})"
        )
        confirmed = (
            p.confirmed_at.isoformat(timespec="milliseconds") if p.confirmed_at else "(none yet)"
        )
        out.append(
            f"durability {p.durability or '?'} · database behind by "
            f"{_size(max(0, p.appended - p.committed))} · confirmed through {confirmed}"
        )
        out.append(
            f"written {p.records_written} in {p.batches} batches (largest {p.largest_batch}) · "
            f"journaled {p.records_journaled} · replayed {p.records_replayed} · "
            f"conflicts {p.conflicts} · rejected {p.rejected}"
        )
        if p.last_error:
            out.append(f"last error: {printable(p.last_error)}")
    out += _cluster(status)
    if status.problems:
        out += ["", "PROBLEMS"] + [f"  {printable(problem)}" for problem in status.problems]
    return "\n".join(out) + "\n"


def _cluster(status: NodeStatus) -> list[str]:
    """The nodes table (``--cluster``): one row per node."""
    nodes = status.nodes
    if nodes is None:
        return []
    out: list[str] = []
    out += ["", "CLUSTER (the nodes table; heartbeat ages by the database's clock)"]
    out += _table(
        [
            "NODE",
            "HOST",
            "PID",
            "STATE",
            "HEARTBEAT",
            "SESSIONS",
            "IN-FLIGHT",
            "HEALTH",
            "LIMITS",
            "SWEPT BY",
        ],
        [
            [
                n.node_id + (" (this node)" if n.node_id == status.node.node_id else ""),
                n.hostname,
                str(n.pid),
                n.state,
                f"{age(n.heartbeat_age_s)} ago",
                "-" if n.snapshot is None else str(n.snapshot.sessions),
                "-" if n.snapshot is None else str(n.snapshot.calls_in_flight),
                "-" if n.snapshot is None else n.snapshot.health,
                _limits_mode(n.snapshot.limits if n.snapshot is not None else None),
                n.swept_by or "",
            ]
            for n in nodes
        ],
    )
    out += _cluster_limits(status.cluster_limits)
    return out


def _rate_limits(limits: LimitsStatus | None) -> list[str]:
    """This node's rate limits: how they are held, and each provider's load."""
    if limits is None:
        return ["(no rate limiter)"]
    out = [_limits_held(limits)]
    if not limits.providers:
        return [*out, "(no providers)"]
    return out + _table(
        ["PROVIDER", "IN-FLIGHT", "WAITING", "REQUESTS AVAIL", "TOKENS AVAIL"],
        [
            [
                p.name,
                f"{p.in_flight}/{p.max_concurrency or '∞'}",
                str(p.waiting),
                _available(p.requests_available, p.requests_per_minute),
                _available(p.tokens_available, p.tokens_per_minute),
            ]
            for p in limits.providers
        ],
    )


def _limits_held(limits: LimitsStatus) -> str:
    """How this node holds its limits, in a sentence."""
    if limits.mode == "shared":
        return (
            "held across the cluster through the database "
            f"({limits.live_nodes} live nodes as last read)"
        )
    if limits.mode == "local_share":
        return (
            f"the database does not answer: this node's share, 1/{limits.live_nodes} of each "
            "limit and of each quota's remainder"
        )
    return "this node's alone (shared limits off)"


def _limits_mode(limits: NodeLimits | None) -> str:
    """How a node holds the limits: ``shared``, ``local 1/N`` (its share while the database
    does not answer it), ``alone`` (shared limits off), ``-`` (not published)."""
    if limits is None:
        return "-"
    if limits.mode == "local_share":
        return f"local 1/{limits.live_nodes}"
    return "shared" if limits.mode == "shared" else "alone"


def _cluster_limits(view: ClusterLimitsView | None) -> list[str]:
    """The cluster's limits as one: the shared buckets and quotas, and the nodes' modes."""
    if view is None:
        return []
    out = [
        "",
        "CLUSTER LIMITS (the database's buckets and quotas; alive nodes: "
        f"{view.nodes_shared} shared, {view.nodes_local_share} on a local share, "
        f"{view.nodes_off} alone, {view.nodes_unknown} not published)",
    ]
    if view.shared:
        load = {p.name: p for p in view.providers}
        rows = []
        for b in view.shared:
            provider = load.get(b.provider) if b.provider is not None else None
            rows.append(
                [
                    b.name,
                    f"{b.used:.0f}/{b.limit_per_minute:g}",
                    "-" if provider is None else str(provider.in_flight),
                    "-" if provider is None else str(provider.waiting),
                ]
            )
        out += _table(["SHARED LIMIT", "USED (LAST MINUTE)", "IN-FLIGHT", "WAITING"], rows)
    else:
        out.append("(no shared rate limits)")
    if view.quotas:
        out += [""]
        out += _table(
            ["QUOTA", "PERIOD", "REQUESTS", "TOKENS", "COST USD"],
            [
                [
                    q.identity,
                    f"{q.period} {q.period_start.isoformat()}",
                    _of(q.requests, q.requests_limit),
                    _of(q.tokens, q.tokens_limit),
                    _of(round(q.cost_usd, 4), q.cost_usd_limit),
                ]
                for q in view.quotas
            ],
        )
    return out


def _of(used: float, limit: float | None) -> str:
    return f"{used:g}/{limit:g}" if limit is not None else f"{used:g}"


def _http_connections(status: NodeStatus) -> str:
    """`` · HTTP connections N/MAX`` (Streamable HTTP), or nothing from a server that does not
    count them."""
    listener = status.listener
    if listener is None or listener.http_connections_max is None:
        return ""
    return f" · HTTP connections {listener.http_connections}/{listener.http_connections_max}"


def _available(level: float | None, per_minute: int | None) -> str:
    if level is None or per_minute is None:
        return "unlimited"
    return f"{level:.0f}/{per_minute} per min"
