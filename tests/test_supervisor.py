"""Example tests of the supervisor: ordering, shutdown, escalation, dynamic children, logs.

Restart semantics are checked exhaustively against a model in
``test_supervision_properties.py``; these tests pin down one behaviour each. All of them run
on the autojump ``MockClock``: waits are on events, time only passes where a test says so,
and a deadlock makes the clock jump to the ``fail_after`` guard instead of hanging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from runtime.supervision import (
    ChildContext,
    ChildSpec,
    ChildStartError,
    ChildState,
    DuplicateChild,
    Restart,
    StartFunction,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    SupervisorNotRunning,
    UnknownChild,
    run_root,
)

Log = list[tuple[str, str]]
GUARD = 10_000  # virtual seconds; only ever reached by a deadlock


class Boom(Exception):
    pass


def worker(log: Log, *, ignore_stop: bool = False) -> StartFunction:
    """A child that runs until asked to stop (or, with ``ignore_stop``, until cancelled)."""

    async def start(ctx: ChildContext) -> None:
        log.append(("start", ctx.id))
        ctx.started()
        try:
            if ignore_stop:
                await trio.sleep_forever()
            await ctx.stop_requested.wait()
            log.append(("stop", ctx.id))
        except trio.Cancelled:
            log.append(("cancelled", ctx.id))
            raise

    return start


async def broken(ctx: ChildContext) -> None:
    raise Boom(f"{ctx.id} cannot start")


async def lazy(ctx: ChildContext) -> None:
    return  # forgets ctx.started()


@asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[trio.Event]:
    """Run ``sup`` as the root; stop it gracefully when the block ends."""
    stop = trio.Event()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_root, sup, stop_requested=stop))
            yield stop
            stop.set()


# -- order ---------------------------------------------------------------------------------------


async def test_children_start_in_order_each_after_the_previous_one_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []

    async def slow_to_start(ctx: ChildContext) -> None:
        log.append(("init", ctx.id))
        await trio.sleep(1)
        log.append(("ready", ctx.id))
        ctx.started()
        await ctx.stop_requested.wait()
        log.append(("stop", ctx.id))

    sup = Supervisor([ChildSpec(name, slow_to_start) for name in "abc"])
    async with running(sup):
        assert trio.current_time() == 3  # nursery.start(run_root) returned after all three
        assert log == [
            ("init", "a"),
            ("ready", "a"),
            ("init", "b"),
            ("ready", "b"),
            ("init", "c"),
            ("ready", "c"),
        ]
    assert log[6:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


# -- shutdown --------------------------------------------------------------------------------------


async def test_shutdown_requests_a_stop_then_cancels_once_the_grace_has_passed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[str, float, bool]] = []

    async def stubborn(ctx: ChildContext) -> None:
        ctx.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            seen.append(("stubborn cancelled", trio.current_time(), ctx.stop_requested.is_set()))
            raise

    async def polite(ctx: ChildContext) -> None:
        ctx.started()
        await ctx.stop_requested.wait()
        await trio.sleep(1)  # tidying up, well within its grace
        seen.append(("polite returned", trio.current_time(), True))

    sup = Supervisor(
        [ChildSpec("polite", polite, shutdown=5), ChildSpec("stubborn", stubborn, shutdown=2)]
    )
    async with running(sup):
        pass
    # Reverse order: stubborn (started last) goes first and uses its whole grace.
    assert seen == [("stubborn cancelled", 2.0, True), ("polite returned", 3.0, True)]


async def test_shutdown_zero_cancels_at_once_without_a_stop_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[float, bool]] = []

    async def child(ctx: ChildContext) -> None:
        ctx.started()
        try:
            await trio.sleep_forever()
        finally:
            seen.append((trio.current_time(), ctx.stop_requested.is_set()))

    async with running(Supervisor([ChildSpec("k", child, shutdown=0)])):
        await trio.sleep(1)
    assert seen == [(1.0, False)]


async def test_shutdown_none_waits_for_as_long_as_the_child_takes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[float] = []

    async def slow_to_stop(ctx: ChildContext) -> None:
        ctx.started()
        await ctx.stop_requested.wait()
        await trio.sleep(1_000)  # never cancelled
        seen.append(trio.current_time())

    async with running(Supervisor([ChildSpec("s", slow_to_stop, shutdown=None)])):
        pass
    assert seen == [1_000.0]


@pytest.mark.parametrize(("concurrent", "duration"), [(False, 6.0), (True, 2.0)])
async def test_grace_periods_overlap_only_with_concurrent_shutdown(
    autojump_clock: trio.testing.MockClock, concurrent: bool, duration: float
) -> None:
    log: Log = []
    specs = [ChildSpec(f"c{i}", worker(log, ignore_stop=True), shutdown=2) for i in range(3)]
    async with running(Supervisor(specs, concurrent_shutdown=concurrent)):
        pass
    assert trio.current_time() == duration
    assert sorted(log) == sorted(
        [("start", s.id) for s in specs] + [("cancelled", s.id) for s in specs]
    )


async def test_concurrent_shutdown_keeps_each_child_within_its_own_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled_at: dict[str, float] = {}

    async def stubborn(ctx: ChildContext) -> None:
        ctx.started()
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at[ctx.id] = trio.current_time()

    specs = [ChildSpec("short", stubborn, shutdown=1), ChildSpec("long", stubborn, shutdown=5)]
    async with running(Supervisor(specs, concurrent_shutdown=True)):
        pass
    assert cancelled_at == {"short": 1.0, "long": 5.0}


async def test_cancelling_the_root_cancels_every_child_in_reverse_order_without_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    inner = Supervisor([ChildSpec("x", worker(log)), ChildSpec("y", worker(log))])
    root = Supervisor(
        [ChildSpec("a", worker(log)), inner.child_spec("inner"), ChildSpec("b", worker(log))]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(run_root, root)
        nursery.cancel_scope.cancel()
    assert log == [
        ("start", "a"),
        ("start", "x"),
        ("start", "y"),
        ("start", "b"),
        ("cancelled", "b"),
        ("cancelled", "y"),
        ("cancelled", "x"),
        ("cancelled", "a"),
    ]


async def test_cancellation_during_a_graceful_shutdown_cuts_the_grace_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor(
        [ChildSpec("a", worker(log)), ChildSpec("b", worker(log, ignore_stop=True), shutdown=60)]
    )
    stop = trio.Event()
    with trio.move_on_after(5):  # the owner loses patience
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_root, sup, stop_requested=stop))
            stop.set()
    assert trio.current_time() == 5
    # b was asked at 0 and cancelled at 5, not 60; a was never asked, only cancelled.
    assert log == [("start", "a"), ("start", "b"), ("cancelled", "b"), ("cancelled", "a")]


# -- restarts and escalation -------------------------------------------------------------------


async def test_a_child_supervisor_that_gives_up_is_restarted_until_its_parent_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    starts = Counter[str]()

    async def crasher(ctx: ChildContext) -> None:
        starts[ctx.path] += 1
        ctx.started()
        raise Boom("worker died")

    inner = Supervisor([ChildSpec("w", crasher)], max_restarts=1, period=10)
    root = Supervisor(
        [ChildSpec("peer", worker(log)), inner.child_spec("inner")],
        strategy=Strategy.ONE_FOR_ALL,
        max_restarts=2,
        period=10,
    )
    with capture_logs() as logs, trio.fail_after(GUARD), pytest.raises(SupervisorGaveUp) as caught:
        await run_root(root)

    gave_up = caught.value
    assert (gave_up.path, gave_up.child) == ("/root", "inner")
    inner_gave_up = gave_up.__cause__
    assert isinstance(inner_gave_up, SupervisorGaveUp)
    assert (inner_gave_up.path, inner_gave_up.child) == ("/root/inner", "w")
    assert isinstance(inner_gave_up.__cause__, Boom)
    # inner ran 1 + 2 times, each time starting w 1 + 1 times, with a fresh intensity.
    assert starts == {"/root/inner/w": 6}
    # ONE_FOR_ALL: the peer was stopped and restarted with inner, and stopped at the end.
    assert log == [("start", "peer"), ("stop", "peer")] * 3
    assert [e["path"] for e in logs if e["event"] == "supervisor.gave_up"] == [
        "/root/inner"
    ] * 3 + ["/root"]
    # Each worker crash carries its traceback; inner's exits only say why, since the
    # traceback that explains them was logged already.
    crashes = [e for e in logs if e["event"] == "child.crashed"]
    assert [(e["path"], type(e["exc_info"])) for e in crashes] == (
        [("/root/inner/w", Boom)] * 2 + [("/root/inner", type(None))]
    ) * 3


async def test_simultaneous_crashes_under_one_for_all_make_a_single_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trigger = trio.Event()
    starts = Counter[str]()

    async def fragile(ctx: ChildContext) -> None:
        starts[ctx.id] += 1
        ctx.started()
        if ctx.restarts == 0:
            await trigger.wait()
            raise Boom(ctx.id)
        await ctx.stop_requested.wait()

    sup = Supervisor(
        [ChildSpec("a", fragile), ChildSpec("b", fragile)],
        strategy=Strategy.ONE_FOR_ALL,
        max_restarts=1,  # a second restart would make it give up
        period=10,
    )
    async with running(sup):
        trigger.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sup.snapshot().restart_times == (0.0,)
        assert starts == {"a": 2, "b": 2}


# -- start failures --------------------------------------------------------------------------------


async def test_an_initial_child_failing_to_start_stops_the_others_and_fails_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    inner = Supervisor(
        [ChildSpec("a", worker(log)), ChildSpec("b", broken), ChildSpec("c", worker(log))]
    )
    root = Supervisor([ChildSpec("first", worker(log)), inner.child_spec("inner")])
    with trio.fail_after(GUARD), pytest.raises(ChildStartError) as caught:
        await run_root(root)
    assert caught.value.path == "/root/inner"
    cause = caught.value.__cause__
    assert isinstance(cause, ChildStartError)
    assert cause.path == "/root/inner/b"
    assert isinstance(cause.__cause__, Boom)
    assert log == [("start", "first"), ("start", "a"), ("stop", "a"), ("stop", "first")]


async def test_a_child_returning_before_started_is_a_start_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ChildStartError) as caught:
        await run_root(Supervisor([ChildSpec("lazy", lazy)]))
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "started()" in str(caught.value.__cause__)


def test_started_twice_is_a_bug() -> None:
    ctx = ChildContext("c", "/root/c")
    ctx.started()
    with pytest.raises(RuntimeError, match="twice"):
        ctx.started()


# -- dynamic children ------------------------------------------------------------------------------


async def test_thousands_of_dynamic_children(autojump_clock: trio.testing.MockClock) -> None:
    stopped: list[str] = []

    async def session(ctx: ChildContext) -> None:
        ctx.started()
        if ctx.id.endswith("1"):
            return  # a client that hangs up: temporary, so it is simply removed
        await ctx.stop_requested.wait()
        stopped.append(ctx.id)

    sessions = Supervisor(concurrent_shutdown=True)
    root = Supervisor([sessions.child_spec("sessions")])
    n = 2_000
    async with running(root):
        for i in range(n):
            await sessions.start_child(
                ChildSpec(f"session/{i}", session, restart=Restart.TEMPORARY, shutdown=1)
            )
        with pytest.raises(DuplicateChild):
            await sessions.start_child(ChildSpec("session/0", session))
        for i in range(0, n, 2):
            await sessions.terminate_child(f"session/{i}")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(UnknownChild):
            await sessions.terminate_child("session/1")  # hung up, already gone

        children = sessions.snapshot().children
        remaining = [i for i in range(1, n, 2) if i % 10 != 1]
        assert [c.id for c in children] == [f"session/{i}" for i in remaining]
        assert {c.state for c in children} == {ChildState.RUNNING}
        assert children[0].path == "/root/sessions/session/3"
        assert len(stopped) == n // 2
    assert len(stopped) == n // 2 + len(remaining)
    assert trio.current_time() == 0  # every session stopped within its grace


async def test_start_child_errors_leave_the_supervisor_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor()
    with pytest.raises(SupervisorNotRunning):
        await sup.start_child(ChildSpec("early", worker(log)))
    async with running(sup):
        with pytest.raises(ChildStartError) as caught:
            await sup.start_child(ChildSpec("bad", broken))
        assert isinstance(caught.value.__cause__, Boom)
        with pytest.raises(ChildStartError):
            await sup.start_child(ChildSpec("lazy", lazy))
        with pytest.raises(UnknownChild):
            await sup.terminate_child("bad")
        await sup.start_child(ChildSpec("good", worker(log)))
        assert [c.id for c in sup.snapshot().children] == ["good"]
    with pytest.raises(SupervisorNotRunning):
        await sup.start_child(ChildSpec("late", worker(log)))
    assert log == [("start", "good"), ("stop", "good")]


async def test_a_cancelled_start_child_leaves_no_half_started_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []

    async def never_ready(ctx: ChildContext) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            log.append(("cancelled", ctx.id))
            raise

    sup = Supervisor()
    async with running(sup):
        with trio.move_on_after(1):
            await sup.start_child(ChildSpec("slow", never_ready))
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("cancelled", "slow")]
        assert sup.snapshot().children == ()
        await sup.start_child(ChildSpec("next", worker(log)))  # the lock was released


async def test_a_supervisor_runs_once_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    sup = Supervisor()
    async with running(sup):
        with pytest.raises(RuntimeError, match="already running"):
            await run_root(sup, name="again")


# -- introspection and logs ------------------------------------------------------------------------


async def test_snapshot_reports_states_counts_times_and_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []

    async def flaky(ctx: ChildContext) -> None:
        ctx.started()
        if ctx.restarts == 0:
            await trio.sleep(5)
            raise Boom("flaky")
        await ctx.stop_requested.wait()

    sup = Supervisor([ChildSpec("steady", worker(log)), ChildSpec("flaky", flaky)], period=10)
    before = sup.snapshot()
    assert (before.path, before.running, before.children) == (None, False, ())
    async with running(sup):
        await trio.sleep(7)
        snap = sup.snapshot()
    assert (snap.path, snap.running, snap.taken_at, snap.strategy) == (
        "/root",
        True,
        7.0,
        Strategy.ONE_FOR_ONE,
    )
    assert snap.restart_times == (5.0,)
    steady, flaky_child = snap.children
    assert (steady.state, steady.restarts, steady.started_at, steady.last_error) == (
        ChildState.RUNNING,
        0,
        0.0,
        None,
    )
    assert (flaky_child.path, flaky_child.restart, flaky_child.restarts) == (
        "/root/flaky",
        Restart.PERMANENT,
        1,
    )
    assert (flaky_child.started_at, flaky_child.last_error) == (5.0, "Boom('flaky')")
    after = sup.snapshot()
    assert not after.running
    assert {c.state for c in after.children} == {ChildState.STOPPED}


async def test_every_crash_is_logged_exactly_once_with_its_traceback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crashed = trio.Event()

    async def once(ctx: ChildContext) -> None:
        ctx.started()
        if ctx.restarts == 0:
            raise Boom("once")
        crashed.set()
        await ctx.stop_requested.wait()

    log: Log = []
    sup = Supervisor(
        [ChildSpec("a", once), ChildSpec("peer", worker(log))], strategy=Strategy.REST_FOR_ONE
    )
    with capture_logs() as logs:
        async with running(sup):
            await crashed.wait()
    crashes = [e for e in logs if e["event"] == "child.crashed"]
    assert len(crashes) == 1
    assert crashes[0]["path"] == "/root/a"
    assert crashes[0]["child"] == "a"
    assert crashes[0]["reason"] == "Boom('once')"
    assert isinstance(crashes[0]["exc_info"], Boom)
    restarting = [e["child"] for e in logs if e["event"] == "child.restarting"]
    assert restarting == ["a", "peer"]
    # The peer stopped by the restart is logged as stopped, not as crashed.
    assert [e["reason"] for e in logs if e["event"] == "child.stopped"] == ["shutdown"] * 3


def test_a_snapshot_can_be_taken_outside_trio() -> None:
    snap = Supervisor(max_restarts=7, period=2).snapshot()
    assert (snap.taken_at, snap.running, snap.max_restarts, snap.period) == (None, False, 7, 2)


def test_specs_and_supervisors_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ChildSpec("", lazy)
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec("x", lazy, shutdown=-1)
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec("x", lazy, shutdown=float("nan"))
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ChildSpec("x", lazy), ChildSpec("x", lazy)])
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor(max_restarts=-1)
    with pytest.raises(ValueError, match="period"):
        Supervisor(period=0)
