"""``python -m bench.persistence``: the persistence actor against raw COPY and per-row INSERT.

One run, one database, same rows (``token_usage``, the highest-volume table), measured one
after the other:

raw COPY        one ``COPY ... FROM STDIN`` of every row in one transaction: the ceiling
per-row         one autocommit ``INSERT`` per row: the seed's pattern (a fixed time slice)
batch methods   batches of ``--batch`` rows, one transaction each, by COPY and by executemany
                (the choice the actor makes, measured)
actor           ``--writers`` trio tasks calling ``write_soon`` (records built in the loop,
                as a caller would), ended by one critical ``write``: the actor is FIFO, so
                its return means every row before it is in
critical        p50/p99 of ``await write()`` (20 writers in a loop), alone and while the
                background writers add half the throughput just measured (a steady load;
                flat out, a FIFO writer's latency is the backlog's, without bound)

Targets (issue 4): actor >= 0.3x raw COPY and >= 10x per-row. Uses a fresh embedded Postgres
in a temporary directory unless ``--database-url`` is given (a scratch database is created
and dropped on it). Prints a markdown table for docs/benchmarks.md, ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import trio

from actors.persistence import PersistenceActor, PersistenceClient, PersistenceConfig
from storage.embedded import EmbeddedPostgres
from storage.journal import Journal
from storage.migrations import apply_migrations
from storage.rows import SessionRow, TokenUsage

SESSION = "bench-session"
_COLUMNS = (
    "id, session_id, task_id, provider, model, input_tokens, output_tokens, cost, estimated,"
    " created_at"
)


@dataclass
class Result:
    rows: int
    raw_copy: float
    per_row: float
    per_row_rows: int
    batch: int
    batch_copy: float
    batch_executemany: float
    actor: float
    actor_batches: int
    actor_mean_batch: float
    critical_alone_p50_ms: float
    critical_alone_p99_ms: float
    critical_loaded_p50_ms: float
    critical_loaded_p99_ms: float
    critical_samples: int
    background_rate: float
    notes: list[str] = field(default_factory=list)

    @property
    def vs_copy(self) -> float:
        return self.actor / self.raw_copy

    @property
    def vs_per_row(self) -> float:
        return self.actor / self.per_row


def _tuples(n: int) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    return [
        (uuid.uuid4(), SESSION, None, "kimi", "k2", 120, 480, Decimal("0.000912"), False, now)
        for _ in range(n)
    ]


def _clear(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("truncate token_usage")
        conn.execute("checkpoint")  # do not bill one method for the previous one's WAL


def raw_copy(url: str, rows: int) -> float:
    data = _tuples(rows)
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"copy token_usage ({_COLUMNS}) from stdin") as copy,
        ):
            for row in data:
                copy.write_row(row)
        elapsed = time.perf_counter() - started
    return rows / elapsed


def per_row(url: str, seconds: float) -> tuple[float, int]:
    data = iter(_tuples(100_000))
    query = f"insert into token_usage ({_COLUMNS}) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            conn.execute(query, next(data))
            done += 1
        elapsed = time.perf_counter() - started
    return done / elapsed, done


def batches(url: str, rows: int, size: int, method: str) -> float:
    data = _tuples(rows)
    query = (
        f"insert into token_usage ({_COLUMNS}) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (id) do nothing"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for start in range(0, rows, size):
            chunk = data[start : start + size]
            with conn.transaction(), conn.cursor() as cur:
                if method == "copy":
                    with cur.copy(f"copy token_usage ({_COLUMNS}) from stdin") as copy:
                        for row in chunk:
                            copy.write_row(row)
                else:
                    cur.executemany(query, chunk)
        elapsed = time.perf_counter() - started
    return rows / elapsed


def _usage(now: datetime) -> TokenUsage:
    return TokenUsage(
        usage_id=uuid.uuid4(),
        session_id=SESSION,
        task_id=None,
        provider="kimi",
        model="k2",
        input_tokens=120,
        output_tokens=480,
        cost=Decimal("0.000912"),
        created_at=now,
    )


async def _background(client: PersistenceClient, count: int) -> None:
    """Write ``count`` rows as fast as possible, yielding like a busy session would."""
    now = datetime.now(UTC)
    for written in range(1, count + 1):
        client.write_soon(_usage(now))
        if written % 50 == 0:
            await trio.lowlevel.checkpoint()


async def _paced(client: PersistenceClient, rate: float, stop: Callable[[], bool]) -> None:
    """Write ``rate`` rows/s in bursts of 50 until ``stop()``: a steady load below capacity
    (flat out, FIFO would make a critical write wait behind an unbounded backlog)."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    written = 0
    while not stop():
        for _ in range(50):
            client.write_soon(_usage(now))
        written += 50
        await trio.sleep(max(0.0, started + written / rate - time.perf_counter()))


