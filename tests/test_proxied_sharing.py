"""Issue 16 (c): ``share = "identity"`` and ``share = "session"`` — one proxied process per
client identity, or per session, started by its first call, bounded by ``max_instances``,
stopped when its session ends. A real server (``mcp-server-time`` from PyPI), a real
``exai serve``, real WebSocket clients of two identities.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import RawClient, ServerProcess, fetch, open_raw, start_server, wait_for_status
from tests.test_proxied_servers_node import recorded_groups
from tests.test_proxy_client import SERVER_TIME, group_alive

BOB = "bob-token-for-the-sharing-tests-0123456789"


@pytest.fixture(scope="module")
def node(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not SERVER_TIME.exists():
        pytest.fail("mcp-server-time env missing: run `just setup-clients` (just test does)")
    tmp = tmp_path_factory.mktemp("sharing")
    config = tmp / "exai.toml"
    config.write_text(
        f"""
[servers.mine]
command = "{SERVER_TIME}"
share = "identity"

[servers.ours]
command = "{SERVER_TIME}"
share = "session"
max_instances = 2
"""
    )
    handle = start_server(
        tmp / "state",
        database_url=database_url,
        extra_env={"EXAI_CONFIG": str(config), "EXAI_CLIENT_TOKENS": f"bob={BOB}"},
    )
    yield handle
    groups = recorded_groups(handle.state_dir)
    assert handle.stop() == 0, handle.stderr_path.read_text()
    for pgid in groups:
        assert not group_alive(pgid), pgid


async def instances(node: ServerProcess) -> dict[str, int | None]:
    return {server.name: server.instances for server in (await fetch(node)).servers}


async def call(client: RawClient, tool: str) -> dict[str, Any]:
    reply = await client.request("tools/call", {"name": tool, "arguments": {"timezone": "UTC"}})
    return reply


def url_for(node: ServerProcess, token: str) -> str:
    return node.authed_url().replace(node.token, token)


async def test_one_process_per_identity(node: ServerProcess) -> None:
    async with open_raw(node.authed_url()) as ws_a, open_raw(node.authed_url()) as ws_b:
        a, b = RawClient(ws_a), RawClient(ws_b)
        await a.initialize("2025-11-25")
        await b.initialize("2025-11-25")
        assert "result" in await call(a, "mine__get_current_time")
        assert "result" in await call(b, "mine__get_current_time")
        # Two sessions of one identity: one process.
        assert (await instances(node))["mine"] == 1
        async with open_raw(url_for(node, BOB)) as ws_bob:
            bob = RawClient(ws_bob)
            await bob.initialize("2025-11-25")
            assert "result" in await call(bob, "mine__get_current_time")
            assert (await instances(node))["mine"] == 2


async def test_one_process_per_session_bounded_and_stopped_with_it(node: ServerProcess) -> None:
    async with open_raw(node.authed_url()) as ws_c:
        c = RawClient(ws_c)
        await c.initialize("2025-11-25")
        async with open_raw(node.authed_url()) as ws_a, open_raw(node.authed_url()) as ws_b:
            a, b = RawClient(ws_a), RawClient(ws_b)
            await a.initialize("2025-11-25")
            await b.initialize("2025-11-25")
            assert "result" in await call(a, "ours__get_current_time")
            assert "result" in await call(b, "ours__get_current_time")
            assert (await instances(node))["ours"] == 2
            # max_instances = 2: a third session is refused, never served by another's.
            refused = await call(c, "ours__get_current_time")
            assert refused["error"]["code"] == -32004, refused
            assert "max_instances" in refused["error"]["message"]
            await ws_a.aclose(1000)  # a session that ends takes its process with it
        await wait_for_status(
            node,
            lambda status: {s.name: s.instances for s in status.servers}["ours"] == 0,
            what="the ended sessions' processes to stop",
        )
        assert "result" in await call(c, "ours__get_current_time")
