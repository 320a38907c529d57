"""The base of every pykka service: typed dispatch, deferred replies, the client, the pacer."""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, assert_never

import pykka
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from runtime.bridge import CallbackFuture
from runtime.pacer import Pacer
from runtime.pykka_client import ServiceClient
from runtime.pykka_service import ServiceActor, UnknownMessage
from storage.errors import ActorUnavailable


@dataclass(frozen=True)
class Add:
    n: int


@dataclass(frozen=True)
class WaitForTotal:
    """Answered once the total reaches ``at_least``: a deferred reply."""

    at_least: int
    reply: CallbackFuture[int] = field(default_factory=CallbackFuture)


class Counter(ServiceActor[Add | WaitForTotal]):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.waiting: list[WaitForTotal] = []

    def handle(self, message: Add | WaitForTotal) -> Any:
        match message:
            case Add(n=n):
                self.total += n
                for waiter in [w for w in self.waiting if w.at_least <= self.total]:
                    self.waiting.remove(waiter)
                    self.answer(waiter.reply, self.total)
                return self.total
            case WaitForTotal():
                if self.total >= message.at_least:
                    return self.total
                self.waiting.append(message)
                return self.defer(message.reply)
            case _:
                assert_never(message)


@asynccontextmanager
async def _counter() -> AsyncIterator[tuple[ServiceClient, pykka.ActorRef[Counter]]]:
    ref = Counter.start()
    try:
        yield ServiceClient(lambda: ref), ref
    finally:
        await trio.to_thread.run_sync(partial(ref.stop, block=True))


def test_a_service_accepts_the_classes_of_its_type_parameter() -> None:
    assert Counter.accepts == (Add, WaitForTotal)


async def test_a_message_it_does_not_accept_is_refused_before_its_handler() -> None:
    async with _counter() as (client, _):
        with pytest.raises(UnknownMessage, match="Counter got str"):
            await client.ask("add one, please")
        assert await client.ask(Add(2)) == 2  # an ask that fails leaves the actor running


async def test_a_deferred_reply_wakes_its_caller_when_the_actor_answers() -> None:
    async with _counter() as (client, _), trio.open_nursery() as nursery:
        answers: list[object] = []

        async def wait() -> None:
            answers.append(await client.ask(WaitForTotal(3)))

        nursery.start_soon(wait)
        await wait_all_tasks_blocked()
        assert await client.ask(Add(1)) == 1
        assert await client.ask(Add(2)) == 3
    assert answers == [3]


async def test_replies_a_crashed_service_still_owed_fail_instead_of_hanging() -> None:
    errors: list[ActorUnavailable] = []
    async with _counter() as (client, ref), trio.open_nursery() as nursery:

        async def wait() -> None:
            try:
                await client.ask(WaitForTotal(10))
            except ActorUnavailable as exc:
                errors.append(exc)

        for _ in range(3):
            nursery.start_soon(wait)
        await wait_all_tasks_blocked()
        client.crash_for_test()  # a failing tell stops the actor
        with trio.fail_after(30):  # a guard against a hang
            await trio.to_thread.run_sync(ref.actor_stopped.wait)
    assert [str(e) for e in errors] == ["Counter stopped before answering"] * 3


async def test_a_client_with_no_actor_to_resolve_fails_clearly_and_send_drops() -> None:
    def nobody() -> pykka.ActorRef[Any]:
        raise LookupError("between incarnations")

    client = ServiceClient(nobody)
    with pytest.raises(ActorUnavailable, match="between incarnations"):
        await client.ask(Add(1))
    client.send(Add(1))  # a settlement to a dead incarnation: its state died with it


# -- the pacer -------------------------------------------------------------------------------


async def test_the_pacer_ticks_at_the_earliest_time_asked_and_then_when_the_tick_says(
    mock_clock: MockClock,
) -> None:
    ticks: list[float] = []
    ticked = trio.Event()

    async def tick(now: float) -> float | None:
        nonlocal ticked
        ticks.append(now)
        ticked.set()
        ticked = trio.Event()
        return now + 5 if len(ticks) == 1 else None

    pacer = Pacer(tick)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        pacer.wake_at(start + 10)
        pacer.wake_at(start + 3)  # earliest wins
        pacer.wake_at(start + 20)
        await wait_all_tasks_blocked()
        assert pacer.due == start + 3
        first = ticked
        mock_clock.jump(3)
        await first.wait()
        second = ticked
        mock_clock.jump(5)  # the tick asked for +5
        await second.wait()
        await wait_all_tasks_blocked()
        assert pacer.due == math.inf  # the second tick asked for nothing
        nursery.cancel_scope.cancel()
    assert [t - start for t in ticks] == [3, 8]


async def test_the_pacer_ticks_every_period_and_skips_a_tick_whose_actor_is_gone(
    mock_clock: MockClock,
) -> None:
    ticks: list[float] = []
    ticked = trio.Event()

    async def tick(now: float) -> None:
        nonlocal ticked
        ticks.append(now)
        ticked.set()
        ticked = trio.Event()
        raise ActorUnavailable("restarting")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Pacer(tick, every=2).run)
        for _ in range(3):
            waiting = ticked
            await wait_all_tasks_blocked()
            mock_clock.jump(2)
            await waiting.wait()
        nursery.cancel_scope.cancel()
    assert [t - start for t in ticks] == [2, 4, 6]


async def test_an_alarm_from_another_thread_reaches_the_pacer(mock_clock: MockClock) -> None:
    ticked = trio.Event()

    async def tick(now: float) -> None:
        ticked.set()

    pacer = Pacer(tick)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        alarm = pacer.alarm()
        due = trio.current_time() + 1
        thread = threading.Thread(target=alarm, args=(due,))
        thread.start()
        await trio.to_thread.run_sync(thread.join)
        await wait_all_tasks_blocked()
        assert pacer.due == due
        mock_clock.jump(1)
        await ticked.wait()
        nursery.cancel_scope.cancel()
