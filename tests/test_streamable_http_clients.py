"""Real third-party MCP clients against ``exai serve``'s Streamable HTTP endpoint (``/mcp``).

Each client runs from its own environment (``just setup-clients``) as a script in tests/clients
that does its scenario and prints one JSON report, with every HTTP exchange it made (its HTTP
library's hook or a recording ``fetch``: tests/clients/wire_log.py, wire_log.cjs); the
assertions are here, on the results, the progress and log notifications, what went over the
wire (the session id minted and adopted, the GET stream, DELETE, the ``server/discover`` probe)
and what the server recorded (the session's row, its ``session.closed`` event, the cancelled
call's task row).

* ``mcp==1.30.0`` ``streamable_http_client``: the 2025-era session, cancel included.
* ``mcp==2.3.0`` ``Client`` over its own ``streamable_http_client``: ``auto`` (the default;
  the probe is answered, so it adopts 2026-07-28 at once) and ``legacy``.
* ``@modelcontextprotocol/sdk`` 1.32.x ``StreamableHTTPClientTransport``: the 2025-era session,
  cancel by ``AbortSignal``, ``terminateSession()``.
* ``@modelcontextprotocol/client`` 2.4.x: its default (``legacy``) and ``auto``.
* ``fastmcp`` 4.x ``Client(url, auth=BearerAuth(token))``: ``auto`` and ``legacy``.
* Side by side: the project's WebSocket test client and a real HTTP client on one server at
  once, one conversation thread used over both.

A test skips only when its client's environment is missing (``just test`` installs them all).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.chat_support import Caller, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import (
    CLIENTS,
    ROOT,
    RawClient,
    ServerProcess,
    open_raw,
    query,
    session_row,
    start_server,
    wait_until,
)
from tests.test_real_clients import assert_strictly_increasing, run_client, tool_steps

SCRIPTS = ROOT / "tests" / "clients"
MCP1 = CLIENTS / "mcp1" / "bin" / "python"
MCP2 = CLIENTS / "mcp2" / "bin" / "python"
FASTMCP = CLIENTS / "fastmcp" / "bin" / "python"
NODE_MODULES = CLIENTS / "node" / "node_modules"
SETUP_HINT = "run `just setup-clients` (just test does)"

LEGACY = "2025-11-25"
MODERN = "2026-07-28"
#: A named client identity, for the side-by-side test's conversation thread.
FRANK = "frank-token-0123456789abcdef"


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server for the module. Heartbeats come quickly: the cancel scenarios wait for one as
    the proof that the server runs the call they cancel. A fake upstream serves ``chat``."""
    state = tmp_path_factory.mktemp("http-clients")
    config = write_config(
        state / "exai.toml",
        clients={"frank": FRANK},
        providers=provider_table("fake", upstream.base_url, "fake-model"),
    )
    handle = start_server(
        state,
        database_url=database_url,
        extra_env={"EXAI_HEARTBEAT_INTERVAL": "0.2", "EXAI_CONFIG": str(config)},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()
    errors = [e for e in handle.log_events() if e.get("level") in ("error", "critical")]
    assert errors == [], errors


def http_url(server: ServerProcess) -> str:
    return f"http://{urlsplit(server.url).netloc}/mcp"


def needs(path: Path, what: str) -> pytest.MarkDecorator:
    """Skip (at collection, so the reason shows) when a client's environment is missing."""
    return pytest.mark.skipif(not path.exists(), reason=f"{what} missing: {SETUP_HINT}")


def needs_node(package: str) -> pytest.MarkDecorator:
    if shutil.which("node") is None:
        return pytest.mark.skip(reason="Node.js is not installed: the TypeScript clients need it")
    return needs(NODE_MODULES / package, f"{package} (npm) env")


async def run_node(script: str, server: ServerProcess, token: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    return await run_client(
        [node, str(SCRIPTS / script), http_url(server), token],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )


# -- what the wire and the database must show --------------------------------------------------


def assert_legacy_wire(wire: Sequence[dict[str, Any]], *, get_stream: bool) -> str:
    """A 2025-era session as the spec has it: ``initialize`` without a session id, answered with
    one; that id on every later request, with ``MCP-Protocol-Version``; the GET stream when the
    client opens one; DELETE last; the bearer token on each; nothing refused. Returns the id."""
    first, *rest = wire
    assert (first["method"], first["rpc"], first["session_id"]) == ("POST", "initialize", None)
    assert first["status"] == 200, first
    minted = first["minted_session_id"]
    assert minted, "no Mcp-Session-Id on the initialize answer"
    assert all(e["bearer"] for e in wire), wire
    assert all(e["session_id"] == minted for e in rest), "the client did not adopt the id"
    assert all(e["protocol_version"] == LEGACY for e in rest), wire
    assert [e["status"] for e in wire if e["status"] >= 400] == [], wire
    assert "server/discover" not in [e["rpc"] for e in wire]
    assert rest[0]["rpc"] == "notifications/initialized"
    assert rest[0]["status"] == 202
    gets = [e for e in wire if e["method"] == "GET"]
    if get_stream:
        assert [(e["status"], e["content_type"]) for e in gets] == [(200, "text/event-stream")]
    else:
        assert gets == []
    assert (rest[-1]["method"], rest[-1]["status"]) == ("DELETE", 200), rest[-1]
    # A call with progress came as an SSE stream; a plain one as JSON.
    calls = [e for e in wire if e["rpc"] == "tools/call"]
    assert {e["content_type"] for e in calls} == {"application/json", "text/event-stream"}
    return str(minted)


def assert_modern_wire(wire: Sequence[dict[str, Any]]) -> None:
    """A 2026-07-28 client adopted the answer to its probe: ``server/discover`` first, then
    plain requests, each with ``MCP-Protocol-Version``, no session id either way, no GET stream,
    no DELETE, nothing refused, no ``initialize``."""
    assert (wire[0]["method"], wire[0]["rpc"]) == ("POST", "server/discover"), wire[0]
    assert all(e["method"] == "POST" for e in wire), wire
    assert all(e["bearer"] and e["protocol_version"] == MODERN for e in wire), wire
    assert all(e["session_id"] is None and e["minted_session_id"] is None for e in wire), wire
    assert [e["status"] for e in wire] == [200] * len(wire), wire
    assert "initialize" not in [e["rpc"] for e in wire]


async def assert_ended_by_delete(server: ServerProcess, database_url: str, sid: str) -> None:
    """DELETE ended the session as a WebSocket close 1000 does: its row closed (written behind,
    so waited for) and its ``session.closed`` event with code 1000."""

    def closed() -> bool:
        row = session_row(database_url, sid) or {}
        return row.get("status") == "closed" and row.get("closed_at") is not None

    await wait_until(closed, what=f"session {sid} to be recorded closed")

    def event() -> list[dict[str, Any]]:
        return [
            e
            for e in server.log_events()
            if e.get("event") == "session.closed" and e.get("session_id") == sid
        ]

    await wait_until(lambda: bool(event()), what=f"session {sid}'s session.closed event")
    (ended,) = event()
    assert ended["code"] == 1000, ended
    assert "DELETE" in ended["reason"], ended


def sessionless_session_ids(database_url: str) -> list[str]:
    """The sessions that served sessionless (2026-07-28) requests: their ids are never given
    to a client (``server/discover`` names none), so they are found by their version."""
    rows = query(
        database_url, "select session_id from sessions where protocol_version = %s", (MODERN,)
    )
    return [row[0] for row in rows]


async def assert_blocked_call_cancelled(database_url: str, sid: str | None) -> None:
    """Every ``exai_test_block`` call of the session (``None``: of the sessionless
    sessions) ended cancelled (none completed)."""

    def statuses() -> list[str]:
        sids = [sid] if sid is not None else sessionless_session_ids(database_url)
        rows = query(
            database_url,
            "select status from tasks where session_id = any(%s) and tool_name = 'exai_test_block'",
            (sids,),
        )
        return [row[0] for row in rows]

    await wait_until(
        lambda: bool(statuses()) and set(statuses()) == {"cancelled"},
        what=f"session {sid}'s blocked call to be recorded cancelled",
    )


def assert_tools_and_echo(report: dict[str, Any], text: str) -> None:
    assert report["server_name"] == "exai-runtime"
    assert {"echo", "exai_test_steps", "exai_test_block"} <= set(report["tools"])
    assert report["echo_text"] == [text]
    assert report["echo_structured"] == {"text": text}


def assert_steps(progress: Sequence[Sequence[Any]], *, ordered: bool = True) -> None:
    """The steps call's progress: each step with its total (2.x runs each callback as a task of
    its own, so arrival order is not kept there)."""
    steps = tool_steps(progress)
    assert (steps if ordered else sorted(steps)) == [[n, 3, f"step {n}"] for n in range(1, 4)]


# -- mcp 1.30 ----------------------------------------------------------------------------------


@needs(MCP1, "mcp 1.30 client env")
async def test_mcp1_streamable_http_session(server: ServerProcess, database_url: str) -> None:
    report = await run_client(
        [str(MCP1), str(SCRIPTS / "mcp1_http.py"), http_url(server), server.token]
    )

    assert report["protocol_version"] == LEGACY
    sid = report["session_id"]
    assert sid
    assert report["meta_session_id"] == sid
    assert {"echo", "exai_test_steps", "exai_test_block"} <= set(report["tools"])
    assert report["echo_text"] == ["hello over HTTP"]
    assert report["steps_result"] == ["3 steps"]
    assert_steps(report["steps_progress"])
    assert_strictly_increasing([entry[0] for entry in report["steps_progress"]])
    assert report["logs"] == [{"step": n} for n in (1, 2, 3)]
    # The cancelled call was never answered; the session went on.
    assert report["blocked_answered"] is False
    assert report["echo_after_cancel"] == ["after the cancel"]
    assert report["strays"] == [], "the server answered a cancelled request"

    assert assert_legacy_wire(report["wire"], get_stream=True) == sid
    assert [e["status"] for e in report["wire"] if e["rpc"] == "notifications/cancelled"] == [202]
    row = session_row(database_url, sid)
    assert row is not None
    assert row["protocol_version"] == LEGACY
    await assert_blocked_call_cancelled(database_url, sid)
    await assert_ended_by_delete(server, database_url, sid)


# -- mcp 2.3 -----------------------------------------------------------------------------------


@needs(MCP2, "mcp 2.x client env")
async def test_mcp2_client_auto_adopts_discover_and_legacy_runs_a_session(
    server: ServerProcess, database_url: str
) -> None:
    report = await run_client(
        [str(MCP2), str(SCRIPTS / "mcp2_http.py"), http_url(server), server.token]
    )

    # auto: the probe was answered, so the modern era at once, none of the 10 s fallback wait.
    auto = report["auto"]
    assert (auto["adopted_discover"], auto["ran_initialize"]) == (True, False)
    assert auto["protocol_version"] == MODERN
    assert MODERN in auto["supported_versions"]
    assert LEGACY in auto["supported_versions"]
    assert auto["connect_seconds"] < auto["discover_timeout_seconds"], auto
    assert_tools_and_echo(auto, "hello from mcp 2.3 (auto)")
    assert auto["steps_text"] == ["3 steps"]
    assert_steps(auto["steps_progress"], ordered=False)
    assert auto["strays"] == []
    assert_modern_wire(auto["wire"])
    # Its cancel closed the call's stream (no notifications/cancelled at 2026-07-28): the call
    # was never answered and is recorded cancelled; the next call was answered.
    assert "notifications/cancelled" not in [e["rpc"] for e in auto["wire"]]
    assert auto["blocked_answered"] is False
    assert auto["echo_after_cancel"] == ["after the cancel"]
    # server/discover names no session: the identity's sessionless one is nobody's to keep.
    assert auto["meta_session_id"] is None
    await assert_blocked_call_cancelled(database_url, None)
    # The sessionless requests are served by the identity's own session actor, recorded as such.
    rows = [session_row(database_url, sid) for sid in sessionless_session_ids(database_url)]
    assert any(row is not None and row["status"] == "active" for row in rows), rows

    legacy = report["legacy"]
    assert (legacy["adopted_discover"], legacy["ran_initialize"]) == (False, True)
    assert legacy["protocol_version"] == LEGACY
    assert_tools_and_echo(legacy, "hello from mcp 2.3 (legacy)")
    assert_steps(legacy["steps_progress"], ordered=False)
    assert legacy["logs"] == [{"step": n} for n in (1, 2, 3)]
    assert legacy["strays"] == []
    assert legacy["blocked_answered"] is False
    assert legacy["echo_after_cancel"] == ["after the cancel"]
    sid = assert_legacy_wire(legacy["wire"], get_stream=True)
    assert [e["status"] for e in legacy["wire"] if e["rpc"] == "notifications/cancelled"] == [202]
    await assert_blocked_call_cancelled(database_url, sid)
    assert legacy["meta_session_id"] == sid
    assert (session_row(database_url, sid) or {}).get("client_name") == "exai-mcp2-http-legacy"
    await assert_ended_by_delete(server, database_url, sid)


# -- TypeScript SDK 1.32 -----------------------------------------------------------------------


@needs_node("@modelcontextprotocol/sdk")
async def test_typescript_sdk_streamable_http_session(
    server: ServerProcess, database_url: str
) -> None:
    report = await run_node("ts_sdk_http.cjs", server, server.token)

    assert report["protocol_version"] == LEGACY
    sid = report["session_id"]
    assert_tools_and_echo(report, "hello from the TS SDK over HTTP")
    assert report["echo_is_error"] is False
    assert report["steps_text"] == ["3 steps"]
    # Progress reaches onprogress or, when it met the SDK's late-progress race
    # (typescript-sdk#2580), onerror; either way the server sent it right.
    late = [entry[1:] for entry in report["late_progress"]]
    assert_steps(tool_steps(report["steps_progress"]) + tool_steps(late))
    assert report["logs"] == [{"step": n} for n in (1, 2, 3)]
    assert report["heartbeats"], "no heartbeat reached onprogress"
    assert all(message.startswith("still running") for _, message in report["heartbeats"])
    # Cancel: the abort sent notifications/cancelled (202); the server never answered the call.
    assert report["blocked_outcome"] == "rejected: MCP error -32001: test: cancelled by the client"
    assert report["echo_after_cancel"] == ["after the cancel"]
    assert report["errors"] == []
    assert report["session_id_after_terminate"] is None

    wire = report["wire"]
    assert assert_legacy_wire(wire, get_stream=True) == sid
    (cancelled,) = [e for e in wire if e["rpc"] == "notifications/cancelled"]
    assert cancelled["status"] == 202
    await assert_blocked_call_cancelled(database_url, sid)
    await assert_ended_by_delete(server, database_url, sid)


# -- TypeScript client 2.4 ---------------------------------------------------------------------


@needs_node("@modelcontextprotocol/client")
async def test_typescript_client_2_legacy_and_auto(
    server: ServerProcess, database_url: str
) -> None:
    report = await run_node("ts2_http.cjs", server, server.token)

    # Its default: the 2025 handshake, byte-for-byte a 1.x client.
    legacy = report["legacy"]
    assert (legacy["era"], legacy["protocol_version"]) == ("legacy", LEGACY)
    assert_tools_and_echo(legacy, "hello from TS 2.x (legacy)")
    late = [entry[1:] for entry in legacy["late_progress"]]
    assert_steps(tool_steps(legacy["steps_progress"]) + tool_steps(late))
    assert legacy["logs"] == [{"step": n} for n in (1, 2, 3)]
    assert legacy["heartbeats"]
    assert legacy["blocked_outcome"] == "rejected: test: cancelled by the client"
    assert legacy["echo_after_cancel"] == ["after the cancel"]
    assert legacy["errors"] == []
    sid = assert_legacy_wire(legacy["wire"], get_stream=True)
    assert legacy["session_id"] == sid
    assert legacy["session_id_after_terminate"] is None
    assert [e["status"] for e in legacy["wire"] if e["rpc"] == "notifications/cancelled"] == [202]
    await assert_blocked_call_cancelled(database_url, sid)
    await assert_ended_by_delete(server, database_url, sid)

    # auto: the probe answered, the modern era; its cancel is closing the call's stream (no
    # notifications/cancelled in 2026-07-28), which the server takes as the cancel.
    auto = report["auto"]
    assert (auto["era"], auto["protocol_version"], auto["session_id"]) == ("modern", MODERN, None)
    assert_tools_and_echo(auto, "hello from TS 2.x (auto)")
    late = [entry[1:] for entry in auto["late_progress"]]
    assert_steps(tool_steps(auto["steps_progress"]) + tool_steps(late))
    assert auto["heartbeats"]
    assert auto["blocked_outcome"] == "rejected: test: cancelled by the client"
    assert auto["echo_after_cancel"] == ["after the cancel"]
    assert auto["errors"] == []
    assert_modern_wire(auto["wire"])
    assert "notifications/cancelled" not in [e["rpc"] for e in auto["wire"]]
    # The blocked call ran in the identity's sessionless session and was cancelled there.
    assert auto["meta_session_id"] is None
    await assert_blocked_call_cancelled(database_url, None)


# -- fastmcp 4 ---------------------------------------------------------------------------------


@needs(FASTMCP, "fastmcp client env")
async def test_fastmcp_client_auto_and_legacy(server: ServerProcess, database_url: str) -> None:
    report = await run_client(
        [str(FASTMCP), str(SCRIPTS / "fastmcp_http.py"), http_url(server), server.token]
    )

    auto = report["auto"]
    assert (auto["protocol_version"], auto["ran_initialize"], auto["session_id"]) == (
        MODERN,
        False,
        None,
    )
    assert_tools_and_echo(auto, "hello from fastmcp (auto)")
    assert auto["steps_text"] == ["3 steps"]
    assert_steps(auto["steps_progress"], ordered=False)
    assert auto["strays"] == []
    assert_modern_wire(auto["wire"])

    legacy = report["legacy"]
    assert (legacy["protocol_version"], legacy["ran_initialize"]) == (LEGACY, True)
    assert_tools_and_echo(legacy, "hello from fastmcp (legacy)")
    assert_steps(legacy["steps_progress"], ordered=False)
    assert legacy["logs"] == [{"step": n} for n in (1, 2, 3)]
    assert legacy["strays"] == []
    sid = assert_legacy_wire(legacy["wire"], get_stream=True)
    assert legacy["session_id"] == sid
    assert (session_row(database_url, sid) or {}).get("client_name") == "exai-fastmcp-legacy"
    await assert_ended_by_delete(server, database_url, sid)


# -- both transports at once -------------------------------------------------------------------


@needs(MCP1, "mcp 1.30 client env")
async def test_websocket_and_http_clients_side_by_side_share_a_thread(
    server: ServerProcess, upstream: FakeOpenAI, database_url: str
) -> None:
    """A WebSocket session (the project's raw client) holds a call running while a real HTTP
    client (mcp 1.30) runs a whole session on the same server, with the same identity: it calls
    the same tools, finds the thread the WebSocket session started, and continues it; the
    WebSocket session then sees the HTTP turn, and its own call is still there to cancel."""
    upstream.script(Reply("first answer, over WebSocket"), Reply("second answer, over HTTP"))
    async with open_raw(server.authed_url(FRANK)) as ws:
        raw = RawClient(ws)
        ws_session = (await raw.initialize())["result"]["_meta"]["exai/sessionId"]
        caller = Caller(raw)
        started = await caller.chat("a thread begun over WebSocket")
        thread = started["continuation_id"]
        assert (started["turn"], started["history_turns"]) == (1, 0)

        # A call that runs until cancelled: its first heartbeat proves it is running.
        await raw.send(
            {
                "jsonrpc": "2.0",
                "id": "held",
                "method": "tools/call",
                "params": {
                    "name": "exai_test_block",
                    "arguments": {},
                    "_meta": {"progressToken": "held"},
                },
            }
        )
        heartbeat = await raw.receive()
        assert heartbeat["method"] == "notifications/progress", heartbeat

        report = await run_client(
            [
                str(MCP1),
                str(SCRIPTS / "mcp1_http_calls.py"),
                http_url(server),
                FRANK,
                json_calls(
                    ("echo", {"text": "over HTTP, beside a WebSocket"}),
                    ("threads", {}),
                    ("chat", {"prompt": "continued over HTTP", "continuation_id": thread}),
                ),
            ]
        )
        echoed, listed, continued = report["results"]
        assert echoed["text"] == ["over HTTP, beside a WebSocket"]
        assert [t["continuation_id"] for t in listed["structured"]["threads"]] == [thread]
        assert listed["structured"]["threads"][0]["turns"] == 1
        assert continued["is_error"] is False, continued
        assert continued["structured"]["continuation_id"] == thread
        assert (continued["structured"]["turn"], continued["structured"]["history_turns"]) == (2, 1)
        assert [m["content"] for m in upstream.received[-1].body["messages"]] == [
            "a thread begun over WebSocket",
            "first answer, over WebSocket",
            "continued over HTTP",
        ]

        # Back on the WebSocket (heartbeats of the held call in between, which Caller skips):
        # the same tools, the HTTP turn in the thread.
        echo = await caller.call("echo", {"text": "over WebSocket"})
        assert echo["result"]["content"][0]["text"] == "over WebSocket"
        threads = await caller.call("threads", {})
        (seen,) = threads["result"]["structuredContent"]["threads"]
        assert (seen["continuation_id"], seen["turns"]) == (thread, 2)

        # The held call was running all along: cancel it; the session answers on, and never
        # the cancelled call (Caller fails on an answer to another id).
        await raw.send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": "held", "reason": "test"},
            }
        )
        after = await caller.call("echo", {"text": "after the cancel"})
        assert after["result"]["content"][0]["text"] == "after the cancel"

    await assert_blocked_call_cancelled(database_url, ws_session)
    await assert_ended_by_delete(server, database_url, report["session_id"])
    assert (session_row(database_url, report["session_id"]) or {}).get("client_name") == "mcp"


def json_calls(*calls: tuple[str, dict[str, Any]]) -> str:
    return json.dumps([list(call) for call in calls])


# -- 2026-07-28 per-request logging ----------------------------------------------------------


@needs(MCP2, "mcp 2.x client env")
async def test_modern_clients_get_the_logs_they_opted_into(server: ServerProcess) -> None:
    report = await run_client(
        [str(MCP2), str(SCRIPTS / "mcp2_http.py"), http_url(server), server.token]
    )
    auto = report["auto"]
    steps = [e for e in auto["wire"] if e["rpc"] == "tools/call"][-1]
    assert steps["log_level_meta"] == "info"  # the opt-in was sent
    assert auto["logs"] == [{"step": n} for n in (1, 2, 3)]
