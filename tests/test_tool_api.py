"""The team's own tools (docs/tools.md): ``@tool`` functions in a user's module
(tests/user_tools/team_tools.py), loaded through the config file's ``[tools]`` table by a real
``exai serve`` and called over real sockets; entry points; refused declarations; access lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from typing_extensions import TypedDict  # pydantic wants it before Python 3.12

from runtime.mcp import ToolContext, ToolDeclarationError, ToolOutput, tool
from runtime.mcp.tools import Tool
from runtime.status_model import NodeStatus
from tests.harness import (
    EXAI,
    RawClient,
    ServerProcess,
    call,
    cancel,
    open_raw,
    start_server,
    wait_for_status,
    wait_until,
)

USER_TOOLS = Path(__file__).parent / "user_tools"
ALICE = "alice_" + secrets.token_urlsafe(24)
BOB = "bob_" + secrets.token_urlsafe(24)
#: The team module's tools, as tools/list lists them to an identity that may call all.
TEAM = {
    "word_count",
    "shout",
    "count_up",
    "wait_gate",
    "slow_gate",
    "slow_async",
    "open_gate",
    "gate_report",
    "block_loop",
}


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_config(directory: Path, text: str) -> Path:
    path = directory / "exai.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def team(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the team's tools, alice and bob restricted, one call per session (so a
    slot kept by a thread is seen), and a watchdog that speaks at 100 ms."""
    state = tmp_path_factory.mktemp("team")
    config = write_config(
        state,
        f"""
[tools]
path = [{json.dumps(str(USER_TOOLS))}]
modules = ["team_tools"]

[clients.alice]
token_sha256 = "{_sha256(ALICE)}"
tools = ["word_*", "shout"]
deny_tools = ["shout"]

[clients.bob]
token_sha256 = "{_sha256(BOB)}"
deny_tools = ["*_gate", "gate_*"]
""",
    )
    handle = start_server(
        state / "state",
        database_url=database_url,
        extra_env={
            "EXAI_CONFIG": str(config),
            "EXAI_MAX_INFLIGHT_PER_SESSION": "1",
            "EXAI_LOOP_STALL_MS": "100",
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@asynccontextmanager
async def session(
    server: ServerProcess, *, token: str | None = None, version: str = "2025-06-18"
) -> AsyncIterator[RawClient]:
    async with open_raw(server.authed_url(token)) as ws:
        client = RawClient(ws)
        reply = await client.initialize(version)
        assert "result" in reply, reply
        yield client


async def listed(client: RawClient) -> dict[str, dict[str, Any]]:
    reply = await client.request("tools/list")
    return {tool["name"]: tool for tool in reply["result"]["tools"]}


async def call_tool(client: RawClient, tool: str, **arguments: Any) -> dict[str, Any]:
    reply = await client.request("tools/call", {"name": tool, "arguments": arguments})
    assert "result" in reply, reply
    return reply["result"]  # type: ignore[no-any-return]


async def receive_reply(client: RawClient) -> dict[str, Any]:
    """The next frame that is a response (notifications skipped)."""
    while True:
        message = await client.receive()
        if "id" in message:
            return message


def threads_of(status: NodeStatus) -> Any:
    assert status.tool_threads is not None
    return status.tool_threads


def session_in_flight(status: NodeStatus, session_id: str) -> int:
    return next(s.in_flight for s in status.sessions if s.session_id == session_id)


async def session_id_of(server: ServerProcess, known: set[str]) -> str:
    """The id of the one session that is not in ``known`` (read from the status)."""
    status = await wait_for_status(
        server,
        lambda s: len({x.session_id for x in s.sessions} - known) == 1,
        what="the new session to be listed",
    )
    return ({x.session_id for x in status.sessions} - known).pop()


# -- schemas, descriptions, results ---------------------------------------------------------


async def test_hints_and_docstrings_become_the_listed_tools(team: ServerProcess) -> None:
    async with session(team) as client:
        tools = await listed(client)
    assert TEAM | {"echo", "chat", "threads"} <= set(tools)
    word_count = tools["word_count"]
    assert word_count["description"] == "Count the words of a note."
    assert word_count["inputSchema"] == {
        "type": "object",
        "title": "WordCountArguments",
        "properties": {
            "text": {"type": "string", "title": "Text"},
            "title": {
                "type": "string",
                "title": "Title",
                "default": "untitled",
                "description": "The note's title.",
            },
        },
        "required": ["text"],
    }
    assert word_count["outputSchema"] == {
        "type": "object",
        "title": "Note",
        "properties": {
            "title": {"type": "string", "title": "Title"},
            "words": {"type": "integer", "title": "Words"},
        },
        "required": ["title", "words"],
    }
    assert word_count["annotations"] == {"readOnlyHint": True, "openWorldHint": False}
    shout = tools["shout"]  # declared as shout_back, named by the decorator
    assert shout["description"] == (
        "Shout the text back, once per time, reporting progress as it goes."
    )
    # The context parameter is not an argument.
    assert shout["inputSchema"]["properties"] == {
        "text": {"type": "string", "title": "Text"},
        "times": {"type": "integer", "title": "Times", "default": 1, "minimum": 1},
    }
    # A list is not an object: wrapped as {"result": ...}, as MCP's output schema must be one.
    assert shout["outputSchema"] == {
        "type": "object",
        "title": "ShoutOutput",
        "properties": {
            "result": {"type": "array", "items": {"type": "string"}, "title": "Result"},
        },
        "required": ["result"],
    }
    assert "annotations" not in shout


async def test_a_sync_tool_answers_structured_content_where_the_version_has_it(
    team: ServerProcess,
) -> None:
    async with session(team) as client:
        result = await call_tool(client, "word_count", text="one two three", title="n")
    assert result["structuredContent"] == {"title": "n", "words": 3}
    assert json.loads(result["content"][0]["text"]) == {"title": "n", "words": 3}
    assert result["isError"] is False
    async with session(team, version="2025-03-26") as client:
        result = await call_tool(client, "word_count", text="one two")
    assert "structuredContent" not in result
    assert json.loads(result["content"][0]["text"]) == {"title": "untitled", "words": 2}


async def test_arguments_are_checked_against_the_hints(team: ServerProcess) -> None:
    async with session(team) as client:
        reply = await client.request("tools/call", {"name": "shout", "arguments": {"times": 0}})
    assert reply["error"]["code"] == -32602, reply
    message = reply["error"]["message"]
    assert "text" in message, message
    assert "times" in message, message


async def test_an_async_tool_reports_progress_and_answers_its_list(team: ServerProcess) -> None:
    async with session(team) as client:
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {
                    "name": "shout",
                    "arguments": {"text": "hi", "times": 2},
                    "_meta": {"progressToken": "p"},
                },
            }
        )
        progress = []
        while True:
            message = await client.receive()
            if message.get("method") == "notifications/progress":
                progress.append(message["params"]["progress"])
                continue
            break
    assert message["id"] == 7, message
    assert progress == [1, 2]
    assert message["result"]["structuredContent"] == {"result": ["HI", "HI"]}
    assert json.loads(message["result"]["content"][0]["text"]) == ["HI", "HI"]


