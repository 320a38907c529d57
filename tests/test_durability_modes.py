"""Each durability mode keeps exactly what it states (storage/durability.py) when ``exai serve``
is SIGKILLed under load: on the embedded Postgres, and on the same database behind a 20 ms
round trip (a loopback proxy holding every chunk 10 ms each way).

The load is ``chat`` calls against the loopback OpenAI-compatible upstream: a tool with an
effect outside the node. Every prompt carries a marker naming its call, so the upstream's
record says which calls had their effect. The kill comes while the upstream holds a few
requests unanswered: those calls are certainly running, with no final state anywhere.

After a restart (recovery runs before the second server listens), what the clients were
answered is compared with the rows:

* ``commit`` and ``journal`` (a killed process loses nothing journaled): every call answered
  with a result has exactly one task row, ``completed``; every call whose request reached the
  upstream has a row, final or ``interrupted``; the held ones ``interrupted``. ``commit``
  also before the kill: while the upstream holds them, the held calls' rows are ``running``
  in the database (the journal replayed at restart would hide an intent only journaled).
* ``async``: no row in an impossible state; every call answered before
  ``persistence.confirmed_at`` (read from the admin status after a first phase) is present and
  ``completed``.

The impossible states are checked in every mode: a task still ``pending``/``running`` after
recovery, a step's fields without the step (``completed`` without a result, a version that
does not match the steps taken), a ``completed`` chat whose upstream request never came back
(held) or never left, a ``completed`` chat without the conversation turn it wrote before its
final state, a session left ``active``.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from runtime.status_model import NodeStatus
from storage.durability import Durability
from tests.chat_support import provider_table, write_config
from tests.fake_openai import FakeOpenAI, Hold, Received, fake_openai
from tests.harness import (
    RawClient,
    ServerProcess,
    open_raw,
    query,
    start_server,
    wait_for_status,
    wait_until,
)
from tests.tcp_proxy import TcpProxy, libpq_target, libpq_via

#: Concurrent client sessions, each calling ``chat`` one call after another.
SESSIONS = 8
#: Calls the upstream holds unanswered when the server is killed.
HELD = 3
#: One-way delay of the proxied database (seconds): a 20 ms round trip.
DELAY = 0.010
#: Calls answered before the kill, per database: the proxied commit mode pays several round
#: trips per call, so the WAN cases run fewer.
CALLS = {"embedded": 240, "proxied": 48}
#: async: calls answered in the first phase, before ``confirmed_at`` is read.
PHASE_ONE = {"embedded": 120, "proxied": 32}

NONE_FINAL = ("pending", "running")
MARKER = "durability-marker"
TOKEN = "test_durability_modes_0123456789"


@dataclass(frozen=True)
class Call:
    """One ``tools/call`` of ``chat``: its task row's key and the marker its prompt carries."""

    session_id: str
    request_id: str  # as the task row stores it: JSON text
    marker: str


@dataclass
class Load:
    """What the clients opened, sent and were answered, in order; waiters are woken by each
    session opened and each answer."""

    session_ids: list[str] = field(default_factory=list)
    sent: dict[str, Call] = field(default_factory=dict)  # by marker
    answered: list[tuple[Call, datetime]] = field(default_factory=list)  # answer's arrival (UTC)
    _grew: trio.Event = field(default_factory=trio.Event)

    def opened(self, session_id: str) -> None:
        self.session_ids.append(session_id)
        self._wake()

    def answer(self, call: Call) -> None:
        self.answered.append((call, datetime.now(UTC)))
        self._wake()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = trio.Event()

    async def reach(self, answers: int, sessions: int) -> None:
        """Until ``answers`` calls were answered and ``sessions`` sessions opened."""
        while len(self.answered) < answers or len(self.session_ids) < sessions:
            await self._grew.wait()


