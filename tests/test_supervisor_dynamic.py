"""Dynamic children as sessions need them: handles, a child's own restart intensity, and the
stop of a supervisor holding thousands of them (docs/supervision.md, "Dynamic children").

All on the autojump ``MockClock``: waits are on events, and a deadlock makes the clock jump to
the ``fail_after`` guard instead of hanging.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from runtime.supervision import (
    ChildContext,
    ChildExit,
    ChildSpec,
    ChildStartError,
    ExitReason,
    Intensity,
    Restart,
    Strategy,
    Supervisor,
    run_root,
)

GUARD = 10_000  # virtual seconds; only ever reached by a deadlock


class Boom(Exception):
    pass


@asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[trio.Event]:
    """Run ``sup`` as the root; stop it gracefully when the block ends."""
    stop = trio.Event()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_root, sup, stop_requested=stop))
            yield stop
            stop.set()


async def until_stopped(ctx: ChildContext) -> None:
    ctx.started()
    await ctx.stop_requested.wait()


# -- handles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("restart", [Restart.TRANSIENT, Restart.TEMPORARY])
async def test_a_handle_reports_a_normal_exit_once_the_child_has_left(
    autojump_clock: trio.testing.MockClock, restart: Restart
) -> None:
    go = trio.Event()

    async def returns(ctx: ChildContext) -> None:
        ctx.started()
        await go.wait()

    sup = Supervisor()
    async with running(sup):
        handle = await sup.start_child(ChildSpec("c", returns, restart=restart))
        assert (handle.id, handle.path, handle.exit) == ("c", "/root/c", None)
        go.set()
        assert await handle.wait() == ChildExit(ExitReason.NORMAL)
        assert sup.snapshot().children == ()


async def test_dynamic_children_log_their_progress_at_debug_static_ones_at_info(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A session's actor comes and goes with its connection: its child.started and
    child.stopped are progress reports at debug (its session logs its own life at info),
    while a static child's stay at info; a dynamic child's crash is still an error."""

    async def crashes(ctx: ChildContext) -> None:
        ctx.started()
        raise Boom("dynamic")

    sup = Supervisor(children=[ChildSpec("static", until_stopped)])
    with capture_logs() as logs:
        async with running(sup):
            await sup.start_child(ChildSpec("d", until_stopped, restart=Restart.TRANSIENT))
            await sup.terminate_child("d")
            crashing = await sup.start_child(ChildSpec("x", crashes, restart=Restart.TEMPORARY))
            await crashing.wait()
    levels = {
        (e["event"], e["child"]): e["log_level"] for e in logs if e["event"].startswith("child.")
    }
    assert levels == {
        ("child.started", "static"): "info",
        ("child.stopped", "static"): "info",
        ("child.started", "d"): "debug",
        ("child.stopped", "d"): "debug",
        ("child.started", "x"): "debug",
        ("child.crashed", "x"): "error",
    }


async def test_a_temporary_crash_is_reported_not_restarted_and_costs_no_intensity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def crashes(ctx: ChildContext) -> None:
        ctx.started()
        await trio.sleep(1)
        raise Boom("temporary")

    sup = Supervisor(max_restarts=0)  # any restart would make it give up
    async with running(sup):
        handles = [
            await sup.start_child(ChildSpec(f"t{i}", crashes, restart=Restart.TEMPORARY))
            for i in range(3)
        ]
        for handle in handles:
            exit = await handle.wait()
            assert exit.reason is ExitReason.CRASHED
            assert isinstance(exit.error, Boom)
        snap = sup.snapshot()
        assert (snap.running, snap.restart_times, snap.children) == (True, (), ())


async def test_terminate_child_is_reported_as_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor()
    async with running(sup):
        handle = await sup.start_child(ChildSpec("c", until_stopped, restart=Restart.TRANSIENT))
        await sup.terminate_child("c")
        assert await handle.wait() == ChildExit(ExitReason.STOPPED)


async def test_cancelling_a_waiter_leaves_the_child_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = Supervisor()
    async with running(sup):
        handle = await sup.start_child(ChildSpec("c", until_stopped, restart=Restart.TEMPORARY))
        with trio.move_on_after(1):
            await handle.wait()
        assert [c.id for c in sup.snapshot().children] == ["c"]
        assert handle.exit is None
    assert handle.exit == ChildExit(ExitReason.STOPPED)


