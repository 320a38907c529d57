"""The servers under test: how to start each one, where it listens, which processes are its.

- ``floor``: ``bench/servers/floor.py`` with the generators' interpreter (the runtime's stack).
- ``exai``: ``exai serve`` with its defaults (persistence on with an embedded Postgres under a
  fresh state directory, auth on with a token chosen by the harness, default logging).
- ``sdk``: ``bench/servers/sdk_fastmcp.py`` in ``bench/.venv-anchors`` (mcp 1.30 FastMCP).
- ``mcp2``: ``bench/servers/mcp2_lowlevel.py`` in ``bench/.venv-mcp2`` (optional).

A fresh server is started for every scenario so that its peak RSS belongs to that scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import proc, venvs
from bench.launch import Owned, free_port, stop_pids, wait_for_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

EXAI_DEFAULT_MAX_SESSIONS = 10_000

SERVERS = ("floor", "exai", "sdk", "mcp2")
LABELS = {
    "floor": "floor (trio-websocket echo)",
    "exai": "exai serve",
    "sdk": "SDK 1.30 FastMCP",
    "mcp2": "SDK 2.3 low-level",
}


@dataclass
class Running:
    """A started server: its URL (token included) and the processes whose cost is its."""

    name: str
    url: str
    #: The server's process, None when the generator starts it (``bench.stdiogen``, which
    #: names its pid in its ``ready`` event: that pid replaces ``pid`` for the measurement).
    owned: Owned | None
    pid: int
    state_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    # Where its database's data lives when that is not under the state dir (a Postgres the
    # harness started for it, reached with --database-url): its CPU is the server's `db`.
    db_dir: Path | None = None
    #: Extra arguments for the load generator that this server needs (``--stateless``).
    client_args: tuple[str, ...] = ()
    #: Processes under the server whose CPU is counted apart (``apart`` of the measurement),
    #: not as the server's: exai's proxied MCP servers. Called at each CPU reading.
    apart: Callable[[], list[int]] | None = None

    def db_pids(self) -> list[int]:
        """Postmasters under ``db_dir``, else under the state directory (exai's embedded
        Postgres)."""
        where = self.db_dir or self.state_dir
        return proc.postmaster_pids(where) if where else []


def find_exai(explicit: str | None) -> str | None:
    """The ``exai`` console script: explicit, next to this interpreter, the repo's .venv, PATH."""
    candidates = [
        explicit,
        str(Path(sys.executable).parent / "exai"),
        str(REPO / ".venv" / "bin" / "exai"),
        shutil.which("exai"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


@dataclass
class Options:
    """How to reach each server's program."""

    generator_python: str
    exai: str | None
    exai_database_url: str | None
    logs: Path
    start_timeout: float = 60.0
    # Extra EXAI_* variables for `exai serve` (``--exai-env``); empty: its defaults.
    exai_env: dict[str, str] = field(default_factory=dict)

    def unavailable(self, server: str) -> str | None:
        """Why ``server`` cannot run here, or None if it can."""
        if server == "exai" and self.exai is None:
            return "exai not found (no .venv/bin/exai yet): not measured"
        return None


def _python_for(server: str, opts: Options) -> str:
    if server == "floor":
        return opts.generator_python
    venv = "anchors" if server == "sdk" else "mcp2"
    return str(venvs.ensure(venv, log=opts.logs / f"venv-{venv}.log"))


@contextlib.contextmanager
def started(server: str, opts: Options, tag: str, sessions: int) -> Iterator[Running]:
    """Start ``server`` on a free loopback port; stop it (and its database) on exit.

    ``sessions`` is how many the scenario opens at once: exai refuses sessions beyond
    ``EXAI_MAX_SESSIONS`` (default 10,000), so the harness raises that limit to fit.
    """
    port = free_port()
    log = opts.logs / f"{tag}-{server}.log"
    deadline = time.monotonic() + opts.start_timeout
    if server == "exai":
        with _exai(port, opts, log, deadline, sessions) as running:
            yield running
        return
    script = {"floor": "floor.py", "sdk": "sdk_fastmcp.py", "mcp2": "mcp2_lowlevel.py"}[server]
    argv = [_python_for(server, opts), str(BENCH / "servers" / script), "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with Owned(server, argv, log, env=env, cwd=REPO) as owned:
        wait_for_port(port, deadline, owned)
        yield Running(server, f"ws://127.0.0.1:{port}/mcp", owned, owned.pid)


@contextlib.contextmanager
def _exai(port: int, opts: Options, log: Path, deadline: float, sessions: int) -> Iterator[Running]:
    assert opts.exai is not None
    state_dir = Path(tempfile.mkdtemp(prefix="exai-bench-state-"))
    # As root the embedded Postgres runs as its own user, which must enter the state dir; the
    # server never loosens a directory itself (docs/persistence.md, "The embedded database").
    state_dir.chmod(0o711)
    token = secrets.token_urlsafe(24)
    argv = [opts.exai, "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--state-dir", str(state_dir)]
    if opts.exai_database_url:
        argv += ["--database-url", opts.exai_database_url]
    env = dict(os.environ, EXAI_TOKEN=token)
    env.update(opts.exai_env)
    if sessions > EXAI_DEFAULT_MAX_SESSIONS:
        env["EXAI_MAX_SESSIONS"] = str(sessions + 100)
    try:
        with Owned("exai", argv, log, env=env, cwd=REPO) as owned:
            info = _wait_server_json(state_dir / "server.json", deadline, owned)
            url = str(info.get("url") or f"ws://127.0.0.1:{port}/mcp")
            pid = info.get("pid")
            pid = pid if isinstance(pid, int) else owned.pid
            sep = "&" if "?" in url else "?"
            yield Running("exai", f"{url}{sep}token={token}", owned, pid, state_dir)
    finally:
        # A Postgres left behind by an unclean exit is still ours to stop.
        leftovers = [p for p in proc.postmaster_pids(state_dir) if _is_postgres(p)]
        if leftovers:
            stop_pids(leftovers)
        shutil.rmtree(state_dir, ignore_errors=True)


def _wait_server_json(path: Path, deadline: float, owned: Owned) -> dict[str, object]:
    while True:
        if owned.returncode() is not None:
            raise RuntimeError(f"exai exited with {owned.returncode()}; see {owned.log}")
        if path.exists():
            with contextlib.suppress(ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"exai wrote no {path.name} in time; see {owned.log}")
        time.sleep(0.05)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
