"""A second hostile client's review of Streamable HTTP and MCP Tasks (issue 15), over real
sockets to a real ``exai serve`` on a real Postgres.

Each test is a bug the review found, written before its fix: the rule it enforces is
named in its docstring, with the words of its source (RFC 9110 / 9112 for HTTP itself, the
MCP transport spec for the rest). What held up under the same review (ids, bodies, heads,
task bounds, cancel storms, another identity's tasks, DELETE races) is in the review's
report; most of it is covered by tests/test_streamable_http_review.py already.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.harness import ServerProcess, start_server
from tests.test_streamable_http import ACCEPT, BOB, error_of, http_url, initialize
from tests.test_streamable_http_modern import MODERN, modern

CAROL = "carol-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-hostile"),
        database_url=database_url,
        # A body that never comes is refused (408) after this: what a server that never
        # answers ``Expect: 100-continue`` leaves its client with.
        # Two HTTP sessions per identity: a place held by a session that should not be
        # (or no longer be) there shows at once as 429 on the next initialize.
        extra_env={
            "EXAI_HANDSHAKE_TIMEOUT": "2",
            "EXAI_CLIENT_TOKENS": f"bob={BOB},carol={CAROL}",
            "EXAI_HTTP_SESSIONS_PER_IDENTITY": "2",
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def open_tcp(server: ServerProcess) -> trio.SocketStream:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


def head_of(server: ServerProcess, message: dict[str, Any], body: bytes, **extra: str) -> bytes:
    """The head of a 2026-07-28 POST of ``message`` (``body`` its bytes), as a client sends it."""
    fields = {
        "Host": "x",
        "Authorization": f"Bearer {server.token}",
        "Content-Type": "application/json",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": message["method"],
        "Content-Length": str(len(body)),
        **extra,
    }
    return (
        "POST /mcp HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    ).encode()


async def read_until(stream: trio.SocketStream, done: Any) -> bytes:
    """Bytes from ``stream`` until ``done(received)`` or the peer closes."""
    received = b""
    while not done(received):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        received += data
    return received


def statuses(received: bytes) -> list[int]:
    """The status code of every response in ``received`` (heads start lines)."""
    return [
        int(line.split(b" ")[1])
        for line in received.split(b"\r\n")
        if line.startswith(b"HTTP/1.1 ")
    ]


async def test_expect_100_continue_is_answered_before_the_body(server: ServerProcess) -> None:
    """RFC 9110 section 10.1.1: an origin server that receives ``Expect: 100-continue`` "MUST
    send either an immediate response with a final status code ... or an immediate 100
    (Continue) response to encourage the client to send the request content". curl sends
    it for every body over 1 MiB and waits a second for the 100 before sending anyway; a
    client that waits for it longer (as the RFC allows) waits for the body deadline: 408."""
    message = modern(1, "tools/call", {"name": "echo", "arguments": {"text": "continued"}})
    body = json.dumps(message).encode()
    head = head_of(server, message, body, **{"Mcp-Name": "echo", "Expect": "100-continue"})
    stream = await open_tcp(server)
    async with stream:
        await stream.send_all(head)
        interim = await read_until(stream, lambda got: b"\r\n\r\n" in got)
        assert statuses(interim)[:1] == [100], interim[:200]
        await stream.send_all(body)
        answered = await read_until(stream, lambda got: b'"continued"' in got)
    assert statuses(interim + answered) == [100, 200], answered[:300]


async def test_a_malformed_request_after_a_first_one_is_answered_400(
    server: ServerProcess,
) -> None:
    """RFC 9112 section 2.2: a server that receives octets that are not an HTTP message
    "SHOULD respond with a 400 (Bad Request) response and close the connection" (and a head
    over the size bound gets 431, RFC 6585), on a kept-alive connection's second request as
    on its first: the client is told why, not reset. (Found by this review and fixed on
    main meanwhile, by ``runtime.http_dispatch.refuse_head``; kept as its test over a
    socket.)"""
    message = modern(1, "tools/list")
    body = json.dumps(message).encode()
    for bad, status in (
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ):
        stream = await open_tcp(server)
        async with stream:
            await stream.send_all(head_of(server, message, body) + body)
            first = await read_until(stream, lambda got: b'"tools"' in got and got.endswith(b"}"))
            assert statuses(first) == [200]
            await stream.send_all(bad)
            rest = await read_until(stream, lambda got: False)  # to the server's close
        assert statuses(rest) == [status], rest[:300]
        assert b"connection: close" in rest.lower()
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == -32600


def plain_headers(token: str, session_id: str | None = None) -> dict[str, str]:
    fields = {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
    }
    if session_id is not None:
        fields["Mcp-Session-Id"] = session_id
    return fields


async def test_a_failed_initialize_establishes_no_session(server: ServerProcess) -> None:
    """2025-11-25 transport spec, "Session Management": the server "MAY assign a session ID
    at initialization time, by including it in an MCP-Session-Id header on the HTTP
    response containing the InitializeResult". An ``initialize`` answered with an error
    establishes nothing: no id is named, and no session is left behind to hold one of the
    identity's places (``EXAI_HTTP_SESSIONS_PER_IDENTITY``, here 2) until the idle expiry
    (1 h), which a client retrying a bad ``initialize`` would otherwise exhaust."""
    bad = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):
            refused = await client.post(
                http_url(server), content=json.dumps(bad), headers=plain_headers(CAROL)
            )
            assert refused.status_code == 200, refused.text
            assert error_of(refused)["code"] == -32602
            assert "mcp-session-id" not in refused.headers
        opened = await client.post(
            http_url(server), content=json.dumps(initialize()), headers=plain_headers(CAROL)
        )
        assert opened.status_code == 200, opened.text
        session_id = opened.headers["mcp-session-id"]
        ended = await client.delete(http_url(server), headers=plain_headers(CAROL, session_id))
        assert ended.status_code == 200


async def test_a_deleted_sessions_place_is_free_when_delete_is_answered(
    server: ServerProcess,
) -> None:
    """The per-identity bound counts the sessions a client holds; once its DELETE is
    answered (2025-11-25 transport spec: the client "SHOULD send an HTTP DELETE ... to
    explicitly terminate the session") it holds one fewer, so an ``initialize`` sent right
    after is not refused with 429 for a session that has ended (its end being recorded in
    the database behind the answer)."""
    async with httpx.AsyncClient(timeout=30) as client:

        async def open_one() -> str:
            opened = await client.post(
                http_url(server), content=json.dumps(initialize()), headers=plain_headers(BOB)
            )
            assert opened.status_code == 200, opened.text
            return opened.headers["mcp-session-id"]

        kept = await open_one()
        current = await open_one()  # the identity's two places are taken
        for _ in range(10):
            ended = await client.delete(http_url(server), headers=plain_headers(BOB, current))
            assert ended.status_code == 200
            current = await open_one()
        for session_id in (kept, current):
            await client.delete(http_url(server), headers=plain_headers(BOB, session_id))


async def test_a_mirrored_number_is_compared_as_its_decimal_text(server: ServerProcess) -> None:
    """2026-07-28 transport spec, "Value Encoding": the client converts the value to its
    string representation ("integer: Convert to decimal string representation", "boolean:
    Convert to lowercase"), and the server compares the header with the body after
    decoding. A well-mirrored ``taskId: 123`` is therefore no header mismatch (which read
    "Mcp-Name '123' differs from the body's '123'"): the request goes on, and is refused
    for what is wrong with it, a task id that is not a string (-32602)."""
    extension = {"extensions": {"io.modelcontextprotocol/tasks": {}}}
    message = modern(1, "tasks/get", {"taskId": 123})
    message["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = extension
    tool = modern(2, "tools/call", {"name": True, "arguments": {}})
    async with httpx.AsyncClient(timeout=30) as client:
        for request, mirrored in ((message, "123"), (tool, "true")):
            answered = await client.post(
                http_url(server),
                content=json.dumps(request),
                headers={
                    **plain_headers(server.token),
                    "MCP-Protocol-Version": MODERN,
                    "Mcp-Method": request["method"],
                    "Mcp-Name": mirrored,
                },
            )
            assert answered.status_code == 200, answered.text
            assert error_of(answered)["code"] == -32602, answered.text
        # A header that does not mirror the value is still a mismatch.
        wrong = await client.post(
            http_url(server),
            content=json.dumps(message),
            headers={
                **plain_headers(server.token),
                "MCP-Protocol-Version": MODERN,
                "Mcp-Method": "tasks/get",
                "Mcp-Name": "124",
            },
        )
        assert (wrong.status_code, error_of(wrong)["code"]) == (400, -32020)


def forged_cursor(offset: str) -> str:
    """A cursor of the server's own shape (runtime/mcp/paging.py) with ``offset`` in it."""
    return base64.urlsafe_b64encode(f"exai:v1:{offset}".encode()).decode().rstrip("=")


async def test_a_forged_cursor_is_refused_as_invalid_params(server: ServerProcess) -> None:
    """A cursor is opaque and the server refuses one it did not issue: -32602 (MCP
    ``server/utilities/pagination``: "Invalid cursors SHOULD result in an error with code
    -32602"). Two forged ones got something else: a Unicode digit (``"²"``, a digit to
    ``str.isdigit`` but not to ``int``) crashed the session actor (-32001, a traceback in the
    log, and for a sessionless client the session every client of its identity shares); an
    offset past Postgres's bigint was -32004 "tasks are unavailable; retry later"."""
    async with httpx.AsyncClient(timeout=30) as client:
        opened = await client.post(
            http_url(server), content=json.dumps(initialize()), headers=plain_headers(CAROL)
        )
        session_id = opened.headers["mcp-session-id"]
        headers = {**plain_headers(CAROL, session_id), "MCP-Protocol-Version": "2025-11-25"}
        try:
            for request_id, offset in enumerate(("\u00b2", "1" * 40), start=1):
                for method in ("tasks/list", "tools/list"):
                    message = {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": method,
                        "params": {"cursor": forged_cursor(offset)},
                    }
                    refused = await client.post(
                        http_url(server), content=json.dumps(message), headers=headers
                    )
                    assert error_of(refused)["code"] == -32602, (method, offset, refused.text)
            listed = modern(9, "tools/list", {"cursor": forged_cursor("\u00b2")})
            refused = await client.post(
                http_url(server),
                content=json.dumps(listed),
                headers={
                    **plain_headers(CAROL),
                    "MCP-Protocol-Version": MODERN,
                    "Mcp-Method": "tools/list",
                },
            )
            assert error_of(refused)["code"] == -32602, refused.text
        finally:
            await client.delete(http_url(server), headers=plain_headers(CAROL, session_id))
    assert not [e for e in server.log_events() if e.get("event") == "child.crashed"]
