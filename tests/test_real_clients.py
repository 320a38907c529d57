"""Real MCP clients, each from its own environment, against ``exai serve``.

* ``mcp==1.30.0`` (Python SDK 1.x, its WebSocket transport): progress and cancellation
  (initialize, list and call are in test_mcp_client.py).
* ``mcp==2.3.0`` (Python SDK 2.x) ``Client`` in its default ``auto`` mode, through the WebSocket
  transport adapter in tests/clients/mcp2_session.py: it must adopt our ``server/discover``
  answer instead of waiting out its 10 s probe timeout and falling back to ``initialize``.
* ``@modelcontextprotocol/sdk`` 1.32.x (TypeScript SDK) ``WebSocketClientTransport`` on the
  machine's Node: initialize, list, call, progress, cancel.

Each client is a script in tests/clients that does its scenario and prints one JSON report;
the assertions are here. The environments come from ``just setup-clients``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import (
    CLIENTS,
    ROOT,
    ServerProcess,
    session_row,
    start_server,
    wait_until,
)

SCRIPTS = ROOT / "tests" / "clients"
MCP1 = CLIENTS / "mcp1" / "bin" / "python"
MCP2 = CLIENTS / "mcp2" / "bin" / "python"
NODE_MODULES = CLIENTS / "node" / "node_modules"
SETUP_HINT = "run `just setup-clients` (just test does)"


@pytest.fixture(scope="module")
def clients_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server whose heartbeats come quickly: the cancel scenarios wait for a heartbeat as the
    proof that the server is running the call they cancel (a cancel that overtook its request
    would find nothing to cancel)."""
    handle = start_server(
        tmp_path_factory.mktemp("state"),
        database_url=database_url,
        extra_env={"EXAI_HEARTBEAT_INTERVAL": "0.2"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def run_client(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one client script to its end and return the JSON report it printed last."""
    # The bound only turns a hang into a failure; a healthy run takes about a second.
    with trio.fail_after(120):
        done = await trio.run_process(
            list(argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    script = next((Path(arg).name for arg in argv if arg.startswith(str(SCRIPTS))), argv[0])
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{stderr}"
    lines = done.stdout.decode().splitlines()
    assert lines, f"{script} printed no report:\n{stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def tool_steps(progress: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The progress the tool reported itself, without heartbeats ("still running ...")."""
    return [list(entry) for entry in progress if str(entry[-1]).startswith("step ")]


def assert_strictly_increasing(values: Sequence[float]) -> None:
    assert all(a < b for a, b in pairwise(values)), values


def require(path: os.PathLike[str], what: str) -> None:
    if not os.path.exists(path):
        pytest.fail(f"{what} missing: {SETUP_HINT}")


# -- mcp 1.30 ----------------------------------------------------------------------------------


async def test_mcp1_progress_logging_and_cancel(clients_server: ServerProcess) -> None:
    require(MCP1, "mcp 1.30 client env")
    report = await run_client(
        [str(MCP1), str(SCRIPTS / "mcp1_progress_cancel.py"), clients_server.authed_url()]
    )

    # Progress reaches call_tool's progress_callback, in order, with the tool's total.
    assert report["steps_result"] == ["4 steps"]
    assert tool_steps(report["steps_progress"]) == [[n, 4, f"step {n}"] for n in range(1, 5)]
    assert_strictly_increasing([entry[0] for entry in report["steps_progress"]])
    # logging/setLevel("info") let each step's log through: the first call's four, then the
    # second call's two.
    assert report["logs"] == [{"step": n} for n in (1, 2, 3, 4, 1, 2)]

    # The cancelled call was never answered, and the session went on working.
    assert isinstance(report["cancelled_request_id"], int)
    assert report["blocked_answered"] is False
    assert report["echo_after_cancel"] == ["after the cancel"]
    assert report["steps_after_cancel"] == ["2 steps"]
    assert report["strays"] == [], "the server answered a cancelled request"


# -- mcp 2.3 -----------------------------------------------------------------------------------


async def test_mcp2_auto_mode_adopts_discover_lists_and_calls(
    clients_server: ServerProcess, database_url: str
) -> None:
    require(MCP2, "mcp 2.x client env")
    report = await run_client(
        [str(MCP2), str(SCRIPTS / "mcp2_session.py"), clients_server.authed_url()]
    )

    # `auto` adopted our server/discover answer: no initialize, the modern era, and so none of
    # the 10 s wait that the fallback to initialize starts with.
    assert report["adopted_discover"] is True
    assert report["ran_initialize"] is False
    assert report["protocol_version"] == "2026-07-28"
    assert "2026-07-28" in report["supported_versions"]
    assert report["connect_seconds"] < report["discover_timeout_seconds"], report
    assert report["server_name"] == "exai-runtime"

    assert "echo" in report["tools"]
    assert report["echo_text"] == ["hello from mcp 2.3"]
    assert report["echo_structured"] == {"text": "hello from mcp 2.3"}
    assert report["echo_is_error"] is False
    assert report["steps_text"] == ["3 steps"]
    # 2.x runs each progress callback as a task of its own, so arrival order is not kept.
    assert sorted(tool_steps(report["steps_progress"])) == [
        [n, 3, f"step {n}"] for n in range(1, 4)
    ]

    # The server recorded the client from the identity in the modern request's _meta.
    session_id = report["session_id"]
    assert session_id

    def recorded() -> bool:
        row = session_row(database_url, session_id) or {}
        return row.get("status") == "closed" and row.get("client_name") == "exai-mcp2-test"

    await wait_until(recorded, what="the mcp 2.x session row to be identified and closed")
    row = session_row(database_url, session_id)
    assert row is not None
    assert row["protocol_version"] == "2026-07-28"


# -- TypeScript SDK ----------------------------------------------------------------------------


def node_command() -> list[str]:
    """``node`` with what this Node needs for a global WebSocket (a flag before Node 22)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the TypeScript SDK client needs it (CI has Node)")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    return [node, "--experimental-websocket"] if major < 22 else [node]


async def test_typescript_sdk_initializes_lists_calls_reports_progress_and_cancels(
    clients_server: ServerProcess,
) -> None:
    node = node_command()
    require(NODE_MODULES / "@modelcontextprotocol" / "sdk", "TypeScript SDK (npm) env")
    report = await run_client(
        [*node, str(SCRIPTS / "ts_sdk_session.cjs"), clients_server.authed_url()],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )

    assert report["protocol_version"] == "2025-11-25"
    assert report["server_name"] == "exai-runtime"
    assert "echo" in report["tools"]
    assert report["echo_text"] == ["hello from the TS SDK"]
    assert report["echo_structured"] == {"text": "hello from the TS SDK"}
    assert report["echo_is_error"] is False

    # Progress: the steps call's notifications all arrived with its token, in order, before
    # its result; the SDK hands each to onprogress or, when it met the SDK's late-progress
    # race (typescript-sdk#2580), to onerror. Either way the server sent them right.
    assert report["steps_text"] == ["3 steps"]
    late = report["late_progress"]
    late_steps = tool_steps([entry[1:] for entry in late])
    assert len({entry[0] for entry in late if str(entry[-1]).startswith("step ")}) <= 1
    steps = tool_steps(report["steps_progress"]) + late_steps
    assert steps == [[n, 3, f"step {n}"] for n in range(1, 4)]
    # Heartbeats of the blocked call, which arrive on their own, reach onprogress.
    assert report["heartbeats"], "no heartbeat progress reached onprogress"
    assert all(message.startswith("still running") for _, message in report["heartbeats"])
    assert_strictly_increasing([value for value, _ in report["heartbeats"]])

    # Cancel: aborting made the SDK send notifications/cancelled; the server sent no answer
    # (one would be an "unknown message ID" error) and kept serving.
    assert report["blocked_outcome"].startswith("rejected")
    assert "cancelled by the client" in report["blocked_outcome"]
    assert report["echo_after_cancel"] == ["after the cancel"]
    assert report["errors"] == []
