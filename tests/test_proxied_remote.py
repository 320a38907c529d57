"""Issue 16: remote proxied servers, ``[servers.<name>] url = ...``, with real servers exai did
not write, over real sockets: ``@modelcontextprotocol/server-everything`` speaking Streamable
HTTP (the TypeScript SDK's server transport), and a second ``exai serve`` reached over
WebSocket and over Streamable HTTP with its bearer token in ``headers``.

Asserted through an ``exai serve`` configured with ``url``: the remote tools are listed as
``<server>__<tool>`` and called, progress comes through, a remote server killed mid-call gives
that call a clear error and serves again once it is back (reconnected, a new session), and
the headers are sent: the token the remote exai requires lets one entry in, a wrong one
keeps the other down with ``HTTP 401`` as its last error in ``exai status``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.mcp.client import ClientSession, Progress, ServerGone
from runtime.mcp.http_client import open_http_stream
from runtime.mcp.ws_client import open_ws_stream, public_url
from runtime.statefile import read_server_info
from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    start_server,
    wait_for_status,
)
from tests.test_proxy_client import CLIENT, EVERYTHING
from tests.test_status import exai_async

REMOTE_TOKEN = "test_remote_" + "x" * 24


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class EverythingHttp:
    """``mcp-server-everything streamableHttp`` on ``port`` (its ``PORT`` variable:
    dist/transports/streamableHttp.js), its output in ``log``."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> None:
        if not EVERYTHING.exists():
            pytest.fail("server-everything env missing: run `just setup-clients`")
        start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(EVERYTHING), "streamableHttp"],
                stdout=out,
                stderr=out,
                env={**os.environ, "PORT": str(self.port)},
                start_new_session=True,
            )
        _wait_for_text(self.log, start, f"listening on port {self.port}")

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None


def _wait_for_text(path: Path, start: int, text: str, within: float = 30) -> None:
    """Block until ``text`` is in ``path`` past ``start``: another process's log, no event
    to wait on (as harness.start_server blocks on its pipe). Called from tests' trio loops
    too, so it cannot run one of its own."""
    deadline = time.monotonic() + within
    while text not in path.read_text(errors="replace")[start:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {path} after {within} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EverythingHttp]:
    server = EverythingHttp(free_port(), tmp_path_factory.mktemp("everything") / "log")
    server.start()
    yield server
    if server.process is not None:
        server.kill()