async def test_on_exit_is_called_once_with_the_exit_even_when_registered_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[ChildExit] = []
    sup = Supervisor()
    async with running(sup):
        handle = await sup.start_child(ChildSpec("c", until_stopped, restart=Restart.TRANSIENT))
        handle.on_exit(seen.append)
        with pytest.raises(RuntimeError, match="already has"):
            handle.on_exit(seen.append)
        assert seen == []
        await sup.terminate_child("c")
        assert seen == [ChildExit(ExitReason.STOPPED)]
        late: list[ChildExit] = []
        ended = await sup.start_child(ChildSpec("d", until_stopped, restart=Restart.TEMPORARY))
        await sup.terminate_child("d")
        ended.on_exit(late.append)  # already gone: called at once
        assert late == [ChildExit(ExitReason.STOPPED)]
    assert seen == [ChildExit(ExitReason.STOPPED)]  # once


async def test_a_child_failing_to_start_gets_no_handle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(ctx: ChildContext) -> None:
        raise Boom("no start")

    sup = Supervisor()
    async with running(sup):
        with pytest.raises(ChildStartError):
            await sup.start_child(ChildSpec("c", broken, restart=Restart.TRANSIENT))
        assert sup.snapshot().children == ()


# -- a child's own intensity -----------------------------------------------------------------------


async def test_a_crash_looping_child_gives_up_alone_within_its_own_intensity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session case: a transient child with its own intensity restarts, told why, until
    one crash too many; then it is removed and reported, and the supervisor (whose own
    intensity would not survive a single restart) and a sibling go on untouched."""
    seen: list[tuple[int, str | None]] = []

    async def crash_loop(ctx: ChildContext) -> None:
        seen.append((ctx.restarts, repr(ctx.last_error) if ctx.last_error else None))
        ctx.started()
        await trio.sleep(1)
        raise Boom(f"crash {ctx.restarts}")

    sup = Supervisor(max_restarts=0)
    with capture_logs() as logs:
        async with running(sup):
            sibling = await sup.start_child(
                ChildSpec("sibling", until_stopped, restart=Restart.TRANSIENT)
            )
            looping = await sup.start_child(
                ChildSpec(
                    "looping",
                    crash_loop,
                    restart=Restart.TRANSIENT,
                    intensity=Intensity(max_restarts=3, period=10),
                )
            )
            exit = await looping.wait()
            assert exit.reason is ExitReason.GAVE_UP
            assert repr(exit.error) == "Boom('crash 3')"
            snap = sup.snapshot()
            assert snap.running
            assert snap.restart_times == ()  # the supervisor's own window was never charged
            assert [c.id for c in snap.children] == ["sibling"]
            assert sibling.exit is None
    assert seen == [
        (0, None),
        (1, "Boom('crash 0')"),
        (2, "Boom('crash 1')"),
        (3, "Boom('crash 2')"),
    ]
    gave_up = [e for e in logs if e["event"] == "child.gave_up"]
    assert [(e["path"], e["reason"]) for e in gave_up] == [
        ("/root/looping", "more than 3 restart(s) within 10 s")
    ]
    assert not [e for e in logs if e["event"] == "supervisor.gave_up"]
    assert sibling.exit == ChildExit(ExitReason.STOPPED)


async def test_crashes_spread_out_beyond_the_period_never_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs = 0

    async def crashes_every_20s(ctx: ChildContext) -> None:
        nonlocal runs
        runs += 1
        ctx.started()
        await trio.sleep(20)
        raise Boom("rare")

    sup = Supervisor(max_restarts=0)
    async with running(sup):
        handle = await sup.start_child(
            ChildSpec(
                "rare",
                crashes_every_20s,
                restart=Restart.TRANSIENT,
                intensity=Intensity(max_restarts=1, period=10),
            )
        )
        await trio.sleep(20 * 6 + 1)
        assert runs == 7
        assert handle.exit is None


async def test_a_restart_failing_to_start_counts_against_the_child_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def crash_then_fail_to_start(ctx: ChildContext) -> None:
        if ctx.restarts:
            raise Boom("cannot start again")
        ctx.started()
        await trio.sleep(1)
        raise Boom("first crash")

    sup = Supervisor(max_restarts=0)
    async with running(sup):
        handle = await sup.start_child(
            ChildSpec(
                "c",
                crash_then_fail_to_start,
                restart=Restart.TRANSIENT,
                intensity=Intensity(max_restarts=2, period=10),
            )
        )
        exit = await handle.wait()
        assert (exit.reason, repr(exit.error)) == (
            ExitReason.GAVE_UP,
            "Boom('cannot start again')",
        )
        assert sup.snapshot().running


def test_an_own_intensity_needs_one_for_one() -> None:
    spec = ChildSpec("c", until_stopped, intensity=Intensity(1, 1))
    with pytest.raises(ValueError, match="one_for_one"):
        Supervisor([spec], strategy=Strategy.ONE_FOR_ALL)
    with pytest.raises(ValueError, match="max_restarts"):
        Intensity(-1, 1)
    with pytest.raises(ValueError, match="period"):
        Intensity(1, 0)


# -- many dynamic children: stop order, cancellation, cost -----------------------------------------


async def test_a_listener_stops_before_the_sessions_supervisor_it_feeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The node's layout: ``sessions`` (dynamic children only) starts before the listener
    that starts them, so it stops after it: the listener's stop (a drain) ends every session
    with its grace while their supervisor is still running, then the supervisor stops empty.
    """
    order: list[str] = []
    sessions = Supervisor(concurrent_shutdown=True)
    n = 1_000
    handles = []

    async def session(ctx: ChildContext) -> None:
        ctx.started()
        await ctx.stop_requested.wait()

    async def listener(ctx: ChildContext) -> None:
        for i in range(n):
            handles.append(
                await sessions.start_child(ChildSpec(f"s{i}", session, restart=Restart.TEMPORARY))
            )
        ctx.started()
        await ctx.stop_requested.wait()
        order.append("listener draining")
        for i in range(n):
            await sessions.terminate_child(f"s{i}")
        order.append(f"listener drained, sessions left: {len(sessions.snapshot().children)}")

    async def after_stop(ctx: ChildContext) -> None:
        ctx.started()
        await ctx.stop_requested.wait()
        order.append("sessions supervisor stopping")

    root = Supervisor(
        [
            ChildSpec("before", after_stop),
            sessions.child_spec("sessions"),
            ChildSpec("listener", listener, shutdown=None),
        ]
    )
    async with running(root):
        assert len(sessions.snapshot().children) == n
    assert order == [
        "listener draining",
        "listener drained, sessions left: 0",
        "sessions supervisor stopping",
    ]
    assert {h.exit for h in handles} == {ChildExit(ExitReason.STOPPED)}


