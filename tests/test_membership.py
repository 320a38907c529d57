"""Membership across nodes on one database (storage/membership.py, actors/membership.py).

One fixed scenario with three real ``exai serve`` nodes on one fresh Postgres database, with
sub-second heartbeats and sweeps: node A is SIGKILLed while a task runs on it (a tool that
blocks); B and C both sweep; A's task and session are interrupted exactly once (the counts on
A's row, the sweepers' own logs, the task's version) and ``swept_by`` names one of them; a
final state found later in A's journal (replayed by A's successor) replaces ``interrupted``;
``exai status --cluster --json`` matches what each node is, field by field.

No sleeps: other processes write the rows, so the test polls the database with a deadline
(:func:`tests.harness.wait_until`), which bounds only a failure.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.config import ConfigError, load_settings
from storage.journal import Journal
from storage.membership import ClusterNode
from storage.rows import TaskFinished
from tests.chat_support import ALICE
from tests.harness import (
    EXAI,
    ServerProcess,
    fetch,
    fresh_database,
    query,
    start_server,
    wait_until,
)
from tests.test_tasks import create, session

#: Sub-second membership: beat every 0.1 s, dead after 1 s of silence, sweep every 0.1 s.
MEMBERSHIP = {
    "EXAI_NODE_HEARTBEAT_INTERVAL": "0.1",
    "EXAI_NODE_TIMEOUT": "1.0",
    "EXAI_SWEEP_INTERVAL": "0.1",
    "EXAI_CLIENT_TOKENS": f"alice={ALICE}",
}


def _node_row(url: str, node_id: str) -> dict[str, Any]:
    rows = query(
        url,
        "select stopped_at, swept_at, swept_by, swept_tasks, swept_sessions, snapshot"
        " from nodes where node_id = %s",
        (node_id,),
    )
    assert rows, node_id
    names = ["stopped_at", "swept_at", "swept_by", "swept_tasks", "swept_sessions", "snapshot"]
    return dict(zip(names, rows[0], strict=True))


def _swept_by_logs(server: ServerProcess) -> tuple[int, int]:
    events = [e for e in server.log_events() if e["event"] == "membership.swept"]
    return sum(e["tasks"] for e in events), sum(e["sessions"] for e in events)


def _cluster_text(server: ServerProcess) -> str:
    done = subprocess.run(
        [str(EXAI), "status", "--cluster", "--state-dir", str(server.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cluster_status(server: ServerProcess) -> dict[str, Any]:
    done = subprocess.run(
        [str(EXAI), "status", "--cluster", "--json", "--state-dir", str(server.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


async def test_a_killed_node_is_swept_once_by_another_and_its_journal_wins(
    database_url: str, tmp_path: Path
) -> None:
    with fresh_database(database_url) as url:
        start = partial(start_server, database_url=url, extra_env=MEMBERSHIP)
        a = await trio.to_thread.run_sync(start, tmp_path / "a")
        b = await trio.to_thread.run_sync(start, tmp_path / "b")
        c = await trio.to_thread.run_sync(start, tmp_path / "c")
        servers = [a, b, c]
        try:
            ids = {s.state_dir.name: (await fetch(s)).node.node_id for s in servers}
            a_id = ids["a"]

            # A runs a task that blocks; its heartbeat publishes the call before it dies.
            async with session(a, ALICE) as (client, _):
                task = await create(client, "exai_test_block")
                await wait_until(
                    lambda: (_node_row(url, a_id)["snapshot"] or {}).get("calls_in_flight") == 1,
                    what="A's snapshot with its call in flight",
                )
                a.process.send_signal(signal.SIGKILL)
                assert await trio.to_thread.run_sync(a.process.wait) == -signal.SIGKILL
            task_id = uuid.UUID(task["taskId"])

            # B and C both sweep every 0.1 s: A's row is swept once A is 1 s silent.
            await wait_until(
                lambda: _node_row(url, a_id)["stopped_at"] is not None,
                what="A swept",
            )
            row = _assert_swept_once(url, a_id, ids, b, c)
            status = await trio.to_thread.run_sync(_cluster_status, b)
            _assert_cluster(status, ids, servers, row)
            text = await trio.to_thread.run_sync(_cluster_text, b)
            table = text[text.index("CLUSTER") :].splitlines()
            for name, node_id in ids.items():
                line = next(line for line in table if line.startswith(node_id))
                assert line.split()[3 if name != "b" else 5] == (
                    "dead" if name == "a" else "alive"
                ), line
            # A's journal held the task's final state (written there, never in the database):
            # A's successor replays it at start-up, and it replaces the sweep's guess.
            journal = Journal.open(a.state_dir / "journal", node_id=a_id)
            finished = TaskFinished(
                task_id=task_id,
                status="completed",
                completed_at=datetime.now(UTC),
                version=3,
                result={"answer": 42},
            )
            assert not journal.append([finished], durable=True)
            journal.close()  # as A's exit would: its lock is free, the file an orphan
            successor = await trio.to_thread.run_sync(start, a.state_dir)
            servers.append(successor)
            assert query(url, "select status, result from tasks where id = %s", (task_id,)) == [
                ("completed", {"answer": 42})
            ]
            # Nobody sweeps A again: its counts are what the one sweep marked.
            row = _node_row(url, a_id)
            assert (row["swept_tasks"], row["swept_sessions"]) == (1, 1)
        finally:
            for server in servers:
                if server.process.poll() is None:
                    assert await trio.to_thread.run_sync(server.stop) == 0


def _assert_swept_once(
    url: str, a_id: str, ids: dict[str, str], b: ServerProcess, c: ServerProcess
) -> dict[str, Any]:
    """A's row and work were swept once, by B or C; A's row returned."""
    row = _node_row(url, a_id)
    assert row["swept_by"] in (ids["b"], ids["c"])
    assert row["swept_at"] is not None
    assert row["swept_tasks"] == 1
    interrupted_sessions = query(
        url,
        "select count(*) from sessions where node_id = %s and status = 'interrupted'",
        (a_id,),
    )[0][0]
    assert row["swept_sessions"] == interrupted_sessions == 1
    assert query(
        url,
        "select status, version from tasks where node_id = %s",
        (a_id,),
    ) == [("interrupted", 3)]  # running (2), interrupted once (3)
    # Each sweeper counts only what it marked: together, exactly the one task.
    counted = [_swept_by_logs(s) for s in (b, c)]
    assert sum(t for t, _ in counted) == 1
    assert sum(s for _, s in counted) == 1
    sweeper = b if row["swept_by"] == ids["b"] else c
    assert _swept_by_logs(sweeper) == (1, 1)

    return row


def _assert_cluster(
    status: dict[str, Any],
    ids: dict[str, str],
    servers: list[ServerProcess],
    row: dict[str, Any],
) -> None:
    """``status --cluster --json`` (B's), field by field against what each node is."""
    a_id = ids["a"]
    b, c = servers[1], servers[2]
    # The cluster, as B's admin endpoint reads it from the database.
    nodes = {n["node_id"]: ClusterNode.model_validate(n) for n in status["nodes"]}
    assert set(nodes) == set(ids.values())
    for server in servers:
        node = nodes[ids[server.state_dir.name]]
        assert node.pid == server.process.pid
        assert node.hostname == socket.gethostname()  # all on this machine
        assert node.heartbeat_age_s >= 0
    dead = nodes[a_id]
    assert dead.state == "dead"
    assert (dead.swept_by, dead.swept_tasks, dead.swept_sessions) == (
        row["swept_by"],
        1,
        1,
    )
    assert dead.heartbeat_age_s >= 1.0  # silent past the timeout, database clock
    assert dead.snapshot is not None
    assert (dead.snapshot.sessions, dead.snapshot.calls_in_flight) == (1, 1)
    for live in (b, c):
        node = nodes[ids[live.state_dir.name]]
        assert node.state == "alive"
        assert node.swept_by is None
        assert node.stopped_at is None
        assert node.snapshot is not None
        assert node.snapshot.health == "ok"
        assert node.snapshot.storage_available
        assert (node.snapshot.sessions, node.snapshot.calls_in_flight) == (0, 0)


async def test_a_paused_node_swept_as_dead_rejoins_and_its_final_state_wins(
    database_url: str, tmp_path: Path
) -> None:
    """A runs a task; A is paused (SIGSTOP) past the timeout and B sweeps it (the task
    ``interrupted``, A ``dead``); A resumes (SIGCONT): its next heartbeat makes it alive
    again (one ``membership.rejoined`` line naming B), the task's final state written by A
    (cancelled by its client) supersedes ``interrupted``, and A's clean stop then shows as
    ``stopped``, not ``dead``. Before the fix A stayed ``dead`` until a restart."""
    with fresh_database(database_url) as url:
        start = partial(start_server, database_url=url, extra_env=MEMBERSHIP)
        a = await trio.to_thread.run_sync(start, tmp_path / "a")
        b = await trio.to_thread.run_sync(start, tmp_path / "b")
        try:
            a_id = (await fetch(a)).node.node_id
            b_id = (await fetch(b)).node.node_id
            async with session(a, ALICE) as (client, _):
                task = await create(client, "exai_test_block")
                task_id = uuid.UUID(task["taskId"])
                await wait_until(
                    lambda: (
                        query(url, "select status from tasks where id = %s", (task_id,))
                        == [("running",)]
                    ),
                    what="A's task running in the database",
                )
                a.process.send_signal(signal.SIGSTOP)
                try:
                    await wait_until(
                        lambda: _node_row(url, a_id)["stopped_at"] is not None,
                        what="A swept while paused",
                    )
                finally:
                    a.process.send_signal(signal.SIGCONT)
                assert _node_row(url, a_id)["swept_by"] == b_id
                assert query(url, "select status from tasks where id = %s", (task_id,)) == [
                    ("interrupted",)
                ]
                await wait_until(
                    lambda: _node_row(url, a_id)["stopped_at"] is None,
                    what="A alive again after SIGCONT",
                )
                nodes = {n["node_id"]: n for n in _cluster_status(b)["nodes"]}
                assert nodes[a_id]["state"] == "alive"
                assert nodes[a_id]["swept_by"] == b_id  # the record of the sweep stays
                rejoined = [e for e in a.log_events() if e["event"] == "membership.rejoined"]
                assert len(rejoined) == 1, rejoined
                assert rejoined[0]["swept_by"] == b_id
                assert rejoined[0]["swept_tasks"] == 1
                # A's own final state for the task supersedes the sweep's guess.
                reply = await client.request("tasks/cancel", {"taskId": str(task_id)})
                assert "result" in reply, reply
                await wait_until(
                    lambda: (
                        query(url, "select status from tasks where id = %s", (task_id,))
                        == [("cancelled",)]
                    ),
                    what="A's cancelled state over interrupted",
                )
            assert await trio.to_thread.run_sync(a.stop) == 0
            nodes = {n["node_id"]: n for n in _cluster_status(b)["nodes"]}
            assert nodes[a_id]["state"] == "stopped"
        finally:
            for server in (a, b):
                if server.process.poll() is None:
                    server.process.send_signal(signal.SIGCONT)
                    assert await trio.to_thread.run_sync(server.stop) == 0


@pytest.mark.parametrize(
    ("heartbeat", "timeout"), [("1", "1"), ("2", "1")], ids=["equal", "shorter"]
)
def test_a_node_timeout_not_above_the_heartbeat_interval_is_refused(
    tmp_path: Path, heartbeat: str, timeout: str
) -> None:
    with pytest.raises(RuntimeError, match="must exceed node_heartbeat_interval"):
        start_server(
            tmp_path / "state",
            database_url=None,
            extra_env={"EXAI_NODE_HEARTBEAT_INTERVAL": heartbeat, "EXAI_NODE_TIMEOUT": timeout},
        )


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("node_timeout", float("inf")),
        ("node_timeout", 1e16),
        ("node_heartbeat_interval", float("inf")),
        ("sweep_interval", float("inf")),
    ],
)
def test_membership_times_past_their_bounds_are_refused_at_start(
    setting: str, value: float
) -> None:
    """A careless ``EXAI_NODE_TIMEOUT=inf`` (or 1e16) passed ``gt=0`` and then failed every
    sweep and every count of live nodes in Postgres (``interval out of range``), leaving
    the shared limits degraded for good; now the start is refused, naming the setting."""
    with pytest.raises(ConfigError, match=setting):
        load_settings(**{setting: value})
