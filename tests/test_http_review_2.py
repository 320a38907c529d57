"""A third hostile client's review of Streamable HTTP and MCP Tasks, over real sockets to a
real ``exai serve`` on a real Postgres.

Each test is a defect the review found, written before its fix; the rule it enforces is
named in its docstring with its source. One server serves the module: at most one task per
client identity (``EXAI_MAX_TASKS_PER_IDENTITY=1``), every task-capable call of a 2026-07-28
request that declares the Tasks extension answered with its task at once
(``EXAI_TASK_AFTER=0``), and a team tool that can only run as a task
(tests/user_tools/task_only_tools.py).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import trio

from runtime.mcp import jsonrpc
from runtime.streamable_http.session_transport import HttpSessionTransport, StreamBounds
from tests.harness import (
    ServerProcess,
    fetch,
    query,
    start_server,
    wait_for_status,
    wait_until,
)
from tests.test_http_hostile_review import head_of, open_tcp, read_until, statuses
from tests.test_streamable_http import ACCEPT, http_url, initialize
from tests.test_tasks_extension import call, post, request, result_of
from tests.test_tool_api import USER_TOOLS

# Identities of this module alone: the test database is shared by every module, whose tests
# read tasks rows by identity.
ANN, ANN_TOKEN = "review2-ann", "ann-token-for-the-third-http-review"
CAROL, CAROL_TOKEN = "review2-carol", "carol-token-for-the-third-http-review"
DAVE, DAVE_TOKEN = "review2-dave", "dave-token-for-the-third-http-review"


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("http-review-2")
    config = state / "exai.toml"
    config.write_text(
        f'[tools]\npath = [{json.dumps(str(USER_TOOLS))}]\nmodules = ["task_only_tools"]\n'
    )
    handle = start_server(
        state / "state",
        database_url=database_url,
        extra_env={
            "EXAI_CONFIG": str(config),
            "EXAI_CLIENT_TOKENS": f"{ANN}={ANN_TOKEN},{CAROL}={CAROL_TOKEN},{DAVE}={DAVE_TOKEN}",
            "EXAI_MAX_TASKS_PER_IDENTITY": "1",
            "EXAI_TASK_AFTER": "0",
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def plain_headers(token: str, session_id: str | None = None) -> dict[str, str]:
    fields = {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "Content-Type": "application/json",
        "MCP-Protocol-Version": "2025-11-25",
    }
    if session_id is not None:
        fields["Mcp-Session-Id"] = session_id
    return fields


def error_body(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert "error" in body, body
    error: dict[str, Any] = body["error"]
    return error


async def test_refused_calls_are_logged_once_per_kind_and_counted_exactly(
    server: ServerProcess, database_url: str
) -> None:
    """A client can send refused calls as fast as it likes; the log must not take one line
    for each (``runtime/log_throttle.py``: what a peer can trigger at will is logged at
    most once per key and period), while the counters stay exact: the session actor's
    ``messages_failed`` (status, the ``exai_actor_messages_failed_total`` metric) for calls
    it would not admit, the session row's ``tool_errors`` for arguments that do not parse."""
    refused, invalid = 60, 30
    async with httpx.AsyncClient(timeout=30) as client:
        opened = await client.post(
            http_url(server), content=json.dumps(initialize()), headers=plain_headers(ANN_TOKEN)
        )
        assert opened.status_code == 200, opened.text
        session_id = opened.headers["mcp-session-id"]
        headers = plain_headers(ANN_TOKEN, session_id)
        started = trio.current_time()
        try:
            for n in range(refused):
                message = {
                    "jsonrpc": "2.0",
                    "id": n + 10,
                    "method": "tools/call",
                    "params": {"name": "no_such_tool", "arguments": {}},
                }
                answer = await client.post(
                    http_url(server), content=json.dumps(message), headers=headers
                )
                assert error_body(answer)["code"] == -32602, answer.text
            for n in range(invalid):
                # Arguments that do not parse: the tool never runs (2025-11-25 answers them
                # with an isError result, SEP-1303).
                message = {
                    "jsonrpc": "2.0",
                    "id": n + 1000,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": {"not": "text"}}},
                }
                answer = await client.post(
                    http_url(server), content=json.dumps(message), headers=headers
                )
                assert answer.json()["result"]["isError"] is True, answer.text
            elapsed = trio.current_time() - started
            path = f"/root/sessions/{session_id}"
            status = await fetch(server)
            [actor] = [a for a in status.actors if a.path == path]
            assert actor.messages_failed == refused
        finally:
            await client.delete(http_url(server), headers=headers)
    # The calls whose arguments did not parse are the session's tool errors, on its row.
    await wait_until(
        lambda: (
            query(
                database_url,
                "select tool_errors from sessions where session_id = %s and closed_at is not null",
                (session_id,),
            )
            == [(invalid,)]
        ),
        what="the session's row to count every call refused for its arguments",
    )
    lines = [
        event
        for event in server.log_events()
        if event.get("event") == "actor.message"
        and event.get("session_id") == session_id
        and event.get("outcome") == "error"
    ]
    # At most one line per kind and 10 s period of the throttle (and one for the period it
    # began in): two kinds here, an unknown tool and arguments that do not parse.
    bound = 2 + int(elapsed // 10)
    unknown = [line for line in lines if "unknown tool" in line["error"]]
    unparsed = [line for line in lines if line not in unknown]
    assert 1 <= len(unknown) <= bound, unknown
    assert 1 <= len(unparsed) <= bound, unparsed


async def test_past_the_task_bound_an_optional_tool_runs_as_a_plain_call(
    server: ServerProcess, database_url: str
) -> None:
    """SEP-2663 ("Tasks Extension"): a server that negotiated the extension "MAY return
    CreateTaskResult in lieu of a standard result ... at its own discretion and on a
    per-request basis. The server is the sole decider". Past ``EXAI_MAX_TASKS_PER_IDENTITY``
    a declaring call to a tool that can be answered plainly (``optional``) is therefore run
    as a plain call, not refused; a tool that can only be answered with a task
    (``required``) is still refused with -32005."""
    async with httpx.AsyncClient(timeout=30) as client:
        held = result_of(
            await post(client, server, call("held", "exai_test_block"), token=CAROL_TOKEN)
        )
        assert held["resultType"] == "task", held
        try:
            plain = result_of(
                await post(client, server, call("plain", "echo", text="plainly"), token=CAROL_TOKEN)
            )
            assert plain["resultType"] == "complete", plain
            assert plain["content"][0]["text"] == "plainly"
            refused = await post(
                client, server, call("only", "task_only_echo", text="x"), token=CAROL_TOKEN
            )
            assert refused.status_code == 200, refused.text
            error = error_body(refused)
            assert error["code"] == -32005, error
            assert error["data"] == {"limit": "tasks_per_identity", "max": 1}
        finally:
            cancel = request("c", "tasks/cancel", {"taskId": held["taskId"]})
            assert "error" not in (await post(client, server, cancel, token=CAROL_TOKEN)).json()
        # The echo ran as a plain call: its row is not a task's.
        rows = query(
            database_url,
            "select augmented from tasks where tool_name = 'echo' and session_id ="
            " (select session_id from tasks where id = %s)",
            (held["taskId"],),
        )
        assert rows == [(False,)], rows


async def test_a_cancelled_tasks_status_names_its_cause_and_no_internal_id(
    server: ServerProcess, database_url: str
) -> None:
    """A sessionless (2026-07-28) client's session id is the server's own, never given to a
    client (docs/operations.md, Streamable HTTP): the ``statusMessage`` of a task it
    cancelled says what cancelled it (``tasks/cancel``), and names no session."""
    async with httpx.AsyncClient(timeout=30) as client:
        held = result_of(
            await post(client, server, call("held", "exai_test_block"), token=DAVE_TOKEN)
        )
        task_id = held["taskId"]
        cancel = request("c", "tasks/cancel", {"taskId": task_id})
        assert "error" not in (await post(client, server, cancel, token=DAVE_TOKEN)).json()
        got = result_of(
            await post(
                client, server, request("g", "tasks/get", {"taskId": task_id}), token=DAVE_TOKEN
            )
        )
    assert got["status"] == "cancelled", got
    [(session_id,)] = query(database_url, "select session_id from tasks where id = %s", (task_id,))
    assert session_id not in got["statusMessage"], got
    assert "session" not in got["statusMessage"], got
    assert "tasks/cancel" in got["statusMessage"], got


async def test_a_websocket_upgrade_on_a_kept_alive_connection_is_refused(
    server: ServerProcess,
) -> None:
    """RFC 6455 section 4.1: a WebSocket client "MUST" send its opening handshake once "a
    connection to the server has been established", i.e. as the first request of a new
    connection, which is where this server upgrades (``runtime.http_dispatch``). The same
    upgrade as a later request of a kept-alive HTTP/1.1 connection is not served as a plain
    GET: 400 with a JSON-RPC error (-32600, as for any head the MCP port refuses), and the
    connection is closed."""
    message = request(1, "tools/list", declares=False)
    body = json.dumps(message).encode()
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        "GET /mcp HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.token}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mcp\r\n\r\n"
    ).encode()
    stream = await open_tcp(server)
    async with stream:
        await stream.send_all(head_of(server, message, body) + body)
        first = await read_until(stream, lambda got: b'"tools"' in got and got.endswith(b"}"))
        assert statuses(first) == [200], first[:300]
        await stream.send_all(upgrade)
        rest = await read_until(stream, lambda got: False)  # to the server's close
    assert statuses(rest) == [400], rest[:300]
    assert b"connection: close" in rest.lower()
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == -32600, error
    assert "WebSocket" in error["message"], error


