"""The official Python SDK client (mcp 1.30, its own venv) against ``exai serve``."""

from __future__ import annotations

import json
import subprocess

import pytest
import trio

from tests.harness import CLIENTS, ROOT, ServerProcess, session_row, wait_until

MCP1 = CLIENTS / "mcp1" / "bin" / "python"


async def test_official_client_initializes_lists_calls_and_session_row_follows(
    server: ServerProcess, database_url: str
) -> None:
    if not MCP1.exists():
        pytest.fail("mcp 1.30 client env missing: run `just setup-clients` (just test does)")
    client = await trio.lowlevel.open_process(
        [str(MCP1), str(ROOT / "tests" / "clients" / "mcp1_session.py"), server.authed_url()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        assert client.stdin is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await client.stdout.receive_some(4096)
                assert chunk, "client exited before reporting"
                line += chunk
        report = json.loads(line)
        assert report["server_name"] == "exai-runtime"
        assert report["protocol_version"] in {"2025-06-18", "2025-11-25"}
        assert "echo" in report["tools"]
        assert report["echo_text"] == ["hello from mcp 1.30"]
        assert report["echo_structured"] == {"text": "hello from mcp 1.30"}
        assert report["echo_is_error"] is False

        session_id = report["session_id"]
        # The session's row is written behind its initialize answer: waited for, not assumed.
        await wait_until(
            lambda: session_row(database_url, session_id) is not None,
            what=f"session {session_id}'s row",
        )
        live = session_row(database_url, session_id)
        assert live is not None
        assert live["status"] == "active"
        assert live["client_name"] == "mcp"
        assert live["protocol_version"] == report["protocol_version"]

        await client.stdin.send_all(b"done\n")
        with trio.fail_after(30):
            assert await client.wait() == 0

        await wait_until(
            lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
            what="session row to become closed",
        )
        closed = session_row(database_url, session_id)
        assert closed is not None
        assert closed["closed_at"] is not None
    finally:
        if client.returncode is None:
            client.kill()
