"""Issue 16 (b), the parts under the proxy: exai's own MCP client (``runtime/mcp/client.py``)
over a child's stdio (``runtime/mcp/stdio_client.py``), and the child process groups that
never outlive the node (``runtime/child_process.py``).

The server is one no one here wrote: ``mcp-server-time`` from PyPI, in its own environment
(``tests/clients/requirements-server-time.txt``, built by ``just setup-clients``). The
process-group tests use ``sh`` and ``sleep``: what matters there is a grandchild.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.child_process import Child, ChildRecord, start_child
from runtime.lines import LineReader, LineTooLong
from runtime.mcp.client import ClientSession, Progress, ServerError, ServerGone
from runtime.mcp.schema import Implementation
from runtime.mcp.stdio_client import StdioStream, log_stderr
from tests.harness import CLIENTS, wait_until

SERVER_TIME = CLIENTS / "server-time" / "bin" / "mcp-server-time"
CLIENT = Implementation(name="exai-test", version="0")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Recording(StdioStream):
    """The stdio stream, keeping what the client sent (to see its cancellations)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: str) -> None:
        self.sent.append(json.loads(message))
        await super().send(message)


@asynccontextmanager
async def connected(
    command: list[str],
    record: ChildRecord,
    *,
    max_bytes: int = 1 << 20,
    capabilities: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[ClientSession, Child]]:
    child = await start_child(command, name="t", record=record)
    assert child.process.stdin is not None
    assert child.process.stdout is not None
    assert child.process.stderr is not None
    stream = Recording(
        child.process.stdin, child.process.stdout, name="t", max_message_bytes=max_bytes
    )
    session = ClientSession(stream, name="t", client_info=CLIENT, capabilities=capabilities)
    session.sent = stream.sent  # type: ignore[attr-defined]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            nursery.start_soon(log_stderr, child.process.stderr, "t")
            yield session, child
            nursery.cancel_scope.cancel()
    finally:
        await child.stop(grace=2)


