"""``exai bridge``: a stdio client reaches the server, and survives a dropped connection."""

from __future__ import annotations

import json
import subprocess
from typing import Any
from urllib.parse import urlsplit

import trio

from tests.harness import EXAI, ServerProcess
from tests.tcp_proxy import TcpProxy


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

    async def request(self, request_id: str, method: str, params: dict[str, Any]) -> Any:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        while (reply := await self.receive()).get("id") != request_id:
            pass
        return reply


def echo(text: str) -> dict[str, Any]:
    return {"name": "echo", "arguments": {"text": text}}


async def test_bridge_relays_resumes_after_a_drop_and_fails_clearly_when_server_is_gone(
    server: ServerProcess,
) -> None:
    proxy = TcpProxy(urlsplit(server.url).port or 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        process = await trio.lowlevel.open_process(
            [
                str(EXAI),
                "bridge",
                "--url",
                f"ws://127.0.0.1:{proxy.port}/mcp",
                "--token",
                server.token,
                "--give-up-after",
                "1",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        peer = StdioPeer(process)
        try:
            init = await peer.request(
                "init",
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "stdio-ide", "version": "1"},
                },
            )
            assert "result" in init, init
            session_id = init["result"]["_meta"]["exai/sessionId"]
            await peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
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

            await process.stdin.aclose()  # type: ignore[union-attr]
            with trio.fail_after(30):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
        nursery.cancel_scope.cancel()
