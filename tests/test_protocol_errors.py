"""Every kind of bad input gets its exact JSON-RPC error, and the session keeps answering."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import RawClient, ServerProcess, open_raw


async def assert_still_alive(client: RawClient) -> None:
    reply = await client.request("ping")
    assert reply["result"] == {}


BAD_FRAMES: list[tuple[str, str, int, Any]] = [
    ("not json", "{not json", -32700, None),
    ("truncated json", '{"jsonrpc": "2.0", "id": 1, "method": "ping"', -32700, None),
    ("json scalar", "42", -32600, None),
    ("json string", '"ping"', -32600, None),
    ("empty object", "{}", -32600, None),
    ("batch", '[{"jsonrpc": "2.0", "id": 9, "method": "ping"}]', -32600, None),
    ("missing jsonrpc", '{"id": 7, "method": "ping"}', -32600, 7),
    ("wrong jsonrpc", '{"jsonrpc": "1.0", "id": 8, "method": "ping"}', -32600, 8),
    ("null id", '{"jsonrpc": "2.0", "id": null, "method": "ping"}', -32600, None),
    ("bool id", '{"jsonrpc": "2.0", "id": true, "method": "ping"}', -32600, None),
    ("method not string", '{"jsonrpc": "2.0", "id": 10, "method": 5}', -32600, 10),
    (
        "params not object",
        '{"jsonrpc": "2.0", "id": 11, "method": "ping", "params": 3}',
        -32600,
        11,
    ),
]


@pytest.mark.parametrize(
    ("frame", "code", "error_id"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
async def test_malformed_frame_gets_exact_error_and_session_survives(
    server: ServerProcess, frame: str, code: int, error_id: Any
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        await client.send(frame)
        reply = await client.receive()
        assert reply["jsonrpc"] == "2.0"
        assert reply["id"] == error_id
        assert reply["error"]["code"] == code
        assert reply["error"]["message"]
        await assert_still_alive(client)


async def test_unknown_method_is_method_not_found(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        reply = await client.request("resources/teleport")
        assert reply["error"]["code"] == -32601
        assert "resources/teleport" in reply["error"]["message"]
        await assert_still_alive(client)


@pytest.mark.parametrize(
    ("method", "params", "mentions"),
    [
        ("tools/call", {}, "name"),
        ("tools/call", {"name": "no-such-tool"}, "no-such-tool"),
        ("tools/call", {"name": "echo", "arguments": {"txt": "typo"}}, "text"),
        ("tools/call", {"name": "echo", "arguments": {"text": 5}}, "text"),
        ("tools/list", {"cursor": 5}, "cursor"),
    ],
)
async def test_wrong_params_are_invalid_params(
    server: ServerProcess, method: str, params: dict[str, Any], mentions: str
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-06-18")
        reply = await client.request(method, params)
        assert reply["error"]["code"] == -32602, reply
        assert mentions in reply["error"]["message"]
        await assert_still_alive(client)


async def test_initialize_with_bad_params_is_invalid_params(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        reply = await client.request("initialize", {"protocolVersion": "2025-06-18"})
        assert reply["error"]["code"] == -32602
        assert "clientInfo" in reply["error"]["message"]
        await assert_still_alive(client)
        # A failed initialize leaves the session uninitialized, so a real one still works.
        assert "result" in await client.initialize()


async def test_requests_before_initialize_are_refused_but_ping_works(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await assert_still_alive(client)
        for method, params in [("tools/list", None), ("tools/call", {"name": "echo"})]:
            reply = await client.request(method, params)
            assert reply["error"]["code"] == -32600
            assert "initialize" in reply["error"]["message"]
        assert "result" in await client.initialize()


async def test_second_initialize_is_refused(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        reply = await client.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "x", "version": "1"},
            },
        )
        assert reply["error"]["code"] == -32600
        await assert_still_alive(client)


@pytest.mark.parametrize(
    ("requested", "answered"),
    [
        ("2024-11-05", "2024-11-05"),
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("1999-01-01", "2025-11-25"),
        ("2099-12-31", "2025-11-25"),
    ],
)
async def test_version_negotiation(server: ServerProcess, requested: str, answered: str) -> None:
    async with open_raw(server.authed_url()) as ws:
        reply = await RawClient(ws).initialize(requested)
        assert reply["result"]["protocolVersion"] == answered


async def test_structured_content_only_for_versions_that_have_it(server: ServerProcess) -> None:
    for version, structured in [("2025-03-26", False), ("2025-06-18", True)]:
        async with open_raw(server.authed_url()) as ws:
            client = RawClient(ws)
            await client.initialize(version)
            reply = await client.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
            assert reply["result"]["content"] == [{"type": "text", "text": "x"}]
            assert ("structuredContent" in reply["result"]) is structured


async def test_invalid_tool_arguments_are_tool_errors_from_2025_11_25(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        reply = await client.request("tools/call", {"name": "echo", "arguments": {}})
        assert reply["result"]["isError"] is True
        assert "text" in reply["result"]["content"][0]["text"]