async def test_a_real_stdio_server_through_our_client(tmp_path: Path) -> None:
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients` (just test does)")
    record = ChildRecord(tmp_path / "children")
    async with connected([str(SERVER_TIME), "--local-timezone", "UTC"], record) as (
        session,
        child,
    ):
        server = await session.initialize()
        assert server.protocol_version == "2025-11-25"
        assert "tools" in server.capabilities
        tools = {tool.name: tool for tool in await session.list_tools()}
        assert {"get_current_time", "convert_time"} <= set(tools)
        assert "timezone" in tools["get_current_time"].input_schema["properties"]

        result = await session.request(
            "tools/call", {"name": "get_current_time", "arguments": {"timezone": "Europe/Paris"}}
        )
        assert result["isError"] is False
        assert "Europe/Paris" in result["content"][0]["text"]
        # The server's own errors come back as it sent them.
        with pytest.raises(ServerError) as unknown:
            await session.request("tools/call", {"name": "nope", "arguments": {}})
        assert unknown.value.code == -32602
        with pytest.raises(ServerError) as missing:
            await session.request("no/such/method")
        assert missing.value.code == -32601
        assert str(child.pid) in record.path.read_text()
    # Stopped: the group is gone and no longer recorded.
    await wait_until(lambda: not group_alive(child.pid), what="the server's group to die")
    assert record.path.read_text() == ""


async def test_a_message_over_the_bound_breaks_the_stream(tmp_path: Path) -> None:
    record = ChildRecord(tmp_path / "children")
    flood = "import sys, time; sys.stdout.write('x' * 100000); sys.stdout.flush(); time.sleep(60)"
    async with connected([sys.executable, "-c", flood], record, max_bytes=1000) as (session, _):
        with pytest.raises(ServerGone, match="longer than 1000 bytes"):
            await session.request("ping")
        # Later requests fail at once: the stream is gone.
        with pytest.raises(ServerGone):
            await session.request("ping")


async def test_a_server_that_dies_fails_its_requests_at_once(tmp_path: Path) -> None:
    record = ChildRecord(tmp_path / "children")
    reads_one_line_then_exits = "import sys; sys.stdin.readline(); sys.exit(3)"
    async with connected([sys.executable, "-c", reads_one_line_then_exits], record) as (
        session,
        child,
    ):
        with pytest.raises(ServerGone):
            await session.request("ping")
    assert child.process.returncode == 3


async def test_stop_kills_the_whole_group_even_what_ignores_sigterm(tmp_path: Path) -> None:
    record = ChildRecord(tmp_path / "children")
    # A leader that ignores stdin's end and SIGTERM, with a grandchild that does too.
    stubborn = "trap '' TERM; (trap '' TERM; sleep 600) & sleep 600; wait"
    child = await start_child(["sh", "-c", stubborn], name="stubborn", record=record)
    assert group_alive(child.pid)
    await child.stop(grace=0.2)
    # SIGKILL was sent to the group; its members are gone once init has reaped them.
    await wait_until(lambda: not group_alive(child.pid), what="the stubborn group to die")


async def test_the_next_start_reaps_the_groups_a_killed_node_left(tmp_path: Path) -> None:
    path = tmp_path / "children"
    record = ChildRecord(path)
    # A node that dies leaves its children behind (here: never stopped), with a grandchild
    # whose leader is gone.
    leader_gone = await start_child(
        ["sh", "-c", "sleep 600 & exit 0"], name="leader-gone", record=record
    )
    await leader_gone.process.wait()
    still_running = await start_child(["sleep", "600"], name="running", record=record)
    assert group_alive(leader_gone.pid)  # the grandchild keeps the group
    assert group_alive(still_running.pid)

    reaped = ChildRecord(path).reap()
    assert reaped == 2
    await still_running.process.wait()  # ours to reap (a node's would be init's)
    await wait_until(
        lambda: not group_alive(leader_gone.pid) and not group_alive(still_running.pid),
        what="the orphaned groups to die",
    )
    assert path.read_text() == ""


async def test_reap_leaves_a_reused_id_alone(tmp_path: Path) -> None:
    """A recorded group whose id now leads an unrelated process (its start time differs)
    is not ours: it is not signalled."""
    path = tmp_path / "children"
    unrelated = await trio.lowlevel.open_process(["sleep", "600"], start_new_session=True)
    try:
        path.write_text(f"{unrelated.pid} 1\n")  # "started" at tick 1: not this process
        assert ChildRecord(path).reap() == 0
        assert unrelated.returncode is None
        assert group_alive(unrelated.pid)
    finally:
        unrelated.send_signal(signal.SIGKILL)
        await unrelated.wait()


async def test_line_reader_bounds_and_blank_lines() -> None:
    send, receive = trio.testing.memory_stream_pair()
    reader = LineReader(receive, max_bytes=8)
    await send.send_all(b"\n\r\nabc\r\n" + b"12345678\n" + b"tail")
    await send.aclose()
    assert await reader.receive_line() == b"abc"
    assert await reader.receive_line() == b"12345678"
    assert await reader.receive_line() == b"tail"
    assert await reader.receive_line() is None

    send, receive = trio.testing.memory_stream_pair()
    reader = LineReader(receive, max_bytes=8)
    await send.send_all(b"123456789\n")
    with pytest.raises(LineTooLong):
        await reader.receive_line()
    send, receive = trio.testing.memory_stream_pair()
    reader = LineReader(receive, max_bytes=8)
    await send.send_all(b"1234567890")  # no newline yet: refused before it comes
    with pytest.raises(LineTooLong):
        await reader.receive_line()


EVERYTHING = CLIENTS / "servers-node" / "node_modules" / ".bin" / "mcp-server-everything"


def require_everything() -> None:
    """server-everything is an npm package: without Node.js there is none to run (as the
    TypeScript clients' tests, skipped then); with it, its env must be there."""
    if EVERYTHING.exists():
        return
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: server-everything (npm) needs it")
    pytest.fail("server-everything env missing: run `just setup-clients` (just test does)")


def everything() -> list[str]:
    require_everything()
    return [str(EVERYTHING), "stdio"]


async def test_progress_and_cancellation_through_our_client(tmp_path: Path) -> None:
    """``@modelcontextprotocol/server-everything`` (npm): its long-running tool's progress
    reaches the request that asked, in order; a cancelled request sends
    ``notifications/cancelled`` and the session goes on."""
    record = ChildRecord(tmp_path / "children")
    async with connected(everything(), record) as (session, _):
        await session.initialize()
        tools = {tool.name: tool for tool in await session.list_tools()}
        long_running = tools["trigger-long-running-operation"]
        assert long_running.annotations is not None
        assert long_running.annotations.read_only_hint is True  # passed through as sent
        assert tools["get-structured-content"].output_schema is not None

        seen: list[tuple[float, float | None]] = []

        async def on_progress(note: Progress) -> None:
            seen.append((note.progress, note.total))

        done = await session.request(
            "tools/call",
            {"name": "trigger-long-running-operation", "arguments": {"duration": 0.3, "steps": 3}},
            on_progress=on_progress,
        )
        assert "completed" in done["content"][0]["text"]
        assert seen == [(1, 3), (2, 3), (3, 3)]

        first = trio.Event()

        async def on_first(note: Progress) -> None:
            first.set()

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await session.request(
                        "tools/call",
                        {
                            "name": "trigger-long-running-operation",
                            "arguments": {"duration": 600, "steps": 6000},
                        },
                        on_progress=on_first,
                    )

                nursery.start_soon(call)
                await first.wait()  # it runs: its first progress came
                scope.cancel()
        assert scope.cancelled_caught
        sent = session.sent  # type: ignore[attr-defined]
        (cancelled_call,) = [
            m for m in sent if m.get("params", {}).get("arguments", {}).get("steps") == 6000
        ]
        cancels = [m for m in sent if m.get("method") == "notifications/cancelled"]
        assert [c["params"]["requestId"] for c in cancels] == [cancelled_call["id"]]
        structured = await session.request(
            "tools/call", {"name": "get-structured-content", "arguments": {"location": "Chicago"}}
        )
        assert "structuredContent" in structured


async def test_a_request_from_the_server_is_refused_and_logged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """server-everything sends ``sampling/createMessage`` from its sampling tool (offered
    only to a client that declares ``sampling``, which this test's client does): our client
    answers -32601, logged once however many come, and the session goes on."""
    record = ChildRecord(tmp_path / "children")
    async with connected(everything(), record, capabilities={"sampling": {}}) as (session, _):
        await session.initialize()
        assert "trigger-sampling-request" in {tool.name for tool in await session.list_tools()}
        for _ in range(2):
            refused = await session.request(
                "tools/call",
                {"name": "trigger-sampling-request", "arguments": {"prompt": "hi"}},
            )
            # The server's tool reports the refusal it got as its own failure.
            text = json.dumps(refused)
            assert "-32601" in text or "not found" in text.lower(), refused
        assert (await session.request("ping")) == {}
    logged = capsys.readouterr().out
    assert logged.count("server.request_refused") == 1
    assert "sampling/createMessage" in logged
