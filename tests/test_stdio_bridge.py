"""``exai bridge`` as IDEs run it: a stdio client reaches the server, survives a dropped or
half-open connection, ends its session when it closes stdin, and hears at once that its token
was refused; the token is never on the command line (every local user can read a process's
arguments, ``ps``, ``/proc/PID/cmdline``; ``/proc/PID/environ`` only its owner: proc(5))."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from tests.harness import EXAI, ServerProcess, query, start_server, wait_until
from tests.tcp_proxy import TcpProxy

#: How ``exai`` starts the one line it prints for a token given as a flag.
WARNING = "exai: warning:"


class StdioPeer:
    """The client side of ``exai bridge``'s stdin/stdout."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""

    async def send(self, message: dict[str, Any]) -> None:
        await self._stdin.send_all(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(30):
            while b"\n" not in self._buffer:
                chunk = await self._stdout.receive_some(65536)
                assert chunk, "the bridge closed its stdout"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    async def close_stdin(self) -> None:
        """What an MCP client does to end a stdio server (MCP lifecycle, "Shutdown")."""
        await self._stdin.aclose()

    async def request(self, request_id: str, method: str, params: dict[str, Any]) -> Any:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        while (reply := await self.receive()).get("id") != request_id:
            pass
        return reply

    async def initialize(self, client_name: str) -> str:
        """Negotiate a session as an IDE does; returns the server's session id."""
        init = await self.request(
            "init",
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": client_name, "version": "1"},
            },
        )
        assert "result" in init, init
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return str(init["result"]["_meta"]["exai/sessionId"])


def echo(text: str) -> dict[str, Any]:
    return {"name": "echo", "arguments": {"text": text}}


