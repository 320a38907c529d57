"""The MCP Tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663) with the real client
that implements it: ``fastmcp-tasks`` 4.1.4 (over fastmcp 4.1.4 and mcp 2.3), against
``exai serve``'s Streamable HTTP endpoint in the 2026-07-28 era.

The client is tests/clients/fastmcp_tasks_http.py, run from .venv-clients/fastmcp-tasks
(``just setup-clients``); it prints one JSON report per run, with every HTTP exchange. Two
servers: one that answers every task-capable call with its task handle (``EXAI_TASK_AFTER=0``),
one that answers a call inline while it runs under ``EXAI_TASK_AFTER`` (600 s). Asserted here:
the results the library returns, what went over the wire (``resultType: "task"``, then
``tasks/get`` with ``Mcp-Name`` set to the task id), and the rows the server recorded.

One disagreement was found, and the client is the one that is wrong: fastmcp-tasks 4.1.4 sends
``tasks/get``, ``tasks/cancel`` and ``tasks/update`` without the ``Mcp-Name`` header SEP-2663
makes a client MUST. exai lets a *missing* one through on ``tasks/*`` (a different one is
still refused, -32020: runtime/streamable_http/headers.py says why), so the library works as
shipped (``probe``); the rest of the script sets the header (``send_mcp_name``) so that the
header's check is exercised too.

The tests skip only when the client's environment is missing (``just test`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trio

from tests.chat_support import write_config
from tests.harness import CLIENTS, ServerProcess, query, start_server, wait_until
from tests.test_real_clients import run_client
from tests.test_streamable_http_clients import MODERN, SCRIPTS, http_url, needs

FASTMCP_TASKS = CLIENTS / "fastmcp-tasks" / "bin" / "python"
SCRIPT = SCRIPTS / "fastmcp_tasks_http.py"
#: A second identity, for the foreign ``tasks/get`` (the first is the node's own, ``default``).
OTHER = "other"
OTHER_TOKEN = "fastmcp-tasks-other-0123456789abcdef"
#: The identity of the inline server's client: its rows are found by it alone.
INLINE = "fastmcp-tasks-inline"
INLINE_TOKEN = "fastmcp-tasks-inline-0123456789abcdef"
#: SEP-2663: a ``DetailedTask``'s fields (``ttlMs`` is required, ``null`` for unlimited).
TASK_KEYS = {"resultType", "taskId", "status", "createdAt", "lastUpdatedAt", "ttlMs"}

pytestmark = needs(FASTMCP_TASKS, "fastmcp-tasks client env")


def tasks_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, *, task_after: str
) -> ServerProcess:
    state = tmp_path_factory.mktemp(f"fastmcp-tasks-after-{task_after}")
    config = write_config(state / "exai.toml", clients={OTHER: OTHER_TOKEN, INLINE: INLINE_TOKEN})
    # start_server turns EXAI_TEST_FAULTS on: exai_test_sleep and exai_test_block exist.
    return start_server(
        state,
        database_url=database_url,
        extra_env={"EXAI_CONFIG": str(config), "EXAI_TASK_AFTER": task_after},
    )


def stopped_cleanly(server: ServerProcess) -> None:
    assert server.stop() == 0, server.stderr_path.read_text()
    errors = [e for e in server.log_events() if e.get("level") in ("error", "critical")]
    assert errors == [], errors


def report_of(server: ServerProcess, token: str, part: str) -> dict[str, Any]:
    """Run the client once (outside any test's event loop: module fixtures are sync)."""
    argv = [str(FASTMCP_TASKS), str(SCRIPT), http_url(server), token, OTHER_TOKEN, part]
    return trio.run(run_client, argv)


@pytest.fixture(scope="module")
def directed_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = tasks_server(database_url, tmp_path_factory, task_after="0")
    yield handle
    stopped_cleanly(handle)


@pytest.fixture(scope="module")
def directed(directed_server: ServerProcess) -> dict[str, Any]:
    """The client's ``directed`` run: probe, transparent, resume, cancel, foreign."""
    return report_of(directed_server, directed_server.token, "directed")


@pytest.fixture(scope="module")
def inline_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = tasks_server(database_url, tmp_path_factory, task_after="600")
    yield handle
    stopped_cleanly(handle)


# -- what the wire and the database must show --------------------------------------------------


def assert_modern(wire: Sequence[dict[str, Any]]) -> None:
    """Each client of the script: ``server/discover`` first, then plain 2026-07-28 POSTs with
    the bearer token and ``Mcp-Method`` (SEP-2243; SEP-2663 for ``tasks/*``), no session
    either way."""
    assert (wire[0]["method"], wire[0]["rpc"]) == ("POST", "server/discover"), wire[0]
    assert all(e["method"] == "POST" and e["bearer"] for e in wire), wire
    assert all(e["protocol_version"] == MODERN for e in wire), wire
    assert all(e["mcp_method"] == e["rpc"] for e in wire), wire
    assert all(e["session_id"] is None and e["minted_session_id"] is None for e in wire), wire


def assert_created(exchange: dict[str, Any], tool: str) -> str:
    """A ``tools/call`` answered with SEP-2663's ``CreateTaskResult``; returns its task id."""
    assert (exchange["rpc"], exchange["tool"], exchange["mcp_name"]) == ("tools/call", tool, tool)
    assert (exchange["status"], exchange["content_type"]) == (200, "application/json")
    assert (exchange["result_type"], exchange["task_status"]) == ("task", "working"), exchange
    assert set(exchange["result_keys"]) >= TASK_KEYS, exchange
    assert exchange["answered_task_id"], exchange
    return str(exchange["answered_task_id"])


def assert_polls(
    wire: Sequence[dict[str, Any]], task_id: str, *, method: str = "tasks/get"
) -> list[dict[str, Any]]:
    """Every request for the task names it in ``params.taskId`` and ``Mcp-Name`` (SEP-2663:
    MUST), and each ``tasks/get`` is answered with a ``DetailedTask`` (``resultType``
    ``complete``). Returns the exchanges of ``method``."""
    named = [e for e in wire if e["task_id"] == task_id]
    assert all(e["mcp_name"] == task_id and e["status"] == 200 for e in named), named
    for poll in (e for e in named if e["rpc"] == "tasks/get"):
        assert poll["result_type"] == "complete", poll
        assert set(poll["result_keys"]) >= TASK_KEYS, poll
    return [e for e in named if e["rpc"] == method]


def task_rows(database_url: str, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    rows = query(
        database_url,
        "select id::text, status, identity, augmented, tool_name from tasks "
        "where id::text = any(%s)",
        (list(task_ids),),
    )
    columns = ("status", "identity", "augmented", "tool_name")
    return {row[0]: dict(zip(columns, row[1:], strict=True)) for row in rows}


async def assert_rows(database_url: str, expected: dict[str, tuple[str, str, str]]) -> None:
    """Each task's row (written behind, so waited for): (status, identity, tool), an MCP
    task (``augmented``)."""
    want = {
        task_id: {"status": status, "identity": identity, "augmented": True, "tool_name": tool}
        for task_id, (status, identity, tool) in expected.items()
    }
    await wait_until(
        lambda: task_rows(database_url, list(want)) == want,
        what=f"the task rows {want}",
    )


# -- the tests ---------------------------------------------------------------------------------


async def test_the_client_as_shipped_omits_mcp_name_and_is_served(
    directed: dict[str, Any],
) -> None:
    """fastmcp-tasks 4.1.4 as shipped: its ``tasks/get`` carries no ``Mcp-Name``; exai
    serves it (a missing name is let through on ``tasks/*``). The wire shows the header
    missing: once a release sends it, this test says so."""
    probe = directed["probe"]
    assert probe["refused"] is None, probe
    assert probe["answered"]["task_id"] == probe["task_id"]
    assert assert_created(probe["wire"][1], "exai_test_sleep") == probe["task_id"]
    (get,) = [e for e in probe["wire"] if e["rpc"] == "tasks/get"]
    assert (get["task_id"], get["mcp_name"]) == (probe["task_id"], None)
    assert (get["status"], get["error_code"]) == (200, None)


async def test_call_tool_polls_the_task_transparently(
    directed: dict[str, Any], database_url: str
) -> None:
    """``call_tool`` on a server that answers with the task handle: the library polled
    ``tasks/get`` to ``completed`` and returned the tool's own result."""
    transparent = directed["transparent"]
    assert (transparent["text"], transparent["is_error"]) == (["slept 0.5 s"], False)
    wire = transparent["wire"]
    assert_modern(wire)
    calls = [e for e in wire if e["rpc"] == "tools/call"]
    assert len(calls) == 1
    task_id = assert_created(calls[0], "exai_test_sleep")
    gets = [e for e in wire if e["rpc"] == "tasks/get"]
    assert gets, "the client never polled"
    assert wire.index(calls[0]) < wire.index(gets[0])
    assert {e["task_id"] for e in gets} == {task_id}
    assert assert_polls(wire, task_id) == gets
    assert [e["task_status"] for e in gets][-1] == "completed"
    assert set(e["task_status"] for e in gets[:-1]) <= {"working"}
    await assert_rows(database_url, {task_id: ("completed", "default", "exai_test_sleep")})


async def test_a_new_client_fetches_the_result_of_a_task_another_one_started(
    directed: dict[str, Any], database_url: str
) -> None:
    """``call_tool_task`` returns the handle; that client closes; a new client (a new
    connection) drives the same task id to the tool's result."""
    resume = directed["resume"]
    task_id = resume["task_id"]
    assert resume["created_status"] == "working"
    submitted = resume["submit_wire"]
    assert_modern(submitted)
    assert [e["rpc"] for e in submitted] == ["server/discover", "tools/call"]
    assert assert_created(submitted[1], "exai_test_sleep") == task_id

    assert (resume["text"], resume["is_error"]) == (["slept 1.5 s"], False)
    final = resume["final"]
    assert (final["task_id"], final["status"], final["error"]) == (task_id, "completed", None)
    assert final["result"]["content"] == [{"type": "text", "text": "slept 1.5 s"}]
    resumed = resume["resume_wire"]
    assert_modern(resumed)
    assert "tools/call" not in [e["rpc"] for e in resumed]
    gets = assert_polls(resumed, task_id)
    assert [e["task_status"] for e in gets][-1:] == ["completed"]
    await assert_rows(database_url, {task_id: ("completed", "default", "exai_test_sleep")})


async def test_cancel_ends_the_task_cancelled(directed: dict[str, Any], database_url: str) -> None:
    """``ToolTask.cancel()`` of a call that runs until cancelled: acknowledged, then
    ``wait()`` and ``status()`` show ``cancelled`` (no result, no error inlined: SEP-2663's
    ``CancelledTask``), and ``result()`` raises."""
    cancel = directed["cancel"]
    task_id = cancel["task_id"]
    assert cancel["before"]["status"] == "working"
    for seen in (cancel["waited"], cancel["after"]):
        assert (seen["task_id"], seen["status"]) == (task_id, "cancelled"), seen
        assert (seen["result"], seen["error"]) == (None, None)
        assert "cancelled by request" in seen["status_message"]
    assert cancel["result_raised"] == f"Task {task_id} was cancelled"

    wire = cancel["wire"]
    assert_modern(wire)
    assert assert_created(wire[1], "exai_test_block") == task_id
    (cancelled,) = assert_polls(wire, task_id, method="tasks/cancel")
    assert (cancelled["result_type"], cancelled["error_code"]) == ("complete", None)
    after = wire[wire.index(cancelled) + 1 :]
    assert {e["rpc"] for e in after} == {"tasks/get"}  # wait(), status(), result()
    assert [e["task_status"] for e in after][-1:] == ["cancelled"]
    await assert_rows(database_url, {task_id: ("cancelled", "default", "exai_test_block")})


async def test_another_identity_cannot_get_or_cancel_the_task(
    directed: dict[str, Any], database_url: str
) -> None:
    """A client with another identity's token names the first identity's tasks: -32602, as
    for a task that does not exist, for ``tasks/get`` and ``tasks/cancel`` alike; the
    tasks are untouched."""
    foreign = directed["foreign"]
    resumed, cancelled = directed["resume"]["task_id"], directed["cancel"]["task_id"]
    assert [(r["method"], r["task_id"], r.get("code")) for r in foreign["refusals"]] == [
        ("tasks/get", resumed, -32602),
        ("tasks/cancel", resumed, -32602),
        ("tasks/get", cancelled, -32602),
        ("tasks/cancel", cancelled, -32602),
    ]
    assert all("not found" in r["message"] for r in foreign["refusals"])
    wire = foreign["wire"]
    assert_modern(wire)
    named = [e for e in wire if e["task_id"]]
    assert [(e["status"], e["error_code"]) for e in named] == [(200, -32602)] * 4
    assert all(e["mcp_name"] == e["task_id"] for e in named)
    await assert_rows(
        database_url,
        {
            resumed: ("completed", "default", "exai_test_sleep"),
            cancelled: ("cancelled", "default", "exai_test_block"),
        },
    )


async def test_a_quick_call_is_answered_inline(
    inline_server: ServerProcess, database_url: str
) -> None:
    """The extension declared, on a server that answers a call inline while it runs under
    ``EXAI_TASK_AFTER``: ``call_tool`` of ``echo`` gets its result in the ``tools/call``
    answer, with no ``tasks/get``; ``call_tool_task`` then has no task to hand back."""
    report = await run_client(
        [
            str(FASTMCP_TASKS),
            str(SCRIPT),
            http_url(inline_server),
            INLINE_TOKEN,
            OTHER_TOKEN,
            "inline",
        ]
    )
    inline = report["inline"]
    assert inline["text"] == ["answered inline"]
    assert inline["structured"] == {"text": "answered inline"}
    assert inline["handle_raised"].startswith("Tool 'exai_test_sleep' did not run as a task")
    wire = inline["wire"]
    assert_modern(wire)
    assert [e["status"] for e in wire] == [200] * len(wire)
    calls = [e for e in wire if e["rpc"] == "tools/call"]
    assert [(e["tool"], e["result_type"]) for e in calls] == [
        ("echo", "complete"),
        ("exai_test_sleep", "complete"),
    ]
    assert not [e for e in wire if e["rpc"] and e["rpc"].startswith("tasks/")]
    # Each call still ran as an MCP task (the extension was declared), answered inline.

    def rows() -> list[tuple[Any, ...]]:
        return query(
            database_url,
            "select tool_name, status, augmented from tasks where identity = %s"
            " order by created_at",
            (INLINE,),
        )

    await wait_until(
        lambda: rows() == [("echo", "completed", True), ("exai_test_sleep", "completed", True)],
        what="the inline calls' rows: MCP tasks of the identity, completed",
    )
