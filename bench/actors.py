"""Actor kernel micro-benchmark: ask round trips per second, three ways, in one run.

1. a bare trio memory channel request/reply (the floor: no actor machinery at all);
2. a trio actor (``runtime.actor``) answering ``ActorRef.ask``;
3. a pykka actor answering through the bridge (``runtime.bridge.wait_reply``), which parks no
   thread per waiter;
plus, for reference, ``trio.to_thread.run_sync(future.get)``, the obvious way that parks one.

Each is measured with 1 asking task and with 100 concurrent asking tasks, for a fixed number
of round trips. Run: ``python -m bench.actors [--rounds N] [--write]``; ``--write`` prepends the
table to ``docs/benchmarks.md`` under its own heading.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pykka
import trio

from runtime.actor import Actor, run_actor
from runtime.bridge import BridgedActor, wait_reply
from runtime.mailbox import open_mailbox

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
MARK = "<!-- bench.actors -->"


class Doubler(Actor[int]):
    async def receive(self, message: int) -> int:
        return message * 2


class PykkaDoubler(BridgedActor):
    def on_receive(self, message: Any) -> Any:
        return message * 2


Ask = Callable[[int], Awaitable[int]]


async def _rate(ask: Ask, rounds: int, tasks: int) -> float:
    per_task = rounds // tasks

    async def worker() -> None:
        for n in range(per_task):
            assert await ask(n) == n * 2

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return per_task * tasks / (time.perf_counter() - start)


async def measure(rounds: int) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    async with trio.open_nursery() as nursery:
        # 1. The floor: a server task on a memory channel, replies on per-request channels.
        requests_send, requests_receive = trio.open_memory_channel[
            tuple[int, trio.MemorySendChannel[int]]
        ](1000)

        async def channel_server() -> None:
            async for value, reply_to in requests_receive:
                reply_to.send_nowait(value * 2)

        nursery.start_soon(channel_server)

        async def channel_ask(value: int) -> int:
            send, receive = trio.open_memory_channel[int](1)
            await requests_send.send((value, send))
            return await receive.receive()

        # 2. A trio actor.
        ref, inbox = open_mailbox("/bench/doubler", 1000)
        nursery.start_soon(run_actor, Doubler(), inbox)

        async def actor_ask(value: int) -> int:
            return int(await ref.ask(value))

        # 3. A pykka actor through the bridge, and through a parked thread.
        pykka_ref = PykkaDoubler.start()

        async def bridge_ask(value: int) -> int:
            return int(await wait_reply(pykka_ref.ask(value, block=False)))

        async def thread_ask(value: int) -> int:
            future = pykka_ref.ask(value, block=False)
            return int(await trio.to_thread.run_sync(future.get))

        try:
            for label, ask in [
                ("trio memory channel (floor)", channel_ask),
                ("trio actor ask", actor_ask),
                ("pykka actor via bridge", bridge_ask),
                ("pykka actor via to_thread", thread_ask),
            ]:
                results[label] = {t: await _rate(ask, rounds, t) for t in (1, 100)}
        finally:
            pykka_ref.stop(block=True)
            ref.close()
            requests_send.close()
    return results


def render(results: dict[str, dict[int, float]], rounds: int) -> str:
    floor = results["trio memory channel (floor)"]
    lines = [
        MARK,
        f"## Actor kernel: ask round trips/s ({datetime.now(UTC):%Y-%m-%d})",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{rounds} round trips per cell; `python -m bench.actors`.",
        "",
        "| path | 1 task | ratio to floor | 100 tasks | ratio to floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, by_tasks in results.items():
        lines.append(
            f"| {label} | {by_tasks[1]:,.0f} | {by_tasks[1] / floor[1]:.2f} "
            f"| {by_tasks[100]:,.0f} | {by_tasks[100] / floor[100]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--write", action="store_true", help="prepend to docs/benchmarks.md")
    args = parser.parse_args()
    results = trio.run(measure, args.rounds)
    table = render(results, args.rounds)
    print(table)
    if args.write:
        existing = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
        head, _, rest = existing.partition("\n\n")
        DOC.write_text(f"{head}\n\n{table}\n{rest}")
    pykka.ActorRegistry.stop_all()


if __name__ == "__main__":
    main()