async def _session(url: str, load: Load, stop: trio.Event, phase: str) -> None:
    """One session calling ``chat`` until ``stop`` (then it closes); every reply must be a
    successful result. A server killed under it just ends it."""
    with contextlib.suppress(ConnectionClosed):
        async with open_raw(url) as ws:
            client = RawClient(ws)
            session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
            load.opened(session_id)
            n = 0
            while not stop.is_set():
                n += 1
                request_id = f"{phase}-{n}"
                call = Call(
                    session_id, json.dumps(request_id), f"{MARKER} {session_id} {request_id}"
                )
                load.sent[call.marker] = call
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": "tools/call",
                        "params": {"name": "chat", "arguments": {"prompt": call.marker}},
                    }
                )
                reply = await client.receive()
                assert reply.get("result", {}).get("isError") is False, reply
                load.answer(call)


def _marker(request: Received) -> str | None:
    """The marker of the call that sent ``request`` upstream (its user message)."""
    for message in request.body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str) and content.startswith(MARKER):
            return content
    return None


# --- the database, direct or behind a WAN --------------------------------------------------


@contextlib.asynccontextmanager
async def _database(kind: str, database_url: str) -> AsyncIterator[tuple[str, TcpProxy | None]]:
    """The URL the servers use: the test database's, or the same database through a proxy
    adding ``DELAY`` each way (which this test's trio run serves: blocking work goes to
    threads while a server may talk to it)."""
    if kind == "embedded":
        yield database_url, None
        return
    port, unix = libpq_target(database_url)
    proxy = TcpProxy(port, target_unix=unix, delay=DELAY)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield libpq_via(database_url, proxy.port), proxy
        proxy.close()


async def _start(state: Path, url: str, mode: str, config: Path) -> ServerProcess:
    """``exai serve`` in ``mode`` (from a thread: the proxy and the upstream serve meanwhile);
    the same token for both incarnations."""
    env = {"EXAI_CONFIG": str(config), "EXAI_DURABILITY": mode}
    return await trio.to_thread.run_sync(
        partial(start_server, state, database_url=url, extra_env=env, token=TOKEN)
    )


# --- rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    status: str
    version: int
    started_at: datetime | None
    completed_at: datetime | None
    result: Any
    error_message: str | None


def _tasks(database_url: str, session_ids: list[str]) -> dict[tuple[str, str], list[Row]]:
    found: dict[tuple[str, str], list[Row]] = {}
    for session_id, request_id, *rest in query(
        database_url,
        "select session_id, request_id, status, version, started_at, completed_at, result,"
        " error_message from tasks where session_id = any(%s)",
        (session_ids,),
    ):
        found.setdefault((session_id, request_id), []).append(Row(*rest))
    return found


