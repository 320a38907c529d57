"""Back-pressure that holds, control that never waits, batches that cannot hurt (issue 11).

Every situation runs over real sockets against a real ``exai serve`` with small bounds, and
ends by checking that another session and the node are untouched: its ``ping`` and ``echo``
answer, and the node's queued bytes and running calls are back to zero.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from runtime.status_model import NodeStatus
from tests.harness import (
    RawClient,
    ServerProcess,
    admin,
    call,
    cancel,
    fetch,
    open_raw,
    start_server,
    wait_for_status,
)

INFLIGHT = 2
MAILBOX = 4
MAILBOX_BYTES = 4096
OUTGOING_BYTES = 2**20
STALL_S = 2.0
MAX_BATCH = 8
FRAME = 64 * 1024
OUTGOING_MESSAGES = 1024
NODE_MAILBOX_BYTES = 6 * 1024
NODE_OUTGOING_BYTES = 128 * 1024  # less than one session may hold by its own bounds
#: A flood a peer sends and never reads the answers of: far more than the kernel's socket
#: buffers and the server's bounds together can take in. Each request asks for a thousand
#: progress notifications, so the answers fill every buffer toward the peer after a few calls
#: (the padding is ignored by the tool: it only makes the requests weigh).
FLOOD_FRAMES = 20_000
FLOOD_PAD = "p" * 16_000
#: What a queue may hold over its bound: the one message that found it under, plus the
#: reader's control answers.
OVERSHOOT = 4096


@pytest.fixture(scope="module")
def bounded(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("bounded"),
        database_url=database_url,
        extra_env={
            "EXAI_MAX_INFLIGHT_PER_SESSION": str(INFLIGHT),
            "EXAI_SESSION_MAILBOX": str(MAILBOX),
            "EXAI_SESSION_MAILBOX_BYTES": str(MAILBOX_BYTES),
            "EXAI_SESSION_OUTGOING_BYTES": str(OUTGOING_BYTES),
            "EXAI_SESSION_OUTGOING_MESSAGES": str(OUTGOING_MESSAGES),
            "EXAI_STALL_TIMEOUT": str(STALL_S),
            "EXAI_MAX_BATCH": str(MAX_BATCH),
            "EXAI_NODE_MAILBOX_BYTES": str(NODE_MAILBOX_BYTES),
            "EXAI_NODE_OUTGOING_BYTES": str(NODE_OUTGOING_BYTES),
            "EXAI_MAX_MESSAGE_BYTES": str(4 * FRAME),
        },
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def flood_request(n: int) -> dict[str, Any]:
    request = call(n, "exai_test_steps", steps=1000, pad=FLOOD_PAD)
    request["params"]["_meta"] = {"progressToken": n}
    return request


FLOOD_REQUEST_BYTES = len(json.dumps(flood_request(FLOOD_FRAMES)))


def session_id_of(reply: dict[str, Any]) -> str:
    return str(reply["result"]["_meta"]["exai/sessionId"])


async def assert_untouched(server: ServerProcess) -> None:
    """Another session works, and the node holds nothing for sessions that are gone."""
    async with open_raw(server.authed_url()) as ws:
        other = RawClient(ws)
        await other.initialize()
        assert (await other.request("ping"))["result"] == {}
        echo = await other.request("tools/call", {"name": "echo", "arguments": {"text": "ok"}})
        assert echo["result"]["content"][0]["text"] == "ok"
    await wait_for_status(server, _drained, what="queued bytes and running calls back to 0")
    url, token = admin(server)
    async with httpx.AsyncClient() as http:
        metrics = await http.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"})
    lines = metrics.text.splitlines()
    assert "exai_session_mailbox_bytes 0" in lines
    assert "exai_session_outgoing_bytes 0" in lines


def _drained(status: NodeStatus) -> bool:
    node = status.node
    return (node.mailbox_bytes, node.outgoing_bytes, node.tool_calls_in_flight) == (0, 0, 0)


def rss_bytes(pid: int) -> int:
    """The process's resident set size (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def session_status(status: NodeStatus, session_id: str) -> Any:
    return next(s for s in status.sessions if s.session_id == session_id)


