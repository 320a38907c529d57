"""Dual-era MCP: batches (2025-03-26), discover and per-request versions (2026-07-28),
paging, progress with heartbeats, and logging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.harness import RawClient, ServerProcess, open_raw, start_server

MODERN = "2026-07-28"
META_VERSION = "io.modelcontextprotocol/protocolVersion"


def modern_meta(version: str = MODERN) -> dict[str, Any]:
    return {
        META_VERSION: version,
        "io.modelcontextprotocol/clientInfo": {"name": "modern-raw", "version": "2"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }


@pytest.fixture(scope="module")
def small_pages(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("pages"),
        database_url=database_url,
        extra_env={"EXAI_PAGE_SIZE": "1", "EXAI_HEARTBEAT_INTERVAL": "0.05"},
    )
    yield handle
    assert handle.stop() == 0


# -- 2025-03-26 batches ----------------------------------------------------------------


async def test_batch_is_answered_as_one_array_in_2025_03_26(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-03-26")
        await client.send(
            [
                {"jsonrpc": "2.0", "id": "p", "method": "ping"},
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
                {"jsonrpc": "2.0", "id": "bad", "method": 7},
                {
                    "jsonrpc": "2.0",
                    "id": "e",
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "in a batch"}},
                },
                {"jsonrpc": "2.0", "id": "i", "method": "initialize", "params": {}},
            ]
        )
        with trio.fail_after(30):
            replies = {reply["id"]: reply for reply in await client.receive_any()}
        assert set(replies) == {"p", "bad", "e", "i"}
        assert replies["p"]["result"] == {}
        assert replies["bad"]["error"]["code"] == -32600
        assert replies["e"]["result"]["content"][0]["text"] == "in a batch"
        assert replies["i"]["error"]["code"] == -32600
        assert "batched" in replies["i"]["error"]["message"]


async def test_batch_of_notifications_only_gets_no_response(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-03-26")
        await client.send([{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}])
        # Batches run one at a time: the next frame is the second batch's answer, so the
        # first produced nothing.
        await client.send([{"jsonrpc": "2.0", "id": "after", "method": "ping"}])
        assert [reply["id"] for reply in await client.receive_any()] == ["after"]


@pytest.mark.parametrize(("version", "frame"), [("2025-03-26", "[]"), ("2025-06-18", '[{"a": 1}]')])
async def test_empty_batch_and_batches_outside_2025_03_26_are_invalid(
    server: ServerProcess, version: str, frame: str
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize(version)
        await client.send(frame)
        reply = await client.receive()
        assert reply["id"] is None
        assert reply["error"]["code"] == -32600
        assert (await client.request("ping"))["result"] == {}


# -- 2026-07-28 ------------------------------------------------------------------------


async def test_server_discover_answers_at_once(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        reply = await client.request("server/discover", {"_meta": modern_meta()})
        result = reply["result"]
        assert result["supportedVersions"] == [
            "2024-11-05",
            "2025-03-26",
            "2025-06-18",
            "2025-11-25",
            MODERN,
        ]
        assert result["resultType"] == "complete"
        assert result["ttlMs"] == 0
        assert result["cacheScope"] == "private"
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "exai-runtime"
        assert "tools" in result["capabilities"]


async def test_modern_requests_need_no_initialize_and_are_tagged(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        listed = await client.request("tools/list", {"_meta": modern_meta()})
        assert listed["result"]["resultType"] == "complete"
        assert "ttlMs" in listed["result"]
        called = await client.request(
            "tools/call",
            {"name": "echo", "arguments": {"text": "modern"}, "_meta": modern_meta()},
        )
        assert called["result"]["resultType"] == "complete"
        assert called["result"]["structuredContent"] == {"text": "modern"}
        # ping and logging/setLevel are gone in 2026-07-28.
        for method, params in [("ping", {}), ("logging/setLevel", {"level": "info"})]:
            gone = await client.request(method, {**params, "_meta": modern_meta()})
            assert gone["error"]["code"] == -32601


@pytest.mark.parametrize("named", ["2099-01-01", "2025-06-18"])
async def test_unsupported_version_in_meta_is_32022_with_the_supported_list(
    server: ServerProcess, named: str
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        reply = await client.request("tools/list", {"_meta": modern_meta(named)})
        assert reply["error"]["code"] == -32022
        assert reply["error"]["data"] == {"supported": [MODERN], "requested": named}


async def test_handshake_results_carry_no_modern_tags(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-11-25")
        listed = await client.request("tools/list")
        assert "resultType" not in listed["result"]
        assert "ttlMs" not in listed["result"]


# -- paging ----------------------------------------------------------------------------


async def test_tools_list_pages_with_opaque_cursors(small_pages: ServerProcess) -> None:
    async with open_raw(small_pages.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        names: list[str] = []
        cursor = None
        for _ in range(10):
            reply = await client.request("tools/list", {"cursor": cursor} if cursor else {})
            page = reply["result"]["tools"]
            assert len(page) == 1
            names += [tool["name"] for tool in page]
            cursor = reply["result"].get("nextCursor")
            if cursor is None:
                break
        assert names[0] == "echo"
        assert len(names) == len(set(names)) >= 2


@pytest.mark.parametrize("cursor", ["garbage", "ZXhhaTp2MToxMDAwMA", "", "!!!"])
async def test_a_bad_cursor_is_invalid_params(small_pages: ServerProcess, cursor: str) -> None:
    async with open_raw(small_pages.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        reply = await client.request("tools/list", {"cursor": cursor})
        assert reply["error"]["code"] == -32602
        assert "cursor" in reply["error"]["message"]


# -- progress, heartbeats, logging -----------------------------------------------------


async def test_progress_is_strictly_increasing_and_logs_follow_the_level(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        assert (await client.request("logging/setLevel", {"level": "info"}))["result"] == {}
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "steps",
                "method": "tools/call",
                "params": {
                    "name": "exai_test_steps",
                    "arguments": {"steps": 3},
                    "_meta": {"progressToken": "tok"},
                },
            }
        )
        progress: list[float] = []
        logs: list[Any] = []
        while True:
            frame = await client.receive()
            if frame.get("method") == "notifications/progress":
                assert frame["params"]["progressToken"] == "tok"
                assert frame["params"]["total"] == 3
                progress.append(frame["params"]["progress"])
            elif frame.get("method") == "notifications/message":
                logs.append(frame["params"]["data"])
                assert frame["params"]["level"] == "info"
            else:
                assert frame["id"] == "steps"
                break
        assert progress == [1, 2, 3]
        assert logs == [{"step": 1}, {"step": 2}, {"step": 3}]

        # Raise the level above info: the same call now logs nothing.
        await client.request("logging/setLevel", {"level": "warning"})
        reply = await client.request("tools/call", {"name": "exai_test_steps"})
        assert reply["result"]["content"][0]["text"] == "3 steps"


async def test_a_silent_long_call_gets_heartbeats_until_cancelled(
    small_pages: ServerProcess,
) -> None:
    async with open_raw(small_pages.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize()
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "long",
                "method": "tools/call",
                "params": {"name": "exai_test_block", "_meta": {"progressToken": 7}},
            }
        )
        beats = [await client.receive() for _ in range(3)]
        assert all(beat["method"] == "notifications/progress" for beat in beats)
        values = [beat["params"]["progress"] for beat in beats]
        assert values == sorted(set(values))
        assert "still running" in beats[-1]["params"]["message"]
        await client.send(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "long"}}
        )
        # No response for the cancelled call: frames up to the answer of a request the actor
        # takes after the cancel may only be heartbeats that were already on their way.
        await client.send({"jsonrpc": "2.0", "id": "after", "method": "tools/list"})
        while (frame := await client.receive()).get("id") != "after":
            assert frame.get("method") == "notifications/progress", frame
        assert "tools" in frame["result"]


async def test_a_modern_request_in_a_handshake_session_leaves_the_session_as_it_was(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-06-18")
        tagged = await client.request("tools/list", {"_meta": modern_meta()})
        assert tagged["result"]["resultType"] == "complete"
        # Still the 2025-06-18 session it negotiated: ping exists, untagged lists work.
        assert (await client.request("ping"))["result"] == {}
        assert "resultType" not in (await client.request("tools/list"))["result"]


async def test_initialize_after_discover_is_32022_naming_the_modern_versions(
    server: ServerProcess,
) -> None:
    # What mcp 2.x does when its discover timed out client-side but the server answered it.
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await client.request("server/discover", {"_meta": modern_meta()})
        reply = await client.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "late", "version": "1"},
            },
        )
        assert reply["error"]["code"] == -32022
        assert reply["error"]["data"] == {"supported": [MODERN], "requested": "2025-11-25"}
