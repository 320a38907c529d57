"""A node SIGKILLed under load (issue 18 part d): three real ``exai serve`` nodes on one fresh
database, sub-second heartbeats and sweeps.

A client on node A has answers for some calls and has two more in flight (a 2025-11-25 task
that blocks, and a plain call that blocks) when A is SIGKILLed. Then:

* the client reconnects to B with its session id: refused 409 while A still counts as alive
  (its heartbeat is younger than the node timeout), then resumed on B with its negotiated
  state (no ``initialize``; its version's methods answer), the row held by B at epoch 1;
* B and C both sweep: A's two unfinished calls are marked ``interrupted`` exactly once;
* every call the client had an answer for is in the database, ``completed`` (``commit``
  durability: an answer waits for the database's commit, so no answered call is only in the
  dead node's journal).

No sleeps: the rows are other processes', so the test polls them with a deadline.
"""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.chat_support import ALICE
from tests.harness import (
    RawClient,
    ServerProcess,
    call,
    fresh_database,
    open_raw,
    query,
    start_server,
    wait_until,
)
from tests.test_tasks import create, session

CLUSTER = {
    "EXAI_NODE_HEARTBEAT_INTERVAL": "0.1",
    "EXAI_NODE_TIMEOUT": "1.0",
    "EXAI_SWEEP_INTERVAL": "0.1",
    "EXAI_CLIENT_TOKENS": f"alice={ALICE}",
    "EXAI_DURABILITY": "commit",
    "EXAI_RESUME_GRACE": "30",
}
ANSWERED = 5


async def test_a_killed_nodes_session_resumes_elsewhere_and_nothing_answered_is_lost(
    database_url: str, tmp_path: Path
) -> None:
    with fresh_database(database_url) as url:
        start = partial(start_server, database_url=url, extra_env=CLUSTER)
        a = await trio.to_thread.run_sync(start, tmp_path / "a")
        b = await trio.to_thread.run_sync(start, tmp_path / "b")
        c = await trio.to_thread.run_sync(start, tmp_path / "c")
        servers = [a, b, c]
        try:
            a_id = query(url, "select node_id from nodes where pid = %s", (a.process.pid,))[0][0]
            b_id = query(url, "select node_id from nodes where pid = %s", (b.process.pid,))[0][0]
            answered: list[str] = []
            async with session(a, ALICE) as (client, init):
                session_id = init["_meta"]["exai/sessionId"]
                for i in range(ANSWERED):
                    reply = await client.request(
                        "tools/call", {"name": "echo", "arguments": {"text": f"answer {i}"}}
                    )
                    assert reply["result"]["content"][0]["text"] == f"answer {i}"
                    answered.append(f"answer {i}")
                task = await create(client, "exai_test_block")
                await client.send(call("in-flight", "exai_test_block"))
                await wait_until(
                    lambda: _calls_in_flight(url, a_id) == 2,
                    what="A's heartbeat with both calls in flight",
                )
                a.process.send_signal(signal.SIGKILL)
                assert await trio.to_thread.run_sync(a.process.wait) == -signal.SIGKILL
                with pytest.raises(ConnectionClosed):
                    await client.receive()  # gone: nothing more is answered

            # Reconnect to B until A counts as dead there (409 until then: its heartbeat is
            # younger than the node timeout); the retry pause is a client's, not a wait.
            conflicts = 0
            with trio.fail_after(30):
                while (refused := await _attempt(b, session_id, task["taskId"])) is not None:
                    assert refused == 409
                    conflicts += 1
                    await trio.sleep(0.05)
            assert query(
                url, "select node_id, epoch from sessions where session_id = %s", (session_id,)
            ) == [(b_id, 1)]
            claimed = [e for e in b.log_events() if e["event"] == "session.claimed"]
            assert [(e["session_id"], e["from_node"]) for e in claimed] == [(session_id, a_id)]

            # A's unfinished calls: interrupted exactly once, by B or C.
            await wait_until(
                lambda: (
                    query(url, "select stopped_at from nodes where node_id = %s", (a_id,))[0][0]
                    is not None
                ),
                what="A swept",
            )
            assert query(
                url,
                "select status, version from tasks where node_id = %s and status <> 'completed'",
                (a_id,),
            ) == [("interrupted", 3), ("interrupted", 3)]
            swept = query(url, "select swept_tasks from nodes where node_id = %s", (a_id,))
            assert swept == [(2,)]
            # Every call the client had an answer for is in the database.
            completed = query(
                url,
                "select result from tasks where session_id = %s and node_id = %s"
                " and status = 'completed' order by created_at",
                (session_id, a_id),
            )
            assert [r[0]["content"][0]["text"] for r in completed] == answered
        finally:
            for server in servers:
                if server.process.poll() is None:
                    assert await trio.to_thread.run_sync(server.stop) == 0


def _resume(server: ServerProcess, session_id: str) -> Any:
    return open_raw(
        server.authed_url(ALICE), extra_headers=[(b"mcp-session-id", session_id.encode())]
    )


async def _attempt(server: ServerProcess, session_id: str, task_id: str) -> int | None:
    """One resume on ``server``: the refusal's status, or ``None`` once resumed and checked."""
    try:
        async with _resume(server, session_id) as ws:
            await _goes_on(RawClient(ws), task_id)
    except ConnectionRejected as refused:
        return int(refused.status_code)
    return None


async def _goes_on(client: RawClient, task_id: str) -> None:
    """The resumed session, without ``initialize``: its 2025-11-25 methods answer."""
    got = await client.request("tasks/get", {"taskId": task_id})
    assert got["result"]["status"] in ("working", "failed"), got
    echoed = await client.request("tools/call", {"name": "echo", "arguments": {"text": "on B"}})
    assert echoed["result"]["content"][0]["text"] == "on B"


def _calls_in_flight(url: str, node_id: str) -> int:
    rows = query(url, "select snapshot from nodes where node_id = %s", (node_id,))
    snapshot = rows[0][0] if rows else None
    return int((snapshot or {}).get("calls_in_flight", 0))