async def test_a_task_whose_handle_never_reached_its_client_is_cancelled(
    server: ServerProcess, database_url: str
) -> None:
    """A 2026-07-28 task is known to its client only by the ``CreateTaskResult`` that names
    it (SEP-2663 has no ``tasks/list``). If the response stream closes before that handle is
    written, nobody can ever poll, update or cancel the task: it is cancelled, as a request
    whose stream closed before its answer is (2026-07-28 transport spec, "Cancellation").

    Deterministic: the ``tasks`` table is locked, so the task's row cannot be written (a
    task is created only once its row is in the database); the client sends its call and
    closes its connection; once the server has let go of that connection the lock is
    released, the task starts and its handle finds its stream gone."""
    async with httpx.AsyncClient(timeout=30) as client:  # the identity's session, started
        listed = await post(client, server, request(0, "tools/list"), token=ANN_TOKEN)
        assert listed.status_code == 200, listed.text
    message = call("orphan", "exai_test_block")
    body = json.dumps(message).encode()
    head = head_of(
        server,
        message,
        body,
        **{"Mcp-Name": "exai_test_block", "Authorization": f"Bearer {ANN_TOKEN}"},
    )
    with psycopg.connect(database_url) as lock:
        lock.execute("lock table tasks in share row exclusive mode")
        stream = await open_tcp(server)
        await stream.send_all(head + body)
        await stream.aclose()
        await wait_for_status(
            server,
            lambda status: status.listener is not None and status.listener.http_connections == 0,
            what="the server to let go of the closed connection",
        )
        lock.rollback()

    def orphan() -> list[tuple[Any, ...]]:
        return query(
            database_url,
            "select status, error_message, session_id from tasks"
            " where identity = %s and tool_name = 'exai_test_block'",
            (ANN,),
        )

    await wait_until(
        lambda: [row[0] for row in orphan()] == ["cancelled"],
        what="the orphaned task recorded cancelled",
        within=20,
    )
    [(_, why, session_id)] = orphan()
    assert "stream" in why, why
    assert session_id not in why, why


