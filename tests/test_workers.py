"""``exai serve --workers N`` (runtime/workers.py): one port, N worker nodes, one parent.

One real server with two workers, real sockets and a real Postgres: the parent's embedded one
(it owns it: started before the workers, stopped after them), or, when
``EXAI_TEST_DATABASE_URL`` is set (CI's PostgreSQL 15 target), a fresh database there. One
scenario, in order, to start the server once:

1. MCP on the one port reaches both workers: sessions are opened (and held) until each
   worker's own admin interface counts one; both node ids are in ``nodes``; a session
   dropped on one worker is resumed on the other (any-node resume, the session's row);
2. ``exai status`` shows every worker (text and ``--json``), ``--worker N`` one; SIGHUP to
   the parent reaches every worker; ``exai trace`` reads every worker's log;
3. a worker SIGKILLed while a task runs on it is restarted (a new pid and node id at its
   index in ``server.json``); its successor's recovery replays its journal and marks its
   task ``interrupted``, once (the dead node's row counts one task, swept by the successor;
   one recovery names it);
4. SIGTERM to the parent: exit 0, no worker left, the embedded Postgres stopped, the state
   dir's lock free, ``server.json`` gone.

Apart: bad ``--workers`` values are refused with exit code 2 before anything starts; a worker
that cannot start (its database refused) stops the server with its exit code, leaving no
worker behind; more workers than the database has connections for are refused before any
starts; the parent's embedded Postgres has room for 64 workers' connections; a worker
stopped (SIGSTOP) is killed and replaced after EXAI_WORKER_TIMEOUT; and a parent killed with
SIGKILL leaves no worker behind (their lifeline ends).

Other processes write what is checked, so the test polls with a deadline
(:func:`tests.harness.wait_until`), which bounds only a failure, never paces a success.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

from runtime.statefile import (
    ServerInfo,
    StateDirLock,
    WorkerInfo,
    read_server_info,
    write_server_info,
)
from runtime.status_model import NodeStatus
from storage.connection_budget import (
    CONNECTIONS_PER_NODE,
    EMBEDDED_SPARE,
    embedded_max_connections,
    room,
)
from storage.embedded import EmbeddedPostgres
from tests.harness import (
    EXAI,
    RawClient,
    ServerProcess,
    open_raw,
    query,
    reachable_tempdir,
    start_server,
    wait_until,
)
from tests.harness import test_database as suite_database
from tests.test_tasks import TASKS_VERSION, create

#: Sessions opened at most while looking for both workers: the kernel spreads connections
#: by a hash of their addresses, so two workers are both reached long before this.
MAX_SESSIONS = 200
#: Resumes at most while looking for the other worker (each lands there with even odds).
MAX_RESUMES = 40
#: RFC 6455 section 7.4.1: "going away", an abnormal end for the session (it is parked).
GOING_AWAY = 1001


def _info(server: ServerProcess) -> ServerInfo:
    info = read_server_info(server.state_dir / "server.json")
    assert info is not None
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def _worker_status(admin_url: str, token: str) -> NodeStatus:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{admin_url}/status", headers={"authorization": f"Bearer {token}"}
        )
    response.raise_for_status()
    return NodeStatus.model_validate_json(response.content)


def _status(server: ServerProcess, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXAI), "status", "--state-dir", str(server.state_dir), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def _database() -> Iterator[str | None]:
    """``None`` (the parent's own embedded Postgres) or a fresh database on
    ``EXAI_TEST_DATABASE_URL``'s server."""
    if os.environ.get("EXAI_TEST_DATABASE_URL"):
        with suite_database() as url:
            yield url
    else:
        yield None


async def test_two_workers_share_one_port_restart_and_stop_cleanly() -> None:
    with reachable_tempdir("exai-test-workers-") as tmp, _database() as external:
        state = tmp / "state"
        server = await trio.to_thread.run_sync(
            lambda: start_server(state, database_url=external, extra_env={"EXAI_WORKERS": "2"})
        )
        try:
            await _scenario(server, external)
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


async def _scenario(server: ServerProcess, external: str | None) -> None:
    state = server.state_dir
    url = external or EmbeddedPostgres(state / "pg").url
    info = _info(server)
    assert "2 workers" in server.announced
    assert info.pid == server.process.pid
    assert [w.index for w in info.workers] == [1, 2]
    assert info.url == server.url
    admin_token = (state / "admin-token").read_text().strip()
    workers = {w.index: w for w in info.workers}
    assert len({w.pid for w in workers.values()}) == 2
    assert info.admin_url == workers[1].admin_url

    # 1. One port, both workers: hold sessions open until each worker counts one.
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_SESSIONS):
            ws = await stack.enter_async_context(open_raw(server.authed_url()))
            reply = await RawClient(ws).initialize(TASKS_VERSION)
            assert "result" in reply, reply
            counts = [
                (await _worker_status(w.admin_url or "", admin_token)).node.sessions_live
                for w in workers.values()
            ]
            if all(counts):
                break
        else:
            raise AssertionError(f"{MAX_SESSIONS} sessions all reached one worker: {counts}")
    rows = query(
        url,
        "select node_id, pid from nodes where node_id = any(%s)",
        ([w.node_id for w in workers.values()],),
    )
    assert sorted(pid for _, pid in rows) == sorted(w.pid for w in workers.values())

    await _a_session_resumes_on_the_other_worker(server, url)
    await _status_shows_every_worker(server, workers)
    await _killed_worker_is_restarted(server, url, workers)
    await _sigterm_stops_everything(server, external)