async def test_a_sync_tool_reports_progress_and_logs_from_its_thread(
    team: ServerProcess,
) -> None:
    async with session(team) as client:
        assert "result" in await client.request("logging/setLevel", {"level": "info"})
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "count",
                "method": "tools/call",
                "params": {
                    "name": "count_up",
                    "arguments": {"to": 3},
                    "_meta": {"progressToken": "c"},
                },
            }
        )
        notes: list[tuple[str, Any]] = []
        while True:
            message = await client.receive()
            if "id" in message:
                break
            if message["method"] == "notifications/progress":
                notes.append(("progress", message["params"]["progress"]))
            else:
                notes.append((message["method"], message["params"]["data"]))
    assert message["id"] == "count", message
    assert message["result"]["structuredContent"] == {"result": 3}
    # In order: each from the thread is sent before the thread goes on.
    assert notes == [
        ("progress", 1),
        ("notifications/message", {"step": 1}),
        ("progress", 2),
        ("notifications/message", {"step": 2}),
        ("progress", 3),
        ("notifications/message", {"step": 3}),
    ]


# -- worker threads ---------------------------------------------------------------------------


async def test_a_blocked_sync_tool_leaves_the_loop_to_every_other_session(
    team: ServerProcess,
) -> None:
    async with session(team) as blocked, session(team) as other:
        await blocked.send(call("wait", "wait_gate", gate="free"))
        await wait_for_status(
            team,
            lambda s: threads_of(s).running == 1,
            what="wait_gate's thread to run",
        )
        # The thread waits on its gate; meanwhile another session is answered, by the reader
        # (ping) and through the whole call path (a tool call, its rows, its reply).
        assert "result" in await other.request("ping")
        assert (await call_tool(other, "echo", text="still here"))["content"][0]["text"] == (
            "still here"
        )
        # Only now is the gate opened (by a tool of the same module, in the server's process).
        assert (await call_tool(other, "open_gate", gate="free"))["content"][0]["text"] == (
            "opened"
        )
        reply = await receive_reply(blocked)
    assert reply["id"] == "wait", reply
    assert reply["result"]["content"][0]["text"] == "gate free opened"


