"""Anything on any node (issue 18 part d): two real ``exai serve`` nodes, A and B, on one fresh
database, and a client that moves between them.

* a task created on A is read on B (``tasks/get``, ``tasks/result``, ``tasks/list``), and not
  by another identity; a chat thread started on A continues on B;
* a WebSocket session parked on A (alive) is resumed on B with its negotiated state; when the
  client comes back to A, A finds its copy stale, drops it and claims the session from B;
  B's stale copy, expiring, writes no end over the session A now runs;
* another identity's resume of it is refused 404 on either node and changes nothing;
* a 2025-era HTTP session taken over by B and then DELETEd on A (whose copy is stale) ends
  everywhere;
* 2026-07-28 requests (no session) need no stickiness: a task created over HTTP on A is read
  over HTTP on B.

The three-node scenario (a node SIGKILLed under load) is ``test_anynode_kill.py``.
No sleeps: rows are written by other processes, so the test polls them with a deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected

from tests.chat_support import ALICE, BOB, Caller, provider_table, upstream_thread, write_config
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import (
    RawClient,
    ServerProcess,
    fresh_database,
    open_raw,
    query,
    start_server,
    wait_until,
)
from tests.test_streamable_http import Session as HttpSession
from tests.test_streamable_http import call as http_call
from tests.test_streamable_http import http_url
from tests.test_tasks import create, session
from tests.test_tasks_extension import call, post, request, result_of

GOING_AWAY = 1001
GRACE = 3.0  # seconds: B's stale copy expires within the test


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def cluster(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess, ServerProcess]]:
    """The database's URL, node A and node B."""
    with fresh_database(database_url) as url:
        nodes: list[ServerProcess] = []
        try:
            for name in ("a", "b"):
                state = tmp_path_factory.mktemp(f"anynode-{name}")
                providers = '[upstream]\ndefault_provider = "fake"\n' + provider_table(
                    "fake", upstream.base_url, "fake-model"
                )
                config = write_config(state / "exai.toml", providers=providers)
                nodes.append(
                    start_server(
                        state,
                        database_url=url,
                        extra_env={
                            "EXAI_CONFIG": str(config),
                            "EXAI_RESUME_GRACE": str(GRACE),
                            "EXAI_TASK_AFTER": "0",
                            # How often a node ends its HTTP session copies ended elsewhere.
                            "EXAI_SWEEP_INTERVAL": "0.2",
                        },
                    )
                )
            yield url, nodes[0], nodes[1]
        finally:
            for node in nodes:
                assert node.stop() == 0, node.stderr_path.read_text()


def _session_state(url: str, session_id: str) -> dict[str, Any]:
    rows = query(
        url,
        "select node_id, epoch, parked_until is not null, status, identity, log_level,"
        " protocol_version from sessions where session_id = %s",
        (session_id,),
    )
    assert rows, session_id
    names = ["node_id", "epoch", "parked", "status", "identity", "log_level", "protocol_version"]
    return dict(zip(names, rows[0], strict=True))


def _parked(url: str, session_id: str) -> bool:
    """Whether the session's row is written and parked (the row is written behind)."""
    rows = query(
        url, "select parked_until is not null from sessions where session_id = %s", (session_id,)
    )
    return bool(rows and rows[0][0])


def _resume(server: ServerProcess, token: str, session_id: str) -> Any:
    return open_raw(
        server.authed_url(token), extra_headers=[(b"mcp-session-id", session_id.encode())]
    )


async def _refused(server: ServerProcess, token: str, session_id: str) -> int:
    with pytest.raises(ConnectionRejected) as refused:
        async with _resume(server, token, session_id):
            pass
    return int(refused.value.status_code)


# -- tasks and threads ------------------------------------------------------------------------


