"""``exai status`` against a real ``exai serve``: sessions in known states, compared field by
field; a crash and restart seen in both the status and the trace; metrics; exit codes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import Endpoint, WebSocketConnection

from runtime.admin import AdminConfigError, serve_admin
from runtime.statefile import ServerInfo, read_server_info, write_server_info
from runtime.status_model import NodeStatus
from tests.harness import (
    EXAI,
    RawClient,
    ServerProcess,
    admin,
    open_raw,
    start_server,
    wait_for_status,
)

CRASH = "$/exai/test/crash"
MAILBOX = 64  # the default session mailbox (Settings.session_mailbox)


def exai(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXAI), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


async def exai_async(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(EXAI), *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def open_session(
    ws: WebSocketConnection, *, name: str, version: str, protocol: str
) -> tuple[RawClient, str]:
    """Initialize with a known identity; the ping after it proves the actor has handled
    ``notifications/initialized`` (one mailbox, in order)."""
    client = RawClient(ws)
    reply = await client.request(
        "initialize",
        {
            "protocolVersion": protocol,
            "capabilities": {},
            "clientInfo": {"name": name, "version": version},
        },
    )
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (await client.request("ping"))["result"] == {}
    return client, reply["result"]["_meta"]["exai/sessionId"]


def local_address(ws: WebSocketConnection) -> str:
    local = ws.local
    assert isinstance(local, Endpoint)
    return f"{local.address}:{local.port}"


@pytest.fixture
def own_server(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of this test alone, so the session counts are exactly the test's."""
    handle = start_server(tmp_path / "state", database_url=database_url)
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@dataclass
class Known:
    """The sessions of the field-by-field test, by what state each was put in."""

    idle: str = ""
    busy: str = ""
    fresh: str = ""
    crashed: str = ""
    gone: str = ""
    remotes: dict[str, str] = field(default_factory=dict)


async def test_status_json_shows_sessions_in_known_states_field_by_field(
    own_server: ServerProcess,
) -> None:
    server = own_server
    known = Known()
    async with (
        open_raw(server.authed_url()) as ws_idle,
        open_raw(server.authed_url()) as ws_busy,
        open_raw(server.authed_url()) as ws_fresh,
        open_raw(server.authed_url()) as ws_crashed,
    ):
        _, known.idle = await open_session(
            ws_idle, name="status-idle", version="1.0.0", protocol="2025-06-18"
        )
        busy_client, known.busy = await open_session(
            ws_busy, name="status-busy", version="2.0", protocol="2025-03-26"
        )
        await busy_client.send(
            {
                "jsonrpc": "2.0",
                "id": "held",
                "method": "tools/call",
                "params": {"name": "exai_test_block", "arguments": {}},
            }
        )
        fresh_client = RawClient(ws_fresh)
        assert (await fresh_client.request("ping"))["result"] == {}  # no initialize
        known.fresh = dict(ws_fresh.handshake_headers)[b"mcp-session-id"].decode()
        crash_client, known.crashed = await open_session(
            ws_crashed, name="status-crash", version="3", protocol="2025-06-18"
        )
        await crash_client.send({"jsonrpc": "2.0", "id": "boom", "method": CRASH})
        assert (await crash_client.receive())["error"]["code"] == -32001
        # The next incarnation answers (ping would not show it: the reader answers pings).
        assert "tools" in (await crash_client.request("tools/list"))["result"]

        # A session whose client went away without ending it: parked for resume.
        async with open_raw(server.authed_url()) as ws_gone:
            _, known.gone = await open_session(
                ws_gone, name="status-gone", version="4", protocol="2025-06-18"
            )
            await ws_gone.aclose(1001)
        known.remotes = {
            known.idle: local_address(ws_idle),
            known.busy: local_address(ws_busy),
            known.fresh: local_address(ws_fresh),
            known.crashed: local_address(ws_crashed),
        }

        # Neither the running call nor the parking has an event the test can see: poll.
        await wait_for_status(
            server,
            partial(_settled, known),
            what="the held call to run and the dropped session to be parked",
        )
        done = await exai_async("status", "--state-dir", str(server.state_dir), "--json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        # The documented top-level shape.
        assert set(document) >= {"actors", "sessions", "limits", "breakers", "persistence"}
        assert set(document) == set(NodeStatus.model_fields)
        assert document["schema_version"] == 1
        status = NodeStatus.model_validate(document)

        _check_node(status, server)
        _check_sessions(status, known)
        _check_actors(status, known)
        _check_storage(status)
        await _check_trace_of_the_crash(server, known.crashed)
        await busy_client.send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": "held"},
            }
        )


