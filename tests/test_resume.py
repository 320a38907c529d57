"""Session resume: a dropped client comes back to the same session within the grace period."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.harness import RawClient, ServerProcess, open_raw, session_row, start_server, wait_until

GOING_AWAY = 1001  # what a client sends when it drops without ending its session


@pytest.fixture(scope="module")
def short_grace(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("grace"),
        database_url=database_url,
        extra_env={"EXAI_RESUME_GRACE": "0.5"},
    )
    yield handle
    assert handle.stop() == 0


async def _drop(url: str, version: str = "2025-06-18") -> str:
    """Open a session, negotiate, and leave without ending it; return its id."""
    async with open_raw(url) as ws:
        client = RawClient(ws)
        session_id: str = (await client.initialize(version))["result"]["_meta"]["exai/sessionId"]
        assert dict(ws.handshake_headers)[b"mcp-session-id"].decode() == session_id
        await ws.aclose(GOING_AWAY)
    return session_id


@pytest.mark.parametrize("presented_as", ["query", "header"])
async def test_a_dropped_session_resumes_with_its_state(
    server: ServerProcess, database_url: str, presented_as: str
) -> None:
    session_id = await _drop(server.authed_url(), version="2025-03-26")
    # Journal durability: the row reaches the database behind the answer.
    await wait_until(
        lambda: (session_row(database_url, session_id) or {}).get("status") == "active",
        what="the session's row",
    )

    if presented_as == "query":
        resume = open_raw(f"{server.authed_url()}&session={session_id}")
    else:
        resume = open_raw(
            server.authed_url(), extra_headers=[(b"mcp-session-id", session_id.encode())]
        )
    async with resume as ws:
        assert dict(ws.handshake_headers)[b"mcp-session-id"].decode() == session_id
        client = RawClient(ws)
        # No initialize: the negotiated version survived (batches prove it is 2025-03-26).
        await client.send([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}])
        (listed,) = await client.receive_any()
        assert listed["result"]["tools"][0]["name"] == "echo"
        again = await client.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "x", "version": "1"},
            },
        )
        assert again["error"]["code"] == -32600
    await wait_until(
        lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
        what="the resumed session's row to close after a clean close",
    )


async def test_a_cleanly_closed_session_cannot_be_resumed(
    server: ServerProcess, database_url: str
) -> None:
    async with open_raw(server.authed_url()) as ws:
        session_id = (await RawClient(ws).initialize())["result"]["_meta"]["exai/sessionId"]
    # Ended at once, not parked: its row closes without waiting for any grace period.
    await wait_until(
        lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
        what="a cleanly closed session's row to close",
    )
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{server.authed_url()}&session={session_id}"):
            pass
    assert refused.value.status_code == 404


async def test_an_unknown_session_id_is_refused_clearly(server: ServerProcess) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{server.authed_url()}&session=no-such-session"):
            pass
    assert refused.value.status_code == 404
    assert b"unknown or its resume grace period has passed" in (refused.value.body or b"")


async def test_an_unknown_session_id_is_logged_as_the_clients_text(server: ServerProcess) -> None:
    """The id a client presents is its own text, not a session's: a secret pasted into it (the
    server's own token here) is masked in the log like any field a peer writes."""

    def refusals() -> list[dict[str, object]]:
        return [e for e in server.log_events() if e["event"] == "handshake.resume_refused"]

    before = len(refusals())  # the module's server: other tests' refusals are logged too
    with pytest.raises(ConnectionRejected):
        async with open_raw(
            server.authed_url(), extra_headers=[(b"mcp-session-id", server.token.encode())]
        ):
            pass
    await wait_until(lambda: len(refusals()) > before, what="the refused resume's log line")
    (line,) = refusals()[before:]
    assert line["resume_id"] == "[REDACTED]"
    assert server.token not in json.dumps(server.log_events())


async def test_a_session_still_attached_cannot_be_taken_over(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        with pytest.raises(ConnectionRejected) as refused:
            async with open_raw(f"{server.authed_url()}&session={session_id}"):
                pass
        assert refused.value.status_code == 409
        assert (await client.request("ping"))["result"] == {}


async def test_after_the_grace_period_the_session_is_closed_and_refused(
    short_grace: ServerProcess, database_url: str
) -> None:
    session_id = await _drop(short_grace.authed_url())
    await wait_until(
        lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
        what="the parked session's row to close when its grace ends",
    )
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{short_grace.authed_url()}&session={session_id}"):
            pass
    assert refused.value.status_code == 404


def _masked_text_frame(payload: bytes) -> bytes:
    """One final text frame as a client sends it (masked; RFC 6455 section 5.2), whatever
    its payload: the client library itself only ever sends valid UTF-8."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_a_peer_that_breaks_the_websocket_protocol_ends_its_session(
    server: ServerProcess, database_url: str
) -> None:
    """A text frame that is not UTF-8 is the peer's fault, not a dropped network (1007):
    its session ends at once instead of waiting, parked, for a resume."""
    async with open_raw(server.authed_url()) as ws:
        session_id = (await RawClient(ws).initialize())["result"]["_meta"]["exai/sessionId"]
        await ws._stream.send_all(_masked_text_frame(b"\xff\xfe not utf-8"))
        with pytest.raises(ConnectionClosed):
            await ws.get_message()
    await wait_until(
        lambda: (session_row(database_url, session_id) or {}).get("status") == "closed",
        what="the session to end",
    )
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{server.authed_url()}&session={session_id}"):
            pass
    assert refused.value.status_code == 404