async def test_cancelling_the_tree_cancels_every_dynamic_child_and_wakes_every_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = 0
    woken = 0

    async def session(ctx: ChildContext) -> None:
        nonlocal cancelled
        ctx.started()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled += 1
            raise

    async def starter(handle_wait: trio.Nursery, sup: Supervisor, i: int) -> None:
        nonlocal woken
        handle = await sup.start_child(
            ChildSpec(f"s{i}", session, restart=Restart.TRANSIENT, intensity=Intensity(3, 5))
        )
        exit = await handle.wait()
        assert exit.reason is ExitReason.STOPPED
        woken += 1

    sessions = Supervisor(concurrent_shutdown=True)
    root = Supervisor([sessions.child_spec("sessions")])
    n = 1_000
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as waiters, trio.open_nursery() as tree:
            await tree.start(run_root, root)
            for i in range(n):
                waiters.start_soon(starter, waiters, sessions, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(sessions.snapshot().children) == n
            tree.cancel_scope.cancel()
    assert (cancelled, woken) == (n, n)
    assert trio.current_time() == 0  # no grace under cancellation


async def test_an_idle_dynamic_child_costs_a_few_kib() -> None:
    """10,000 idle sessions must fit: the supervisor's share per child (task, records,
    context, cancel scope, events, handle) stays a few KiB (measured ~4 KiB)."""
    sessions = Supervisor(concurrent_shutdown=True)
    n = 2_000
    async with running(sessions):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                await sessions.start_child(
                    ChildSpec(
                        f"s{i}",
                        until_stopped,
                        restart=Restart.TRANSIENT,
                        intensity=Intensity(3, 5),
                    )
                )
            gc.collect()
            per_child = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
    print(f"{per_child:.0f} bytes per idle child")
    assert per_child < 8 * 1024, f"{per_child:.0f} bytes per idle child"