def _holder(url: str, session_id: str) -> tuple[str, bool] | None:
    """The node holding the session's row, and whether it is parked (``None``: no row yet)."""
    rows = query(
        url,
        "select node_id, parked_until is not null from sessions where session_id = %s",
        (session_id,),
    )
    return (rows[0][0], rows[0][1]) if rows else None


async def _a_session_resumes_on_the_other_worker(server: ServerProcess, url: str) -> None:
    """1b. A session dropped on one worker goes on where the client's next connection lands:
    reconnections are spread by the kernel, so the client drops and resumes until one lands
    on the other worker (each try lands there with even odds), which claims the session
    from the database with what it negotiated: a 2025-03-26 session takes a batch, which no
    fresh (uninitialized) session would."""
    async with open_raw(server.authed_url()) as ws:
        reply = await RawClient(ws).initialize("2025-03-26")
        session_id: str = reply["result"]["_meta"]["exai/sessionId"]
        await ws.aclose(GOING_AWAY)  # not a clean 1000: the session is parked
    await wait_until(lambda: (_holder(url, session_id) or ("", False))[1], what="parked")
    first = _holder(url, session_id)
    assert first is not None
    resume = [(b"mcp-session-id", session_id.encode())]
    for attempt in range(MAX_RESUMES):
        async with open_raw(server.authed_url(), extra_headers=resume) as ws:
            client = RawClient(ws)
            await client.send([{"jsonrpc": "2.0", "id": attempt, "method": "tools/list"}])
            batch = await client.receive_any()
            assert isinstance(batch, list), batch
            assert "result" in batch[0], batch
            holder = _holder(url, session_id)
            assert holder is not None
            await ws.aclose(GOING_AWAY)
        if holder[0] != first[0]:
            break
        await wait_until(lambda: (_holder(url, session_id) or ("", False))[1], what="parked")
    else:
        raise AssertionError(f"{MAX_RESUMES} resumes all landed on the worker that parked it")


async def _status_shows_every_worker(server: ServerProcess, workers: dict[int, WorkerInfo]) -> None:
    """2. exai status: every worker, in turn; --json; --worker N alone."""
    text = await trio.to_thread.run_sync(_status, server)
    assert text.returncode == 0, text.stderr
    assert "worker 1 of 2" in text.stdout
    assert "worker 2 of 2" in text.stdout
    for worker in workers.values():
        assert f"node {worker.node_id}" in text.stdout
    document = await trio.to_thread.run_sync(_status, server, "--json")
    assert document.returncode == 0, document.stderr
    shown = json.loads(document.stdout)["workers"]
    assert [(d["worker"], d["status"]["node"]["node_id"]) for d in shown] == [
        (w.index, w.node_id) for w in workers.values()
    ]
    # SIGHUP to the parent reaches every worker: each reloads its tokens.
    server.process.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: (
            sorted(
                e.get("worker", 0) for e in server.log_events() if e["event"] == "config.reloaded"
            )
            == [1, 2]
        ),
        what="both workers reloaded",
    )
    one = await trio.to_thread.run_sync(_status, server, "--json", "--worker", "2")
    assert one.returncode == 0, one.stderr
    assert NodeStatus.model_validate_json(one.stdout).node.node_id == workers[2].node_id