async def test_a_task_created_on_one_node_is_read_on_another_by_its_identity_only(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    _, a, b = cluster
    async with session(a, ALICE) as (on_a, _):
        task = await create(on_a, "echo", text="made on A")
        task_id = task["taskId"]
    async with session(b, ALICE) as (on_b, _):
        got = await on_b.request("tasks/get", {"taskId": task_id})
        assert got["result"]["taskId"] == task_id, got
        result = await on_b.request("tasks/result", {"taskId": task_id})
        assert result["result"]["content"][0]["text"] == "made on A", result
        listed = await on_b.request("tasks/list")
        assert task_id in [t["taskId"] for t in listed["result"]["tasks"]], listed
    async with session(b, BOB) as (stranger, _):
        for method in ("tasks/get", "tasks/result"):
            reply = await stranger.request(method, {"taskId": task_id})
            assert reply["error"]["code"] == -32602, reply  # unknown to bob, as on A
        listed = await stranger.request("tasks/list")
        assert task_id not in [t["taskId"] for t in listed["result"]["tasks"]]


async def test_a_chat_thread_started_on_one_node_continues_on_another(
    cluster: tuple[str, ServerProcess, ServerProcess], upstream: FakeOpenAI
) -> None:
    _, a, b = cluster
    upstream.script(Reply("first answer"), Reply("second answer"))
    async with open_raw(a.authed_url(ALICE)) as ws:
        client = RawClient(ws)
        await client.initialize()
        first = await Caller(client).chat("Where is the thread kept?")
    async with open_raw(b.authed_url(ALICE)) as ws:
        client = RawClient(ws)
        await client.initialize()
        second = await Caller(client).chat("And then?", continuation_id=first["continuation_id"])
    assert (second["turn"], second["history_turns"]) == (2, 1), second
    assert [m["content"] for m in upstream.received[-1].body["messages"]] == [
        "Where is the thread kept?",
        "first answer",
        "And then?",
    ]
    async with open_raw(b.authed_url(BOB)) as ws:
        client = RawClient(ws)
        await client.initialize()
        refused = await Caller(client).call(
            "chat", {"prompt": "mine now?", "continuation_id": first["continuation_id"]}
        )
    assert refused["result"]["isError"] is True, refused  # another identity's thread


async def test_sessionless_requests_need_no_stickiness(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    """2026-07-28 (EXAI_TASK_AFTER=0: every task-capable call is a task): a task made over
    HTTP on A, polled to its result over HTTP on B, and unknown to another identity there."""
    _, a, b = cluster
    async with httpx.AsyncClient(timeout=30) as client:
        # Each node has its own token: alice's is known to both.
        made = result_of(
            await post(client, a, call(1, "exai_test_sleep", seconds=0.2), token=ALICE)
        )
        assert made["status"] == "working", made
        task_id = made["taskId"]
        done = await _poll(client, b, task_id)
        assert done["status"] == "completed", done
        assert done["result"]["content"] == [{"type": "text", "text": "slept 0.2 s"}]
        stranger = await post(client, b, request(2, "tasks/get", {"taskId": task_id}), token=BOB)
        assert stranger.json()["error"]["code"] == -32602, stranger.text


async def _poll(client: httpx.AsyncClient, server: ServerProcess, task_id: str) -> dict[str, Any]:
    """alice's ``tasks/get`` on ``server`` until the task is terminal (the row is another
    process's: polled, the deadline bounds only a failure)."""
    with trio.fail_after(30):
        while True:
            got = result_of(
                await post(
                    client, server, request("g", "tasks/get", {"taskId": task_id}), token=ALICE
                )
            )
            if got["status"] in ("completed", "failed", "cancelled"):
                return got
            await trio.sleep(0.05)


# -- 2025-era Streamable HTTP sessions -------------------------------------------------------


async def test_a_2025_http_session_is_served_by_any_node(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    """``initialize`` on A; the next request on B, with no stickiness: served from the row
    (2025-11-25's ``tasks/list`` proves the negotiated version went along)."""
    url, a, b = cluster
    async with httpx.AsyncClient(timeout=30) as client:
        on_a = HttpSession(client, http_url(a), ALICE)
        await on_a.open()
        session_id = on_a.session_id
        assert session_id is not None
        on_b = HttpSession(client, http_url(b), ALICE)
        on_b.session_id = session_id
        listed = await on_b.request({"jsonrpc": "2.0", "id": 2, "method": "tasks/list"})
        assert "tasks" in listed[-1]["result"], listed
        echoed = await on_b.request(http_call(3, "echo", text="via B"))
        assert echoed[-1]["result"]["content"][0]["text"] == "via B"
        row = _session_state(url, session_id)
        assert (row["epoch"], row["status"], row["identity"]) == (1, "active", "alice")
        # A serves it on from its own copy (no database round trip per request).
        assert "result" in (await on_a.request(http_call(4, "echo", text="via A")))[-1]
        # Another identity: 404 on both nodes, as for an id never issued.
        for server in (a, b):
            stranger = HttpSession(client, http_url(server), BOB)
            stranger.session_id = session_id
            refused = await stranger.post(http_call(5, "echo", text="mine?"))
            assert refused.status_code == 404, refused.text
        # DELETE on B ends the session (B holds the row now).
        deleted = await client.delete(http_url(b), headers=on_b.headers())
        assert deleted.status_code == 200, deleted.text
        await wait_until(
            lambda: _session_state(url, session_id)["status"] == "closed", what="closed"
        )
        gone = await on_b.post(http_call(6, "echo", text="after"))
        assert gone.status_code == 404, gone.text
        # A's copy ends at its next look at the rows of its copies (EXAI_SWEEP_INTERVAL).
        with trio.fail_after(30):
            while (await on_a.post(http_call(7, "echo", text="still?"))).status_code != 404:  # noqa: ASYNC110 - another process ends it
                await trio.sleep(0.05)
        assert any(
            e["event"] == "session.ended_elsewhere" and e.get("session_id") == session_id
            for e in a.log_events()
        )


async def test_a_delete_on_the_node_whose_copy_is_stale_ends_the_session_everywhere(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    """Found by trying it: ``initialize`` on A, a request on B (B takes it over), then
    DELETE on A. A's copy was stale, so its end (written at its old epoch) changed nothing:
    DELETE answered 200 while the row stayed active and B served the session on, for good.
    The client's end is the session's, wherever it runs now."""
    url, a, b = cluster
    async with httpx.AsyncClient(timeout=30) as client:
        on_a = HttpSession(client, http_url(a), ALICE)
        await on_a.open()
        session_id = on_a.session_id
        assert session_id is not None
        on_b = HttpSession(client, http_url(b), ALICE)
        on_b.session_id = session_id
        assert "result" in (await on_b.request(http_call(2, "echo", text="via B")))[-1]
        assert _session_state(url, session_id)["epoch"] == 1  # B holds it; A's copy: epoch 0
        deleted = await client.delete(http_url(a), headers=on_a.headers())
        assert deleted.status_code == 200, deleted.text
        assert _session_state(url, session_id)["status"] == "closed"  # before DELETE answered
        assert (await on_a.post(http_call(3, "echo", text="A?"))).status_code == 404
        # B's copy ends at its next look at the rows of its copies (EXAI_SWEEP_INTERVAL).
        with trio.fail_after(30):
            while (await on_b.post(http_call(4, "echo", text="B?"))).status_code != 404:  # noqa: ASYNC110 - another process ends it
                await trio.sleep(0.05)


# -- WebSocket sessions -----------------------------------------------------------------------


async def test_a_session_parked_on_a_live_node_resumes_on_another_and_back(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    url, a, b = cluster
    async with open_raw(a.authed_url(ALICE)) as ws:
        client = RawClient(ws)
        reply = await client.initialize("2025-03-26")
        session_id: str = reply["result"]["_meta"]["exai/sessionId"]
        assert "result" in await client.request("logging/setLevel", {"level": "debug"})
        await ws.aclose(GOING_AWAY)
    await wait_until(lambda: _parked(url, session_id), what="parked on A")
    parked = _session_state(url, session_id)
    assert (parked["epoch"], parked["identity"], parked["log_level"]) == (0, "alice", "debug")

    # Another identity: 404 on either node, exactly as for an id never issued; nothing moves.
    assert await _refused(b, BOB, session_id) == 404
    assert await _refused(a, BOB, session_id) == 404
    assert _session_state(url, session_id) == parked

    # Resumed on B: no initialize, and the batch (2025-03-26 only) proves its version.
    async with _resume(b, ALICE, session_id) as ws:
        assert dict(ws.handshake_headers)[b"mcp-session-id"].decode() == session_id
        client = RawClient(ws)
        await client.send([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}])
        batch = await client.receive_any()
        assert isinstance(batch, list), batch
        assert "result" in batch[0], batch
        on_b = _session_state(url, session_id)
        assert (on_b["epoch"], on_b["parked"], on_b["status"]) == (1, False, "active")
        assert on_b["node_id"] != parked["node_id"]
        # Attached on B: a second connection is told so, on B and on A.
        assert await _refused(b, ALICE, session_id) == 409
        assert await _refused(a, ALICE, session_id) == 409
        await ws.aclose(GOING_AWAY)
    await wait_until(lambda: _parked(url, session_id), what="parked on B")

    # Back to A, which still holds its parked copy at epoch 0: stale, dropped, claimed anew.
    async with _resume(a, ALICE, session_id) as ws:
        client = RawClient(ws)
        await client.send([{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}])
        assert isinstance(await client.receive_any(), list)
        back = _session_state(url, session_id)
        assert (back["node_id"], back["epoch"]) == (parked["node_id"], 2)
        handed = [
            e
            for e in a.log_events()
            if e["event"] == "session.handed_over" and e.get("session_id") == session_id
        ]
        assert len(handed) == 1
        # B's copy (epoch 1) expires while A runs the session: it ends nothing in the database.
        await wait_until(
            lambda: any(
                e["event"] == "session.closed" and e.get("session_id") == session_id
                for e in b.log_events()
            ),
            what="B's stale copy expired",
        )
        assert _session_state(url, session_id)["status"] == "active"
        await ws.aclose(1000)  # the client ends its session, on A
    await wait_until(
        lambda: _session_state(url, session_id)["status"] == "closed", what="closed by A"
    )


async def test_resumes_of_unknown_ids_are_404_on_any_node(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    _, a, b = cluster
    for server in (a, b):
        assert await _refused(server, ALICE, "not-a-session-id") == 404
        assert await _refused(server, ALICE, str(uuid.uuid4())) == 404
    unknown = str(uuid.uuid4())
    assert await _refused(b, ALICE, unknown) == 404
    assert await _refused(b, ALICE, unknown) == 404  # no row: asked again (rate-bounded)


async def test_a_dropped_client_that_goes_nowhere_keeps_its_session_on_its_node(
    cluster: tuple[str, ServerProcess, ServerProcess],
) -> None:
    """The local resume still works (and pays one conditional update)."""
    url, a, _ = cluster
    async with open_raw(a.authed_url(ALICE)) as ws:
        session_id: str = (await RawClient(ws).initialize())["result"]["_meta"]["exai/sessionId"]
        await ws.aclose(GOING_AWAY)
    await wait_until(lambda: _parked(url, session_id), what="parked on A")
    async with _resume(a, ALICE, session_id) as ws:
        assert "result" in await RawClient(ws).request("tools/list")
        assert _session_state(url, session_id)["epoch"] == 1
        await ws.aclose(1000)