def _turns(database_url: str, thread_ids: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """``(turn_index, role, content)`` of each thread, in stored order."""
    turns: dict[str, list[tuple[int, str, str]]] = {}
    for thread_id, index, role, content in query(
        database_url,
        "select m.thread_id::text, m.turn_index, m.role, m.content from messages m"
        " join threads t on t.id = m.thread_id"
        " where m.thread_id = any(%s::uuid[]) order by m.turn_index, m.created_at",
        (thread_ids,),
    ):
        turns.setdefault(thread_id, []).append((index, role, content))
    return turns


def _no_impossible_rows(
    database_url: str,
    load: Load,
    tasks: dict[tuple[str, str], list[Row]],
    *,
    reached: set[str],
    held: set[str],
) -> None:
    """What no mode may leave after a kill and a recovery, whatever it lost."""
    calls = {(c.session_id, c.request_id): c for c in load.sent.values()}
    completed: dict[str, Call] = {}
    for key, rows in tasks.items():
        assert key in calls, f"a task row for a call never sent: {key}"
        assert len(rows) == 1, (key, rows)
        row, call = rows[0], calls[key]
        assert row.status not in NONE_FINAL, (key, row)  # recovery interrupted these
        if row.status == "completed":
            assert row.result is not None, (key, row)
            assert row.started_at is not None, (key, row)
            assert row.completed_at is not None, (key, row)
            assert (row.version, row.error_message) == (3, None), (key, row)
            # The upstream answered it: its request arrived and was not one of those held.
            assert call.marker in reached, (key, "completed, but the upstream never had it")
            assert call.marker not in held, (key, "completed, but its upstream call never ended")
            completed[row.result["structuredContent"]["continuation_id"]] = call
        elif row.status == "interrupted":
            assert row.completed_at is not None, (key, row)
            assert row.version == (3 if row.started_at is not None else 2), (key, row)
        elif row.status == "failed":
            assert row.error_message, (key, row)
        else:
            assert row.status == "cancelled", (key, row)
    # A chat's turn (thread and both messages) was given to persistence before its final state,
    # which can only be durable with everything given before it.
    turns = _turns(database_url, list(completed))
    for thread_id, call in completed.items():
        answer = tasks[(call.session_id, call.request_id)][0].result["structuredContent"]
        assert turns.get(thread_id) == [
            (0, "user", call.marker),
            (0, "assistant", answer["content"]),
        ], (call, thread_id)
    for session_id, status in query(
        database_url,
        "select session_id, status from sessions where session_id = any(%s)",
        (load.session_ids,),
    ):
        assert status in ("closed", "interrupted"), (session_id, status)


# --- the run ---------------------------------------------------------------------------------


async def _run_phase(url: str, load: Load, phase: str, until: int) -> None:
    """Sessions calling until ``until`` calls of ``load`` were answered; all closed on return."""
    stop = trio.Event()
    sessions = len(load.session_ids) + SESSIONS
    async with trio.open_nursery() as nursery:
        for _ in range(SESSIONS):
            nursery.start_soon(_session, url, load, stop, phase)
        await load.reach(until, sessions)
        stop.set()


async def _run_and_kill(
    server: ServerProcess,
    upstream: FakeOpenAI,
    load: Load,
    phase: str,
    until: int,
    *,
    while_held: Callable[[set[str]], Awaitable[None]] | None = None,
) -> set[str]:
    """Sessions calling until ``until`` calls were answered; then the next ``HELD`` requests
    the upstream receives are held, and the server is SIGKILLed once it holds them all: at
    that moment, from the upstream's handler (the last call's intent is as fresh as it can
    be), or after ``while_held`` (given their markers) returned. Returns the held markers."""
    held: set[str] = set()
    all_held = trio.Event()
    never = trio.Event()

    def arrived(request: Received) -> None:
        marker = _marker(request)
        assert marker is not None, request.body
        held.add(marker)
        if len(held) == HELD:
            if while_held is None:
                server.process.send_signal(signal.SIGKILL)
            all_held.set()

    stop = trio.Event()
    sessions = len(load.session_ids) + SESSIONS
    async with trio.open_nursery() as nursery:
        for _ in range(SESSIONS):
            nursery.start_soon(_session, server.authed_url(), load, stop, phase)
        # All sessions open (none is mid-handshake at the kill), then hold the next requests.
        await load.reach(until, sessions)
        upstream.script(*(Hold(release=never, arrived=arrived) for _ in range(HELD)))
        await all_held.wait()
        if while_held is not None:
            await while_held(held)
            server.process.send_signal(signal.SIGKILL)
        assert await trio.to_thread.run_sync(server.process.wait) == -signal.SIGKILL
        stop.set()
        nursery.cancel_scope.cancel()  # the sessions' sockets are dead
    return held


async def _intents_committed(database_url: str, load: Load, held: set[str]) -> None:
    """commit: while their tool runs (the upstream holds their requests), the held calls'
    intents are already in the database, ``running``. Read directly, not through the proxy:
    this is what another node would see."""
    calls = [load.sent[marker] for marker in held]
    tasks = await trio.to_thread.run_sync(_tasks, database_url, [call.session_id for call in calls])
    for call in calls:
        key = (call.session_id, call.request_id)
        statuses = [r.status for r in tasks.get(key, [])]
        assert statuses == ["running"], (key, "its tool runs, its intent is not committed")


def _config(path: Path, upstream: FakeOpenAI) -> Path:
    """One provider, the fake upstream (one attempt per call); no named clients."""
    providers = '[upstream]\ndefault_provider = "fake"\n' + provider_table(
        "fake", upstream.base_url, "fake-model"
    )
    return write_config(path, providers=providers, clients={})


@dataclass(frozen=True)
class Killed:
    """What the first incarnation left: the calls, and which of them reached the upstream
    (their tool had its effect) and which were held there when it died."""

    load: Load
    reached: set[str]
    held: set[str]
    #: async: the calls answered before ``persistence.confirmed_at`` (the first phase).
    confirmed: set[Call]


async def _first_life(
    mode: str, database: str, database_url: str, server: ServerProcess, upstream: FakeOpenAI
) -> Killed:
    load = Load()
    confirmed: set[Call] = set()
    if mode == Durability.ASYNC:
        await _run_phase(server.authed_url(), load, "one", PHASE_ONE[database])
        last = max(at for _, at in load.answered)
        await wait_for_status(
            server,
            lambda status: (_confirmed_at(status) or last) >= last,
            what=f"persistence.confirmed_at at or past {last} (the last answer)",
        )
        confirmed = {call for call, _ in load.answered}
    until = len(load.answered) + CALLS[database]
    check = partial(_intents_committed, database_url, load) if mode == Durability.COMMIT else None
    held = await _run_and_kill(server, upstream, load, "two", until, while_held=check)
    reached = {m for m in map(_marker, upstream.received) if m is not None}
    return Killed(load, reached, held, confirmed)


def _confirmed_at(status: NodeStatus) -> datetime | None:
    """``persistence.confirmed_at`` of a status document: every record the node had been given
    before it is durable (storage/durability.py)."""
    assert status.persistence is not None
    return status.persistence.confirmed_at


def _no_connections(database_url: str) -> bool:
    """No client connection to the test database but this one (this test is its only user
    now; the database's own workers, autovacuum, do not count)."""
    rows = query(
        database_url,
        "select count(*) from pg_stat_activity where datname = current_database()"
        " and backend_type = 'client backend' and pid <> pg_backend_pid()",
    )
    return bool(rows[0][0] == 0)


@contextlib.contextmanager
def _reaped(server: ServerProcess) -> Iterator[ServerProcess]:
    """The first incarnation, killed on the way out if the test failed before killing it."""
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=30)