async def _killed_worker_is_restarted(
    server: ServerProcess, url: str, workers: dict[int, WorkerInfo]
) -> None:
    """3. A worker killed with a task running on it: restarted, its task interrupted once."""
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        assert "result" in await client.initialize(TASKS_VERSION)
        task = await create(client, "exai_test_block")
        task_id = uuid.UUID(task["taskId"])
        [(node_id,)] = query(url, "select node_id from tasks where id = %s", (task_id,))
        victim = next(w for w in workers.values() if w.node_id == node_id)
        os.kill(victim.pid, signal.SIGKILL)
        await wait_until(
            lambda: any(
                w.index == victim.index and w.pid != victim.pid for w in _info(server).workers
            ),
            what=f"worker {victim.index} restarted",
        )
    successor = next(w for w in _info(server).workers if w.index == victim.index)
    assert successor.node_id != victim.node_id
    assert not _alive(victim.pid)
    [(status,)] = query(url, "select status from tasks where id = %s", (task_id,))
    assert status == "interrupted"
    [(swept_by, swept_tasks, stopped)] = query(
        url,
        "select swept_by, swept_tasks, stopped_at is not null from nodes where node_id = %s",
        (victim.node_id,),
    )
    assert (swept_by, swept_tasks, stopped) == (successor.node_id, 1, True)
    recoveries = [
        e
        for e in server.log_events()
        if e["event"] == "recovery.done" and victim.node_id in e["dead_nodes"]
    ]
    assert len(recoveries) == 1, recoveries
    assert recoveries[0]["node_id"] == successor.node_id
    assert recoveries[0]["interrupted_tasks"] == 1
    assert recoveries[0]["journals"], "the dead worker's journal was replayed"
    # exai trace reads every worker's log (workers/<index>/logs), in time order.
    state = str(server.state_dir)
    traced = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [str(EXAI), "trace", "--event", "recovery.done", "--json", "--state-dir", state],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    )
    recovered = [json.loads(line)["node_id"] for line in traced.stdout.splitlines()]
    assert sorted(recovered) == sorted([*(w.node_id for w in workers.values()), successor.node_id])
    crashed = [e for e in server.log_events() if e["event"] == "child.crashed"]
    assert [e["path"] for e in crashed] == [f"/workers/worker-{victim.index}"]


async def _sigterm_stops_everything(server: ServerProcess, external: str | None) -> None:
    """4. SIGTERM: every worker drains and exits, then the database and the lock."""
    state = server.state_dir
    pids = [w.pid for w in _info(server).workers]
    assert await trio.to_thread.run_sync(server.stop) == 0, server.stderr_path.read_text()
    assert not any(_alive(pid) for pid in pids)
    exited = [e for e in server.log_events() if e["event"] == "workers.exited"]
    assert sorted(e["worker"] for e in exited) == [1, 2]
    assert all(e["exit_code"] == 0 for e in exited)
    assert not (state / "server.json").exists()
    StateDirLock.acquire(state).release()  # free: the parent released it
    if external is None:
        assert not (state / "pg" / "postmaster.pid").exists(), "the embedded Postgres stopped"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "workers"),
        ("-1", "workers"),
        ("65", "workers"),
        ("many", "workers"),
    ],
)
def test_bad_worker_counts_are_refused(value: str, message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(EXAI), "serve", "--workers", value, "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"{message} (--{message} / EXAI_WORKERS)" in done.stderr
    assert not (tmp_path / "state").exists(), "refused before anything was made"


async def test_a_stopped_worker_is_replaced_and_workers_do_not_outlive_a_killed_parent(
    database_url: str, tmp_path: Path
) -> None:
    server = await trio.to_thread.run_sync(
        lambda: start_server(
            tmp_path / "state",
            database_url=database_url,
            extra_env={"EXAI_WORKERS": "2", "EXAI_WORKER_TIMEOUT": "3"},
        )
    )
    # Found by trying it: a SIGSTOPped worker stayed in place for ever, and the kernel went
    # on giving it its share of new connections (which hung). Silent for EXAI_WORKER_TIMEOUT
    # seconds, it is killed and another takes its place.
    stopped = _info(server).workers[0].pid
    os.kill(stopped, signal.SIGSTOP)
    await wait_until(
        lambda: _info(server).workers[0].pid != stopped and len(_info(server).workers) == 2,
        what="worker 1 replaced",
    )
    unresponsive = [e for e in server.log_events() if e["event"] == "workers.unresponsive"]
    assert (1, stopped) in [(e["worker"], e["pid"]) for e in unresponsive]
    assert not _alive(stopped)
    pids = [w.pid for w in _info(server).workers]
    server.process.send_signal(signal.SIGKILL)
    assert await trio.to_thread.run_sync(server.process.wait) == -signal.SIGKILL
    # Their lifeline (the socket pair with the parent) ended: each stops at once, alone.
    await wait_until(lambda: not any(_alive(pid) for pid in pids), what="workers gone")
    gone = [e for e in server.log_events() if e["event"] == "server.parent_gone"]
    assert sorted(e["worker"] for e in gone) == [1, 2]


def test_a_worker_that_cannot_start_stops_the_server_with_its_code(tmp_path: Path) -> None:
    port = socket.socket()  # nothing listens on its port: the database is refused at once
    port.bind(("127.0.0.1", 0))
    with port:
        unreachable = f"postgresql://exai@127.0.0.1:{port.getsockname()[1]}/exai"
        argv = [str(EXAI), "serve", "--workers", "2", "--port", "0", "--database-wait", "0"]
        argv += ["--state-dir", str(tmp_path / "state"), "--database-url", unreachable]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "EXAI_LOG_CONSOLE": "json"},
        )
    assert done.returncode == 4, done.stderr
    assert "could not start (exit code 4)" in done.stderr.splitlines()[-1]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    started = [e["pid"] for e in events if e["event"] == "workers.started"]
    assert len(started) == 2
    assert not any(_alive(pid) for pid in started)
    assert not (tmp_path / "state" / "server.json").exists()