def _settled(known: Known, status: NodeStatus) -> bool:
    by_id = {s.session_id: s for s in status.sessions}
    return (
        known.busy in by_id
        and by_id[known.busy].in_flight == 1
        and status.node.tool_calls_in_flight == 1
        and known.gone in by_id
        and by_id[known.gone].state == "detached"
        # The database is written behind the answers (journal durability): caught up once.
        and status.persistence is not None
        and status.persistence.records_written >= 5
        and status.persistence.journal_pending_records == 0
    )


def _check_node(status: NodeStatus, server: ServerProcess) -> None:
    node = status.node
    assert node.pid == server.process.pid
    assert node.url == server.url
    assert node.sessions_live == 4
    assert node.sessions_detached == 1
    assert node.sessions_max == 10_000
    assert node.tool_calls_in_flight == 1
    assert node.tool_calls_max == 1024
    assert node.protocol_versions == [
        "2024-11-05",
        "2025-03-26",
        "2025-06-18",
        "2025-11-25",
        "2026-07-28",
    ]
    assert node.uptime_s >= 0
    assert datetime.now(UTC) >= node.started_at
    assert status.taken_at >= node.started_at


def _check_sessions(status: NodeStatus, known: Known) -> None:
    sessions = {s.session_id: s for s in status.sessions}
    assert set(sessions) == {known.idle, known.busy, known.fresh, known.crashed, known.gone}
    attached_identity = {
        known.idle: ("status-idle", "1.0.0", "2025-06-18", True),
        known.busy: ("status-busy", "2.0", "2025-03-26", True),
        known.fresh: (None, None, None, False),
        known.crashed: ("status-crash", "3", "2025-06-18", True),
        known.gone: ("status-gone", "4", "2025-06-18", True),
    }
    for session_id, (name, version, protocol, initialized) in attached_identity.items():
        session = sessions[session_id]
        assert session.client_name == name
        assert session.client_version == version
        assert session.protocol_version == protocol
        assert session.initialized is initialized
        assert session.state == ("detached" if session_id == known.gone else "attached")
        if session_id in known.remotes:
            assert session.remote == known.remotes[session_id]
        assert session.in_flight == (1 if session_id == known.busy else 0)
        assert session.restarts == (1 if session_id == known.crashed else 0)
        assert session.queued == 0
        # No upstream calls in these sessions: the rate limiter's counters are zero.
        assert (session.requests, session.input_tokens, session.output_tokens) == (0, 0, 0)
        assert (session.cost_usd, session.refused) == (0.0, 0)
        assert session.uptime_s >= 0
        assert session.last_activity_s is not None
        assert session.last_activity_s >= 0


def _check_actors(status: NodeStatus, known: Known) -> None:
    actors = {a.path: a for a in status.actors}
    paths = [a.path for a in status.actors]
    assert paths.index("/root") < paths.index("/root/sessions")  # parents first
    assert (actors["/root"].kind, actors["/root"].state) == ("node", "running")
    assert actors["/root/sessions"].kind == "supervisor"
    assert (actors["/root/persistence"].kind, actors["/root/persistence"].state) == (
        "pykka",
        "running",
    )
    for child in ("admin", "persistence_pulse", "membership", "rate_limiter", "providers"):
        assert actors[f"/root/{child}"].state == "running", child
        assert actors[f"/root/{child}"].restarts == 0
    for session_id in (known.idle, known.busy, known.fresh, known.crashed):
        actor = actors[f"/root/sessions/{session_id}"]
        assert (actor.kind, actor.state) == ("session", "running")
        assert (actor.mailbox_depth, actor.mailbox_capacity) == (0, MAILBOX)
        assert actor.messages_handled is not None
        assert actor.messages_handled >= 1
    parked = actors[f"/root/sessions/{known.gone}"]
    assert (parked.state, parked.mailbox_depth, parked.mailbox_capacity) == (
        "detached",
        None,
        None,
    )
    # The crash and the restart, as the status shows them.
    crashed = actors[f"/root/sessions/{known.crashed}"]
    assert crashed.restarts == 1
    assert crashed.last_error is not None
    assert crashed.last_error.startswith("SessionCrashRequested(")
    assert crashed.messages_failed == 1
    assert actors[f"/root/sessions/{known.idle}"].last_error is None
    assert actors[f"/root/sessions/{known.idle}"].messages_failed == 0


