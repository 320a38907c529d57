"""pykka actors under a trio supervisor: crashes heal, callers see only in-flight failures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pykka
import pytest
import trio

from runtime.bridge import BridgedActor
from runtime.pykka_supervision import ActorName, pykka_child
from runtime.supervision import ChildSpec, Supervisor, SupervisorGaveUp, run_root
from storage.errors import ActorUnavailable


@dataclass(frozen=True)
class Add:
    n: int


class LedgerCrashed(Exception):
    pass


class Crash:
    pass


class Ledger(BridgedActor):
    """Sums what it is told; a Crash (sent with tell) kills it."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Add):
            self.total += message.n
            return self.total
        if isinstance(message, Crash):
            raise LedgerCrashed("ledger crashed on purpose")
        raise TypeError(message)


async def test_a_crash_under_load_fails_only_in_flight_requests_then_heals() -> None:
    name: ActorName[Ledger] = ActorName("/root/ledger")
    supervisor = Supervisor(
        [ChildSpec("ledger", pykka_child(name, Ledger.start), shutdown=30)],
        max_restarts=3,
        period=60,
    )
    callers, asks_each = 40, 50
    ok = failed = 0
    crashed = trio.Event()

    async def caller(index: int) -> None:
        nonlocal ok, failed
        for n in range(asks_each):
            if index == 0 and n == asks_each // 2:
                name.ref.tell(Crash())
                crashed.set()
            try:
                await name.ask(Add(1))
            except ActorUnavailable:
                failed += 1
            else:
                ok += 1

    stop = trio.Event()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_root(
                    supervisor, stop_requested=stop, task_status=task_status
                )
            )
            async with trio.open_nursery() as load:
                for index in range(callers):
                    load.start_soon(caller, index)
            assert crashed.is_set()
            # The new incarnation counts from zero, so its total is what it handled: fewer
            # than all the successes, because the first incarnation handled some.
            second_total = await name.ask(Add(0))
            assert 0 < second_total < ok
            stop.set()

    assert ok + failed == callers * asks_each
    # Only requests in flight at the crash can fail: at most one per caller.
    assert failed <= callers
    assert name.incarnations == 2


async def test_a_requested_stop_handles_everything_already_sent() -> None:
    name: ActorName[Ledger] = ActorName("/root/ledger")
    supervisor = Supervisor([ChildSpec("ledger", pykka_child(name, Ledger.start), shutdown=30)])
    stop = trio.Event()
    answers: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_root(supervisor, stop_requested=stop, task_status=task_status)
        )
        async with trio.open_nursery() as senders:
            for _ in range(100):
                senders.start_soon(lambda: _append(answers, name.ask(Add(1))))
            await trio.testing.wait_all_tasks_blocked()
            stop.set()
    assert sorted(answers) == list(range(1, 101))


async def _append(answers: list[int], ask: Any) -> None:
    answers.append(await ask)


class Broken(BridgedActor):
    def on_start(self) -> None:
        raise RuntimeError("cannot start")


async def test_an_actor_that_keeps_crashing_escalates() -> None:
    name: ActorName[Broken] = ActorName("/root/broken")
    supervisor = Supervisor(
        [ChildSpec("broken", pykka_child(name, Broken.start), shutdown=30)],
        max_restarts=2,
        period=60,
    )
    with pytest.raises(SupervisorGaveUp) as gave_up:
        await run_root(supervisor)
    assert gave_up.value.child == "broken"
    # The first start plus two restarts; the third crash is one too many.
    assert name.incarnations == 3
    with pytest.raises(ActorUnavailable):
        _ = name.ref


def test_pykka_registry_is_left_clean() -> None:
    assert pykka.ActorRegistry.get_all() == []
