"""Issue 16 (b): a proxied stdio MCP server kept running (``actors/servers/proxy.py``).

Real servers no one here wrote (``mcp-server-time`` from PyPI, ``server-everything`` from
npm, each in its own env: ``just setup-clients``), real processes and signals: a server
killed with SIGKILL mid-call gives that call a clear error and is restarted; a command that
keeps failing is marked down past its restart intensity and its calls refused at once;
stopping the node leaves no process of the server's group behind.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from actors.servers import ProxiedServer, ServerDown, ServerState, StdioCommand
from runtime.child_process import ChildRecord
from runtime.mcp.client import Progress, ServerGone
from tests.harness import wait_until
from tests.test_proxy_client import EVERYTHING, SERVER_TIME, group_alive, require_everything


def proxied(tmp_path: Path, name: str, command: StdioCommand, **options: float) -> ProxiedServer:
    return ProxiedServer(
        name,
        command,
        record=ChildRecord(tmp_path / "children"),
        max_message_bytes=1 << 20,
        **options,  # type: ignore[arg-type]
    )


async def test_a_server_is_started_listed_and_called(tmp_path: Path) -> None:
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients` (just test does)")
    server = proxied(tmp_path, "time", StdioCommand(str(SERVER_TIME), ("--local-timezone", "UTC")))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        assert server.state is ServerState.UP
        assert {"get_current_time", "convert_time"} <= {tool.name for tool in server.tools}
        result = await server.call("get_current_time", {"timezone": "Asia/Tokyo"})
        assert "Asia/Tokyo" in result["content"][0]["text"]
        pid = server.pid
        assert pid is not None
        nursery.cancel_scope.cancel()
    # The node stopping stops the child and its whole group.
    await wait_until(lambda: not group_alive(pid), what="the server's group to end")


async def test_sigkill_mid_call_is_a_clear_error_and_the_server_comes_back(
    tmp_path: Path,
) -> None:
    require_everything()
    server = proxied(
        tmp_path, "everything", StdioCommand(str(EVERYTHING), ("stdio",)), backoff=0.01
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        first_pid = server.pid
        assert first_pid is not None
        running = trio.Event()

        async def on_progress(note: Progress) -> None:
            running.set()

        async def kill_when_running() -> None:
            await running.wait()
            os.kill(first_pid, signal.SIGKILL)

        nursery.start_soon(kill_when_running)
        with pytest.raises(ServerGone, match="everything"):
            await server.call(
                "trigger-long-running-operation",
                {"duration": 600, "steps": 6000},
                on_progress=on_progress,
            )
        await server.wait_for(ServerState.UP)
        assert server.restarts == 1
        assert server.pid != first_pid
        echoed = await server.call("echo", {"message": "back"})
        assert "back" in echoed["content"][0]["text"]
        nursery.cancel_scope.cancel()


async def test_a_crash_loop_marks_the_server_down_and_its_calls_are_refused(
    tmp_path: Path,
) -> None:
    server = proxied(
        tmp_path,
        "broken",
        StdioCommand("sh", ("-c", "exit 1")),
        max_restarts=2,
        restart_period=600,
        backoff=0.01,
        retry_after=600,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_for(ServerState.DOWN)
        assert server.restarts == 3  # two restarts allowed, the third is one too many
        with pytest.raises(ServerDown, match="'broken' is down"):
            await server.call("anything", {})
        nursery.cancel_scope.cancel()


async def test_a_command_that_does_not_exist_is_down_not_a_crash(tmp_path: Path) -> None:
    server = proxied(
        tmp_path,
        "missing",
        StdioCommand(str(tmp_path / "no-such-server")),
        max_restarts=0,
        restart_period=600,
        retry_after=600,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_for(ServerState.DOWN)
        assert server.last_error is not None
        assert "no-such-server" in server.last_error
        nursery.cancel_scope.cancel()


async def test_a_flood_of_list_changed_costs_one_listing_at_a_time(tmp_path: Path) -> None:
    """A server that sends 5,000 ``notifications/tools/list_changed`` at once: the proxy
    lists its tools again one at a time, at most once more after the one running, never
    5,000 times (each would be a task and a request)."""
    hostile = Path(__file__).parent / "servers" / "hostile_server.py"
    changes: list[int] = []
    server = ProxiedServer(
        "hostile",
        StdioCommand(sys.executable, (str(hostile),)),
        record=ChildRecord(tmp_path / "children"),
        max_message_bytes=1 << 20,
        on_tools_changed=lambda s: changes.append(len(s.tools)),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        flooded = await server.call("flood", {"times": 5000})
        assert flooded["content"][0]["text"] == "flooded 5000"
        # The count answers after every notification before it was read (one stream).
        count = int((await server.call("count", {}))["content"][0]["text"])
        assert 1 <= count <= 3, count  # the first listing, then at most two more
        nursery.cancel_scope.cancel()
