"""Sessions are isolated, authenticated, and recorded; the server restarts on its own state."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    session_row,
    start_server,
    wait_until,
)

CRASH = "$/exai/test/crash"


async def test_a_crash_restarts_the_session_actor_and_keeps_the_socket(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        # Pipelined: the crash, then two requests already queued behind it.
        await client.send({"jsonrpc": "2.0", "id": "boom", "method": CRASH})
        await client.send({"jsonrpc": "2.0", "id": "after-1", "method": "tools/list"})
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "after-2",
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "survived"}},
            }
        )
        replies = {reply["id"]: reply for reply in [await client.receive() for _ in range(3)]}
        assert replies["boom"]["error"]["code"] == -32001
        assert "restarted" in replies["boom"]["error"]["message"]
        # Queued messages went to the next incarnation, which kept the negotiated session.
        assert "tools" in replies["after-1"]["result"]
        assert replies["after-2"]["result"]["content"][0]["text"] == "survived"
    restarts = [e for e in server.log_events() if e["event"] == "session.actor_restarted"]
    assert [e["session_id"] for e in restarts].count(session_id) == 1


async def test_a_session_crashing_past_its_intensity_closes_1011_and_harms_no_other(
    server: ServerProcess, database_url: str
) -> None:
    async with (
        open_raw(server.authed_url()) as healthy_ws,
        open_raw(server.authed_url()) as doomed_ws,
    ):
        healthy, doomed = RawClient(healthy_ws), RawClient(doomed_ws)
        await healthy.initialize()
        doomed_id = (await doomed.initialize())["result"]["_meta"]["exai/sessionId"]

        # The default intensity tolerates 3 restarts in 10 s; the 4th crash is one too many.
        for n in range(3):
            reply = await doomed.request(CRASH)
            assert reply["error"]["code"] == -32001, (n, reply)
        await doomed.send({"jsonrpc": "2.0", "id": 99, "method": CRASH})
        # The error for 99 may or may not arrive before the close.
        assert await doomed.receive_until_closed() == 1011

        # The other session, and new ones, carry on as if nothing happened.
        for n in range(5):
            reply = await healthy.request(
                "tools/call", {"name": "echo", "arguments": {"text": f"still here {n}"}}
            )
            assert reply["result"]["content"][0]["text"] == f"still here {n}"
        async with open_raw(server.authed_url()) as fresh_ws:
            assert "result" in await RawClient(fresh_ws).initialize()

    await wait_until(
        lambda: (session_row(database_url, doomed_id) or {}).get("status") == "closed",
        what="crashed session's row to be closed",
    )
    events = server.log_events()
    crashes = [e for e in events if e["event"] == "session.crashed"]
    restarts = [e for e in events if e["event"] == "session.actor_restarted"]
    assert [e["session_id"] for e in crashes].count(doomed_id) == 1
    assert [e["session_id"] for e in restarts].count(doomed_id) == 3
    # The session's actor gave up alone, within its own intensity: the sessions supervisor,
    # whose own intensity is never charged by a session, and the root go on.
    gave_up = [e["path"] for e in events if e["event"] == "child.gave_up"]
    assert gave_up.count(f"/root/sessions/{doomed_id}") == 1
    assert not [e for e in events if e["event"] == "supervisor.gave_up"]


async def test_crash_method_does_not_exist_without_test_faults(
    database_url: str, state_dir: Path
) -> None:
    handle = start_server(state_dir, database_url=database_url, extra_env={"EXAI_TEST_FAULTS": "0"})
    try:
        async with open_raw(handle.authed_url()) as ws:
            client = RawClient(ws)
            await client.initialize()
            reply = await client.request("$/exai/test/crash")
            assert reply["error"]["code"] == -32601
    finally:
        assert handle.stop() == 0


@pytest.mark.parametrize("token", ["wrong-token-wrong-token", ""])
async def test_wrong_or_missing_token_is_refused_with_401(
    server: ServerProcess, token: str
) -> None:
    url = server.url if token == "" else server.authed_url(token)
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_raw(url):
            pass
    assert rejected.value.status_code == 401


async def test_bearer_header_is_accepted(server: ServerProcess) -> None:
    headers = [(b"authorization", f"Bearer {server.token}".encode())]
    async with open_raw(server.url, extra_headers=headers) as ws:
        assert "result" in await RawClient(ws).initialize()


async def test_client_offering_no_subprotocol_is_accepted(server: ServerProcess) -> None:
    async with open_websocket_url(server.authed_url()) as ws:
        assert ws.subprotocol is None
        assert "result" in await RawClient(ws).initialize()


async def test_other_paths_are_not_found(server: ServerProcess) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_raw(server.url.replace("/mcp", "/other") + f"?token={server.token}"):
            pass
    assert rejected.value.status_code == 404


async def test_shutdown_closes_sessions_with_1001_and_records_them(
    database_url: str, state_dir: Path
) -> None:
    handle = start_server(state_dir, database_url=database_url)
    server_json = state_dir / "server.json"
    assert server_json.exists()
    async with open_raw(handle.authed_url()) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        # Journal durability: the row reaches the database behind the answer.
        await wait_until(
            lambda: (session_row(database_url, session_id) or {}).get("status") == "active",
            what="the session's row",
        )
        code = await trio.to_thread.run_sync(handle.stop)
        assert code == 0
        with pytest.raises(ConnectionClosed) as closed:
            await client.receive()
        assert closed.value.reason.code == 1001
    # Recorded before the process exited: no waiting needed.
    assert (session_row(database_url, session_id) or {}).get("status") == "closed"
    assert not server_json.exists()


async def test_restart_on_same_state_dir_reuses_database_and_migrations(
    state_dir: Path,
) -> None:
    first = start_server(state_dir, database_url=None)
    async with open_raw(first.authed_url()) as ws:
        await RawClient(ws).initialize()
    assert first.stop() == 0
    pg_version = state_dir / "pg" / "PG_VERSION"
    created = pg_version.stat().st_ino

    second = start_server(state_dir, database_url=None, token=first.token)
    try:
        async with open_raw(second.authed_url()) as ws:
            assert "result" in await RawClient(ws).initialize()
    finally:
        assert second.stop() == 0

    assert pg_version.stat().st_ino == created
    events = second.log_events()
    embedded = [e for e in events if e["event"] == "storage.embedded"]
    migrated = [e for e in events if e["event"] == "storage.migrated"]
    # The log file holds both runs: the first created and migrated, the second reused.
    assert [e["reused"] for e in embedded] == [False, True]
    assert migrated[0]["applied"] != []
    assert migrated[1]["applied"] == []


async def test_generated_token_is_kept_private_and_reused(
    database_url: str, state_dir: Path
) -> None:
    first = start_server(state_dir, database_url=database_url, token="")
    token_file = state_dir / "token"
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert first.token == token_file.read_text().strip()
        assert len(first.token) >= 32
        async with open_raw(first.authed_url()) as ws:
            assert "result" in await RawClient(ws).initialize()
    finally:
        assert first.stop() == 0
    second = start_server(state_dir, database_url=database_url, token="")
    try:
        assert second.token == first.token
    finally:
        assert second.stop() == 0
