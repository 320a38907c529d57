"""Start-up failures of ``exai serve`` (issue 12, items 1-3): one line on stderr naming the
cause and what to do, and an exit code per cause; a database that is down at start is waited
for; one server per state dir.

Every test runs the real ``exai serve`` against a real socket and a real PostgreSQL. "One line"
is checked on stderr as the operator sees it: the console log (JSON lines, as under any
non-terminal) may go on around it, but holds no traceback, and every other line is the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import trio
from psycopg.conninfo import conninfo_to_dict

from runtime.statefile import read_server_info
from tests.harness import EXAI, start_server, wait_until, with_database

#: A failing start is over in seconds; this only bounds a test that would otherwise hang
#: (a server that starts where it should have refused to).
EXIT_DEADLINE = 60


@dataclass
class Exited:
    code: int
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    @property
    def message(self) -> str:
        """The one line for the operator: every stderr line that is not a log event."""
        lines = [line for line in self.stderr.splitlines() if not line.startswith("{")]
        assert len(lines) == 1, self.stderr
        return lines[0]


def serve_until_exit(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> Exited:
    """Run ``exai serve`` expected to fail at start; its exit code and stderr."""
    env = {
        **os.environ,
        "EXAI_TOKEN": secrets.token_urlsafe(24),
        "EXAI_LOG_CONSOLE": "json",
        **(env or {}),
    }
    env.pop("EXAI_DATABASE_URL", None)
    done = subprocess.run(
        [str(EXAI), "serve", "--port", "0", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=EXIT_DEADLINE,
        check=False,
    )
    return Exited(done.returncode, done.stderr)


def assert_refused(exited: Exited, code: int, *fragments: str) -> str:
    assert exited.code == code, exited.stderr
    message = exited.message
    assert message.startswith("exai: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in exited.stderr, exited.stderr
    return message


def with_user(url: str, user: str) -> str:
    """``url`` logging in as ``user`` (same password, host and database)."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    password = userinfo.partition(":")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{hostport}"))


def database_attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {"storage.database_unreachable", "storage.database_refused", "storage.connected"}
    return [event for event in events if event.get("event") in names]