async def read_until_closed(ws: WebSocketConnection) -> tuple[int, int, int | None]:
    """Read until the server closes: (results, "server busy" errors, close code); progress
    notifications are skipped."""
    results = busy = 0
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if "method" in frame:
                continue
            if "result" in frame:
                results += 1
            else:
                assert frame["error"]["code"] == -32000, frame
                busy += 1
    except ConnectionClosed as closed:
        return results, busy, closed.reason.code if closed.reason else None


async def hold_every_slot(client: RawClient, server: ServerProcess, session_id: str) -> None:
    """Block every slot of the session (calls ``block-N``), then send ``waits``, an echo the
    actor takes and waits on for a slot: from then on the session's mailbox only fills."""
    for n in range(INFLIGHT):
        await client.send(call(f"block-{n}", "exai_test_block"))
    await client.barrier()  # both run: every slot of the session is taken
    await client.send(call("waits", "echo", text="for a slot"))
    await wait_for_status(
        server,
        lambda s: session_status(s, session_id).in_flight == INFLIGHT + 1,
        what="the third call to wait for a slot",
    )


async def test_a_full_mailbox_refuses_at_once_by_bytes_while_ping_and_cancel_get_through(
    bounded: ServerProcess,
) -> None:
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        session_id = session_id_of(await client.initialize())
        await hold_every_slot(client, bounded, session_id)
        half = "x" * (MAILBOX_BYTES * 3 // 4)
        await client.send(call("fits", "echo", text=half))  # an empty mailbox takes it
        await client.send(call("too-many-bytes", "echo", text=half))  # 2 items, too many bytes
        busy = await client.receive()
        assert busy["id"] == "too-many-bytes"
        assert busy["error"]["code"] == -32000
        assert "server busy" in busy["error"]["message"]
        assert busy["error"]["data"]["retryAfterMs"] > 0
        # Control never waits: ping is answered while every slot is busy and the actor waits.
        assert (await client.request("ping"))["result"] == {}
        status = await fetch(bounded)
        assert session_status(status, session_id).queued_bytes > MAILBOX_BYTES // 2
        assert status.node.mailbox_bytes >= session_status(status, session_id).queued_bytes

        for n in range(INFLIGHT):
            await client.send(cancel(f"block-{n}"))  # control, applied at once
        answered = {(await client.receive())["id"] for _ in range(2)}
        assert answered == {"waits", "fits"}  # the cancelled calls get no response
        assert (await client.request("ping"))["result"] == {}
    await assert_untouched(bounded)


async def test_a_peer_that_never_reads_is_stopped_by_tcp_then_closed_1008_and_ended(
    bounded: ServerProcess,
) -> None:
    # Every frame read is answered (a result, or "busy" once the mailbox is full): once the
    # socket buffers toward the peer are full, the server's outgoing queue fills, and then
    # it stops reading, and the flood waits in TCP's buffers toward the server.
    sent = 0
    rss_before = rss_bytes(bounded.process.pid)
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        session_id = session_id_of(await client.initialize())

        async def send_without_reading() -> None:
            nonlocal sent
            for n in range(FLOOD_FRAMES):
                await client.send(flood_request(n))
                sent += 1

        def stalled() -> bool:
            return any(
                e["event"] == "session.peer_not_reading" and e.get("session_id") == session_id
                for e in bounded.log_events()
            )

        peak_rss = 0
        peak_outgoing = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_without_reading)
            with trio.fail_after(60):
                while not stalled():
                    peak_rss = max(peak_rss, rss_bytes(bounded.process.pid))
                    status = await fetch(bounded)
                    mine = [s for s in status.sessions if s.session_id == session_id]
                    if mine:
                        peak_outgoing = max(peak_outgoing, mine[0].outgoing_bytes)
                        assert mine[0].in_flight <= INFLIGHT + 1
                        assert mine[0].queued_bytes <= MAILBOX_BYTES + FLOOD_REQUEST_BYTES
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()  # the sender is blocked by TCP back-pressure
        assert sent < FLOOD_FRAMES, "the server read everything: nothing pushed back"
        # The outgoing queue held at most its bound and one message over it (here the node's
        # bound, the smaller).
        assert 0 < peak_outgoing <= NODE_OUTGOING_BYTES + OVERSHOOT
        assert peak_rss - rss_before < 100 * 2**20

        # Now read: what was queued arrives, each frame an answer or "busy", then 1008.
        with trio.fail_after(30):
            results, busy, code = await read_until_closed(ws)
        assert code == 1008
        assert results + busy > 0
    # Ended, not parked: resuming it would only stall again.
    await wait_for_status(
        bounded,
        lambda s: all(other.session_id != session_id for other in s.sessions),
        what="the session to end",
    )
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{bounded.authed_url()}&session={session_id}"):
            pass
    assert refused.value.status_code == 404
    await assert_untouched(bounded)


