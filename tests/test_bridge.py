"""The trio↔pykka bridge: replies wake the right task, cancellation leaks nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest
import trio

from runtime.bridge import BridgedActor, wait_reply
from storage.errors import ActorUnavailable


@dataclass(frozen=True)
class Echo:
    value: Any


@dataclass(frozen=True)
class Block:
    gate: threading.Event
    value: Any


class Boom(Exception):
    pass


class Worker(BridgedActor):
    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Echo):
            return message.value
        if isinstance(message, Block):
            message.gate.wait(timeout=30)
            return message.value
        raise Boom(f"cannot handle {message!r}")


@pytest.fixture
def worker() -> Iterator[pykka.ActorRef[Worker]]:
    ref = Worker.start()
    yield ref
    ref.stop(block=True, timeout=30)


async def test_reply_wakes_the_asking_task(worker: pykka.ActorRef[Worker]) -> None:
    assert await wait_reply(worker.ask(Echo(42), block=False)) == 42


async def test_an_error_in_the_actor_is_raised_to_the_asker_and_the_actor_lives(
    worker: pykka.ActorRef[Worker],
) -> None:
    with pytest.raises(Boom):
        await wait_reply(worker.ask("nonsense", block=False))
    assert await wait_reply(worker.ask(Echo("alive"), block=False)) == "alive"


async def test_many_concurrent_asks_each_get_their_own_reply(
    worker: pykka.ActorRef[Worker],
) -> None:
    results: dict[int, Any] = {}

    async def one(n: int) -> None:
        results[n] = await wait_reply(worker.ask(Echo(n), block=False))

    async with trio.open_nursery() as nursery:
        for n in range(1000):
            nursery.start_soon(one, n)
    assert results == {n: n for n in range(1000)}


async def test_a_cancelled_wait_drops_the_late_reply_and_parks_no_thread(
    worker: pykka.ActorRef[Worker],
) -> None:
    threads_before = threading.active_count()
    gate = threading.Event()
    late = worker.ask(Block(gate, "late"), block=False)
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled before it can be answered: the gate is still shut
        await wait_reply(late)
    assert scope.cancelled_caught
    # While the actor is blocked, no thread was added to wait for it.
    assert threading.active_count() == threads_before
    gate.set()
    # The actor answers "late" first (it is serial); that answer must go nowhere, and the
    # next ask must get its own reply, not the stale one.
    assert await wait_reply(worker.ask(Echo("fresh"), block=False)) == "fresh"
    assert late.get(timeout=30) == "late"  # it was answered, to nobody
    assert threading.active_count() == threads_before


async def test_asking_a_stopped_actor_raises_actor_unavailable() -> None:
    ref = Worker.start()
    ref.stop(block=True, timeout=30)
    with pytest.raises(ActorUnavailable):
        await wait_reply(ref.ask(Echo(1), block=False))


async def test_asks_queued_behind_a_crash_fail_instead_of_hanging() -> None:
    ref = Worker.start()
    gate = threading.Event()
    first = ref.ask(Block(gate, "first"), block=False)
    ref.tell("crash")  # a failing tell stops a pykka actor
    queued = ref.ask(Echo("queued"), block=False)
    gate.set()
    assert await wait_reply(first) == "first"
    with pytest.raises(ActorUnavailable):
        await wait_reply(queued)
