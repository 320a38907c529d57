"""``python -m bench.hot_path``: the CPU one ``tools/call`` costs, over the in-memory session.

A whole session (reader, mailbox, actor, call runner, task rows through a real persistence
actor and Postgres) driven by :class:`~runtime.memory_transport.MemoryClient`, no socket, so
that what is measured is the session's own work per call, not the network's. ``--calls``
``echo`` calls are sent in waves of ``--concurrency`` (each wave sent, then its replies
received), after ``--warmup`` calls that are not counted, with the persistence client's pulse
running and ``--durability`` (a node's default, ``journal``, unless told) as on a node.
Reported per call, best of ``--runs``:

trio CPU     ``time.thread_time()`` of the trio thread (the session, the client's JSON, the
             persistence client's shipments): the hot path's own CPU
process CPU  ``time.process_time()``: the above plus the persistence actor's thread
wall         elapsed time

Uses a fresh embedded Postgres in a temporary directory unless ``EXAI_TEST_DATABASE_URL`` is
set (the tests' harness, ``tests.harness.test_database``). Not part of ``just bench``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pykka
import structlog
import trio

from actors.persistence import PersistenceActor, PersistenceClient
from actors.session import SessionConfig, SessionServices
from actors.session.memory import memory_session
from actors.tools.echo import Echo
from runtime.mcp.tools import ToolRegistry
from storage.durability import Durability
from storage.journal import Journal
from storage.migrations import apply_migrations
from tests.harness import test_database


async def _measure(
    url: str,
    journal_dir: Path,
    *,
    calls: int,
    concurrency: int,
    warmup: int,
    durability: Durability,
) -> tuple[float, float, float]:
    journal = Journal.open(journal_dir / f"journal-{uuid.uuid4().hex[:8]}", node_id="bench")
    ref: pykka.ActorRef[Any] = PersistenceActor.start(url, journal)
    persistence = PersistenceClient.for_ref(ref, durability=durability)
    try:
        # As on a node: the client's pulse runs (its shipper, its clock).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(persistence.pulse)
            result = await _calls(persistence, calls=calls, concurrency=concurrency, warmup=warmup)
            nursery.cancel_scope.cancel()
        return result
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(ref.stop, block=True, timeout=30))
        journal.close()


async def _calls(
    persistence: PersistenceClient, *, calls: int, concurrency: int, warmup: int
) -> tuple[float, float, float]:
    services = SessionServices(
        tools=ToolRegistry([Echo()]),
        persistence=persistence,
        config=SessionConfig(
            max_inflight=concurrency,
            test_faults=False,
            node_id="bench",
            total_slots=trio.CapacityLimiter(concurrency),
        ),
        mailbox_capacity=max(64, concurrency * 2),
        max_message_bytes=64 * 1024,
        max_restarts=3,
        restart_period=60,
    )
    async with memory_session(services) as session:
        client = session.client
        await client.request(
            "init",
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        next_id = 0

        async def wave(size: int) -> None:
            nonlocal next_id
            ids = list(range(next_id, next_id + size))
            next_id += size
            for request_id in ids:
                await client.send(
                    {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"text": "hello hot path"}},
                    }
                )
            for _ in ids:
                reply = (await client.receive()).message
                assert isinstance(reply, dict), reply
                assert "result" in reply, reply

        for _ in range(0, warmup, concurrency):
            await wave(concurrency)
        await persistence.flush()
        wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        for _ in range(0, calls, concurrency):
            await wave(concurrency)
        await persistence.flush()
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        thread = time.thread_time() - thread
    return thread / calls, cpu / calls, wall / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--durability",
        type=Durability,
        choices=list(Durability),
        default=Durability.JOURNAL,
        help="what a call's final write waits for (a node's default: journal)",
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with test_database() as url, TemporaryDirectory() as tmp:
        apply_migrations(url)
        results = [
            trio.run(
                partial(
                    _measure,
                    url,
                    Path(tmp),
                    calls=args.calls,
                    concurrency=args.concurrency,
                    warmup=args.warmup,
                    durability=args.durability,
                )
            )
            for _ in range(args.runs)
        ]
    for thread, cpu, wall in results:
        print(
            f"run: trio CPU {thread * 1e6:7.1f} µs  process CPU {cpu * 1e6:7.1f} µs  "
            f"wall {wall * 1e6:7.1f} µs  per call"
        )
    thread, cpu, wall = min(results)
    print(
        f"best of {args.runs} ({args.calls} calls, {args.concurrency} in flight, "
        f"{args.durability} durability): "
        f"trio CPU {thread * 1e6:.1f} µs, process CPU {cpu * 1e6:.1f} µs, "
        f"wall {wall * 1e6:.1f} µs per call"
    )


if __name__ == "__main__":
    main()