async def start_bridge(url: str, token: str, stderr: Path, *flags: str) -> StdioPeer:
    """``exai bridge`` in a subprocess, given its token the safe way (the environment), its
    stderr (the bridge's log, JSON lines) going to ``stderr``."""
    env = {**os.environ, "EXAI_TOKEN": token}
    with stderr.open("ab") as sink:
        process = await trio.lowlevel.open_process(
            [str(EXAI), "bridge", "--url", url, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sink,
            env=env,
        )
    return StdioPeer(process)


def log_events(stderr: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.read_text().splitlines() if line.startswith("{")]


async def test_bridge_relays_resumes_after_a_drop_and_fails_clearly_when_server_is_gone(
    server: ServerProcess, tmp_path: Path
) -> None:
    proxy = TcpProxy(urlsplit(server.url).port or 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        peer = await start_bridge(
            f"ws://127.0.0.1:{proxy.port}/mcp",
            server.token,
            tmp_path / "bridge.stderr",
            "--give-up-after",
            "1",
        )
        process = peer.process
        try:
            session_id = await peer.initialize("stdio-ide")
            assert (await peer.request("e1", "tools/call", echo("one")))["result"]["content"][0][
                "text"
            ] == "one"

            # A call in flight when the connection drops is answered with a clear error.
            await peer.send(
                {
                    "jsonrpc": "2.0",
                    "id": "long",
                    "method": "tools/call",
                    "params": {"name": "exai_test_block"},
                }
            )
            await peer.request("p1", "ping", {})  # the server has the long call now
            proxy.cut()
            lost = await peer.receive()
            assert lost["id"] == "long"
            assert lost["error"]["code"] == -32003

            # The bridge reconnects and resumes: no initialize needed, same session.
            again = await peer.request("e2", "tools/call", echo("two"))
            assert again["result"]["content"][0]["text"] == "two"
            assert proxy.connections == 2
            events = server.log_events()
            resumed = [e for e in events if e["event"] == "session.resumed"]
            assert [e["session_id"] for e in resumed] == [session_id]
            initialized = [e for e in events if e["event"] == "session.initialized"]
            assert [e["session_id"] for e in initialized].count(session_id) == 1

            # The server goes away for good. A request sent before the bridge noticed is
            # "lost" (-32003); once it knows, requests fail at once as unreachable (-32002).
            proxy.close()
            first = await peer.request("e3", "tools/call", echo("three"))
            assert first["error"]["code"] in (-32002, -32003)
            gone = await peer.request("e4", "tools/call", echo("four"))
            assert gone["error"]["code"] == -32002
            assert "unreachable" in gone["error"]["message"]

            await peer.close_stdin()
            with trio.fail_after(30):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
        nursery.cancel_scope.cancel()


async def test_closing_stdin_ends_the_session_for_good_without_reconnecting(
    server: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    """MCP's stdio shutdown is the client closing the server's stdin, then killing it if it
    does not exit soon (the SDKs wait about 2 s). The bridge must close its session with 1000
    and exit: no reconnect (which would find the session closed and open a phantom one)."""
    client_name = f"stdin-eof-{secrets.token_hex(4)}"
    proxy = TcpProxy(urlsplit(server.url).port or 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        peer = await start_bridge(
            f"ws://127.0.0.1:{proxy.port}/mcp", server.token, tmp_path / "bridge.stderr"
        )
        try:
            session_id = await peer.initialize(client_name)
            reply = await peer.request("e1", "tools/call", echo("one"))
            assert reply["result"]["content"][0]["text"] == "one"

            closed_at = trio.current_time()
            await peer.close_stdin()
            with trio.fail_after(30):  # a guard against hanging, not a measure
                code = await peer.process.wait()
            print(f"bridge exited {trio.current_time() - closed_at:.3f} s after stdin closed")
        finally:
            if peer.process.returncode is None:
                peer.process.kill()
        assert code == 0
        # The bridge's one connection was the only one it made: no attempt after the close.
        assert proxy.connections == 1
        nursery.cancel_scope.cancel()

    # The session ended for good (a clean 1000 close, not a park), and no other appeared.
    await wait_until(
        lambda: any(
            e["event"] == "session.closed" and e["session_id"] == session_id
            for e in server.log_events()
        ),
        what="the session to be closed",
    )
    events = [e for e in server.log_events() if e.get("session_id") == session_id]
    assert "session.detached" not in [e["event"] for e in events]
    rows = query(
        database_url,
        "select session_id, closed_at is not null from sessions where client_name = %s",
        (client_name,),
    )
    assert rows == [(session_id, True)]


async def test_a_refused_token_is_answered_at_once_and_said_once_on_stderr(
    server: ServerProcess, tmp_path: Path
) -> None:
    """HTTP 401 at the handshake will not change by retrying: every request (the one waiting
    for the connection, and later ones) is answered with an error naming the refused token,
    instead of waiting out ``--give-up-after`` and calling the server unreachable."""
    stderr = tmp_path / "bridge.stderr"
    peer = await start_bridge(server.url, "not-the-token-" + secrets.token_hex(8), stderr)
    try:
        first = await peer.request("init", "initialize", {"protocolVersion": "2025-06-18"})
        assert first["error"]["code"] == -32006, first
        assert "token" in first["error"]["message"]
        assert "refused" in first["error"]["message"]
        assert "HTTP 401" in first["error"]["message"]
        later = await peer.request("t1", "tools/list", {})
        assert later["error"] == first["error"]

        await peer.close_stdin()
        with trio.fail_after(30):
            assert await peer.process.wait() == 0
    finally:
        if peer.process.returncode is None:
            peer.process.kill()
    refused = [e for e in log_events(stderr) if e["event"] == "bridge.token_refused"]
    assert len(refused) == 1, stderr.read_text()
    assert refused[0]["status"] == 401


async def test_a_half_open_link_is_noticed_by_pings_and_the_session_resumes_on_a_fresh_path(
    database_url: str, tmp_path: Path
) -> None:
    """A link that stops carrying anything without closing (a NAT that forgot the mapping, a
    laptop asleep): the bridge notices by its own pings, drops it, answers the request lost
    in it, and resumes the same session over a new connection. The server pings too, so it
    parks its side in time for the resume (else the resume is refused with 409)."""
    server = start_server(
        tmp_path / "state",
        database_url=database_url,
        # Short, for the test's sake, yet generous for a pong on a loaded machine: a
        # spurious drop would only add a resume, which the assertions allow.
        extra_env={"EXAI_WS_PING_INTERVAL": "1", "EXAI_WS_PING_TIMEOUT": "3"},
    )
    stderr = tmp_path / "bridge.stderr"
    try:
        proxy = TcpProxy(urlsplit(server.url).port or 0)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            peer = await start_bridge(
                f"ws://127.0.0.1:{proxy.port}/mcp",
                server.token,
                stderr,
                "--ws-ping-interval",
                "0.5",
                "--ws-ping-timeout",
                "3",
            )
            try:
                session_id = await peer.initialize("half-open-ide")
                reply = await peer.request("e1", "tools/call", echo("before"))
                assert reply["result"]["content"][0]["text"] == "before"
                before = proxy.connections

                proxy.black_hole()
                lost = await peer.request("e2", "tools/call", echo("into the hole"))
                assert lost["error"]["code"] == -32003, lost
                again = await peer.request("e3", "tools/call", echo("after"))
                assert again["result"]["content"][0]["text"] == "after"
                assert proxy.connections > before

                await peer.close_stdin()
                with trio.fail_after(30):
                    assert await peer.process.wait() == 0
            finally:
                if peer.process.returncode is None:
                    peer.process.kill()
            nursery.cancel_scope.cancel()
        events = server.log_events()
        resumed = [e["session_id"] for e in events if e["event"] == "session.resumed"]
        assert resumed
        assert set(resumed) == {session_id}
        initialized = [e["session_id"] for e in events if e["event"] == "session.initialized"]
        assert initialized == [session_id]  # the same session: never initialized again
        # The bridge found out by its own ping (the black hole never closed its socket).
        unresponsive = [e for e in log_events(stderr) if e["event"] == "connection.unresponsive"]
        assert unresponsive, stderr.read_text()
    finally:
        assert server.stop() == 0


def command_line(pid: int) -> str:
    """What ``ps`` shows of a process: its arguments, as any local user can read them."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("given", ["file", "flag"])
async def test_the_token_comes_from_a_file_and_a_token_flag_still_works_with_one_warning(
    server: ServerProcess, tmp_path: Path, given: str
) -> None:
    """(The other tests give it as EXAI_TOKEN.)"""
    env = {key: value for key, value in os.environ.items() if key != "EXAI_TOKEN"}
    args = [str(EXAI), "bridge", "--url", server.url]
    if given == "file":
        token_file = tmp_path / "token"
        token_file.write_text(server.token + "\n")
        token_file.chmod(0o600)
        args += ["--token-file", str(token_file)]
    else:
        args += ["--token", server.token]
    stderr = tmp_path / "bridge.stderr"
    with stderr.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, env=env
        )
    peer = StdioPeer(process)
    try:
        assert (await peer.request("p", "ping", {}))["result"] == {}
        # Only once it has answered is the bridge surely running its own program: read
        # right after the spawn, /proc could still show the parent's arguments.
        seen_in_ps = server.token in command_line(process.pid)
        await peer.close_stdin()
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
    warnings = [line for line in stderr.read_text().splitlines() if line.startswith(WARNING)]
    if given == "flag":
        assert seen_in_ps  # why the flag is discouraged
        assert len(warnings) == 1
        assert "--token" in warnings[0]
        assert "EXAI_TOKEN" in warnings[0]
    else:
        assert not seen_in_ps
        assert warnings == []


def bridge_with_token_file(path: Path) -> subprocess.CompletedProcess[str]:
    """``exai bridge`` given ``--token-file path`` (and a URL nothing listens on)."""
    return subprocess.run(
        [str(EXAI), "bridge", "--url", "ws://127.0.0.1:1/mcp", "--token-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_unreadable_token_file_is_a_configuration_error(tmp_path: Path) -> None:
    done = bridge_with_token_file(tmp_path)
    assert done.returncode == 2
    assert f"cannot read the token file {tmp_path}" in done.stderr


def test_a_token_file_others_can_read_is_refused_as_the_servers_own(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("exai_a-token-others-can-read-0123\n")
    token_file.chmod(0o644)
    done = bridge_with_token_file(token_file)
    assert done.returncode == 2
    assert f"chmod 600 {token_file}" in done.stderr
    assert "others-can-read" not in done.stderr
