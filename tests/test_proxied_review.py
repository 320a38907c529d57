"""Issue 16, the review: proxied servers as a hostile server and a careless operator see them.

Real processes (``tests/servers/hostile_review_server.py``, a server that misbehaves as its
first argument says), real pipes, real signals. What the review found:

- a server's tool names were served as it listed them, whatever they were: a newline, 10,000
  characters, a space (MCP allows 1 to 128 of ``[A-Za-z0-9_.-]``, and so do exai's own); and
  so were input and output schemas that are not object schemas (MCP's ``Tool`` requires
  ``"type": "object"``; a client that checks the listing, the TypeScript SDK's, refuses the
  whole ``tools/list`` for one such tool, every other server's tools with it);
- ``tools/list`` pages were followed to the 100th whatever the tools already held (the proxy
  serves 1,000 a server at most), so a server with 40,000 tools in pages of 400 never came up;
- one stderr line over 64 KiB stopped the reading of the server's stderr: the server then
  blocked on its next 64 KiB of log and answered nothing more;
- an answer the client could not read (a result that is not an object, an error without a
  message) was dropped, and the call it answered waited for ever, holding its slots;
- a call to an unknown tool quoted the client's name whole in its -32602: 10,000 characters
  in, 10,000 out (bounded only by the 4 MiB message);
- ``exai status`` listed the proxied servers with their health, but not the team's own tools
  (docs/tools.md: each "gets what exai gives its own tools ... ``exai status``"): it now has
  TOOLS, each with where it was declared, where it runs, its calls running and timeout;
- two servers whose names overlap through the separator (``a`` and ``a__b``, ``a`` and
  ``a_``) make one prefix glob (``tools = ["a__*"]``) reach both: refused at start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from actors.servers import ProxiedServer, ServerState, StdioCommand
from actors.servers.tools import MAX_TOOLS_PER_SERVER, proxied_tools
from runtime.child_process import ChildRecord
from runtime.mcp.client import ClientError, Progress, ServerGone
from tests.harness import EXAI, RawClient, open_raw, start_server, wait_for_status, wait_until
from tests.test_proxy_client import SERVER_TIME
from tests.test_status import exai_async
from tests.test_tool_api import USER_TOOLS

HOSTILE = Path(__file__).parent / "servers" / "hostile_review_server.py"


def hostile(tmp_path: Path, mode: str) -> ProxiedServer:
    return ProxiedServer(
        "h",
        StdioCommand(sys.executable, (str(HOSTILE), mode)),
        record=ChildRecord(tmp_path / "children"),
        max_message_bytes=1 << 20,
        backoff=0.01,
        max_restarts=1,
    )


async def test_tools_mcp_does_not_allow_are_not_served(tmp_path: Path) -> None:
    server = hostile(tmp_path, "names")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        served = [tool.name for tool in proxied_tools(server, "__")]
        assert served == ["h__ok", "h__" + "v" * 100]
        # A name the prefix makes longer than 128 characters is not served either.
        long_name = ProxiedServer(
            "s" * 64,
            StdioCommand(sys.executable, (str(HOSTILE), "names")),
            record=ChildRecord(tmp_path / "children2"),
            max_message_bytes=1 << 20,
        )
        long_name.tools = server.tools
        assert [tool.name for tool in proxied_tools(long_name, "-" * 8)] == [
            "s" * 64 + "-" * 8 + "ok"
        ]
        nursery.cancel_scope.cancel()


async def test_a_server_with_endless_pages_of_tools_is_served_its_first_thousand(
    tmp_path: Path,
) -> None:
    server = hostile(tmp_path, "pages")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await wait_until(
            lambda: server.state in (ServerState.UP, ServerState.DOWN),
            what="the server up or down",
        )
        assert server.state is ServerState.UP, server.last_error
        assert len(server.tools) == MAX_TOOLS_PER_SERVER
        assert len(proxied_tools(server, "__")) == MAX_TOOLS_PER_SERVER
        # Three pages of 400 hold the first 1,000: no fourth was asked for.
        asked = await server.call("pages", {})
        assert asked["content"][0]["text"] == "3"
        nursery.cancel_scope.cancel()


async def test_a_stderr_line_over_the_bound_does_not_stop_the_server(tmp_path: Path) -> None:
    server = hostile(tmp_path, "stderr")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        # The guard only bounds a failure: a server whose stderr is no longer read blocks
        # for good once the pipe holds 64 KiB, and never answers.
        with trio.fail_after(60):
            for _ in range(2):
                shouted = await server.call("shout", {})
                assert shouted["content"][0]["text"] == "shouted"
        assert server.restarts == 0
        nursery.cancel_scope.cancel()


async def test_a_burst_of_requests_from_a_server_that_reads_nothing_meanwhile(
    tmp_path: Path,
) -> None:
    """5,000 requests at once from a single-threaded server: the proxy's answers (-32601)
    must not be written by the task that reads the server, or both block on full pipes (the
    server writing its requests, the reader writing an answer the server is not reading)."""
    server = hostile(tmp_path, "requests")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        with trio.fail_after(60):  # bounds a deadlock, never paces a success
            for _ in range(2):
                begged = await server.call("beg", {})
                assert begged["content"][0]["text"] == "begged"
        assert server.restarts == 0
        nursery.cancel_scope.cancel()


async def test_an_unknown_tool_is_quoted_clipped(database_url: str, tmp_path: Path) -> None:
    node = start_server(tmp_path / "state", database_url=database_url)
    try:
        async with open_raw(node.authed_url()) as ws:
            client = RawClient(ws)
            await client.initialize("2025-11-25")
            for name in ["x" * 10_000, "time__now\n\x1b[31m" + "y" * 5_000]:
                answer = await client.request("tools/call", {"name": name, "arguments": {}})
                message = answer["error"]["message"]
                assert answer["error"]["code"] == -32602
                assert message.startswith("unknown tool: "), message[:100]
                assert len(message) < 200, len(message)
    finally:
        assert node.stop() == 0, node.stderr_path.read_text()


async def test_garbage_stray_answers_and_floods_leave_the_server_serving(
    tmp_path: Path,
) -> None:
    """Held up in the review: what the reader cannot use is dropped (logged once), and the
    call that provoked it is answered, by the same incarnation."""
    server = hostile(tmp_path, "chaos")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        for _ in range(2):
            notes: list[Progress] = []

            async def note(progress: Progress, notes: list[Progress] = notes) -> None:
                notes.append(progress)

            answer = await server.call("chaos", {}, on_progress=note)
            assert answer["content"][0]["text"] == "survived"
            assert notes == []  # progress for tokens of no call of ours reaches none
        assert server.restarts == 0
        assert server.state is ServerState.UP
        nursery.cancel_scope.cancel()


async def test_an_answer_that_is_no_valid_response_fails_its_call(tmp_path: Path) -> None:
    server = hostile(tmp_path, "invalid")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        with trio.fail_after(60):  # bounds a call left waiting, never paces an answer
            for tool in ("bad_result", "bad_error"):
                with pytest.raises(ClientError, match="invalid answer") as failed:
                    await server.call(tool, {})
                assert not isinstance(failed.value, ServerGone)
            fine = await server.call("fine", {})
        assert fine["content"][0]["text"] == "fine"
        assert server.restarts == 0
        nursery.cancel_scope.cancel()


async def test_status_lists_the_teams_tools_beside_a_proxied_server(
    database_url: str, tmp_path: Path
) -> None:
    """docs/tools.md's end: your own tool and a server from PyPI side by side in
    ``exai status``, with their health."""
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients` (just test does)")
    config = tmp_path / "exai.toml"
    config.write_text(
        f"""