async def test_a_cancelled_sync_tool_is_let_go_at_once_and_keeps_its_slot_until_it_returns(
    team: ServerProcess,
) -> None:
    before = await wait_for_status(team, lambda s: True, what="a status")
    async with session(team) as client:
        session_id = await session_id_of(team, {s.session_id for s in before.sessions})
        async with session(team) as other:
            await cancelled_call_keeps_its_slot(team, client, other, session_id)
    status = await wait_for_status(
        team, lambda s: threads_of(s).running == 0, what="no thread left"
    )
    assert threads_of(status).outliving == []


async def cancelled_call_keeps_its_slot(
    team: ServerProcess, client: RawClient, other: RawClient, session_id: str
) -> None:
    await client.send(call("held", "wait_gate", gate="held"))
    await wait_for_status(
        team, lambda s: threads_of(s).running == 1, what="wait_gate's thread to run"
    )
    await client.send(cancel("held"))
    status = await wait_for_status(
        team,
        lambda s: len(threads_of(s).outliving) == 1,
        what="the cancelled call's thread to be listed as outliving it",
    )
    outliving = threads_of(status).outliving[0]
    assert (outliving.tool, outliving.session_id, outliving.request_id) == (
        "wait_gate",
        session_id,
        "held",
    )
    assert outliving.answered == "cancelled"
    shown = await trio.run_process(
        [str(EXAI), "status", "--state-dir", str(team.state_dir)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "1 still running after their call was answered" in text, text
    threads_part = text.split("\nTOOL THREADS\n", 1)[1]  # (TOOLS above lists wait_gate too)
    row = next(line for line in threads_part.splitlines() if line.startswith("wait_gate "))
    assert session_id in row, row
    assert "cancelled" in row, row
    # The session may run one call (EXAI_MAX_INFLIGHT_PER_SESSION=1): its slot is still
    # the thread's, so the next call waits for it.
    await client.send(call("after", "echo", text="after the thread"))
    await wait_for_status(
        team,
        lambda s: session_in_flight(s, session_id) == 1 and len(threads_of(s).outliving) == 1,
        what="the echo to wait for the slot",
    )
    pong = await client.request("ping")
    # The next frame is the ping's answer, not the echo's: the echo still waits.
    assert "result" in pong, pong
    await call_tool(other, "open_gate", gate="held")
    reply = await receive_reply(client)
    assert reply["id"] == "after", reply
    assert reply["result"]["content"][0]["text"] == "after the thread"
    # The function saw ctx.cancelled once it could look.
    report = await call_tool(other, "gate_report", gate="held")
    assert report["content"][0]["text"] == "saw cancelled"


async def test_ctx_cancelled_lets_a_sync_tool_stop_early(team: ServerProcess) -> None:
    async with session(team) as client:
        await client.send(call("early", "wait_gate", gate="early", stop_on_cancel=True))
        await wait_for_status(
            team, lambda s: threads_of(s).running == 1, what="wait_gate's thread to run"
        )
        await client.send(cancel("early"))
        # The function returns on the cancel, which gives the session's one slot back.
        result = await call_tool(client, "gate_report", gate="early")
    assert result["content"][0]["text"] == "stopped on cancel"


async def test_a_sync_tool_past_its_timeout_is_answered_while_its_thread_runs_on(
    team: ServerProcess,
) -> None:
    async with session(team) as client, session(team) as other:
        result = await call_tool(client, "slow_gate", gate="late")
        assert result["isError"] is True
        assert "timed out after 0.2 s" in result["content"][0]["text"], result
        status = await wait_for_status(
            team, lambda s: len(threads_of(s).outliving) == 1, what="the timed-out thread"
        )
        assert threads_of(status).outliving[0].answered == "timed out"
        await call_tool(other, "open_gate", gate="late")
        await wait_for_status(
            team, lambda s: threads_of(s).running == 0, what="the thread to return"
        )
        report = await call_tool(client, "gate_report", gate="late")
    assert report["content"][0]["text"] == "saw cancelled"


async def test_an_async_tool_past_its_timeout_is_an_error_result(team: ServerProcess) -> None:
    async with session(team) as client:
        result = await call_tool(client, "slow_async", seconds=60)
    assert result["isError"] is True
    assert "timed out after 0.2 s" in result["content"][0]["text"], result


async def test_an_async_tool_that_blocks_the_loop_is_named_once(team: ServerProcess) -> None:
    def named() -> list[dict[str, Any]]:
        return [
            event
            for event in team.log_events()
            if event.get("event") == "tool.blocked_loop" and event.get("tool") == "block_loop"
        ]

    async with session(team) as client:
        await call_tool(client, "block_loop", ms=400)
        await wait_until(lambda: len(named()) == 1, what="the watchdog to name block_loop")
        await call_tool(client, "block_loop", ms=400)
        # Round trips after the second stall: the watchdog has woken since (it is due at once).
        for _ in range(3):
            await call_tool(client, "echo", text="x")
    assert len(named()) == 1, named()
    assert named()[0]["stalled_ms"] >= 100


# -- access lists -----------------------------------------------------------------------------


async def test_access_lists_filter_what_each_identity_sees_and_calls(team: ServerProcess) -> None:
    async with session(team, token=ALICE) as alice:
        assert set(await listed(alice)) == {"word_count"}  # shout is allowed, then denied
        assert (await call_tool(alice, "word_count", text="a b"))["structuredContent"] == {
            "title": "untitled",
            "words": 2,
        }
        forbidden = await alice.request("tools/call", {"name": "shout", "arguments": {}})
        unknown = await alice.request("tools/call", {"name": "nothing", "arguments": {}})
    # Answered exactly as a tool that does not exist.
    assert forbidden["error"]["code"] == unknown["error"]["code"] == -32602
    assert forbidden["error"]["message"].replace("shout", "nothing") == unknown["error"]["message"]
    async with session(team) as default:
        every = set(await listed(default))
    async with session(team, token=BOB) as bob:
        gates = {"wait_gate", "slow_gate", "open_gate", "gate_report"}
        assert gates <= every
        assert set(await listed(bob)) == every - gates
        refused = await bob.request("tools/call", {"name": "open_gate", "arguments": {"gate": "g"}})
        assert "unknown tool: 'open_gate'" in refused["error"]["message"], refused
    async with session(team, version="2025-11-25", token=ALICE) as alice:
        # The same in every era.
        forbidden = await alice.request("tools/call", {"name": "shout", "arguments": {}})
        unknown = await alice.request("tools/call", {"name": "nothing", "arguments": {}})
    assert json.dumps(forbidden["error"]).replace("shout", "nothing") == json.dumps(
        unknown["error"]
    )


# -- loading ------------------------------------------------------------------------------------


def serve_until_exit(state: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``exai serve`` expected to stop before storage starts (no database is given)."""
    full = {**os.environ, "EXAI_TOKEN": secrets.token_urlsafe(24), **env}
    full.pop("EXAI_DATABASE_URL", None)
    return subprocess.run(
        [str(EXAI), "serve", "--port", "0", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=False,
    )


def the_one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("modules", "fragments"),
    [
        (
            ["no_such_tools"],
            ["exai: tools: module 'no_such_tools' failed to import: ModuleNotFoundError"],
        ),
        (
            ["broken_tools"],
            [
                "module 'broken_tools' failed to import: RuntimeError: the team's tools need a "
                "setting that is missing"
            ],
        ),
        (
            ["bad_tools"],
            [
                "module 'bad_tools' declares a bad tool:",
                "tool bad_tools.untyped: parameter 'query' has no type hint",
            ],
        ),
        (
            ["clash_tools"],
            ["two tools are named 'echo': the built-in 'echo' and clash_tools.echo"],
        ),
    ],
)
def test_a_module_that_cannot_be_served_stops_the_start_with_one_line(
    tmp_path: Path, modules: list[str], fragments: list[str]
) -> None:
    config = write_config(
        tmp_path,
        f"[tools]\npath = [{json.dumps(str(USER_TOOLS))}]\nmodules = {json.dumps(modules)}\n",
    )
    line = the_one_line(serve_until_exit(tmp_path / "state", {"EXAI_CONFIG": str(config)}))
    assert line.startswith("exai: tools: "), line
    for fragment in fragments:
        assert fragment in line, line


def make_distribution(root: Path, *, tool_name: str) -> Path:
    """An installed distribution, as pip leaves one (a package and its ``.dist-info`` with
    ``entry_points.txt``), on a directory to put on ``PYTHONPATH``."""
    package = root / "ep_tools"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from runtime.mcp import tool\n\n\n"
        f"@tool(name={tool_name!r})\n"
        "def packaged(name: str) -> str:\n"
        '    """Greet from a package."""\n'
        '    return f"hello {name} from a package"\n'
    )
    info = root / "ep_tools-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tools\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[exai.tools]\nep = ep_tools\n")
    return root


async def test_an_installed_package_serves_its_tools_through_its_entry_point(
    database_url: str, tmp_path: Path
) -> None:
    site = make_distribution(tmp_path / "site", tool_name="packaged_hello")
    server = start_server(
        tmp_path / "state",
        database_url=database_url,
        extra_env={"PYTHONPATH": str(site)},
    )
    try:
        async with session(server) as client:
            tools = await listed(client)
            assert tools["packaged_hello"]["description"] == "Greet from a package."
            result = await call_tool(client, "packaged_hello", name="ada")
        assert result["content"][0]["text"] == "hello ada from a package"
    finally:
        assert server.stop() == 0, server.stderr_path.read_text()


def test_an_entry_point_and_a_module_with_one_tool_name_stop_the_start(tmp_path: Path) -> None:
    site = make_distribution(tmp_path / "site", tool_name="word_count")
    # The module next to the config file, found through a path relative to it.
    (tmp_path / "team").mkdir()
    shutil.copy(USER_TOOLS / "team_tools.py", tmp_path / "team")
    config = write_config(tmp_path, '[tools]\npath = ["team"]\nmodules = ["team_tools"]\n')
    done = serve_until_exit(
        tmp_path / "state", {"EXAI_CONFIG": str(config), "PYTHONPATH": str(site)}
    )
    line = the_one_line(done)
    assert "two tools are named 'word_count': team_tools.word_count (module 'team_tools') and " in (
        line
    ), line
    assert "entry point 'ep' = 'ep_tools' of ep-tools" in line, line


async def test_sighup_applies_new_access_lists_to_open_sessions(
    database_url: str, tmp_path: Path
) -> None:
    def clients(rule: str) -> str:
        return f'[clients.alice]\ntoken_sha256 = "{_sha256(ALICE)}"\n{rule}\n'

    config = write_config(tmp_path, clients(""))
    server = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    try:
        async with session(server, token=ALICE) as alice:
            assert "chat" in await listed(alice)
            write_config(tmp_path, clients('tools = ["echo"]'))
            seen = len([e for e in server.log_events() if e["event"] == "config.reloaded"])
            server.process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: (
                    len([e for e in server.log_events() if e["event"] == "config.reloaded"]) > seen
                ),
                what="config.reloaded",
            )
            assert set(await listed(alice)) == {"echo"}
            refused = await alice.request("tools/call", {"name": "threads", "arguments": {}})
            assert "unknown tool: 'threads'" in refused["error"]["message"], refused
    finally:
        assert server.stop() == 0, server.stderr_path.read_text()


# -- declarations, without a server -------------------------------------------------------------


def test_a_tool_is_still_its_function() -> None:
    @tool
    def double(n: int) -> int:
        """Double a number."""
        return n * 2

    assert double(4) == 8
    assert isinstance(double, Tool)
    assert double.descriptor().output_schema == {
        "type": "object",
        "title": "DoubleOutput",
        "properties": {"result": {"type": "integer", "title": "Result"}},
        "required": ["result"],
    }


class Point(TypedDict):
    x: int
    y: int


@dataclass
class Box:
    corner: Point
    label: str = "box"


def test_dataclasses_and_typed_dicts_are_output_objects_as_they_are() -> None:
    @tool
    async def box() -> Box:
        """A box."""
        return Box({"x": 1, "y": 2})

    schema = box.descriptor().output_schema
    assert schema is not None
    assert schema["type"] == "object"  # on top: MCP requires it, and the SDKs check it
    assert set(schema["properties"]) == {"corner", "label"}

    async def run() -> ToolOutput:
        return await box.run(box.parse({}), ToolContext("s", 1))

    output = trio.run(run)
    assert output.structured is not None
    assert output.structured.model_dump(mode="json") == {"corner": {"x": 1, "y": 2}, "label": "box"}
    assert json.loads(output.text) == {"corner": {"x": 1, "y": 2}, "label": "box"}


def test_a_tool_may_answer_a_tool_output_of_its_own() -> None:
    @tool
    def refuse(why: str) -> ToolOutput:
        """Say why not."""
        return ToolOutput(text=why, is_error=True)

    assert refuse.descriptor().output_schema is None

    async def run() -> ToolOutput:
        return await refuse.run(refuse.parse({"why": "no"}), ToolContext("s", 1))

    assert trio.run(run) == ToolOutput(text="no", is_error=True)


def _untyped(query):  # type: ignore[no-untyped-def]
    """Search."""


def _no_doc(query: str) -> str:
    return query


def _star(*words: str) -> str:
    """Join."""
    return " ".join(words)


def _returns_none(query: str) -> None:
    """Nothing."""


def _generator(query: str) -> Iterator[str]:
    """Yield."""
    yield query


def _fine(query: str) -> str:
    """Fine."""
    return query


@pytest.mark.parametrize(
    ("function", "options", "why"),
    [
        (_untyped, {}, "parameter 'query' has no type hint"),
        (_no_doc, {}, "no description: give it a docstring"),
        (_star, {}, "*words: a tool's arguments are named"),
        (_returns_none, {}, "returns None"),
        (_generator, {}, "a generator cannot be a tool"),
        (_fine, {"name": "has space"}, "name 'has space' must be 1 to 128 letters"),
        (_fine, {"annotations": {"readonlyHint": True}}, "unknown annotation(s) 'readonlyHint'"),
        (_fine, {"timeout": 0}, "timeout must be a positive number of seconds"),
        (_fine, {"max_concurrency": 0}, "max_concurrency must be at least 1"),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_function(
    function: Callable[..., Any], options: dict[str, Any], why: str
) -> None:
    with pytest.raises(ToolDeclarationError) as refused:
        tool(**options)(function)
    message = str(refused.value)
    assert message.startswith(f"tool tests.test_tool_api.{function.__name__}: "), message
    assert why in message, message