async def test_ping_and_other_requests_are_answered_while_a_batch_holds_a_long_call(
    bounded: ServerProcess,
) -> None:
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-03-26")
        await client.send([call("b1", "exai_test_block"), call("e1", "echo", text="member")])
        assert (await client.request("ping"))["result"] == {}
        # The actor itself is free too: the batch runs as its own task.
        await client.barrier()
        await client.send(cancel("b1"))
        reply = await client.receive_any()
        assert [member["id"] for member in reply] == ["e1"]  # a cancelled member: no response
    await assert_untouched(bounded)


async def test_batches_are_capped_and_ids_in_use_are_refused_without_leaking_slots(
    bounded: ServerProcess,
) -> None:
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        session_id = session_id_of(await client.initialize("2025-03-26"))
        pings = [{"jsonrpc": "2.0", "id": n, "method": "ping"} for n in range(MAX_BATCH + 1)]
        await client.send(pings)
        over = await client.receive_any()
        assert isinstance(over, dict), "an over-long batch is refused as a whole"
        assert (over["id"], over["error"]["code"]) == (None, -32600)
        assert str(MAX_BATCH) in over["error"]["message"]

        # An id in use, in the session or earlier in the same batch, is refused for that
        # member alone; a single request reusing it is refused by the reader.
        await client.send(call("held", "exai_test_block"))
        await client.barrier()
        await client.send(call("held", "echo", text="reused"))
        reused = await client.receive()
        assert (reused["id"], reused["error"]["code"]) == ("held", -32600)
        # With one slot held, batches of twin ids over and over: each is answered, the twin
        # refused, and no slot leaks (the slots are the call's, never the client's id).
        for n in range(12):
            await client.send(
                [
                    call(f"twin-{n}", "echo", text="first"),
                    call(f"twin-{n}", "echo", text="second"),
                    call("held", "echo", text="in use"),
                ]
            )
            reply = await client.receive_any()
            assert [(m["id"], "result" in m) for m in reply] == [
                (f"twin-{n}", True),
                (f"twin-{n}", False),
                ("held", False),
            ]
            assert reply[0]["result"]["content"][0]["text"] == "first"
            assert {m["error"]["code"] for m in reply[1:]} == {-32600}
        await client.send(cancel("held"))
        assert (await client.request("ping"))["result"] == {}
        status = await wait_for_status(
            bounded,
            lambda s: session_status(s, session_id).in_flight == 0,
            what="the held call to end",
        )
        assert session_status(status, session_id).restarts == 0
    await assert_untouched(bounded)


