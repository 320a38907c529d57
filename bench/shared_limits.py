"""``python -m bench.shared_limits``: one rate limit held by several processes through Postgres.

Issue 18's benchmark of shared limits: ``--processes`` processes (4 by default), each with its
own :class:`storage.shared_limits.SharedLimits` (one connection, as each node has), take one
unit at a time from one bucket (``exai_rate_take``, the statement every admission runs) as fast
as they can for ``--duration`` seconds. Reported, all from one run on one database:

floor      ``select 1`` in a loop from as many processes: a round trip on the same connections,
           the most checks/s any one-statement design could reach
one        the same take from a single process: what one node's limiter can ask for
shared     the take from ``--processes`` processes on one bucket (one row: every check waits
           for the row lock of the one before): checks/s, and the admitted count against the
           bound GCRA promises, ``capacity + capacity / 60 * elapsed`` (the bucket starts
           empty; ``elapsed`` from the database's clock, first decision to last)

The capacity (``--capacity`` per minute, 1,200 by default: a burst of 1,200, then 20 a second)
is far below what the processes ask for, so most checks are refusals and the bound is what is
tested (a refusal is decided from an unlocked read and writes nothing; an admission locks its
row and commits). Uses a fresh embedded Postgres in a temporary directory unless
``--database-url`` names a server (a fresh database is made on it and dropped). Appends its
section to docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench import report
from storage.embedded import EmbeddedPostgres
from storage.migrations import apply_migrations
from storage.shared_limits import BucketTake, SharedLimits

KEY = "bench:shared"
REPO = Path(__file__).resolve().parent.parent
MARKER = (
    "<!-- bench shared_limits: newest results first; "
    "`python -m bench.shared_limits` inserts below -->"
)
SECTION = f"""## Shared limits: one rate limit across processes through Postgres (issue 18)

Several processes, each with its own connection as each node has, take from one GCRA bucket
with `exai_rate_take` (the statement every admission of a shared limit runs), beside `select 1`
round trips on as many connections and the same take from one process. Made by
`python -m bench.shared_limits`; what it measures is in its module doc.

{MARKER}
"""


@dataclass(frozen=True)
class Result:
    """What one process did: checks, admissions, and the database times of its first and last
    decision (epoch seconds; 0 for the floor, which decides nothing)."""

    checks: int
    admitted: int
    first_at: float
    last_at: float
    seconds: float


def _worker(url: str, what: str, capacity: float, start_at: float, duration: float) -> Result:
    limits = SharedLimits(url, statement_timeout=5.0)
    conn = psycopg.connect(url, autocommit=True) if what == "floor" else None
    take = [BucketTake(KEY, capacity, 1.0)]
    checks = admitted = 0
    first_at = last_at = 0.0
    try:
        # Connect before the start line, so connection set-up is not measured.
        if conn is not None:
            conn.execute("select 1")
        else:
            limits.live_nodes()
        time.sleep(max(0.0, start_at - time.time()))
        began = time.perf_counter()
        end = began + duration
        while time.perf_counter() < end:
            if conn is not None:
                conn.execute("select 1").fetchone()
            else:
                decision = limits.take(take)
                at = decision.at.timestamp()
                first_at = first_at or at
                last_at = at
                admitted += decision.taken
            checks += 1
        return Result(checks, admitted, first_at, last_at, time.perf_counter() - began)
    finally:
        if conn is not None:
            conn.close()
        limits.close()


def _run(url: str, what: str, processes: int, capacity: float, duration: float) -> list[Result]:
    if what != "floor":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("delete from rate_buckets where key = %s", (KEY,))
    start_at = time.time() + 1.0 + 0.2 * processes
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        args = [(url, what, capacity, start_at, duration)] * processes
        return pool.starmap(_worker, args)


@contextlib.contextmanager
def _database(given: str | None) -> Iterator[str]:
    """A fresh, migrated database: on ``given``'s server, or on an embedded Postgres."""
    with contextlib.ExitStack() as stack:
        admin = given
        if admin is None:
            tmp = Path(tempfile.mkdtemp(prefix="exai-bench-limits-"))
            stack.callback(shutil.rmtree, tmp, True)
            tmp.chmod(0o711)  # as root the database runs as its own user
            pg = EmbeddedPostgres(tmp / "pg")
            admin = pg.start()
            stack.callback(pg.stop)
        name = f"exai_bench_{secrets.token_hex(4)}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        url = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')

        stack.callback(drop)
        apply_migrations(url)
        yield url


def _rate(results: list[Result]) -> float:
    return sum(r.checks for r in results) / max(r.seconds for r in results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shared_limits", description=__doc__)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--capacity", type=float, default=1_200.0, help="the limit, per minute")
    p.add_argument("--database-url", default=None)
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(argv)
    n, capacity, duration = args.processes, args.capacity, args.duration
    with _database(args.database_url) as url:
        floor = _run(url, "floor", n, capacity, duration)
        one = _run(url, "take", 1, capacity, duration)
        shared = _run(url, "take", n, capacity, duration)
    admitted = sum(r.admitted for r in shared)
    elapsed = max(r.last_at for r in shared) - min(r.first_at for r in shared)
    bound = capacity + capacity / 60 * elapsed
    figures = {
        "processes": n,
        "capacity_per_minute": capacity,
        "floor_checks_per_s": round(_rate(floor)),
        "one_process_checks_per_s": round(_rate(one)),
        "shared_checks_per_s": round(_rate(shared)),
        "admitted": admitted,
        "bound": round(bound, 1),
        "elapsed_s": round(elapsed, 3),
    }
    held = admitted <= bound
    ratio = figures["shared_checks_per_s"] / figures["floor_checks_per_s"]
    database = "its own embedded Postgres" if args.database_url is None else "--database-url"
    text = "\n".join(
        [
            f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · `shared_limits` · "
            f"{report.machine()}",
            "",
            f"One bucket of {capacity:,.0f} per minute in one Postgres ({database}), "
            f"{duration:g} s per phase (`python -m bench.shared_limits`):",
            "",
            "| phase | processes | checks/s | admitted | bound (capacity + rate x elapsed) |",
            "|---|---:|---:|---:|---:|",
            f"| floor: `select 1` | {n} | {figures['floor_checks_per_s']:,} |  |  |",
            f"| `exai_rate_take`, one process | 1 | {figures['one_process_checks_per_s']:,} |"
            f" {sum(r.admitted for r in one):,} |  |",
            f"| `exai_rate_take`, one bucket shared | {n} | {figures['shared_checks_per_s']:,} |"
            f" {admitted:,} | {bound:,.1f} over {elapsed:.3f} s |",
            "",
            f"Shared checks/s are {ratio:.2f}x"
            f" the floor's round trips; the bound {'held' if held else 'was PASSED'}"
            f" ({admitted:,} admitted <= {bound:,.1f}).",
            "",
        ]
    )
    print(text)
    if args.json:
        print(json.dumps(figures))
    if not args.no_write:
        report.append(args.output, text, MARKER, SECTION, first=True)
        print(f"appended to {args.output}")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
