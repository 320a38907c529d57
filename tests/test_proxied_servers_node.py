"""Issue 16 (b) end to end: ``exai serve`` with ``[servers]`` in its config file serves the
tools of real third-party MCP servers (``mcp-server-time`` from PyPI, ``server-everything``
from npm, each in its own env) as ``<server>__<tool>`` to a real client over a real socket:
listed with their schemas and annotations, called with progress, structured output passed
through, recorded as task rows; a server killed with SIGKILL mid-call gives that call a clear
error and serves again once restarted; no process of a proxied server outlives the node,
whether it is stopped (SIGTERM) or killed (SIGKILL) and started again on its state dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.harness import (
    EXAI,
    RawClient,
    ServerProcess,
    admin,
    fetch,
    open_raw,
    query,
    start_server,
    wait_for_status,
    wait_until,
)
from tests.test_proxy_client import EVERYTHING, SERVER_TIME, group_alive, require_everything
from tests.test_status import exai_async
from tests.test_streamable_http_modern import listen_lines, modern


def write_config(path: Path) -> Path:
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients` (just test does)")
    require_everything()
    path.write_text(
        f"""
[servers.time]
command = "{SERVER_TIME}"
args = ["--local-timezone", "UTC"]

[servers.everything]
command = "{EVERYTHING}"
args = ["stdio"]
env = {{ EXAI_TEST_MARK = "${{HOME}}" }}
"""
    )
    return path


def recorded_groups(state_dir: Path) -> list[int]:
    text = (state_dir / "children").read_text()
    return [int(line.split()[0]) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def node(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("proxied")
    config = write_config(tmp / "exai.toml")
    handle = start_server(
        tmp / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    yield handle
    groups = recorded_groups(handle.state_dir)
    assert handle.stop() == 0, handle.stderr_path.read_text()
    # Stopped (SIGTERM): every proxied server's group is gone, and none is recorded.
    assert groups
    for pgid in groups:
        assert not group_alive(pgid), pgid
    assert recorded_groups(handle.state_dir) == []


async def connect(node: ServerProcess) -> Any:
    return open_raw(node.authed_url())


async def test_proxied_tools_are_listed_and_called(node: ServerProcess, database_url: str) -> None:
    async with open_raw(node.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        listed = (await client.request("tools/list"))["result"]["tools"]
        by_name = {tool["name"]: tool for tool in listed}
        assert {"echo", "time__get_current_time", "everything__echo"} <= set(by_name)
        long_running = by_name["everything__trigger-long-running-operation"]
        assert long_running["annotations"]["readOnlyHint"] is True  # passed through
        assert "properties" in by_name["time__convert_time"]["inputSchema"]

        now = await client.request(
            "tools/call", {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}
        )
        assert now["result"]["isError"] is False
        assert '"timezone": "UTC"' in now["result"]["content"][0]["text"]
        structured = await client.request(
            "tools/call",
            {"name": "everything__get-structured-content", "arguments": {"location": "Chicago"}},
        )
        assert "structuredContent" in structured["result"]
        # A proxied server's own error comes back as a tool error.
        unknown_tz = await client.request(
            "tools/call",
            {"name": "time__get_current_time", "arguments": {"timezone": "Not/AZone"}},
        )
        assert unknown_tz["result"]["isError"] is True

    # Every proxied call is a task row (journaled before the answer; in the database with
    # the writer's next batch).
    await wait_until(
        lambda: (
            query(
                database_url,
                "select count(*) from tasks where tool_name = 'time__get_current_time'",
            )[0][0]
            >= 1
        ),
        what="the proxied call's task row",
    )


async def test_progress_comes_through_the_proxy(node: ServerProcess) -> None:
    async with open_raw(node.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {
                    "name": "everything__trigger-long-running-operation",
                    "arguments": {"duration": 0.3, "steps": 3},
                    "_meta": {"progressToken": "p"},
                },
            }
        )
        progress = []
        while True:
            message = await client.receive()
            if message.get("id") == 7:
                break
            if message.get("method") == "notifications/progress":
                progress.append(message["params"]["progress"])
        assert "completed" in message["result"]["content"][0]["text"]
        assert [p for p in progress if p >= 1] == [1, 2, 3]


async def test_sigkill_mid_call_is_a_clear_error_and_the_server_serves_again(
    node: ServerProcess,
) -> None:
    async with open_raw(node.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {
                    "name": "everything__trigger-long-running-operation",
                    "arguments": {"duration": 600, "steps": 6000},
                    "_meta": {"progressToken": "k"},
                },
            }
        )
        while (await client.receive()).get("method") != "notifications/progress":
            pass  # its first progress: the call runs in the proxied server
        before = set(recorded_groups(node.state_dir))
        everything = [pgid for pgid in before if _is_everything(pgid)]
        assert len(everything) == 1, before
        os.kill(everything[0], signal.SIGKILL)
        while True:
            answer = await client.receive()
            if answer.get("id") == 9:
                break
        assert "result" in answer, answer
        assert answer["result"]["isError"] is True
        assert "everything" in answer["result"]["content"][0]["text"]

        async def echo_answers() -> bool:
            reply = await client.request(
                "tools/call", {"name": "everything__echo", "arguments": {"message": "again"}}
            )
            return reply.get("result", {}).get("isError") is False

        # Restarted after its back-off: calls meanwhile are refused as "starting".
        with trio.fail_after(30):
            while not await echo_answers():  # noqa: ASYNC110 - another process restarts it
                await trio.sleep(0.05)
        assert not group_alive(everything[0])


def _is_everything(pgid: int) -> bool:
    try:
        return "everything" in Path(f"/proc/{pgid}/cmdline").read_text()
    except OSError:
        return False


async def test_a_killed_node_leaves_no_server_behind_once_started_again(
    database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "exai.toml")
    state = tmp_path / "state"
    first = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    groups = recorded_groups(state)
    assert len(groups) == 2
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    second = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    try:
        # The new node killed what the old one left before starting its own.
        for pgid in groups:
            await wait_until(lambda pgid=pgid: not group_alive(pgid), what=f"group {pgid}")
        assert set(recorded_groups(state)).isdisjoint(groups)
    finally:
        assert second.stop() == 0, second.stderr_path.read_text()
    log = json.dumps(second.stderr_path.read_text())
    assert "orphan" in log


async def test_status_and_metrics_show_each_server(node: ServerProcess) -> None:
    status = await wait_for_status(
        node,
        lambda s: [server.state for server in s.servers] == ["up", "up"],
        what="both proxied servers up",
    )
    by_name = {server.name: server for server in status.servers}
    assert set(by_name) == {"time", "everything"}
    assert by_name["time"].tools >= 2
    assert by_name["time"].pid is not None
    assert by_name["time"].server_name == "mcp-time"
    assert by_name["time"].endpoint == str(SERVER_TIME)  # the command, never its args or env
    paths = [actor.path for actor in status.actors]
    assert {"/root/servers", "/root/servers/time", "/root/servers/everything"} <= set(paths)
    url, token = admin(node)
    async with httpx.AsyncClient() as client:
        metrics = await client.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"})
    assert 'exai_proxied_server_up{server="time"} 1' in metrics.text
    done = await exai_async("status", "--state-dir", str(node.state_dir))
    assert b"PROXIED SERVERS" in done.stdout
    assert b"everything" in done.stdout


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            '[servers.x]\ncommand = "true"\nenv = { A = "${EXAI_TEST_UNSET_VAR}" }\n',
            "servers.x.env.A: the variable EXAI_TEST_UNSET_VAR is not set",
        ),
        ('[servers."bad name"]\ncommand = "true"\n', "should match pattern"),
        ('[servers.x]\ncommand = "true"\nshare = "cluster"\n', "servers.x.share"),
        # remote servers (url = ...)
        (
            '[servers.x]\nurl = "http://127.0.0.1:9/mcp"\n'
            'headers = { Authorization = "Bearer ${EXAI_TEST_UNSET_VAR}" }\n',
            "servers.x.headers.Authorization: the variable EXAI_TEST_UNSET_VAR is not set",
        ),
        ('[servers.x]\nurl = "ftp://example.com/mcp"\n', "servers.x.url"),
        (
            '[servers.x]\ncommand = "true"\nurl = "ws://127.0.0.1:9/mcp"\n',
            "exactly one of command",
        ),
        ('[servers.x]\nseparator = "__"\n', "exactly one of command"),
        ('[servers.x]\nurl = "ws://127.0.0.1:9/mcp"\nargs = ["a"]\n', "not a url"),
        ('[servers.x]\ncommand = "true"\nheaders = { A = "b" }\n', "not a command"),
    ],
)
def test_a_bad_servers_table_stops_the_start(tmp_path: Path, table: str, expected: str) -> None:
    config = tmp_path / "exai.toml"
    config.write_text(table)
    env = {k: v for k, v in os.environ.items() if k != "EXAI_TEST_UNSET_VAR"}
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
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr


async def test_clients_are_told_when_a_server_goes_down(database_url: str, tmp_path: Path) -> None:
    """A server that serves once, then fails to start again (max_restarts = 0): down. The
    sessions of the handshake era that declared nothing are told
    (``notifications/tools/list_changed``, the server having declared ``tools.listChanged``);
    its tools stay listed and calling one is refused at once (-32004)."""
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients`")
    once = tmp_path / "served-once"
    script = tmp_path / "once.sh"
    script.write_text(
        f'#!/bin/sh\nif [ -e "{once}" ]; then exit 1; fi\ntouch "{once}"\n'
        f'exec "{SERVER_TIME}" --local-timezone UTC\n'
    )
    script.chmod(0o755)
    config = tmp_path / "exai.toml"
    config.write_text(
        f'[servers.once]\ncommand = "{script}"\nmax_restarts = 0\nretry_after = 3600\n'
    )
    node = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    listened: list[dict[str, Any]] = []
    try:
        async with (
            open_raw(node.authed_url()) as ws,
            httpx.AsyncClient(timeout=30) as http,
            trio.open_nursery() as nursery,
        ):
            client = RawClient(ws)
            init = await client.initialize("2025-11-25")
            assert init["result"]["capabilities"]["tools"]["listChanged"] is True
            # A 2026-07-28 client listens for it on subscriptions/listen.
            listen = modern(
                "sub", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
            )
            acknowledged, notified = trio.Event(), trio.Event()

            async def listen_for_changes() -> None:
                async for line in listen_lines(http, node, listen):
                    if line.startswith("data: "):
                        listened.append(json.loads(line[6:]))
                        acknowledged.set()
                        if listened[-1]["method"] == "notifications/tools/list_changed":
                            notified.set()
                            return

            nursery.start_soon(listen_for_changes)
            await acknowledged.wait()
            (pgid,) = recorded_groups(node.state_dir)
            os.kill(pgid, signal.SIGKILL)
            with trio.fail_after(30):
                while True:
                    message = await client.receive()
                    if message.get("method") == "notifications/tools/list_changed":
                        break
                await notified.wait()
            assert listened[-1]["params"]["_meta"] == {
                "io.modelcontextprotocol/subscriptionId": "sub"
            }
            listed = (await client.request("tools/list"))["result"]["tools"]
            assert "once__get_current_time" in {tool["name"] for tool in listed}
            refused = await client.request(
                "tools/call", {"name": "once__get_current_time", "arguments": {}}
            )
            assert refused["error"]["code"] == -32004
            assert "'once' is down" in refused["error"]["message"]
        status = await fetch(node)
        assert [(s.name, s.state) for s in status.servers] == [("once", "down")]
    finally:
        assert node.stop() == 0, node.stderr_path.read_text()
