"""A hostile review of Streamable HTTP's hot path (issue 17, part 3: one guard task per
written stream, none for a small lone response), over real sockets to a real ``exai serve``.

A peer that stops reading its connection once it has sent more than ``MAX_EARLY_BYTES``
after its request is no longer watched by reads (``HttpWire.watch_peer`` then waits for the
stream's end only): its reset is first seen by a write, which raises ``PeerGone`` inside the
writer's nursery, where trio wraps it in an exception group.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from runtime.streamable_http.wire import MAX_EARLY_BYTES
from tests.harness import ServerProcess, fetch, query, start_server, wait_for_status, wait_until
from tests.test_streamable_http_modern import headers, modern
from tests.test_streamable_http_review import open_tcp, raw_post


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-hot-review"),
        database_url=database_url,
        extra_env={"EXAI_HEARTBEAT_INTERVAL": "0.2", "EXAI_HTTP_KEEPALIVE": "0.3"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def _padding() -> bytes:
    """A pipelined request whose body is more than the server keeps while it writes a
    response: its watch stops reading, and waits for the connection's end."""
    size = 3 * MAX_EARLY_BYTES
    head = (
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    )
    return head.encode() + b" " * size


def _reset(stream: trio.SocketStream) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed client's kernel would."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await stream.receive_some(65536)
        assert chunk, seen
        seen += chunk
    return seen


def _failures(server: ServerProcess) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == "connection.failed"]


async def test_a_reset_seen_by_a_write_cancels_a_sessionless_request(
    server: ServerProcess, database_url: str
) -> None:
    """2026-07-28: closing a response stream cancels its request, however the server learns
    of it. Here it learns by the failed write of a progress notification on the SSE stream
    (its guard no longer reads the socket): the call must end cancelled, and the reset is
    the peer's doing, not a failure logged with a traceback."""
    [(started,)] = query(database_url, "select now()")
    message = modern(
        "reset",
        "tools/call",
        {"name": "exai_test_block", "arguments": {}, "_meta": {"progressToken": "hb"}},
    )
    stream = await open_tcp(server)
    await stream.send_all(raw_post(server, message, **_mirrored(server, message)) + _padding())
    seen = await _read_until(stream, b"notifications/progress")
    assert b"text/event-stream" in seen
    _reset(stream)
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
        what="the call whose stream was reset recorded cancelled",
    )
    assert not _failures(server), _failures(server)


async def test_a_reset_seen_by_a_write_ends_a_listen_stream_quietly(
    server: ServerProcess,
) -> None:
    """``subscriptions/listen``: a keep-alive written to a reset peer ends the stream as the
    peer's doing, not as a failure logged with a traceback."""
    message = modern("listen", "subscriptions/listen", {"notifications": {}})
    stream = await open_tcp(server)
    await stream.send_all(raw_post(server, message, **_mirrored(server, message)) + _padding())
    await _read_until(stream, b"notifications/subscriptions/acknowledged")
    _reset(stream)
    # The next keep-alive (EXAI_HTTP_KEEPALIVE) finds the reset, and the connection ends.
    await wait_for_status(
        server, lambda status: status.listener.http_connections == 0, what="the connection closed"
    )
    await _log_barrier(server)
    assert not _failures(server), _failures(server)
    assert (await fetch(server)).listener.connections_failed == 0


async def _log_barrier(server: ServerProcess) -> None:
    """Wait until the server has logged a refusal asked after everything before it: what it
    logged earlier is in the log by then (one writer, in order)."""
    stream = await open_tcp(server)
    await stream.send_all(b"DELETE /mcp HTTP/1.1\r\nHost: x\r\n\r\n")
    await _read_until(stream, b"\r\n\r\n")
    await stream.aclose()
    await wait_until(
        lambda: any(
            e.get("event") == "http.refused" and e.get("status") == 401 for e in server.log_events()
        ),
        what="the barrier's refusal logged",
    )


def _mirrored(server: ServerProcess, message: dict[str, Any]) -> dict[str, str]:
    fields = headers(server.token, message)
    for name in ("Authorization", "Accept", "Content-Type"):
        fields.pop(name)
    return fields
