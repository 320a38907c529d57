"""Nothing accepted is lost, end to end through ``exai serve``: not when Postgres crashes under
load, not when the server process is killed.

"Accepted" is what a client was answered: every ``tools/call`` that got a result must have
exactly one ``completed`` task row, found by its session and request id.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    own_postgres,
    query,
    start_server,
)

SESSIONS = 20


async def _session_calls(
    url: str,
    session_ids: list[str],
    accepted: list[tuple[str, str]],
    stop: trio.Event,
    progress: trio.Event | None = None,
) -> None:
    """One session calling echo until told to stop; records every call answered with a result.
    A server that dies under it (the SIGKILL test) just ends it."""
    with contextlib.suppress(ConnectionClosed):
        await _calls(url, session_ids, accepted, stop, progress)


async def _calls(
    url: str,
    session_ids: list[str],
    accepted: list[tuple[str, str]],
    stop: trio.Event,
    progress: trio.Event | None,
) -> None:
    async with open_raw(url) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        session_ids.append(session_id)
        n = 0
        while not stop.is_set():
            n += 1
            request_id = f"call-{n}"
            await client.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": f"{session_id}/{n}"}},
                }
            )
            reply = await client.receive()
            if "result" in reply:
                accepted.append((session_id, json.dumps(request_id)))
                if progress is not None:
                    progress.set()


def _tasks(database_url: str, session_ids: list[str]) -> dict[tuple[str, str], list[str]]:
    rows = query(
        database_url,
        "select session_id, request_id, status from tasks where session_id = any(%s)",
        (session_ids,),
    )
    found: dict[tuple[str, str], list[str]] = {}
    for session_id, request_id, status in rows:
        found.setdefault((session_id, request_id), []).append(status)
    return found


async def _each_accepted_call_completed_once(
    database_url: str, session_ids: list[str], accepted: list[tuple[str, str]], *, within: float
) -> None:
    """Every call answered with a result has exactly one task row, ``completed``. ``within``:
    how long its rows may take to land (0: they must be there already)."""
    expected = set(accepted)

    def all_completed() -> bool:
        tasks = _tasks(database_url, session_ids)
        return all(tasks.get(key) == ["completed"] for key in expected)

    if within:
        # A call's intent ("running") may land in one batch and its final state in the next:
        # wait for the final states, not merely for the rows.
        with trio.move_on_after(within):
            while not all_completed():  # noqa: ASYNC110 - rows another process writes
                await trio.sleep(0.05)
    tasks = _tasks(database_url, session_ids)
    for key in expected:
        assert tasks.get(key) == ["completed"], key


class Accepted(list[tuple[str, str]]):
    """Calls answered with a result; waiters are woken by each new one (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def append(self, item: tuple[str, str]) -> None:
        super().append(item)
        self._grew.set()
        self._grew = trio.Event()

    async def reach(self, target: int) -> None:
        while len(self) < target:
            await self._grew.wait()


async def _accepted_reach(target: int, accepted: Accepted) -> None:
    await accepted.reach(target)


async def test_postgres_crash_under_load_loses_no_accepted_task(tmp_path: Path) -> None:
    with own_postgres() as postgres:
        url = postgres.start()
        server = start_server(tmp_path / "state", database_url=url)
        try:
            session_ids: list[str] = []
            accepted = Accepted()
            stop = trio.Event()
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for _ in range(SESSIONS):
                        nursery.start_soon(
                            _session_calls, server.authed_url(), session_ids, accepted, stop
                        )
                    await _accepted_reach(200, accepted)
                    await trio.to_thread.run_sync(postgres.crash)
                    crashed_at = len(accepted)
                    # Calls go on while the database is gone: the journal holds them.
                    await _accepted_reach(crashed_at + 200, accepted)
                    await trio.to_thread.run_sync(postgres.start)
                    await _accepted_reach(len(accepted) + 200, accepted)
                    stop.set()

            await _each_accepted_call_completed_once(url, session_ids, accepted, within=90)
            assert len(set(accepted)) == len(accepted)  # no request answered twice either
        finally:
            assert server.stop() == 0, server.stderr_path.read_text()[-3000:]


async def test_sigkill_mid_load_then_restart_loses_nothing_and_interrupts_running(
    database_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start_server(state, database_url=database_url)
    session_ids: list[str] = []
    accepted = Accepted()
    stop = trio.Event()
    blocked_session: list[str] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(SESSIONS):
                nursery.start_soon(_session_calls, first.authed_url(), session_ids, accepted, stop)
            # One call that is running when the process dies.
            async with open_raw(first.authed_url()) as ws:
                client = RawClient(ws)
                sid = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
                blocked_session.append(sid)
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "id": "running",
                        "method": "tools/call",
                        "params": {"name": "exai_test_block"},
                    }
                )
                await client.barrier()  # it is running now
                await _accepted_reach(300, accepted)
                first.process.send_signal(signal.SIGKILL)
                assert first.process.wait(timeout=30) == -signal.SIGKILL
                stop.set()
                nursery.cancel_scope.cancel()  # the sessions' sockets are dead

    second: ServerProcess = start_server(state, database_url=database_url, token=first.token)
    try:
        # Recovery ran before the second server accepted anything: no waiting needed.
        await _each_accepted_call_completed_once(database_url, session_ids, accepted, within=0)
        running = _tasks(database_url, blocked_session)
        assert running == {(blocked_session[0], '"running"'): ["interrupted"]}
        recovered = [e for e in second.log_events() if e["event"] == "storage.recovered"]
        assert recovered
    finally:
        assert second.stop() == 0


async def test_persistence_actor_crash_under_load_heals_and_loses_no_task(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(tmp_path / "state", database_url=database_url)
    try:
        session_ids: list[str] = []
        accepted = Accepted()
        stop = trio.Event()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(SESSIONS):
                    nursery.start_soon(
                        _session_calls, server.authed_url(), session_ids, accepted, stop
                    )
                await _accepted_reach(200, accepted)
                async with open_raw(server.authed_url()) as ws:
                    client = RawClient(ws)
                    await client.initialize()
                    crash = await client.request("$/exai/test/crash-persistence")
                    assert crash["result"] == {}
                crashed_at = len(accepted)
                # Calls go on against the next incarnation.
                await _accepted_reach(crashed_at + 300, accepted)
                stop.set()
        # Every call was answered with a result (the sessions record nothing else as
        # accepted, and none stalled: fail_after would have fired).
        await _each_accepted_call_completed_once(database_url, session_ids, accepted, within=60)
        events = server.log_events()
        restarts = [
            e
            for e in events
            if e["event"] == "child.restarting" and e.get("child") == "persistence"
        ]
        assert len(restarts) == 1
        # No session noticed: none crashed, none was refused.
        assert [e for e in events if e["event"] == "session.crashed"] == []
    finally:
        assert server.stop() == 0
