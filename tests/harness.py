"""Real parts for tests: a test Postgres, ``exai serve`` in a subprocess, raw WebSocket clients.

Nothing here is a mock. The database is a real PostgreSQL (embedded, or the one named by
``EXAI_TEST_DATABASE_URL``); the server is the real ``exai`` console script in its own process;
clients speak over real loopback sockets. Waiting is always on an event (a line printed, a
frame received, a process exit) or on a condition polled with a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from runtime.statefile import read_server_info
from runtime.status_model import NodeStatus
from storage.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
EXAI = Path(sys.executable).parent / "exai"
CLIENTS = ROOT / ".venv-clients"


@contextmanager
def reachable_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory that can hold an embedded Postgres's state dir.

    As root the database runs as its own system user, which must be able to enter every
    directory down to its data; ``tempfile`` makes directories 0700, so this one is opened for
    search (not listing) to others, which the test may do to a directory it made itself. The
    server never loosens a directory on its own (storage/embedded.py).
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chmod(tmp, 0o711)
        yield Path(tmp)


@contextmanager
def test_database() -> Iterator[str]:
    """A fresh, empty database for one test run; dropped afterwards.

    On ``EXAI_TEST_DATABASE_URL``'s server (CI's second target) or on an embedded Postgres
    started for this run in a temporary directory.
    """
    external = os.environ.get("EXAI_TEST_DATABASE_URL")
    embedded: EmbeddedPostgres | None = None
    with reachable_tempdir("exai-test-pg-") as tmp:
        if external:
            admin_url = external
        else:
            embedded = EmbeddedPostgres(tmp / "pg")
            admin_url = embedded.start()
        name = f"exai_test_{secrets.token_hex(4)}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        try:
            yield with_database(admin_url, name)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')
            if embedded is not None:
                embedded.stop()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class ServerProcess:
    """A running ``exai serve``; ``stop()`` sends SIGTERM and returns the exit code."""

    process: subprocess.Popen[str]
    url: str
    token: str
    state_dir: Path
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    announced: str = ""
    """The line it printed once serving (``exai: serving MCP on ...``)."""

    def authed_url(self, token: str | None = None) -> str:
        return f"{self.url}?token={token or self.token}"

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log_events(self) -> list[dict[str, Any]]:
        """The server's structured log so far, one dict per JSON line."""
        events = []
        text = self.stderr_path.read_text()
        # The server may be mid-line: only lines it has finished (newline-terminated) count.
        complete = text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


def start_server(
    state_dir: Path,
    *,
    database_url: str | None,
    token: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60,
    port: int = 0,
) -> ServerProcess:
    """Start ``exai serve`` on a free port (or ``port``) and return once it printed its URL.

    ``token=""`` starts it without ``EXAI_TOKEN``, so it uses (or creates) ``<state>/token``.
    """
    # The suite's database outlives its nodes: killed nodes of earlier tests stay in it. The
    # periodic sweep (actors/membership.py) would mark their rows whenever a later test's node
    # runs one, so tests sweep only when they ask for it (EXAI_SWEEP_INTERVAL in extra_env).
    env = {
        **os.environ,
        "EXAI_TEST_FAULTS": "1",
        "EXAI_SWEEP_INTERVAL": "3600",
        **(extra_env or {}),
    }
    env.pop("EXAI_DATABASE_URL", None)
    env.pop("EXAI_TOKEN", None)
    if token != "":
        # Never starting with "-": tests pass it as a command-line argument too.
        token = token or "test_" + secrets.token_urlsafe(24)
        env["EXAI_TOKEN"] = token
    args = [str(EXAI), "serve", "--port", str(port), "--state-dir", str(state_dir)]
    if database_url is not None:
        args += ["--database-url", database_url]
    state_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = state_dir / "server.stderr"
    with stderr_path.open("a") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
        if not ready:
            process.kill()
            raise TimeoutError(
                f"exai serve printed no URL in {timeout}s: {stderr_path.read_text()}"
            )
        line = process.stdout.readline()
        if not line:
            code = process.wait()
            raise RuntimeError(f"exai serve exited {code}: {stderr_path.read_text()}")
        if "serving MCP on " in line:
            url = line.split("serving MCP on ", 1)[1].split()[0]  # the WebSocket URL
            token = token or (state_dir / "token").read_text().strip()
            return ServerProcess(
                process, url, token, state_dir, stderr_path, announced=line.strip()
            )


