"""The Justfile's recipes pass arguments as given, and ``just serve`` starts and stops quietly
(issue 12, item 15). Each test runs the real ``just`` (``pip install rust-just``, as the README
says) on the real Justfile.

* ``just serve ARGS`` / ``just test ARGS``: each argument reaches ``exai`` / pytest intact,
  whatever it holds (quotes, spaces, ``&``, ``$``), where ``{{ARGS}}`` used to paste them into
  a shell line: a database URL was cut at ``&`` and the server sent to the background.
* Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) stops ``just serve``
  with exit code 0 and nothing but the server's own log on stderr.
* No ``XDG_RUNTIME_DIR`` warning at start, where the variable is unset (any service).
* ``just setup`` on a fresh clone prints no wall of setuptools warnings building the project.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio

from tests.harness import ROOT, RawClient, open_raw, query, wait_until

JUST = shutil.which("just")
pytestmark = pytest.mark.skipif(
    JUST is None, reason="`just` is not installed (pip install rust-just)"
)

#: A path holding everything a shell would interpret.
AWKWARD = 'it\'s a $HOME & `x` "dir"'


#: The project's install in ``just setup``, without its dependencies (they build nothing here).
INSTALL = ("install", "--quiet", "--no-deps", "-e", ".")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(extra)
    return env


def _not_logs(stderr: str) -> list[str]:
    """stderr without the server's JSON log lines: what a person would see besides them."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def _url_with_query(database_url: str) -> str:
    """The test database's URL, naming the database only after a ``&`` in its query: cut
    there, it would name another database (libpq: the user's name)."""
    parts = urlsplit(database_url)
    query_string = "&".join(
        q for q in (parts.query, "sslmode=disable", f"dbname={parts.path.lstrip('/')}") if q
    )
    return urlunsplit(parts._replace(path="/", query=query_string + "&connect_timeout=5"))


def test_just_serve_passes_arguments_intact_and_stops_quietly_on_ctrl_c(
    database_url: str, tmp_path: Path
) -> None:
    assert JUST is not None
    state = tmp_path / AWKWARD
    token = secrets.token_urlsafe(24)
    args = [JUST, "serve", "--port", "0", "--state-dir", str(state)]
    args += ["--database-url", _url_with_query(database_url)]
    server = subprocess.Popen(
        args,
        cwd=ROOT,
        env=_env(EXAI_TOKEN=token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        url = _served_url(server)
        # The state dir is the one named, character for character.
        assert (state / "server.json").is_file()
        session_id = trio.run(_open_session, f"{url}?token={token}")
        # ...and so is the database, which only the part after the `&` names (the row lands
        # behind the answer, journal durability).
        trio.run(
            partial(
                wait_until,
                lambda: bool(
                    query(
                        database_url, "select 1 from sessions where session_id = %s", (session_id,)
                    )
                ),
                what="the session's row in the named database",
            )
        )
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C
        _, stderr = server.communicate(timeout=90)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.returncode == 0, stderr
    assert _not_logs(stderr) == [], stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "server.stopped" in events


def _served_url(server: subprocess.Popen[str]) -> str:
    """The URL ``exai serve`` prints once it accepts connections."""
    assert server.stdout is not None
    deadline = time.monotonic() + 90
    while True:
        ready, _, _ = select.select([server.stdout], [], [], max(deadline - time.monotonic(), 0))
        line = server.stdout.readline() if ready else ""
        assert line, f"just serve printed no URL (exit code {server.poll()})"
        if "serving MCP on " in line:
            return line.split("serving MCP on ", 1)[1].split()[0]  # the WebSocket URL


async def _open_session(url: str) -> str:
    async with open_raw(url) as ws:
        reply = await RawClient(ws).initialize()
    session_id: str = reply["result"]["_meta"]["exai/sessionId"]
    return session_id


def test_just_test_passes_arguments_intact(tmp_path: Path) -> None:
    assert JUST is not None
    report = tmp_path / f"{AWKWARD}.log"
    this = "tests/test_just.py"
    done = subprocess.run(
        [
            JUST,
            "test",
            this,
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "passes_arguments_intact and not stops_quietly",
            "--log-file",
            str(report),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{this}::test_just_test_passes_arguments_intact" in done.stdout.splitlines()
    assert f"{this}::test_just_serve" not in done.stdout
    assert report.is_file()


def test_setup_builds_the_project_without_setuptools_warnings(tmp_path: Path) -> None:
    """What ``just setup`` does that printed the warnings: the editable build and install of
    the project, in a fresh environment, with the recipe's own settings. (A fresh venv and a
    pip upgrade, the rest of a first setup, print nothing but take most of a minute here.)"""
    assert JUST is not None
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, clone / name)
    for package in ("actors", "runtime", "storage"):
        shutil.copytree(
            ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", clone / ".venv"], check=True)
    evaluated = subprocess.run(
        [JUST, "--evaluate", "quiet_build"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    name, _, value = evaluated.stdout.partition("=")
    recipe_env = {name: value} if evaluated.returncode == 0 else {}
    done = subprocess.run(
        # pip's --python: this venv's pip installs into the fresh one, which has none.
        [sys.executable, "-m", "pip", "--python", clone / ".venv" / "bin" / "python", *INSTALL],
        cwd=clone,
        env=_env(**recipe_env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for wall in ("Warning:", "!!", "********"):
        assert wall not in output, output