async def test_what_a_flooding_peer_makes_the_server_log_is_rate_limited_and_counted(
    bounded: ServerProcess,
) -> None:
    flood = 300
    before = (await fetch(bounded)).dead_letters.total
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        session_id = session_id_of(await client.initialize())
        await hold_every_slot(client, bounded, session_id)
        for n in range(MAILBOX):
            await client.send(call(f"fill-{n}", "echo", text="f"))
        for _ in range(flood):
            await client.send({"jsonrpc": "2.0", "method": "notifications/progress"})
            await client.send("{not json")
        replies = [await client.receive() for _ in range(flood)]
        assert {(r["id"], r["error"]["code"]) for r in replies} == {(None, -32700)}
        for n in range(INFLIGHT):
            await client.send(cancel(f"block-{n}"))
        assert len({(await client.receive())["id"] for _ in range(1 + MAILBOX)}) == 1 + MAILBOX
    status = await fetch(bounded)
    assert status.dead_letters.total - before == flood  # every one counted
    events = [e for e in bounded.log_events() if e.get("session_id") == session_id]
    bad_frames = [e for e in events if e["event"] == "session.bad_frame"]
    assert 1 <= len(bad_frames) < flood // 10
    letters = [
        e
        for e in bounded.log_events()
        if e["event"] == "dead_letter" and e["target"].endswith(session_id)
    ]
    assert 1 <= len(letters) < flood // 10
    await assert_untouched(bounded)


async def test_the_node_bounds_hold_across_sessions(bounded: ServerProcess) -> None:
    url = bounded.authed_url()
    async with open_raw(url) as a_ws, open_raw(url) as b_ws, open_raw(url) as c_ws:
        a, b, c = RawClient(a_ws), RawClient(b_ws), RawClient(c_ws)
        a_id = session_id_of(await a.initialize())
        await b.initialize()
        # Mailboxes: A holds most of the node's mailbox bytes behind a blocked actor...
        await hold_every_slot(a, bounded, a_id)
        await a.send(call("holds", "echo", text="x" * (NODE_MAILBOX_BYTES * 2 // 3)))
        await wait_for_status(
            bounded,
            lambda s: session_status(s, a_id).queued_bytes > NODE_MAILBOX_BYTES // 2,
            what="A's request to wait in its mailbox",
        )
        # ...so B, whose own mailbox is empty, is refused by the node's bound.
        big = "y" * (NODE_MAILBOX_BYTES // 2)
        await b.send(call("node-full", "echo", text=big))
        assert (await b.receive())["error"]["code"] == -32000
        for n in range(INFLIGHT):
            await a.send(cancel(f"block-{n}"))
        assert {(await a.receive())["id"] for _ in range(2)} == {"waits", "holds"}
        reply = await b.request("tools/call", {"name": "echo", "arguments": {"text": big}})
        assert reply["result"]["content"][0]["text"] == big  # room again

        # Outgoing: two peers that never read hold at most the node's bound between them.
        c_id = session_id_of(await c.initialize())
        peak = 0

        async def flood(client: RawClient) -> None:
            with contextlib.suppress(ConnectionClosed):  # closed (1008) once found stalled
                for n in range(FLOOD_FRAMES):
                    await client.send(flood_request(n))

        def stalled() -> set[str]:
            return {
                e.get("session_id", "")
                for e in bounded.log_events()
                if e["event"] == "session.peer_not_reading"
            }

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, a)
            nursery.start_soon(flood, c)
            with trio.fail_after(120):
                while not {a_id, c_id} <= stalled():
                    peak = max(peak, (await fetch(bounded)).node.outgoing_bytes)
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert 0 < peak <= NODE_OUTGOING_BYTES + OVERSHOOT
        for ws in (a_ws, c_ws):
            with trio.fail_after(30):
                *_, code = await read_until_closed(ws)
            assert code in (1008, 1006)  # 1006 if it read too late for the close frame
    await assert_untouched(bounded)


async def test_a_batch_with_more_calls_than_the_session_has_slots_is_answered(
    bounded: ServerProcess,
) -> None:
    async with open_raw(bounded.authed_url()) as ws:
        client = RawClient(ws)
        await client.initialize("2025-03-26")
        members = [call(f"m{n}", "echo", text=f"t{n}") for n in range(MAX_BATCH)]  # > INFLIGHT
        await client.send(members)
        reply = await client.receive_any()
        assert [m["id"] for m in reply] == [f"m{n}" for n in range(MAX_BATCH)]
        assert [m["result"]["content"][0]["text"] for m in reply] == [
            f"t{n}" for n in range(MAX_BATCH)
        ]
    await assert_untouched(bounded)
