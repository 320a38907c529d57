"""Issue 15 (a): Streamable HTTP on the MCP port, 2025-era ``Mcp-Session-Id`` sessions.

Over real sockets to a real ``exai serve`` on a real Postgres, with httpx as the client, so
every status code, header and body is the one on the wire. The rules are the spec's
(modelcontextprotocol/modelcontextprotocol, ``docs/specification/2025-11-25/basic/
transports.mdx``): a session begun by ``initialize`` and named by ``Mcp-Session-Id``; a
request answered as JSON or as an SSE stream; notifications 202; the GET stream; DELETE;
404 for a session this node does not hold; 403 for a foreign ``Origin``; and a precise
status with a JSON-RPC error for every bad request and every bound reached, the session and
the node unharmed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected

from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    query,
    session_row,
    start_server,
    wait_until,
)

BOB = "bob-token-0123456789abcdef"
ACCEPT = "application/json, text/event-stream"
ALLOWED_ORIGIN = "https://app.example.com"


def http_url(server: ServerProcess) -> str:
    parts = urlsplit(server.url)
    return f"http://{parts.netloc}/mcp"


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http"),
        database_url=database_url,
        extra_env={
            "EXAI_HEARTBEAT_INTERVAL": "0.2",
            "EXAI_CLIENT_TOKENS": f"bob={BOB}",
            "EXAI_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
            "EXAI_MAX_MESSAGE_BYTES": "65536",
            "EXAI_HTTP_SESSIONS_PER_IDENTITY": "4",
            "EXAI_HANDSHAKE_TIMEOUT": "2",
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def initialize(request_id: int = 1, version: str = "2025-11-25") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "http-test", "version": "1"},
        },
    }


def call(request_id: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


class Session:
    """One HTTP session, driven by hand."""

    def __init__(self, client: httpx.AsyncClient, url: str, token: str) -> None:
        self.client = client
        self.url = url
        self.token = token
        self.session_id: str | None = None

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Accept": ACCEPT,
            "Content-Type": "application/json",
        }
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        headers.update(extra)
        return headers

    async def post(self, message: Any, **extra: str) -> httpx.Response:
        return await self.client.post(
            self.url, content=json.dumps(message), headers=self.headers(**extra)
        )

    async def open(self) -> dict[str, Any]:
        response = await self.post(initialize())
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        notified = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert notified.status_code == 202
        result: dict[str, Any] = response.json()["result"]
        return result

    async def request(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Everything the POST's response carried, in order (one JSON body, or SSE events)."""
        async with self.client.stream(
            "POST", self.url, content=json.dumps(message), headers=self.headers()
        ) as response:
            assert response.status_code == 200, await response.aread()
            return await messages_of(response)


async def messages_of(response: httpx.Response) -> list[dict[str, Any]]:
    kind = response.headers["content-type"]
    if kind.startswith("application/json"):
        return [json.loads(await response.aread())]
    assert kind.startswith("text/event-stream"), kind
    found = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            found.append(json.loads(line[len("data: ") :]))
    return found


@asynccontextmanager
async def session(server: ServerProcess, token: str | None = None) -> AsyncIterator[Session]:
    async with httpx.AsyncClient(timeout=30) as client:
        opened = Session(client, http_url(server), token or server.token)
        await opened.open()
        try:
            yield opened
        finally:  # as a client should: ended, not left to the idle expiry
            with trio.CancelScope(shield=True):
                await client.delete(opened.url, headers=opened.headers())


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    error: dict[str, Any] = body["error"]
    return error


# -- the happy path --------------------------------------------------------------------------