def test_workers_that_would_not_fit_in_the_databases_connections_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    """Found trying ``--workers 24`` on the embedded Postgres (100 connections): it served,
    with most workers' persistence refused ("too many clients already") and psql locked out.
    Now the parent refuses at once, exit code 4, before starting any worker."""
    maximum, reserved, _ = room(database_url) or (0, 0, 0)
    workers = (maximum - reserved) // CONNECTIONS_PER_NODE + 1  # more than fit, even idle
    assert 2 <= workers <= 64, f"the test database's max_connections is {maximum}"
    argv = [str(EXAI), "serve", "--workers", str(workers), "--port", "0"]
    argv += ["--state-dir", str(tmp_path / "state"), "--database-url", database_url]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "EXAI_LOG_CONSOLE": "json"},
    )
    assert done.returncode == 4, done.stderr
    last = done.stderr.splitlines()[-1]
    assert f"--workers {workers} needs up to {workers * CONNECTIONS_PER_NODE} database" in last
    assert f"(max_connections {maximum}, {reserved} reserved" in last
    assert '"workers.started"' not in done.stderr
    assert not (tmp_path / "state" / "server.json").exists()


def test_the_embedded_postgres_of_64_workers_has_room_for_their_connections() -> None:
    """The parent starts its embedded Postgres with ``max_connections`` for every worker."""
    with reachable_tempdir("exai-test-pg-") as tmp:
        embedded = EmbeddedPostgres(tmp / "pg", max_connections=embedded_max_connections(64))
        url = embedded.start()
        try:
            maximum, _, _ = room(url) or (0, 0, 0)
        finally:
            embedded.stop()
    assert maximum == 64 * CONNECTIONS_PER_NODE + EMBEDDED_SPARE
    assert embedded_max_connections(2) == 100  # never below PostgreSQL's default


def test_status_lists_a_worker_being_restarted_as_not_serving(tmp_path: Path) -> None:
    """A restarting worker is missing from ``server.json``'s list until its successor
    serves: ``exai status`` still counts it (``worker_count``), says it is not serving
    (exit 4), and ``--json`` keeps its shape when no worker answers."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin-token").write_text("t" * 32 + "\n")
    now = datetime.now(UTC)
    write_server_info(
        state / "server.json",
        ServerInfo(
            url="ws://127.0.0.1:1/mcp",
            pid=os.getpid(),  # alive: the file is not stale
            started_at=now,
            protocol_versions=[],
            workers=[
                WorkerInfo(index=1, pid=os.getpid(), node_id="n1", admin_url=None, started_at=now)
            ],
            worker_count=2,
        ),
    )
    shown = subprocess.run(
        [str(EXAI), "status", "--json", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 4, shown.stderr
    assert json.loads(shown.stdout) == {"workers": []}
    assert "worker 2: worker 2 is not serving" in shown.stderr
    assert "worker 1:" in shown.stderr