[tools]
path = [{json.dumps(str(USER_TOOLS))}]
modules = ["team_tools"]

[servers.time]
command = "{SERVER_TIME}"
args = ["--local-timezone", "UTC"]
"""
    )
    node = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    try:
        status = await wait_for_status(
            node,
            lambda s: any(server.state == "up" for server in s.servers),
            what="time up",
        )
        tools = {tool.name: tool for tool in status.tools}
        assert tools["echo"].origin == "built-in"
        assert tools["word_count"].origin == "team_tools.word_count"
        assert tools["word_count"].runs == "worker thread"
        assert tools["shout"].runs == "event loop"
        assert (tools["shout"].running, tools["shout"].max_concurrency) == (0, 2)
        assert not any(name.startswith("time__") for name in tools)  # under its server
        done = await exai_async("status", "--state-dir", str(node.state_dir))
        text = done.stdout.decode()
        assert done.returncode == 0, done.stderr
        tools_part = text.split("\nTOOLS\n", 1)[1].split("\n\n", 1)[0]
        assert "word_count" in tools_part
        assert "team_tools.word_count" in tools_part
        assert "shout" in tools_part
        assert "0/2" in tools_part
        assert "and 2 tools of proxied servers" in tools_part
        servers_part = text.split("\nPROXIED SERVERS\n", 1)[1]
        assert re.search(r"^time +up ", servers_part, re.MULTILINE), servers_part
    finally:
        assert node.stop() == 0, node.stderr_path.read_text()


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ("[servers.a]\n{c}\n[servers.a__b]\n{c}\n", "servers a and a__b"),
        ("[servers.a]\n{c}\n[servers.a_]\n{c}\n", "servers a and a_"),
        ('[servers.ab]\n{c}\nseparator = "-"\n[servers.ab-c]\n{c}\n', "servers ab and ab-c"),
    ],
)
def test_servers_whose_names_overlap_through_the_separator_stop_the_start(
    tmp_path: Path, tables: str, expected: str
) -> None:
    config = tmp_path / "exai.toml"
    config.write_text(tables.format(c='command = "true"'))
    done = subprocess.run(
        [
            str(EXAI),
            "serve",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "s"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr, done.stderr