def _check(mode: str, database_url: str, killed: Killed) -> None:
    """The rows after recovery against what the clients were answered (module doc)."""
    load = killed.load
    tasks = _tasks(database_url, load.session_ids)
    _no_impossible_rows(database_url, load, tasks, reached=killed.reached, held=killed.held)
    if mode == Durability.ASYNC:
        for call in killed.confirmed:
            key = (call.session_id, call.request_id)
            assert [r.status for r in tasks.get(key, [])] == ["completed"], (key, "confirmed")
        return
    # commit and journal: an answered call is never lost, and every call that had its effect
    # left a row (its intent was durable before the tool ran).
    for call, _ in load.answered:
        key = (call.session_id, call.request_id)
        assert [r.status for r in tasks.get(key, [])] == ["completed"], (key, "answered")
    for marker in killed.reached:
        call = load.sent[marker]
        key = (call.session_id, call.request_id)
        rows = tasks.get(key, [])
        if marker in killed.held:
            assert [r.status for r in rows] == ["interrupted"], (key, "held when killed", rows)
            assert rows[0].started_at is not None, (key, "its intent was running", rows)
        else:
            assert len(rows) == 1, (key, "reached the upstream", rows)


@pytest.mark.parametrize("database", ["embedded", "proxied"])
@pytest.mark.parametrize("mode", [m.value for m in Durability])
async def test_sigkill_keeps_what_the_mode_states(
    mode: str, database: str, database_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(240):
        async with _database(database, database_url) as (url, proxy), fake_openai() as upstream:
            config = _config(tmp_path / "exai.toml", upstream)
            with _reaped(await _start(state, url, mode, config)) as first:
                killed = await _first_life(mode, database, database_url, first, upstream)
            if proxy is not None:
                proxy.cut()  # nothing the dead process sent is left in flight to land later
            # A backend ends only once it has run what it read before the end of its stream:
            # after this, nothing of the dead process can land behind recovery's back.
            await wait_until(
                partial(_no_connections, database_url),
                what="the killed server's database connections to end",
            )
            second = await _start(state, url, mode, config)
            try:
                # Recovery ran before the second server listened: nothing to wait for.
                await trio.to_thread.run_sync(_check, mode, database_url, killed)
                assert [e for e in second.log_events() if e["event"] == "storage.recovered"]
            finally:
                code = await trio.to_thread.run_sync(second.stop)
                assert code == 0, second.stderr_path.read_text()[-3000:]