def logged_events(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines a server has written to ``path`` so far."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


# --- item 1: one line and an exit code per cause ---------------------------------------------


def test_an_address_in_use_exits_3_naming_host_and_port(database_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exited = serve_until_exit(
            tmp_path / "state", "--port", str(port), "--database-url", database_url
        )
    assert_refused(exited, 3, f"127.0.0.1:{port}", "address already in use", "--port")


def test_a_state_dir_that_cannot_be_created_exits_5(tmp_path: Path) -> None:
    # A path under a regular file is refused by the kernel (ENOTDIR) to root as to anyone,
    # where a chmod'ed directory would not stop root (the suite runs as root in CI).
    (tmp_path / "file").write_text("not a directory\n")
    state = tmp_path / "file" / "state"
    exited = serve_until_exit(state, "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert_refused(exited, 5, str(state), "--state-dir")


# --- item 2: the database, waited for while it does not answer, not when it refuses ----------


def test_an_unreachable_database_is_retried_then_exits_4(tmp_path: Path) -> None:
    password = secrets.token_hex(12)
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql://exai:{password}@127.0.0.1:{port}/exai_app"
        exited = serve_until_exit(tmp_path / "state", "--database-url", url, "--database-wait", "1")
    assert_refused(exited, 4, f"127.0.0.1:{port}", "'exai_app'", "gave up after")
    attempts = database_attempts(exited.events)
    assert len(attempts) >= 2, exited.stderr  # tried again within the second
    for attempt in attempts:
        assert attempt["event"] == "storage.database_unreachable", attempt
        assert (attempt["host"], attempt["port"], attempt["database"]) == (
            "127.0.0.1",
            str(port),
            "exai_app",
        )
    log_file = (tmp_path / "state" / "logs" / "exai.log").read_text()
    assert password not in exited.stderr
    assert password not in log_file


def test_a_refused_login_exits_4_without_waiting(database_url: str, tmp_path: Path) -> None:
    # A role that does not exist: 28000 under trust authentication (the embedded test
    # server), 28P01 under password authentication (EXAI_TEST_DATABASE_URL's, say).
    url = with_user(database_url, "exai_no_such_role")
    # The wait is longer than the test may take: only "not retried" lets it pass.
    exited = serve_until_exit(
        tmp_path / "state", "--database-url", url, env={"EXAI_DATABASE_WAIT": "600"}
    )
    assert_refused(exited, 4, "refused user 'exai_no_such_role'", "SQLSTATE 28")
    attempts = database_attempts(exited.events)
    assert [(a["event"], a["attempt"]) for a in attempts] == [("storage.database_refused", 1)]


def test_a_missing_database_exits_4_without_waiting(database_url: str, tmp_path: Path) -> None:
    url = with_database(database_url, "exai_no_such_database")
    exited = serve_until_exit(
        tmp_path / "state", "--database-url", url, env={"EXAI_DATABASE_WAIT": "600"}
    )
    assert_refused(exited, 4, "no database 'exai_no_such_database'", "SQLSTATE 3D000")
    attempts = database_attempts(exited.events)
    assert [(a["event"], a["attempt"]) for a in attempts] == [("storage.database_refused", 1)]


class DatabaseComingUp:
    """The test database behind a loopback port that refuses connections until :meth:`serve`:
    a database that is down at start and comes up later, as a client sees it. Bound from the
    start (so the port is ours throughout), listening only once served; each connection is
    relayed to the real server, over its Unix socket or TCP."""

    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        self._host = str(params.get("host") or "localhost")
        self._port = int(params.get("port") or 5432)
        self._socket = trio.socket.socket()
        password = str(params.get("password") or "")
        if not password and params.get("passfile"):
            # The embedded server's password lives in a libpq passfile
            # (host:port:database:user:password); the relay's URL carries it instead.
            line = Path(str(params["passfile"])).read_text().splitlines()[0]
            password = line.rsplit(":", 1)[1]
        self._login = (str(params.get("user") or ""), password)
        self._database = str(params["dbname"])

    async def bind(self) -> str:
        """Reserve the port; the URL that leads to the database through it."""
        await self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        user, password = (quote(part, safe="") for part in self._login)
        return f"postgresql://{user}:{password}@127.0.0.1:{port}/{self._database}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._socket.listen()
        await trio.serve_listeners(
            self._relay, [trio.SocketListener(self._socket)], task_status=task_status
        )

    async def _relay(self, client: trio.SocketStream) -> None:
        if self._host.startswith("/"):
            upstream: trio.abc.Stream = await trio.open_unix_socket(
                f"{self._host}/.s.PGSQL.{self._port}"
            )
        else:
            upstream = await trio.open_tcp_stream(self._host, self._port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            nursery.start_soon(_pump, upstream, client)


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)


async def test_a_database_down_at_start_is_waited_for(database_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    stderr_path = state / "server.stderr"  # where start_server sends it
    database = DatabaseComingUp(database_url)
    url = await database.bind()

    def failed_attempts() -> int:
        events = logged_events(stderr_path)
        return sum(e["event"] == "storage.database_unreachable" for e in events)

    async def come_up_once_tried(nursery: trio.Nursery) -> None:
        await wait_until(lambda: failed_attempts() > 0, what="a failed attempt logged")
        await nursery.start(database.serve)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(come_up_once_tried, nursery)
        server = await trio.to_thread.run_sync(
            partial(
                start_server,
                state,
                database_url=url,
                extra_env={"EXAI_DATABASE_WAIT": "120", "EXAI_LOG_CONSOLE": "json"},
            )
        )
        try:
            attempts = database_attempts(server.log_events())
            connected = attempts[-1]
            assert connected["event"] == "storage.connected", attempts
            assert connected["attempts"] == len(attempts) >= 2
            port = url.rsplit(":", 1)[1].split("/")[0]
            assert (connected["host"], connected["port"]) == ("127.0.0.1", port)
            assert connected["database"] == str(conninfo_to_dict(database_url)["dbname"])
        finally:
            # In a thread: the relay must keep serving the server's last writes meanwhile.
            assert await trio.to_thread.run_sync(server.stop) == 0, server.stderr_path.read_text()
            nursery.cancel_scope.cancel()


# --- item 3: one server per state dir --------------------------------------------------------


def test_a_second_server_on_the_same_state_dir_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start_server(state, database_url=database_url)
    try:
        exited = serve_until_exit(state, "--database-url", database_url)
        assert_refused(exited, 5, f"pid {first.process.pid}", first.url, "--state-dir")
        # The first still owns the dir: server.json is its own, and exai status finds it.
        info = read_server_info(state / "server.json")
        assert info is not None
        assert (info.pid, info.url) == (first.process.pid, first.url)
        status = subprocess.run(
            [str(EXAI), "status", "--state-dir", str(state), "--json"],
            capture_output=True,
            text=True,
            timeout=EXIT_DEADLINE,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["node"]["pid"] == first.process.pid

        # A crash releases the lock: the kernel drops a dead process's flock.
        first.process.kill()
        first.process.wait()
        second = start_server(state, database_url=database_url)
        assert second.stop() == 0, second.stderr_path.read_text()
    finally:
        first.stop()
