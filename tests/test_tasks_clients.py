"""MCP Tasks with a real client: ``mcp==1.30.0``'s experimental task API (the Python SDK's
``session.experimental``) over WebSocket against ``exai serve`` (tests/clients/mcp1_tasks.py;
the pattern of tests/test_real_clients.py)."""

from __future__ import annotations

from tests.harness import ServerProcess
from tests.test_real_clients import MCP1, SCRIPTS, require, run_client


async def test_mcp1_runs_polls_fetches_lists_and_cancels_a_task(server: ServerProcess) -> None:
    require(MCP1, "mcp 1.30 client env")
    report = await run_client([str(MCP1), str(SCRIPTS / "mcp1_tasks.py"), server.authed_url()])
    assert report["protocol_version"] == "2025-11-25"
    assert report["tasks_capability"] == {
        "list": {},
        "cancel": {},
        "requests": {"tools": {"call": {}}},
    }
    assert report["echo_task_support"] == "optional"
    assert report["created_status"] == "working"
    assert report["created_ttl"] == 120_000
    assert report["poll_interval"] == 1000
    assert report["statuses"][-1] == "completed"
    assert report["result_text"] == ["hello from a task"]
    assert report["result_is_error"] is False
    assert report["task_id"] in report["listed"]
    assert report["cancelled_status"] == "cancelled"
    assert report["status_after_cancel"] == "cancelled"