async def test_a_queued_handle_that_is_never_written_is_reported_lost() -> None:
    """The transport's side of the previous test, for the handle that was already queued
    when the stream closed: a response queued on a stream whose exchange ends before writing
    it is reported lost, once; one written is not."""
    bounds = StreamBounds(max_bytes=1 << 20, max_messages=16, stall_timeout=30, node=None)
    transport = HttpSessionTransport("s", "bob", bounds, sessionless=True)
    lost: list[str] = []
    queued = transport.open_stream("a")
    transport.watch_delivery(queued.request_id, lambda: lost.append("a"))
    await transport.send(jsonrpc.encode_result(queued.request_id, {}), queued.request_id)
    assert queued.answered
    assert lost == []
    transport.release(queued)  # its connection closed before the writer took it
    assert lost == ["a"]
    transport.release(queued)
    assert lost == ["a"]
    written = transport.open_stream("b")
    transport.watch_delivery(written.request_id, lambda: lost.append("b"))
    await transport.send(jsonrpc.encode_result(written.request_id, {}), written.request_id)
    written.delivered()
    transport.release(written)
    assert lost == ["a"]
    # A stream already over is reported at once.
    gone = transport.open_stream("c")
    transport.release(gone)
    transport.watch_delivery(gone.request_id, lambda: lost.append("c"))
    assert lost == ["a", "c"]