async def test_a_session_from_initialize_to_delete(
    server: ServerProcess, database_url: str
) -> None:
    async with session(server) as s:
        assert s.session_id is not None
        tools = await s.request({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert [m["id"] for m in tools] == [2]
        assert "echo" in [tool["name"] for tool in tools[0]["result"]["tools"]]
        # A response that is the first thing sent for its request comes as one JSON body.
        async with s.client.stream(
            "POST", s.url, content=json.dumps(call(3, "echo", text="hi")), headers=s.headers()
        ) as response:
            assert response.headers["content-type"] == "application/json"
            assert response.headers["mcp-session-id"] == s.session_id
            echoed = await messages_of(response)
        assert echoed[0]["result"]["content"][0]["text"] == "hi"
        await wait_until(
            lambda: (
                (session_row(database_url, s.session_id or "") or {}).get("client_name")
                == "http-test"
            ),
            what="the session's row",
        )
        deleted = await s.client.delete(s.url, headers=s.headers())
        assert deleted.status_code == 200
        after = await s.post({"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
        assert after.status_code == 404  # the spec: the client then starts a new session
        assert "session not found" in error_of(after)["message"]
    await wait_until(
        lambda: (session_row(database_url, s.session_id or "") or {}).get("closed_at") is not None,
        what="the session's end recorded",
    )


async def test_progress_and_log_come_on_the_calls_own_sse_stream(server: ServerProcess) -> None:
    async with session(server) as s:
        await s.request(
            {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "info"}}
        )
        message = call(3, "exai_test_steps", steps=2)
        message["params"]["_meta"] = {"progressToken": "p1"}
        async with s.client.stream(
            "POST", s.url, content=json.dumps(message), headers=s.headers()
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["x-accel-buffering"] == "no"
            seen = await messages_of(response)
        methods = [m.get("method") for m in seen]
        assert methods[:-1].count("notifications/progress") == 2
        assert "notifications/message" in methods
        assert seen[-1]["id"] == 3
        assert seen[-1]["result"]["content"][0]["text"] == "2 steps"


async def test_a_cancelled_request_ends_its_stream_without_a_response(
    server: ServerProcess, database_url: str
) -> None:
    async with session(server) as s, trio.open_nursery() as nursery:
        seen: list[dict[str, Any]] = []
        heartbeat = trio.Event()
        ended = trio.Event()

        async def blocked() -> None:
            message = call(7, "exai_test_block")
            message["params"]["_meta"] = {"progressToken": "hb"}
            async with s.client.stream(
                "POST", s.url, content=json.dumps(message), headers=s.headers()
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
                        heartbeat.set()
            ended.set()

        nursery.start_soon(blocked)
        await heartbeat.wait()  # the call runs: its heartbeat came on its stream
        cancelled = await s.post(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}}
        )
        assert cancelled.status_code == 202
        await ended.wait()
        assert all("id" not in m for m in seen), seen  # no response for a cancelled request
        # The session goes on.
        after = await s.request(call(8, "echo", text="after"))
        assert after[0]["result"]["content"][0]["text"] == "after"
    await wait_until(
        lambda: (
            query(
                database_url,
                "select status from tasks where session_id = %s and request_id = '7'",
                (s.session_id,),
            )
            == [("cancelled",)]
        ),
        what="the cancelled call's row",
    )


async def test_the_get_stream_is_one_per_session(server: ServerProcess) -> None:
    """A new GET replaces the stream open, which ends: one stream per session, and a client
    whose old connection vanished is never locked out of its own GET stream."""
    async with session(server) as s:
        headers = s.headers(Accept="text/event-stream")
        async with s.client.stream("GET", s.url, headers=headers) as first:
            assert first.status_code == 200
            assert first.headers["content-type"] == "text/event-stream"
            async with s.client.stream("GET", s.url, headers=headers) as second:
                assert second.status_code == 200
                # The first ends (its body completes) while the second stays open.
                assert [line async for line in first.aiter_lines() if line.strip()] == []
                # Requests go on being answered on their own POSTs meanwhile.
                echoed = await s.request(call(2, "echo", text="beside the GET"))
                assert echoed[0]["result"]["content"][0]["text"] == "beside the GET"


async def test_a_disconnect_does_not_cancel_the_call(
    server: ServerProcess, database_url: str
) -> None:
    """The spec: disconnection "SHOULD NOT be interpreted as the client cancelling". The
    call runs to its end; its row says so."""
    async with session(server) as s:
        message = call(5, "exai_test_sleep", seconds=1.0)
        message["params"]["_meta"] = {"progressToken": "hb"}
        async with s.client.stream(
            "POST", s.url, content=json.dumps(message), headers=s.headers()
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # its first heartbeat: the call runs; the client drops the connection
        await wait_until(
            lambda: (
                query(
                    database_url,
                    "select status from tasks where session_id = %s and request_id = '5'",
                    (s.session_id,),
                )
                == [("completed",)]
            ),
            what="the abandoned call completed",
        )
        after = await s.request(call(6, "echo", text="still here"))
        assert after[0]["result"]["content"][0]["text"] == "still here"


async def test_http_and_websocket_sessions_side_by_side(server: ServerProcess) -> None:
    async with session(server) as s, open_raw(server.authed_url()) as ws:
        raw = RawClient(ws)
        await raw.initialize()
        over_ws = await raw.request("tools/call", {"name": "echo", "arguments": {"text": "ws"}})
        over_http = await s.request(call(2, "echo", text="http"))
        assert over_ws["result"]["content"][0]["text"] == "ws"
        assert over_http[0]["result"]["content"][0]["text"] == "http"


async def test_a_crash_restarts_the_session_actor_and_the_session_goes_on(
    server: ServerProcess,
) -> None:
    async with session(server) as s:
        crashed = await s.request({"jsonrpc": "2.0", "id": 2, "method": "$/exai/test/crash"})
        assert crashed[0]["error"]["code"] == -32001
        after = await s.request(call(3, "echo", text="restarted"))
        assert after[0]["result"]["content"][0]["text"] == "restarted"


# -- refusals: every bad request gets its status and a JSON-RPC error ------------------------


async def test_refusals_before_a_session(server: ServerProcess) -> None:
    url = http_url(server)
    good = {
        "Authorization": f"Bearer {server.token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
    }
    body = json.dumps(initialize())
    async with httpx.AsyncClient(timeout=30) as client:
        no_token = await client.post(url, content=body, headers={**good, "Authorization": ""})
        assert no_token.status_code == 401
        assert no_token.headers["www-authenticate"].startswith("Bearer")
        assert error_of(no_token)["code"] == -32600
        foreign = await client.post(
            url, content=body, headers={**good, "Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        assert "Origin" in error_of(foreign)["message"]
        for origin in (ALLOWED_ORIGIN, "http://localhost:3000", "http://127.0.0.1:9"):
            allowed = await client.post(url, content=body, headers={**good, "Origin": origin})
            assert allowed.status_code == 200, origin
        text = await client.post(url, content=body, headers={**good, "Content-Type": "text/plain"})
        assert text.status_code == 415
        json_only = await client.post(
            url, content=body, headers={**good, "Accept": "application/json"}
        )
        assert json_only.status_code == 406
        not_json = await client.post(url, content=b"{nope", headers=good)
        assert (not_json.status_code, error_of(not_json)["code"]) == (400, -32700)
        batch = await client.post(url, content=json.dumps([initialize()]), headers=good)
        assert (batch.status_code, error_of(batch)["code"]) == (400, -32600)
        not_rpc = await client.post(url, content=json.dumps({"id": 3, "x": 1}), headers=good)
        assert not_rpc.status_code == 400
        assert error_of(not_rpc)["code"] == -32600
        no_session = await client.post(
            url, content=json.dumps(call(2, "echo", text="x")), headers=good
        )
        assert no_session.status_code == 400
        assert "Mcp-Session-Id" in error_of(no_session)["message"]
        unknown = await client.post(
            url,
            content=json.dumps(call(2, "echo", text="x")),
            headers={**good, "Mcp-Session-Id": "no-such-session"},
        )
        assert unknown.status_code == 404
        bad_version = await client.post(
            url, content=body, headers={**good, "MCP-Protocol-Version": "1999-01-01"}
        )
        assert (bad_version.status_code, error_of(bad_version)["code"]) == (400, -32022)
        put = await client.put(url, content=body, headers=good)
        assert (put.status_code, put.headers["allow"]) == (405, "GET, POST, DELETE")
        get_without_session = await client.get(url, headers={**good, "Accept": "text/event-stream"})
        assert get_without_session.status_code == 400
        delete_unknown = await client.delete(url, headers={**good, "Mcp-Session-Id": "nope"})
        assert delete_unknown.status_code == 404


async def test_a_foreign_origin_is_refused_on_websocket_too(server: ServerProcess) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(
            server.authed_url(), extra_headers=[(b"Origin", b"https://evil.example")]
        ):
            pass
    assert refused.value.status_code == 403
    async with open_raw(
        server.authed_url(), extra_headers=[(b"Origin", ALLOWED_ORIGIN.encode())]
    ) as ws:
        assert (await RawClient(ws).request("ping"))["result"] == {}


async def test_another_identity_cannot_reach_a_session(server: ServerProcess) -> None:
    async with session(server) as s, httpx.AsyncClient(timeout=30) as client:
        bob = Session(client, s.url, BOB)
        bob.session_id = s.session_id
        stolen = await bob.post(call(2, "echo", text="mine now"))
        assert stolen.status_code == 404  # not "forbidden": its existence is not bob's to learn
        assert (await client.delete(s.url, headers=bob.headers())).status_code == 404
        still = await s.request(call(3, "echo", text="still mine"))
        assert still[0]["result"]["content"][0]["text"] == "still mine"


async def test_an_id_in_flight_is_refused_and_the_first_call_still_answered(
    server: ServerProcess,
) -> None:
    async with session(server) as s, trio.open_nursery() as nursery:
        first: list[dict[str, Any]] = []
        started = trio.Event()

        async def slow() -> None:
            message = call(9, "exai_test_sleep", seconds=0.5)
            message["params"]["_meta"] = {"progressToken": "t"}
            async with s.client.stream(
                "POST", s.url, content=json.dumps(message), headers=s.headers()
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        first.append(json.loads(line[6:]))
                        started.set()

        nursery.start_soon(slow)
        await started.wait()  # its heartbeat: id 9 is in flight
        duplicate = await s.post(call(9, "echo", text="same id"))
        assert duplicate.status_code == 409
        assert error_of(duplicate)["code"] == -32600
        assert duplicate.json()["id"] == 9
    assert first[-1]["id"] == 9
    assert "slept" in first[-1]["result"]["content"][0]["text"]


async def test_bounds_of_a_request(server: ServerProcess) -> None:
    async with session(server) as s:
        big = call(2, "echo", text="x" * 70_000)  # over EXAI_MAX_MESSAGE_BYTES (65536)
        too_large = await s.post(big)
        assert too_large.status_code == 413
        assert "at most 65536 bytes" in error_of(too_large)["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for _ in range(20):
                yield b" " * 4096

        chunked = await s.client.post(s.url, content=chunks(), headers=s.headers())
        assert chunked.status_code == 413
        # The session is unharmed.
        after = await s.request(call(3, "echo", text="fine"))
        assert after[0]["result"]["content"][0]["text"] == "fine"


async def test_a_body_that_never_arrives_gets_408(server: ServerProcess) -> None:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            b"Authorization: Bearer " + server.token.encode() + b"\r\n"
            b'Content-Length: 100\r\n\r\n{"jsonrpc"'
        )
        answer = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


async def test_sessions_per_identity_are_bounded(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        opened = []
        for _ in range(4):  # EXAI_HTTP_SESSIONS_PER_IDENTITY
            s = Session(client, http_url(server), BOB)
            await s.open()
            opened.append(s)
        refused = await Session(client, http_url(server), BOB).post(initialize())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert "too many sessions" in error_of(refused)["message"]
        # Another identity is not affected.
        async with session(server) as mine:
            assert mine.session_id is not None
        # Ending one frees its place.
        assert (await client.delete(opened[0].url, headers=opened[0].headers())).status_code == 200
        await wait_until_opens(client, http_url(server), BOB)
        for s in opened[1:]:
            await client.delete(s.url, headers=s.headers())


async def wait_until_opens(client: httpx.AsyncClient, url: str, token: str) -> None:
    """A DELETE answers once the session is told to end; its place is free once it has
    ended, a moment later: retry until the node takes a new one."""
    with trio.fail_after(30):
        while True:
            s = Session(client, url, token)
            response = await s.post(initialize())
            if response.status_code == 200:
                s.session_id = response.headers["mcp-session-id"]
                await client.delete(url, headers=s.headers())
                return
            assert response.status_code == 429
            await trio.sleep(0.02)


# -- the session's life ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_idle(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-idle"),
        database_url=database_url,
        # A quiet stream gets a comment every 0.7 s: longer than the idle bound, so seeing
        # one on the GET stream proves the bound has passed while the stream was open.
        extra_env={"EXAI_HTTP_SESSION_IDLE": "0.5", "EXAI_HTTP_KEEPALIVE": "0.7"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def test_an_idle_session_expires_but_not_while_a_stream_is_open(
    short_idle: ServerProcess, database_url: str
) -> None:
    async with session(short_idle) as s:
        headers = s.headers(Accept="text/event-stream")
        async with s.client.stream("GET", s.url, headers=headers) as listening:
            assert listening.status_code == 200
            # Held open past the idle bound (the keep-alive comment comes after it): the
            # session stays.
            async for line in listening.aiter_lines():
                if line.startswith(":"):
                    break
            alive = await s.request(call(2, "echo", text="alive"))
            assert alive[0]["result"]["content"][0]["text"] == "alive"
        await wait_until(
            lambda: (
                (session_row(database_url, s.session_id or "") or {}).get("closed_at") is not None
            ),
            what="the idle session's end",
        )
        gone = await s.post(call(3, "echo", text="too late"))
        assert gone.status_code == 404
    ended = [
        e
        for e in short_idle.log_events()
        if e.get("event") == "session.closed" and e.get("session_id") == s.session_id
    ]
    assert ended
    assert ended[0]["reason"].startswith("idle for 0.5 s")


async def test_activity_without_a_stream_moves_the_idle_deadline(
    short_idle: ServerProcess,
) -> None:
    # Notifications open no stream: only the time of the last one keeps the session. The
    # expiry looks at its deadline when it falls due, finds it moved, and looks again later;
    # a look that missed the activity would end the session within the first 0.5 s.
    async with session(short_idle) as s:
        until = trio.current_time() + 3 * 0.5
        while trio.current_time() < until:
            noted = await s.post({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"})
            assert noted.status_code == 202, noted.text
        alive = await s.request(call(2, "echo", text="alive"))
        assert alive[0]["result"]["content"][0]["text"] == "alive"


async def test_a_drain_answers_the_call_in_flight(database_url: str, tmp_path: Any) -> None:
    handle = start_server(
        tmp_path / "drain",
        database_url=database_url,
        extra_env={"EXAI_HEARTBEAT_INTERVAL": "0.2"},
    )
    try:
        async with session(handle) as s:
            message = call(2, "exai_test_sleep", seconds=1.0)
            message["params"]["_meta"] = {"progressToken": "hb"}
            seen: list[dict[str, Any]] = []
            async with s.client.stream(
                "POST", s.url, content=json.dumps(message), headers=s.headers()
            ) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 1:  # its first heartbeat: the call runs; now stop
                        handle.process.send_signal(signal.SIGTERM)
            assert seen[-1]["id"] == 2
            assert seen[-1]["result"]["content"][0]["text"] == "slept 1 s"
        assert handle.process.wait(timeout=60) == 0
    finally:
        handle.stop()


async def test_a_connection_serves_more_requests_after_a_get_or_delete(
    server: ServerProcess,
) -> None:
    """A GET or DELETE leaves its kept-alive connection able to serve the next request
    (h11 ends a request only once its end is read: the connection used to be closed after
    either, and a client reusing it at that moment got a reset)."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    body = json.dumps(initialize()).encode()
    auth = b"Authorization: Bearer " + server.token.encode() + b"\r\n"
    post = (
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n"
        + auth
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        received = b""

        async def answer() -> bytes:
            nonlocal received
            with trio.fail_after(30):
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some()
                head, _, rest = received.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += await stream.receive_some()
                received = rest[length:]
                return head

        await stream.send_all(post)
        head = await answer()
        assert head.startswith(b"HTTP/1.1 200 ")
        session_id = head.lower().split(b"mcp-session-id: ")[1].split(b"\r\n")[0]
        await stream.send_all(
            b"DELETE /mcp HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Mcp-Session-Id: "
            + session_id
            + b"\r\n\r\n"
        )
        head = await answer()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" not in head.lower()
        # The same connection goes on: the session is gone now, so a second DELETE is 404.
        await stream.send_all(
            b"DELETE /mcp HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Mcp-Session-Id: "
            + session_id
            + b"\r\n\r\n"
        )
        assert (await answer()).startswith(b"HTTP/1.1 404 ")
