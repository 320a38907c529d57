"""Issue 12, item 6: ``GET /healthz`` and ``GET /readyz`` on the MCP port, with no token.

Over real sockets to a real ``exai serve``: each answers one status word (text/plain) and
closes the connection; other plain requests are refused (404, 405, 400; ``/mcp`` without a
token gets 401: it is Streamable HTTP's endpoint too) while WebSocket sessions go on sharing
the port; and ``/readyz`` follows the database: a Postgres crashed under the server turns it
to 503 ``database unavailable`` once the persistence actor's breaker opens, and back to 200
once the database is back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.harness import RawClient, ServerProcess, open_raw, own_postgres, start_server, wait_until


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(tmp_path_factory.mktemp("health"), database_url=database_url)
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def http_url(server: ServerProcess, path: str) -> str:
    """The plain-HTTP URL of ``path`` on the server's MCP port."""
    parts = urlsplit(server.url)
    return f"http://{parts.netloc}{path}"


def probe(server: ServerProcess, path: str) -> tuple[int, str]:
    """``GET path`` without any token: its status code and body."""
    response = httpx.get(http_url(server, path))
    return response.status_code, response.text


async def test_healthz_and_readyz_answer_a_status_word_without_a_token(
    server: ServerProcess,
) -> None:
    async with httpx.AsyncClient() as client:
        for path in ("/healthz", "/readyz"):
            response = await client.get(http_url(server, path))
            assert (response.status_code, response.text) == (200, "ok"), path
            assert response.headers["content-type"].startswith("text/plain")
            assert response.headers["connection"] == "close"
            assert response.headers["cache-control"] == "no-store"
    # The port still serves MCP: the upgrade goes on to the WebSocket server as before.
    async with open_raw(server.authed_url()) as ws:
        assert (await RawClient(ws).request("ping"))["result"] == {}


async def test_other_plain_requests_are_refused(server: ServerProcess) -> None:
    async with httpx.AsyncClient() as client:
        mcp = await client.get(http_url(server, "/mcp"))
        assert mcp.status_code == 401  # Streamable HTTP, no token
        assert mcp.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get(http_url(server, "/status"))).status_code == 404
        posted = await client.post(http_url(server, "/readyz"))
        assert (posted.status_code, posted.headers["allow"]) == (405, "GET")
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_readyz_is_503_while_the_database_is_down(tmp_path: Path) -> None:
    with own_postgres() as postgres:
        url = postgres.start()
        server = start_server(tmp_path / "state", database_url=url)
        try:
            assert probe(server, "/readyz") == (200, "ok")
            await trio.to_thread.run_sync(postgres.crash)
            # A session's first write meets the dead database and opens the breaker (the
            # record goes to the journal), without waiting for the next heartbeat.
            async with open_raw(server.authed_url()) as ws:
                await RawClient(ws).initialize()
            await wait_until(
                lambda: probe(server, "/readyz") == (503, "database unavailable"),
                what="/readyz to say the database is unavailable",
            )
            assert probe(server, "/healthz") == (200, "ok")  # alive all the same
            await trio.to_thread.run_sync(postgres.start)
            await wait_until(
                lambda: probe(server, "/readyz") == (200, "ok"),
                what="/readyz to be ready again once the database is back",
            )
        finally:
            assert server.stop() == 0, server.stderr_path.read_text()[-3000:]