def _check_storage(status: NodeStatus) -> None:
    assert status.persistence is not None
    assert (status.persistence.database, status.persistence.available) == ("up", True)
    assert status.persistence.records_written >= 5  # five sessions opened
    assert status.persistence.durability == "journal"
    assert status.persistence.committed <= status.persistence.appended
    assert status.persistence.synced <= status.persistence.appended
    # The rate limiter runs; no upstream is configured in the tests, and no session called one.
    assert status.limits is not None
    assert (status.limits.providers, status.limits.sessions_tracked) == ([], 0)
    assert status.breakers == []  # one per configured upstream
    assert status.problems == []
    assert status.dead_letters.total == sum(status.dead_letters.by_reason.values())


async def _check_trace_of_the_crash(server: ServerProcess, session_id: str) -> None:
    """The crash and the restart as the trace shows them, under the session's id."""
    done = await exai_async(
        "trace", "--state-dir", str(server.state_dir), "--session", session_id, "--json"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert {e.get("session_id") for e in events} == {session_id}
    failed = [e for e in events if e["event"] == "actor.message" and e["outcome"] == "error"]
    assert [(e["kind"], e["rpc_id"]) for e in failed] == [(CRASH, "boom")]
    assert "SessionCrashRequested" in failed[0]["error"]
    restarted = [e for e in events if e["event"] == "session.actor_restarted"]
    assert len(restarted) == 1
    assert "SessionCrashRequested" in restarted[0]["error"]
    assert "Traceback" in restarted[0]["exception"]
    # The next incarnation answered tools/list: a message handled after the restart.
    after = events[events.index(restarted[0]) + 1 :]
    assert any(e["event"] == "actor.message" and e["kind"] == "tools/list" for e in after)


async def test_the_status_tree_is_the_supervision_tree_that_runs(own_server: ServerProcess) -> None:
    """docs/supervision.md and docs/architecture.md draw this tree: ``exai status`` shows the
    root's children in start order, each session under the sessions supervisor (attached:
    its actor is that supervisor's child; parked: kept by the registry, with no task), and
    the listener after the supervisor it feeds."""
    server = own_server
    async with open_raw(server.authed_url()) as ws:
        _, attached = await open_session(ws, name="tree", version="1", protocol="2025-06-18")
        async with open_raw(server.authed_url()) as ws_gone:
            _, parked = await open_session(
                ws_gone, name="tree-gone", version="1", protocol="2025-06-18"
            )
            await ws_gone.aclose(1001)
        await wait_for_status(
            server,
            lambda status: status.node.sessions_detached == 1,
            what="the dropped session to be parked",
        )
        done = await exai_async("status", "--state-dir", str(server.state_dir), "--json")
    assert done.returncode == 0, done.stderr
    status = NodeStatus.model_validate(json.loads(done.stdout))
    actors = {a.path: a for a in status.actors}
    sessions = sorted([f"/root/sessions/{attached}", f"/root/sessions/{parked}"])
    assert [a.path for a in status.actors] == [
        "/root",
        "/root/persistence",
        "/root/persistence_pulse",
        "/root/membership",
        "/root/rate_limiter",
        "/root/providers",
        "/root/admin",
        "/root/tool_workers",
        "/root/conversations",
        "/root/tasks",
        "/root/servers",  # no [servers]: a supervisor with no children
        "/root/sessions",
        *sessions,  # by id (docs/operations.md)
        "/root/listener",
    ]
    assert (actors["/root/sessions"].kind, actors["/root/sessions"].state) == (
        "supervisor",
        "running",
    )
    assert (actors["/root/listener"].kind, actors["/root/listener"].state) == ("task", "running")
    assert actors[f"/root/sessions/{attached}"].state == "running"
    assert actors[f"/root/sessions/{parked}"].state == "detached"


async def test_a_tool_call_is_one_trace_across_the_session_and_its_tool(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client, session_id = await open_session(
            ws, name="trace", version="1", protocol="2025-06-18"
        )
        reply = await client.request("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        assert reply["result"]["content"][0]["text"] == "hi"
    done = await exai_async(
        "trace",
        "--state-dir",
        str(server.state_dir),
        "--session",
        session_id,
        "--event",
        "actor.message",
        "--json",
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    calls = [e for e in events if e["kind"] == "tools/call"]
    assert {e["actor"] for e in calls} == {
        f"/root/sessions/{session_id}",
        f"/root/sessions/{session_id}/tools/echo",
    }
    (trace_id,) = {e["trace_id"] for e in calls}
    # The call's task rows were written by the persistence actor under the same trace.
    persisted = [e for e in events if e["actor"] == "/root/persistence"]
    assert any(trace_id in e.get("trace_ids", [e["trace_id"]]) for e in persisted)
    # Every other message of the session has a trace of its own.
    session_events = [e for e in events if e not in calls and e not in persisted]
    others = {e["trace_id"] for e in session_events}
    assert trace_id not in others
    assert len(others) == len(session_events)

    done = await exai_async("trace", "--state-dir", str(server.state_dir), "--timeline", trace_id)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert text.startswith(f"trace {trace_id} · session {session_id}")
    assert "/root/persistence" in text
    rows = [line for line in text.splitlines() if "tools/call #" in line]
    assert [row.split()[3] for row in rows] == [
        f"/root/sessions/{session_id}",
        f"/root/sessions/{session_id}/tools/echo",
    ]


async def test_metrics_in_prometheus_text_format(server: ServerProcess) -> None:
    url, token = admin(server)
    async with open_raw(server.authed_url()) as ws, httpx.AsyncClient() as http:
        await open_session(ws, name="metrics", version="1", protocol="2025-06-18")
        response = await http.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    declared: set[str] = set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter")
            declared.add(name)
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
            assert series.split("{")[0] in declared  # TYPE comes before its samples
    assert samples["exai_up"] == 1
    assert samples['exai_sessions{state="attached"}'] >= 1
    assert samples["exai_sessions_max"] == 10_000
    assert samples['exai_actor_up{actor="/root/persistence"}'] == 1
    assert samples["exai_database_up"] == 1
    assert samples["exai_persistence_records_written_total"] >= 1
    assert samples["exai_handshakes_max"] == 1024
    assert samples['exai_handshakes_refused_total{bound="per_address"}'] == 0
    assert samples["exai_accept_pauses_total"] == 0
    # Sessions are aggregated: no series names a session.
    assert not any("/root/sessions/" in series for series in samples)


def test_admin_interface_requires_its_own_token(server: ServerProcess) -> None:
    url, token = admin(server)
    for headers in (
        {},
        {"authorization": f"Bearer {server.token}"},
        {"authorization": "Bearer nope"},
    ):
        for path in ("/status", "/metrics"):
            response = httpx.get(f"{url}{path}", headers=headers)
            assert response.status_code == 401, (path, headers)
    assert httpx.get(f"{url}/nope", headers={"authorization": f"Bearer {token}"}).status_code == 404
    assert url.startswith("http://127.0.0.1:")
    mode = stat.S_IMODE((server.state_dir / "admin-token").stat().st_mode)
    assert mode == 0o600


def test_wrong_admin_token_exits_5(server: ServerProcess) -> None:
    done = exai("status", "--state-dir", str(server.state_dir), "--admin-token", "not-the-token")
    assert done.returncode == 5
    assert "refused the admin token" in done.stderr
    assert done.stdout == ""


def test_the_admin_token_comes_from_a_file_or_the_environment_and_a_flag_warns_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    """No secret in a process list: every local user can read a process's arguments (ps,
    /proc/PID/cmdline), not its environment (proc(5))."""
    url, token = admin(server)
    # A state dir without an admin-token file: the token can only come from what is given.
    target = ["status", "--json", "--url", url, "--state-dir", str(tmp_path / "elsewhere")]
    bare = {key: value for key, value in os.environ.items() if key != "EXAI_ADMIN_TOKEN"}
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    warning = "exai: warning:"

    for done in (
        exai(*target, "--admin-token-file", str(token_file), env=bare),
        exai(*target, env={**bare, "EXAI_ADMIN_TOKEN": token}),
    ):
        assert done.returncode == 0, done.stderr
        NodeStatus.model_validate_json(done.stdout)  # the document, whole
        assert warning not in done.stderr
    assert exai(*target, env=bare).returncode == 5  # nothing else supplied it

    # Still works as a flag, with one warning however many times --watch shows the status.
    done = exai(*target, "--admin-token", token, "--watch", "--count", "2", "--interval", "0")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith(warning)]
    assert len(warnings) == 1
    assert "--admin-token" in warnings[0]
    assert "EXAI_ADMIN_TOKEN" in warnings[0]


def test_no_server_exits_3(tmp_path: Path) -> None:
    done = exai("status", "--state-dir", str(tmp_path))
    assert done.returncode == 3
    assert "no server running" in done.stderr
    assert str(tmp_path / "server.json") in done.stderr


def test_a_stale_server_file_exits_3(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_server_info(
        tmp_path / "server.json",
        ServerInfo(
            url="ws://127.0.0.1:1/mcp",
            pid=gone.pid,
            started_at=datetime.now(UTC),
            protocol_versions=[],
            admin_url="http://127.0.0.1:1",
        ),
    )
    done = exai("status", "--state-dir", str(tmp_path))
    assert done.returncode == 3
    assert f"pid {gone.pid}, which is not running" in done.stderr


def test_an_unreachable_server_exits_4(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_server_info(
        tmp_path / "server.json",
        ServerInfo(
            url="ws://127.0.0.1:1/mcp",
            pid=os.getpid(),  # alive: the server "runs" but its admin port does not answer
            started_at=datetime.now(UTC),
            protocol_versions=[],
            admin_url=f"http://127.0.0.1:{port}",
        ),
    )
    (tmp_path / "admin-token").write_text("some-admin-token\n")
    done = exai("status", "--state-dir", str(tmp_path))
    assert done.returncode == 4
    assert f"server unreachable at http://127.0.0.1:{port}" in done.stderr
    done = exai("status", "--url", f"http://127.0.0.1:{port}", "--admin-token", "x")
    assert done.returncode == 4


def test_old_server_files_still_parse(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text(
        json.dumps(
            {
                "url": "ws://h:1/mcp",
                "pid": 1,
                "started_at": "2026-01-01T00:00:00Z",
                "protocol_versions": [],
            }
        )
    )
    info = read_server_info(path)
    assert info is not None
    assert info.admin_url is None
    assert info.http_url is None


def test_text_status_and_watch(server: ServerProcess) -> None:
    done = exai("status", "--state-dir", str(server.state_dir))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("exai-runtime ")
    assert f"pid {server.process.pid}" in lines[0]
    assert f"MCP {server.url}" in lines[1]
    for heading in (
        "SUPERVISION TREE",
        "SESSIONS",
        "RATE LIMITS",
        "CIRCUIT BREAKERS",
        "PERSISTENCE",
    ):
        assert heading in lines
    tree = lines[lines.index("SUPERVISION TREE") + 1 :]
    assert tree[1].startswith("/root ")
    assert any(line.startswith(("├─ persistence ", "└─ persistence ")) for line in tree)
    assert any("database up" in line for line in lines)

    watched = exai(
        "status",
        "--state-dir",
        str(server.state_dir),
        "--watch",
        "--interval",
        "0",
        "--count",
        "3",
        "--json",
    )
    assert watched.returncode == 0, watched.stderr
    documents = watched.stdout.replace("}\n{", "}\n\x00{").split("\x00")
    assert len(documents) == 3
    taken = [NodeStatus.model_validate_json(d).taken_at for d in documents]
    assert taken == sorted(taken)


def test_server_files_and_log_keep_no_secret(server: ServerProcess) -> None:
    url, admin_token = admin(server)
    assert url.startswith("http://127.0.0.1:")
    log = server.state_dir / "logs" / "exai.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text() + server.stderr_path.read_text()
    assert server.token not in text
    assert admin_token not in text
    assert all(json.loads(line)["timestamp"] for line in log.read_text().splitlines())


async def test_admin_interface_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    class Never:
        async def status(self) -> NodeStatus:
            raise AssertionError("never asked")

    with pytest.raises(AdminConfigError, match="loopback only"):
        await serve_admin(Never(), state_dir=tmp_path, host="0.0.0.0")
    assert not (tmp_path / "admin-token").exists()