async def _critical_latencies(
    client: PersistenceClient, writers: int, per_writer: int
) -> list[float]:
    latencies: list[float] = []
    now = datetime.now(UTC)

    async def writer() -> None:
        for _ in range(per_writer):
            started = time.perf_counter()
            await client.write(_usage(now))
            latencies.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        for _ in range(writers):
            nursery.start_soon(writer)
    return latencies


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def through_actor(
    url: str, state: Path, rows: int, writers: int, max_batch: int
) -> tuple[float, int, float, list[float], list[float], float]:
    journal = Journal.open(state / "journal", node_id="bench")
    ref = PersistenceActor.start(url, journal, config=PersistenceConfig(max_batch=max_batch))
    try:
        client = PersistenceClient.for_ref(ref)
        await client.write(SessionRow(session_id=SESSION, created_at=datetime.now(UTC)))
        before = await client.status()

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(_background, client, rows // writers)
        await client.write(_usage(datetime.now(UTC)))  # FIFO: returns after all of the above
        elapsed = time.perf_counter() - started
        after = await client.status()
        batches = after.batches - before.batches
        mean_batch = (after.records_written - before.records_written) / max(1, batches)

        alone = await _critical_latencies(client, 20, 50)
        loaded: list[float] = []
        done = False
        load = rows / elapsed / 2
        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(_paced, client, load / writers, lambda: done)
            loaded = await _critical_latencies(client, 20, 50)
            done = True
        await client.flush()
    finally:
        ref.stop(block=True, timeout=60)
        journal.close()
    return (rows + 1) / elapsed, batches, mean_batch, alone, loaded, load


def _count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("select count(*) from token_usage").fetchone()
        return int(row[0]) if row else 0


def run(url: str, state: Path, *, rows: int, writers: int, batch: int, max_batch: int) -> Result:
    apply_migrations(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "insert into sessions (session_id) values (%s) on conflict do nothing", (SESSION,)
        )
    notes = []
    _clear(url)
    copy_rate = raw_copy(url, rows)
    _clear(url)
    row_rate, row_rows = per_row(url, 3.0)
    _clear(url)
    copy_batches = batches(url, rows, batch, "copy")
    _clear(url)
    many_batches = batches(url, rows, batch, "executemany")
    _clear(url)
    actor_rate, actor_batches, mean_batch, alone, loaded, load = trio.run(
        through_actor, url, state, rows, writers, max_batch
    )
    total = _count(url)
    if total < rows + 1:
        notes.append(f"LOST ROWS: {total} in the table, expected at least {rows + 1}")
    return Result(
        rows=rows,
        raw_copy=copy_rate,
        per_row=row_rate,
        per_row_rows=row_rows,
        batch=batch,
        batch_copy=copy_batches,
        batch_executemany=many_batches,
        actor=actor_rate,
        actor_batches=actor_batches,
        actor_mean_batch=mean_batch,
        critical_alone_p50_ms=_ms(alone, 0.50),
        critical_alone_p99_ms=_ms(alone, 0.99),
        critical_loaded_p50_ms=_ms(loaded, 0.50),
        critical_loaded_p99_ms=_ms(loaded, 0.99),
        critical_samples=len(alone),
        background_rate=load,
        notes=notes,
    )


def markdown(result: Result, *, writers: int) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = f"{os.cpu_count()} cores, Python {platform.python_version()}"
    r = result
    lines = [
        f"### {stamp} · `python -m bench.persistence` · {cpu}",
        "",
        "| path | rows/s | vs raw COPY | notes |",
        "|---|---|---|---|",
        f"| raw COPY, one transaction | {r.raw_copy:,.0f} | 1.00x | {r.rows:,} rows |",
        f"| one INSERT per row, autocommit (seed) | {r.per_row:,.0f} |"
        f" {r.per_row / r.raw_copy:.3f}x | {r.per_row_rows:,} rows in 3 s |",
        f"| batches of {r.batch:,}, COPY | {r.batch_copy:,.0f} | {r.batch_copy / r.raw_copy:.2f}x"
        " | one transaction per batch |",
        f"| batches of {r.batch:,}, executemany | {r.batch_executemany:,.0f} |"
        f" {r.batch_executemany / r.raw_copy:.2f}x | one transaction per batch, ON CONFLICT |",
        f"| **persistence actor**, {writers} trio writers | **{r.actor:,.0f}** |"
        f" **{r.vs_copy:.2f}x** | {r.actor_batches} transactions, {r.actor_mean_batch:,.0f}"
        " rows each on average |",
        "",
        "| critical `await write()` (20 concurrent writers) | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| alone | {r.critical_alone_p50_ms:.2f} | {r.critical_alone_p99_ms:.2f} |",
        f"| with {r.background_rate:,.0f} background rows/s | {r.critical_loaded_p50_ms:.2f} |"
        f" {r.critical_loaded_p99_ms:.2f} |",
        "",
        "Targets (issue 4):",
        "",
        f"- {'PASS' if r.vs_copy >= 0.3 else 'MISS'} actor >= 0.3x raw COPY: {r.vs_copy:.2f}x",
        f"- {'PASS' if r.vs_per_row >= 10 else 'MISS'} actor >= 10x per-row INSERT:"
        f" {r.vs_per_row:,.0f}x",
    ]
    lines += [f"- {note}" for note in r.notes]
    return "\n".join(lines) + "\n"


@contextmanager
def _database(url: str | None) -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="exai-bench-persistence-") as tmp:
        embedded = None
        if url is None:
            # As root the database's own user must enter it (docs/persistence.md).
            Path(tmp).chmod(0o711)
            embedded = EmbeddedPostgres(Path(tmp) / "pg")
            url = embedded.start()
        name = f"exai_bench_{secrets.token_hex(4)}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        try:
            yield urlunsplit(urlsplit(url)._replace(path=f"/{name}")), Path(tmp)
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')
            if embedded is not None:
                embedded.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.persistence", description=__doc__)
    parser.add_argument("--database-url", help="a server to use instead of an embedded one")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=PersistenceConfig().max_batch,
        help="the actor's max_batch (records per transaction)",
    )
    parser.add_argument("--json", type=Path, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    with _database(args.database_url) as (url, state):
        result = run(
            url,
            state,
            rows=args.rows,
            writers=args.writers,
            batch=args.batch,
            max_batch=args.max_batch,
        )
    print(markdown(result, writers=args.writers))
    if args.json:
        payload: dict[str, Any] = asdict(result)
        payload |= {"vs_copy": result.vs_copy, "vs_per_row": result.vs_per_row}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