@pytest.fixture(scope="module")
def remote(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    holder = Remote(tmp_path_factory.mktemp("remote"), database_url)
    holder.start()
    yield holder
    assert holder.server is not None
    assert holder.server.stop() == 0, holder.server.stderr_path.read_text()


class Remote:
    """A second ``exai serve`` requiring ``REMOTE_TOKEN``, restartable on its port."""

    def __init__(self, state: Path, database_url: str) -> None:
        self.state = state
        self.database_url = database_url
        self.server: ServerProcess | None = None
        self.port = 0

    def start(self) -> None:
        self.server = start_server(
            self.state, database_url=self.database_url, token=REMOTE_TOKEN, port=self.port
        )
        self.port = int(self.server.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def ws_url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def http_url(self) -> str:
        info = read_server_info(self.state / "server.json")
        assert info is not None
        assert info.http_url is not None
        return info.http_url


@pytest.fixture(scope="module")
def node(
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    everything: EverythingHttp,
    remote: Remote,
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("node")
    config = tmp / "exai.toml"
    config.write_text(
        f"""
[servers.everything]
url = "{everything.url}"
headers = {{ X-Exai-Test = "exai-test" }}

[servers.remote]
url = "{remote.ws_url}"
headers = {{ Authorization = "Bearer ${{EXAI_TEST_REMOTE_TOKEN}}" }}

[servers.remote_http]
url = "{remote.http_url}"
headers = {{ Authorization = "Bearer ${{EXAI_TEST_REMOTE_TOKEN}}" }}

[servers.denied]
url = "{remote.ws_url}"
headers = {{ Authorization = "Bearer not-the-remote-token" }}
"""
    )
    handle = start_server(
        tmp / "state",
        database_url=database_url,
        extra_env={"EXAI_CONFIG": str(config), "EXAI_TEST_REMOTE_TOKEN": REMOTE_TOKEN},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()
    assert REMOTE_TOKEN not in handle.stderr_path.read_text()  # masked in the node's log


@asynccontextmanager
async def session_to(node: ServerProcess) -> AsyncIterator[RawClient]:
    async with open_raw(node.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        yield client


async def call_with_progress(
    client: RawClient, request_id: int, tool: str, arguments: dict[str, Any]
) -> tuple[dict[str, Any], list[float]]:
    await client.send(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": "p"}},
        }
    )
    progress: list[float] = []
    while True:
        message = await client.receive()
        if message.get("id") == request_id:
            return message, progress
        if message.get("method") == "notifications/progress":
            progress.append(message["params"]["progress"])


async def eventually_answers(client: RawClient, tool: str, arguments: dict[str, Any]) -> None:
    """Call ``tool`` until it answers without error: the node reconnects on its own, after
    its back-off (or, past its restart intensity, after 60 s), meanwhile refusing calls."""

    async def answers() -> bool:
        reply = await client.request("tools/call", {"name": tool, "arguments": arguments})
        return reply.get("result", {}).get("isError") is False

    with trio.fail_after(90):
        while not await answers():  # noqa: ASYNC110 - another process reconnects it
            await trio.sleep(0.05)


# -- the clients alone ---------------------------------------------------------------------------


async def test_our_http_client_speaks_to_the_typescript_sdk(everything: EverythingHttp) -> None:
    async with (
        open_http_stream(everything.url, {}, name="everything", max_message_bytes=1 << 20) as http,
        trio.open_nursery() as nursery,
    ):
        session = ClientSession(http, name="everything", client_info=CLIENT)
        nursery.start_soon(session.run)
        initialized = await session.initialize()
        assert initialized.protocol_version == "2025-11-25"
        assert http.session_id  # MCP-Session-Id from the initialize answer, echoed since
        tools = {tool.name for tool in await session.list_tools()}
        assert {"echo", "trigger-long-running-operation"} <= tools
        echoed = await session.request(
            "tools/call", {"name": "echo", "arguments": {"message": "over http"}}
        )
        assert "over http" in echoed["content"][0]["text"]
        seen: list[Progress] = []

        async def on_progress(note: Progress) -> None:
            seen.append(note)

        done = await session.request(
            "tools/call",
            {"name": "trigger-long-running-operation", "arguments": {"duration": 0.3, "steps": 3}},
            on_progress=on_progress,
        )
        assert "completed" in done["content"][0]["text"]
        assert [note.progress for note in seen] == [1, 2, 3]  # over the POST's SSE stream
        nursery.cancel_scope.cancel()
    assert http.session_id is None  # ended with DELETE


async def test_our_websocket_client_needs_the_remote_token(remote: Remote) -> None:
    headers = {"Authorization": f"Bearer {REMOTE_TOKEN}"}
    async with (
        open_ws_stream(remote.ws_url, headers, name="remote", max_message_bytes=1 << 20) as ws,
        trio.open_nursery() as nursery,
    ):
        session = ClientSession(ws, name="remote", client_info=CLIENT)
        nursery.start_soon(session.run)
        await session.initialize()
        assert "echo" in {tool.name for tool in await session.list_tools()}
        nursery.cancel_scope.cancel()
    wrong = {"Authorization": "Bearer not-the-remote-token"}
    with pytest.raises(Exception, match="HTTP 401") as refused:
        async with open_ws_stream(remote.ws_url, wrong, name="remote", max_message_bytes=1 << 20):
            pass
    assert "not-the-remote-token" not in str(refused.value)


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_a_message_over_the_bound_breaks_the_stream(
    transport: str, everything: EverythingHttp, remote: Remote
) -> None:
    # Both servers' initialize results are longer than 200 bytes.
    if transport == "http":
        opened = open_http_stream(everything.url, {}, name="everything", max_message_bytes=200)
    else:
        headers = {"Authorization": f"Bearer {REMOTE_TOKEN}"}
        opened = open_ws_stream(remote.ws_url, headers, name="remote", max_message_bytes=200)
    async with opened as stream, trio.open_nursery() as nursery:
        session = ClientSession(stream, name="bounded", client_info=CLIENT)
        nursery.start_soon(session.run)
        with pytest.raises(ServerGone, match="longer than 200 bytes"):
            await session.initialize()
        nursery.cancel_scope.cancel()


# -- through a node ------------------------------------------------------------------------------


async def test_remote_tools_are_listed_and_called(node: ServerProcess) -> None:
    async with session_to(node) as client:
        listed = (await client.request("tools/list"))["result"]["tools"]
        names = {tool["name"] for tool in listed}
        assert {"everything__echo", "remote__echo", "remote_http__echo"} <= names
        assert not any(name.startswith("denied__") for name in names)  # never let in
        # server-everything's echo takes "message", exai's takes "text".
        for tool, argument in (
            ("everything__echo", "message"),
            ("remote__echo", "text"),
            ("remote_http__echo", "text"),
        ):
            reply = await client.request(
                "tools/call", {"name": tool, "arguments": {argument: f"via {tool}"}}
            )
            assert reply["result"]["isError"] is False, reply
            assert f"via {tool}" in reply["result"]["content"][0]["text"]
        structured = await client.request(
            "tools/call",
            {"name": "everything__get-structured-content", "arguments": {"location": "Chicago"}},
        )
        assert "structuredContent" in structured["result"]


async def test_status_names_each_remote_server_by_its_url(
    node: ServerProcess, remote: Remote
) -> None:
    status = await wait_for_status(
        node,
        lambda s: {x.name: x.state for x in s.servers}.get("remote") == "up",
        what="the remote server up",
    )
    endpoints = {server.name: server.endpoint for server in status.servers}
    assert endpoints["remote"] == public_url(remote.ws_url)
    assert endpoints["remote_http"] == public_url(remote.http_url)
    assert endpoints["remote"].startswith("ws://127.0.0.1:")
    done = await exai_async("status", "--state-dir", str(node.state_dir))
    assert public_url(remote.http_url).encode() in done.stdout
    assert b"Bearer" not in done.stdout  # the headers are never shown


async def test_progress_comes_through_http_and_websocket(node: ServerProcess) -> None:
    async with session_to(node) as client:
        answer, progress = await call_with_progress(
            client, 11, "everything__trigger-long-running-operation", {"duration": 0.3, "steps": 3}
        )
        assert "completed" in answer["result"]["content"][0]["text"]
        assert [p for p in progress if p >= 1] == [1, 2, 3]
        for request_id, tool in (
            (12, "remote__exai_test_steps"),
            (13, "remote_http__exai_test_steps"),
        ):
            answer, progress = await call_with_progress(client, request_id, tool, {"steps": 3})
            assert answer["result"]["content"][0]["text"] == "3 steps", answer
            assert progress == [1, 2, 3], tool


async def test_a_wrong_token_keeps_the_server_down_with_a_clear_error(
    node: ServerProcess,
) -> None:
    status = await wait_for_status(
        node,
        lambda s: {server.name: server.state for server in s.servers}.get("denied") == "down",
        what="the server with a wrong token down",
    )
    denied = next(server for server in status.servers if server.name == "denied")
    assert denied.last_error is not None
    assert "refused the WebSocket handshake with HTTP 401" in denied.last_error
    assert "not-the-remote-token" not in denied.last_error
    up = {server.name for server in status.servers if server.state == "up"}
    assert {"remote", "remote_http", "everything"} <= up  # the right token let them in
    shown = await exai_async("status", "--state-dir", str(node.state_dir))
    assert b"denied" in shown.stdout
    assert b"401" in shown.stdout
    async with session_to(node) as client:
        reply = await client.request(
            "tools/call", {"name": "denied__echo", "arguments": {"text": "x"}}
        )
        assert "error" in reply or reply["result"]["isError"] is True


async def test_http_server_killed_mid_call_is_a_clear_error_then_serves_again(
    node: ServerProcess, everything: EverythingHttp
) -> None:
    async with session_to(node) as client:
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 21,
                "method": "tools/call",
                "params": {
                    "name": "everything__trigger-long-running-operation",
                    "arguments": {"duration": 600, "steps": 6000},
                    "_meta": {"progressToken": "k"},
                },
            }
        )
        while (await client.receive()).get("method") != "notifications/progress":
            pass  # its first progress: the call runs in the remote server
        everything.kill()
        while (answer := await client.receive()).get("id") != 21:
            pass
        assert answer["result"]["isError"] is True, answer
        text = answer["result"]["content"][0]["text"]
        assert "proxied server 'everything' went away before answering" in text
        assert everything.url in text  # which connection broke
        everything.start()  # back on its port: the node reconnects, a new session
        await eventually_answers(client, "everything__echo", {"message": "again"})
    status = await wait_for_status(
        node,
        lambda s: any(x.name == "everything" and x.state == "up" for x in s.servers),
        what="everything up again",
    )
    everything_status = next(x for x in status.servers if x.name == "everything")
    assert everything_status.restarts >= 1
    assert everything.url in (everything_status.last_error or "")


async def test_websocket_server_killed_mid_call_is_a_clear_error_then_serves_again(
    node: ServerProcess, remote: Remote
) -> None:
    assert remote.server is not None
    async with session_to(node) as client:
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 31,
                "method": "tools/call",
                "params": {"name": "remote__exai_test_sleep", "arguments": {"seconds": 600}},
            }
        )
        await wait_for_status(
            remote.server,
            lambda s: any(session.in_flight for session in s.sessions),
            what="the call running in the remote exai",
        )
        remote.server.process.send_signal(signal.SIGKILL)
        remote.server.process.wait()
        while (answer := await client.receive()).get("id") != 31:
            pass
        assert answer["result"]["isError"] is True, answer
        text = answer["result"]["content"][0]["text"]
        assert "proxied server 'remote' went away before answering" in text
        assert f"the WebSocket connection to {remote.ws_url} closed" in text
        remote.start()  # back on its port
        await eventually_answers(client, "remote__echo", {"text": "again"})
        await eventually_answers(client, "remote_http__echo", {"text": "again"})
