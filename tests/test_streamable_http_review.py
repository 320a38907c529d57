"""A hostile client's review of Streamable HTTP (both eras), over real sockets to a real
``exai serve`` on a real Postgres.

The first tests are the bugs the review found, each fixed since: the rule each enforces is
the MCP transport specs' (modelcontextprotocol/modelcontextprotocol,
``docs/specification/2025-11-25/basic/transports.mdx`` and
``docs/specification/2026-07-28/basic/transports/streamable-http.mdx``) or the endpoint's own
(``runtime/streamable_http/endpoint.py``). The rest cover what held up and had no test:
pipelining, concurrent DELETEs, a chunked body that never ends, and one sessionless session
per identity under a burst of first requests.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.harness import (
    ServerProcess,
    fetch,
    query,
    start_server,
    wait_for_status,
    wait_until,
)
from tests.test_streamable_http import (
    ACCEPT,
    BOB,
    Session,
    call,
    error_of,
    http_url,
    initialize,
    session,
)
from tests.test_streamable_http_modern import MODERN, headers, modern, post

CAROL = "carol-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-review"),
        database_url=database_url,
        extra_env={
            "EXAI_HEARTBEAT_INTERVAL": "0.2",
            "EXAI_CLIENT_TOKENS": f"bob={BOB},carol={CAROL}",
            "EXAI_HTTP_SESSIONS_PER_IDENTITY": "4",
            "EXAI_HANDSHAKE_TIMEOUT": "2",
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@pytest.fixture(scope="module")
def small(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A node with a short session idle expiry, few HTTP connections, a short stall timeout
    and a small node-wide outgoing budget."""
    handle = start_server(
        tmp_path_factory.mktemp("http-review-small"),
        database_url=database_url,
        extra_env={
            "EXAI_HEARTBEAT_INTERVAL": "0.2",
            "EXAI_CLIENT_TOKENS": f"bob={BOB}",
            "EXAI_HTTP_SESSION_IDLE": "0.5",
            "EXAI_MAX_HTTP_CONNECTIONS": "6",
            "EXAI_HTTP_EXCHANGES_PER_IDENTITY": "4",
            "EXAI_STALL_TIMEOUT": "1",
            "EXAI_NODE_OUTGOING_BYTES": str(4 * 2**20),
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def open_tcp(server: ServerProcess) -> trio.SocketStream:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


def raw_post(server: ServerProcess, message: dict[str, Any], **extra: str) -> bytes:
    body = json.dumps(message).encode()
    fields = {
        "Host": "x",
        "Authorization": f"Bearer {server.token}",
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "Content-Length": str(len(body)),
        **extra,
    }
    head = "POST /mcp HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n" + body


# -- bugs ------------------------------------------------------------------------------------


async def test_a_modern_request_with_a_session_id_still_has_its_headers_checked(
    server: ServerProcess,
) -> None:
    async with session(server) as s:
        message = modern(2, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
        response = await s.client.post(
            s.url,
            content=json.dumps(message),
            headers=headers(
                server.token,
                message,
                **{"Mcp-Session-Id": s.session_id or "", "Mcp-Name": "not-echo"},
            ),
        )
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == -32020


async def test_a_repeated_mirrored_header_is_refused(server: ServerProcess) -> None:
    message = modern(1, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
    fields = [*headers(BOB, message).items(), ("Mcp-Name", "evil")]
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(http_url(server), content=json.dumps(message), headers=fields)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == -32020


async def test_concurrent_initializes_respect_the_per_identity_bound(
    server: ServerProcess,
) -> None:
    statuses: Counter[int] = Counter()
    opened: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:

        async def one() -> None:
            s = Session(client, http_url(server), BOB)
            response = await s.post(initialize())
            statuses[response.status_code] += 1
            if response.status_code == 200:
                opened.append(response.headers["mcp-session-id"])

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(one)
        for session_id in opened:
            s = Session(client, http_url(server), BOB)
            s.session_id = session_id
            await client.delete(s.url, headers=s.headers())
    assert statuses[200] <= 4, statuses  # EXAI_HTTP_SESSIONS_PER_IDENTITY
    assert statuses[429] == 12 - statuses[200], statuses


async def test_an_id_may_be_used_again_once_answered(server: ServerProcess) -> None:
    async with session(server) as s:
        streams = [await open_tcp(server) for _ in range(3)]
        refused = 0
        for turn in range(200):
            stream = streams[turn % 3]
            message = call(1, "echo", text=str(turn))
            await stream.send_all(
                raw_post(server, message, **{"Mcp-Session-Id": s.session_id or ""})
            )
            answer = b""
            with trio.fail_after(30):
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    answer += await stream.receive_some()
            if answer.startswith(b"HTTP/1.1 409 "):
                refused += 1
        for stream in streams:
            await stream.aclose()
    assert refused == 0, f"{refused} of 200 refused 409"


async def test_a_call_outlives_the_idle_expiry_of_its_disconnected_session(
    small: ServerProcess, database_url: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        s = Session(client, http_url(small), small.token)
        await s.open()
        message = call(5, "exai_test_sleep", seconds=2.0)
        message["params"]["_meta"] = {"progressToken": "hb"}
        async with client.stream(
            "POST", s.url, content=json.dumps(message), headers=s.headers()
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # its first heartbeat: the call runs; the client goes away

    def status() -> list[tuple[Any, ...]]:
        return query(
            database_url,
            "select status, error_message from tasks where session_id = %s",
            (s.session_id,),
        )

    await wait_until(
        lambda: bool(status()) and status()[0][0] not in ("pending", "running"),
        what="the abandoned call's end",
    )
    assert status() == [("completed", None)]


async def test_one_identity_cannot_take_every_http_connection(small: ServerProcess) -> None:
    """Streams that never end by themselves (``subscriptions/listen``, GET) are requests in
    progress: an identity holds at most ``EXAI_HTTP_EXCHANGES_PER_IDENTITY`` of them (429
    beyond), so others still find connections."""
    listen = modern(1, "subscriptions/listen", {"notifications": {"toolsListChanged": True}})
    bob = ServerProcess(small.process, small.url, BOB, small.state_dir, small.stderr_path)
    held = []
    try:
        for _ in range(4):  # EXAI_HTTP_EXCHANGES_PER_IDENTITY, all bob's: each acknowledged
            stream = await open_tcp(small)
            held.append(stream)
            await stream.send_all(raw_post(bob, listen, **_mirrored(listen)))
            acknowledged = b""
            with trio.fail_after(30):
                while b"notifications/subscriptions/acknowledged" not in acknowledged:
                    acknowledged += await stream.receive_some()
            assert acknowledged.startswith(b"HTTP/1.1 200 "), acknowledged[:200]
        async with httpx.AsyncClient(timeout=30) as other:
            one_more = await other.post(
                http_url(small), content=json.dumps(listen), headers=headers(BOB, listen)
            )
            response = await post(other, small, modern(1, "tools/list"))
    finally:
        for stream in held:
            await stream.aclose()
    assert one_more.status_code == 429, one_more.text
    assert "too many requests in progress" in error_of(one_more)["message"]
    assert response.status_code == 200, response.text


def _mirrored(message: dict[str, Any]) -> dict[str, str]:
    return {"MCP-Protocol-Version": MODERN, "Mcp-Method": message["method"]}


async def test_an_unread_response_is_bounded_in_time(small: ServerProcess) -> None:
    """Responses nobody reads: each stream always takes its one message, however large
    (runtime/budget.py's progress rule), so what bounds them is time: past the stall
    timeout (1 s here) with nothing taken, each connection is closed and its bytes given
    back, and it is logged."""
    async with httpx.AsyncClient(timeout=30) as client:
        s = Session(client, http_url(small), small.token)
        await s.open()
    held = []
    try:
        for n in range(4):
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 2048)
            parts = urlsplit(small.url)
            await sock.connect((parts.hostname, parts.port))
            stream = trio.SocketStream(sock)
            held.append(stream)
            message = call(10 + n, "echo", text="x" * 1_000_000)
            await stream.send_all(
                raw_post(small, message, **{"Mcp-Session-Id": s.session_id or ""})
            )
        peak = 0
        with trio.fail_after(30):
            while True:
                status = await fetch(small)
                peak = max(peak, status.node.outgoing_bytes)
                if peak and status.node.outgoing_bytes == 0:
                    break
                await trio.sleep(0.05)
        assert any(event.get("event") == "session.peer_not_reading" for event in small.log_events())
    finally:
        for stream in held:
            await stream.aclose()


async def test_small_unread_responses_are_bounded_in_time(small: ServerProcess) -> None:
    """Pipelined requests whose small responses nobody reads: each response is written in
    one send, with no guard task beside it (endpoint ``_wait_first``); once the socket's
    buffers are full, the one being written is given up past the stall timeout (1 s here),
    and the connection is closed (the client's writes then fail) with its bytes given
    back."""
    async with httpx.AsyncClient(timeout=30) as client:
        s = Session(client, http_url(small), small.token)
        await s.open()
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 2048)
    parts = urlsplit(small.url)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    try:
        with trio.fail_after(60), pytest.raises(trio.BrokenResourceError):
            await pipeline_until_closed(stream, small, s.session_id or "")
        await wait_for_status(
            small,
            lambda status: status.node.outgoing_bytes == 0,
            what="the unread responses' bytes given back",
        )
    finally:
        await stream.aclose()


async def pipeline_until_closed(stream: trio.SocketStream, server: ServerProcess, sid: str) -> None:
    """Echo calls of 20 kB, pipelined, none of their responses read, until the server closes
    the connection (raises ``trio.BrokenResourceError``)."""
    for n in range(1_000_000):
        message = call(100 + n, "echo", text="x" * 20_000)
        await stream.send_all(raw_post(server, message, **{"Mcp-Session-Id": sid}))


# -- what held up ----------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    async with session(server) as s:
        stream = await open_tcp(server)
        async with stream:
            sid = {"Mcp-Session-Id": s.session_id or ""}
            await stream.send_all(
                b"".join(
                    raw_post(server, call(100 + n, "echo", text=str(n)), **sid) for n in range(20)
                )
            )
            received = b""
            with trio.fail_after(30):
                while received.count(b"HTTP/1.1 200 ") < 20 or not received.endswith(b"}"):
                    received += await stream.receive_some()
        ids = [
            json.loads(part.split(b"\r\n\r\n", 1)[1])["id"]
            for part in received.split(b"HTTP/1.1 ")[1:]
        ]
        assert ids == list(range(100, 120))


async def test_concurrent_deletes_end_the_session_once(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        s = Session(client, http_url(server), server.token)
        await s.open()
        statuses: Counter[int] = Counter()

        async def delete() -> None:
            statuses[(await client.delete(s.url, headers=s.headers())).status_code] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(delete)
        assert statuses == Counter({200: 1, 404: 7})


async def test_a_chunked_body_that_never_ends_gets_408(server: ServerProcess) -> None:
    stream = await open_tcp(server)
    async with stream:
        await stream.send_all(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            b"Authorization: Bearer " + server.token.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        answer = b""
        with trio.fail_after(30):
            while not answer:
                with trio.move_on_after(0.1):  # a byte of body now and then: never done
                    answer = bytes(await stream.receive_some())
                if not answer:
                    await stream.send_all(b"1\r\n \r\n")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


async def test_a_burst_of_first_sessionless_requests_starts_one_session(
    server: ServerProcess,
) -> None:
    def sessionless(status: Any) -> int:
        return sum(entry.remote == "http (sessionless)" for entry in status.sessions)

    before = sessionless(await fetch(server))
    statuses: Counter[int] = Counter()
    message = modern(1, "tools/list")
    async with httpx.AsyncClient(timeout=30) as client:

        async def one() -> None:
            response = await client.post(
                http_url(server), content=json.dumps(message), headers=headers(CAROL, message)
            )
            statuses[response.status_code] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert statuses == Counter({200: 20})
    # Carol (this test's alone) now has exactly one.
    assert sessionless(await fetch(server)) == before + 1


async def test_a_delete_cancels_the_calls_in_flight(
    server: ServerProcess, database_url: str
) -> None:
    """DELETE is the client ending its session: a call it cuts short is recorded
    ``cancelled`` (by its client), not ``failed`` as a crash or a stop would be."""
    async with httpx.AsyncClient(timeout=30) as client:
        s = Session(client, http_url(server), server.token)
        await s.open()
        message = call(5, "exai_test_block")
        message["params"]["_meta"] = {"progressToken": "hb"}
        async with trio.open_nursery() as nursery:
            running = trio.Event()

            async def blocked() -> None:
                async with client.stream(
                    "POST", s.url, content=json.dumps(message), headers=s.headers()
                ) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            running.set()  # its first heartbeat: the call runs

            nursery.start_soon(blocked)
            await running.wait()
            assert (await client.delete(s.url, headers=s.headers())).status_code == 200

    def status() -> list[tuple[Any, ...]]:
        return query(
            database_url,
            "select status, error_message from tasks where session_id = %s",
            (s.session_id,),
        )

    await wait_until(
        lambda: bool(status()) and status()[0][0] not in ("pending", "running"),
        what="the blocked call's end",
    )
    assert status() == [("cancelled", "cancelled: its client left (the connection ended)")]
