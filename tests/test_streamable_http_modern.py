"""Issue 15 (b): the sessionless 2026-07-28 protocol over Streamable HTTP.

Over real sockets to a real ``exai serve``: no ``initialize``, no ``Mcp-Session-Id``; each
request names its version in ``_meta`` and mirrors it, its method and its target in headers,
which the server checks against the body (modelcontextprotocol/modelcontextprotocol,
``docs/specification/2026-07-28/basic/transports/streamable-http.mdx``, "Server
Validation"); an unknown method is 404; closing a request's response stream cancels it
("Cancellation"); GET and DELETE are 405. Requests of one client identity are served by
that identity's own session actor, whatever client sent them: their ids never collide.
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trio

from tests.harness import ServerProcess, query, start_server, wait_until
from tests.test_streamable_http import ACCEPT, BOB, error_of, http_url, messages_of

MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-modern"),
        database_url=database_url,
        extra_env={
            "EXAI_HEARTBEAT_INTERVAL": "0.2",
            "EXAI_CLIENT_TOKENS": f"bob={BOB}",
            "EXAI_HTTP_KEEPALIVE": "0.3",
            "EXAI_LOG_CONSOLE_TRACE": "1",  # the traceparent test reads actor.message events
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def modern(
    request_id: Any, method: str, params: dict[str, Any] | None = None, *, client: str = "t"
) -> dict[str, Any]:
    body = dict(params or {})
    body["_meta"] = {
        **body.get("_meta", {}),
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": client, "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": body}


def headers(token: str, message: dict[str, Any], **extra: str) -> dict[str, str]:
    mirrored = {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": message["method"],
    }
    name = (message.get("params") or {}).get("name")
    if message["method"] == "tools/call" and name is not None:
        mirrored["Mcp-Name"] = name
    mirrored.update(extra)
    return {key: value for key, value in mirrored.items() if value != ""}


async def post(
    client: httpx.AsyncClient, server: ServerProcess, message: dict[str, Any], **extra: str
) -> httpx.Response:
    return await client.post(
        http_url(server),
        content=json.dumps(message),
        headers=headers(server.token, message, **extra),
    )


async def test_a_call_without_a_session(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        discovered = await post(client, server, modern(1, "server/discover"))
        assert discovered.status_code == 200
        assert MODERN in discovered.json()["result"]["supportedVersions"]
        assert "mcp-session-id" not in discovered.headers  # nothing minted, nothing echoed
        listed = await post(client, server, modern("l", "tools/list"))
        assert listed.json()["id"] == "l"
        assert listed.json()["result"]["ttlMs"] == 0  # cacheable, and told for how long
        message = modern("a-string-id", "tools/call", {"name": "echo", "arguments": {"text": "m"}})
        echoed = await post(client, server, message)
        assert echoed.status_code == 200
        body = echoed.json()
        assert body["id"] == "a-string-id"
        assert body["result"]["content"][0]["text"] == "m"
        assert body["result"]["resultType"] == "complete"


async def test_clients_of_one_identity_may_use_the_same_ids_at_once(server: ServerProcess) -> None:
    """Two clients, one identity, one session actor: both send id 1 at the same time, and
    each gets its own answer under its own id."""
    answers: dict[str, dict[str, Any]] = {}

    async def one(text: str, seconds: float) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            message = modern(
                1, "tools/call", {"name": "exai_test_sleep", "arguments": {"seconds": seconds}}
            )
            first = await post(client, server, message)
            assert first.status_code == 200
            echo = modern(1, "tools/call", {"name": "echo", "arguments": {"text": text}})
            answers[text] = (await post(client, server, echo)).json()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "first", 0.3)
        nursery.start_soon(one, "second", 0.1)
    for text in ("first", "second"):
        assert answers[text]["id"] == 1
        assert answers[text]["result"]["content"][0]["text"] == text


async def test_headers_must_mirror_the_body(server: ServerProcess) -> None:
    call = modern(2, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
    async with httpx.AsyncClient(timeout=30) as client:
        cases = [
            ({"MCP-Protocol-Version": ""}, "MCP-Protocol-Version header is required"),
            ({"Mcp-Method": ""}, "Mcp-Method header is required"),
            ({"Mcp-Method": "tools/list"}, "differs from the body"),
            ({"Mcp-Name": ""}, "Mcp-Name header is required"),
            ({"Mcp-Name": "threads"}, "differs from the body"),
            ({"Mcp-Name": "=?base64?not base64!?="}, "not a valid header value"),
        ]
        for extra, expected in cases:
            refused = await post(client, server, call, **extra)
            assert refused.status_code == 400, extra
            error = error_of(refused)
            assert error["code"] == -32020, extra
            assert expected in error["message"], (extra, error)
            assert refused.json()["id"] == 2
        # The body's version and the header's must agree too.
        mixed = await post(client, server, call, **{"MCP-Protocol-Version": "2025-11-25"})
        assert (mixed.status_code, error_of(mixed)["code"]) == (400, -32020)
        # A name outside the header-safe set comes base64-encoded, and is accepted so.
        sentinel = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
        accepted = await post(client, server, call, **{"Mcp-Name": sentinel})
        assert accepted.status_code == 200
        assert accepted.json()["result"]["content"][0]["text"] == "x"


async def test_versions_methods_and_verbs_of_a_modern_client(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        future = modern(3, "tools/list")
        future["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2099-01-01"
        unsupported = await post(client, server, future, **{"MCP-Protocol-Version": "2099-01-01"})
        assert unsupported.status_code == 400
        error = error_of(unsupported)
        assert error["code"] == -32022
        assert MODERN in error["data"]["supported"]
        handshake = modern(9, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
        refused = await post(client, server, handshake)
        assert (refused.status_code, error_of(refused)["code"]) == (404, -32601)
        assert "2025-11-25" in error_of(refused)["message"]
        unknown = await post(client, server, modern(4, "nope/never"))
        assert (unknown.status_code, error_of(unknown)["code"]) == (404, -32601)
        assert unknown.json()["id"] == 4
        note = {"jsonrpc": "2.0", "method": "notifications/whatever", "params": {}}
        accepted = await client.post(
            http_url(server), content=json.dumps(note), headers=headers(server.token, note)
        )
        assert accepted.status_code == 202
        bare = {"Authorization": f"Bearer {server.token}", "MCP-Protocol-Version": MODERN}
        for verb in ("GET", "DELETE"):
            response = await client.request(
                verb, http_url(server), headers={**bare, "Accept": "text/event-stream"}
            )
            assert response.status_code == 405, verb


async def test_closing_the_response_stream_cancels_the_request(
    server: ServerProcess, database_url: str
) -> None:
    message = modern(
        "blocked",
        "tools/call",
        {"name": "exai_test_block", "arguments": {}, "_meta": {"progressToken": "hb"}},
    )
    [(started,)] = query(database_url, "select now()")
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            http_url(server),
            content=json.dumps(message),
            headers=headers(server.token, message),
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    heartbeat = json.loads(line[6:])
                    assert heartbeat["method"] == "notifications/progress"
                    break  # the call runs; closing the stream now is the cancellation
        # The identity's session goes on; the blocked call's row ends cancelled.
        after = await post(
            client, server, modern(5, "tools/call", {"name": "echo", "arguments": {"text": "on"}})
        )
        assert after.json()["result"]["content"][0]["text"] == "on"
    await wait_until(
        lambda: (
            query(
                database_url,
                "select status from tasks where tool_name = 'exai_test_block'"
                " and status <> 'running' and created_at >= %s",
                (started,),
            )
            == [("cancelled",)]
        ),
        what="the blocked call recorded cancelled",
    )


async def test_each_identity_has_its_own_session_actor(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        mine = await post(client, server, modern(1, "tools/list"))
        message = modern(1, "tools/list")
        bobs = await client.post(
            http_url(server), content=json.dumps(message), headers=headers(BOB, message)
        )
        assert mine.status_code == bobs.status_code == 200
    log = server.log_events()
    opened = {
        event["identity"]
        for event in log
        if event.get("event") == "session.opened" and event.get("remote") == "http (sessionless)"
    }
    assert {"default", "bob"} <= opened
    answered = [event for event in log if event.get("event") == "session.initialized"]
    assert answered  # the first request of each named its client


async def test_a_modern_request_on_sse_carries_its_progress(server: ServerProcess) -> None:
    message = modern(
        "steps",
        "tools/call",
        {"name": "exai_test_steps", "arguments": {"steps": 2}, "_meta": {"progressToken": "p"}},
    )
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            http_url(server),
            content=json.dumps(message),
            headers=headers(server.token, message),
        ) as response,
    ):
        seen = await messages_of(response)
    progress = [m for m in seen if m.get("method") == "notifications/progress"]
    assert [p["params"]["progress"] for p in progress] == [1, 2]
    assert seen[-1]["id"] == "steps"
    assert seen[-1]["result"]["content"][0]["text"] == "2 steps"


async def listen_lines(
    client: httpx.AsyncClient, server: ServerProcess, message: dict[str, Any]
) -> AsyncIterator[str]:
    async with client.stream(
        "POST",
        http_url(server),
        content=json.dumps(message),
        headers=headers(server.token, message),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            yield line


async def test_subscriptions_listen_acknowledges_what_it_honours(server: ServerProcess) -> None:
    message = modern(
        "sub-1",
        "subscriptions/listen",
        {"notifications": {"toolsListChanged": True, "resourceSubscriptions": ["file:///x"]}},
    )
    async with httpx.AsyncClient(timeout=30) as client:
        lines = listen_lines(client, server, message)
        first = None
        async for line in lines:
            if line.startswith("data: "):
                first = json.loads(line[6:])
                break
        assert first is not None
        assert first["method"] == "notifications/subscriptions/acknowledged"
        assert first["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": "sub-1"}
        # No resources here: only what the server will honour is acknowledged.
        assert first["params"]["notifications"] == {"toolsListChanged": True}
        async for line in lines:
            if line.startswith(":"):
                break  # the stream stays open, kept alive
        await lines.aclose()
        bad = modern("sub-2", "subscriptions/listen", {"notifications": "all"})
        refused = await post(client, server, bad)
        assert (refused.status_code, error_of(refused)["code"]) == (400, -32602)


async def test_a_stopping_node_ends_a_subscription_gracefully(
    database_url: str, tmp_path: Any
) -> None:
    handle = start_server(tmp_path / "listen-stop", database_url=database_url)
    try:
        message = modern(7, "subscriptions/listen", {"notifications": {"toolsListChanged": True}})
        seen: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=30) as client:
            async for line in listen_lines(client, handle, message):
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 1:  # acknowledged: the subscription is open; stop the node
                        handle.process.send_signal(signal.SIGTERM)
        assert seen[-1] == {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {
                "resultType": "complete",
                "_meta": {"io.modelcontextprotocol/subscriptionId": 7},
            },
        }
        assert handle.process.wait(timeout=60) == 0
    finally:
        handle.stop()


async def test_a_clients_traceparent_is_the_calls_trace(server: ServerProcess) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    message = modern(
        "traced",
        "tools/call",
        {
            "name": "echo",
            "arguments": {"text": "traced"},
            "_meta": {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        },
    )
    async with httpx.AsyncClient(timeout=30) as client:
        answered = await post(client, server, message)
    assert answered.json()["result"]["content"][0]["text"] == "traced"
    await wait_until(
        lambda: any(
            event.get("event") == "actor.message"
            and event.get("trace_id") == trace_id
            and event.get("kind") == "tools/call"
            for event in server.log_events()
        ),
        what="the call's trace under the client's trace id",
    )