class RawClient:
    """JSON-RPC over a bare WebSocket: sends exactly the bytes a test wants, malformed or not."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._next_id = 0

    async def send(self, message: str | dict[str, Any]) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(30):
            return json.loads(await self.ws.get_message())  # type: ignore[no-any-return]

    async def receive_any(self) -> Any:
        """The next frame, decoded, whatever its shape (a batch answer is a list)."""
        with trio.fail_after(30):
            return json.loads(await self.ws.get_message())

    async def receive_until_closed(self) -> int:
        """Read (and drop) frames until the server closes; return the close code."""
        with trio.fail_after(30):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        reply = await self.receive()
        assert reply.get("id") == self._next_id, reply
        return reply

    async def barrier(self) -> None:
        """A request the session *actor* answers (the reader answers ``ping`` itself, ahead
        of the mailbox): once it is answered, the actor has taken every message sent before
        it, and has started (and given slots to) every tools/call among them."""
        reply = await self.request("tools/list")
        assert "result" in reply, reply

    async def initialize(self, version: str = "2025-06-18") -> dict[str, Any]:
        reply = await self.request(
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "raw-test-client", "version": "0"},
            },
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply


def call(request_id: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    """A ``tools/call`` request."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def cancel(request_id: Any) -> dict[str, Any]:
    """A ``notifications/cancelled`` for ``request_id``."""
    return {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": "test"},
    }


def open_raw(url: str, **kwargs: Any) -> Any:
    return open_websocket_url(url, subprotocols=["mcp"], **kwargs)


async def wait_until(condition: Callable[[], bool], *, what: str, within: float = 30) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``within`` seconds.

    For conditions outside this process (a row another process writes) there is no event to
    wait on, so this polls; the deadline only bounds a failure, it never paces a success.
    """
    with trio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 - no event exists across processes
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def admin(server: ServerProcess) -> tuple[str, str]:
    """The admin interface's URL and token of a running server."""
    info = read_server_info(server.state_dir / "server.json")
    assert info is not None
    assert info.admin_url is not None
    return info.admin_url, (server.state_dir / "admin-token").read_text().strip()


async def fetch(server: ServerProcess) -> NodeStatus:
    """The server's status document (``GET /status`` of its admin interface)."""
    url, token = admin(server)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/status", headers={"authorization": f"Bearer {token}"})
    response.raise_for_status()
    return NodeStatus.model_validate_json(response.content)


async def wait_for_status(
    server: ServerProcess, condition: Callable[[NodeStatus], bool], *, what: str
) -> NodeStatus:
    """Poll the admin interface until ``condition`` holds: the server is another process, so
    there is no event to wait on (as :func:`wait_until`)."""
    with trio.move_on_after(30):
        while True:
            status = await fetch(server)
            if condition(status):
                return status
            await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def session_row(database_url: str, session_id: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(
            "select session_id, status, client_name, client_version, protocol_version,"
            " closed_at, last_activity from sessions where session_id = %s",
            (session_id,),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        names = [column.name for column in cursor.description or []]
        return dict(zip(names, row, strict=True))


# --- persistence (issue 4) ------------------------------------------------------------------


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new, empty database on the server of ``url``, dropped (with force) afterwards."""
    name = f"exai_scratch_{secrets.token_hex(4)}"
    admin = with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@contextmanager
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """An embedded Postgres for one test module to crash (``.crash()``) and restart
    (``.start()``); always embedded, even when ``EXAI_TEST_DATABASE_URL`` is set.

    Its data lives in a :func:`reachable_tempdir`, not pytest's ``tmp_path``: as root the
    server runs as another user, which cannot enter pytest's private (0700) base temp directory.
    """
    with reachable_tempdir("exai-test-pg-") as tmp:
        server = EmbeddedPostgres(tmp / "pg")
        server.start()
        try:
            yield server
        finally:
            server.stop()


def query(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


class LineReader:
    """Lines from a trio byte stream (a subprocess's stdout), one at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> str | None:
        """The next line without its newline, or ``None`` at end of stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()
