"""Property tests: the supervisor against a small, pure model of Erlang/OTP semantics.

Hypothesis draws a supervisor (strategy, intensity, children with restart types and shutdown
grace) and a timed script of child failures; the script is played against the real supervisor
under a ``MockClock`` and against :class:`Model`, and both must produce the same trace of
starts, start failures, exits, crashes and stops, and give up at the same point, if at all.

Determinism: the script waits for ``wait_all_tasks_blocked()`` after every step instead of
sleeping, and virtual times are whole seconds, so a restart lands exactly on a window's edge
as often as Hypothesis likes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import structlog
import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from runtime.supervision import (
    ChildContext,
    ChildSpec,
    Restart,
    RestartIntensity,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    run_root,
)

Kind = Literal["crash", "exit"]
"""What a scripted child does: raise or return."""
KINDS: tuple[Kind, ...] = ("crash", "exit")

Trace = list[tuple[str, ...]]


@dataclass(frozen=True)
class Scenario:
    strategy: Strategy
    restarts: tuple[Restart, ...]
    shutdowns: tuple[float | None, ...]
    max_restarts: int
    period: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Step:
    at: int
    """Absolute virtual time, whole seconds."""
    child: int
    kind: Kind
    poison: int | None
    """A child whose next start, if any, fails; set just before ``child`` ends."""


class Boom(Exception):
    pass


# -- the model ---------------------------------------------------------------------------------


def exceeds_intensity(times: list[float], max_restarts: int, period: float) -> bool:
    """Whether any closed window of length ``period`` holds more than ``max_restarts`` times.

    Deliberately brute force and phrased differently from ``RestartIntensity``.
    """
    return any(sum(1 for t in times if a <= t <= a + period) > max_restarts for a in times)


class Model:
    """Erlang/OTP supervisor semantics, straight-line, over child ids ``c0``, ``c1``, ..."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.ids = [f"c{i}" for i in range(len(sc.restarts))]
        self.kinds = dict(zip(self.ids, sc.restarts, strict=True))
        self.children = list(self.ids)  # in start order
        self.starts = dict.fromkeys(self.ids, 0)
        self.live: set[str] = set()
        self.poisoned: set[str] = set()
        self.restart_times: list[float] = []
        self.trace: Trace = []

    def run(self) -> tuple[Trace, str | None]:
        """Play the scenario; return the trace and the child that made it give up, if any."""
        for cid in self.children:
            assert self.start(cid)
        for step in self.sc.steps:
            failed = self.ids[step.child]
            if failed not in self.live:
                continue  # removed (or not running): the script step does nothing
            if step.poison is not None:
                self.poisoned.add(self.ids[step.poison])
            self.live.discard(failed)
            self.trace.append((step.kind, failed))
            restart = self.kinds[failed]
            abnormal = step.kind == "crash"
            if restart is Restart.PERMANENT or (restart is Restart.TRANSIENT and abnormal):
                breaker = self.restart(failed, step.at)
                if breaker is not None:
                    return self.trace, breaker
            else:
                self.children.remove(failed)
        self.stop(self.children[::-1])
        return self.trace, None

    def restart(self, failed: str, now: float) -> str | None:
        while True:
            self.restart_times.append(now)
            if exceeds_intensity(self.restart_times, self.sc.max_restarts, self.sc.period):
                self.stop(self.children[::-1])
                return failed
            group = self.group(failed)
            siblings = [cid for cid in group if cid != failed]
            self.stop(siblings[::-1])
            for cid in siblings:
                if self.kinds[cid] is Restart.TEMPORARY:
                    self.children.remove(cid)
            for cid in [cid for cid in group if cid in self.children]:
                if not self.start(cid):
                    failed = cid
                    break
            else:
                return None

    def group(self, failed: str) -> list[str]:
        if self.sc.strategy is Strategy.ONE_FOR_ONE:
            return [failed]
        if self.sc.strategy is Strategy.ONE_FOR_ALL:
            return list(self.children)
        return self.children[self.children.index(failed) :]

    def start(self, cid: str) -> bool:
        restarts = self.starts[cid]
        self.starts[cid] += 1
        if cid in self.poisoned:
            self.poisoned.discard(cid)
            self.trace.append(("start_failed", cid, str(restarts)))
            return False
        self.trace.append(("start", cid, str(restarts)))
        self.live.add(cid)
        return True

    def stop(self, in_order: list[str]) -> None:
        for cid in in_order:
            if cid in self.live:
                self.live.discard(cid)
                self.trace.append(("stop", cid))


# -- the real thing, scripted ------------------------------------------------------------------


@dataclass
class Puppet:
    command: Kind | None = None
    wake: trio.Event = field(default_factory=trio.Event)


@dataclass
class World:
    trace: Trace = field(default_factory=list)
    live: dict[str, Puppet] = field(default_factory=dict)
    poisoned: set[str] = field(default_factory=set)

    async def child(self, ctx: ChildContext) -> None:
        if ctx.id in self.poisoned:
            self.poisoned.discard(ctx.id)
            self.trace.append(("start_failed", ctx.id, str(ctx.restarts)))
            raise Boom(f"{ctx.id} cannot start")
        self.trace.append(("start", ctx.id, str(ctx.restarts)))
        puppet = Puppet()
        self.live[ctx.id] = puppet
        ctx.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, ctx.stop_requested, nursery.cancel_scope)
                await puppet.wake.wait()
                nursery.cancel_scope.cancel()
        finally:
            del self.live[ctx.id]
            if puppet.command is None:  # stopped: asked to, or cancelled
                self.trace.append(("stop", ctx.id))
        if puppet.command is None:
            return
        if puppet.command == "exit":
            self.trace.append(("exit", ctx.id))
            return
        self.trace.append(("crash", ctx.id))
        raise Boom(ctx.id)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def play(sc: Scenario) -> tuple[Trace, str | None, int]:
    """Run the scenario for real; return the trace, who broke the supervisor, crash logs."""
    world = World()
    specs = [
        ChildSpec(f"c{i}", world.child, restart=restart, shutdown=shutdown)
        for i, (restart, shutdown) in enumerate(zip(sc.restarts, sc.shutdowns, strict=True))
    ]
    sup = Supervisor(specs, strategy=sc.strategy, max_restarts=sc.max_restarts, period=sc.period)
    gave_up: list[SupervisorGaveUp] = []

    async def root(stop: trio.Event, task_status: trio.TaskStatus[None]) -> None:
        try:
            await run_root(sup, stop_requested=stop, task_status=task_status)
        except SupervisorGaveUp as exc:
            gave_up.append(exc)

    async def main() -> None:
        stop = trio.Event()
        # A deadlock makes the MockClock jump here and fail, instead of hanging the suite.
        with trio.fail_after(10_000):
            await play_steps(stop)

    async def play_steps(stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(root, stop)
            for step in sc.steps:
                await trio.sleep_until(step.at)
                puppet = world.live.get(f"c{step.child}")
                if gave_up or puppet is None:
                    continue
                if step.poison is not None:
                    world.poisoned.add(f"c{step.poison}")
                puppet.command = step.kind
                puppet.wake.set()
                await trio.testing.wait_all_tasks_blocked()
            stop.set()

    with structlog.testing.capture_logs() as logs:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    crash_logs = sum(1 for e in logs if e["event"] in {"child.crashed", "child.start_failed"})
    if gave_up:
        assert gave_up[0].path == "/root"
        assert isinstance(gave_up[0].__cause__, Boom | RuntimeError | type(None))
    return world.trace, (gave_up[0].child if gave_up else None), crash_logs


@st.composite
def scenarios(draw: st.DrawFn, strategy: Strategy) -> Scenario:
    n = draw(st.integers(1, 4))
    restarts = tuple(draw(st.lists(st.sampled_from(Restart), min_size=n, max_size=n)))
    shutdowns = tuple(draw(st.lists(st.sampled_from([0.0, 1.0, None]), min_size=n, max_size=n)))
    raw_steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.integers(0, n - 1),
                st.sampled_from(KINDS),
                st.none() | st.integers(0, n - 1),
            ),
            max_size=16,
        )
    )
    steps, now = [], 0
    for delay, index, kind, poison in raw_steps:
        now += delay
        steps.append(Step(now, index, kind, poison))
    return Scenario(
        strategy=strategy,
        restarts=restarts,
        shutdowns=shutdowns,
        max_restarts=draw(st.integers(0, 3)),
        period=draw(st.integers(1, 4)),
        steps=tuple(steps),
    )


@pytest.mark.parametrize("strategy", list(Strategy))
@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_supervisor_matches_the_otp_model(strategy: Strategy, data: st.DataObject) -> None:
    sc = data.draw(scenarios(strategy))
    expected_trace, expected_breaker = Model(sc).run()
    trace, breaker, crash_logs = play(sc)
    event(f"gave up: {breaker is not None}")
    event(f"failed restarts: {min(sum(1 for e in trace if e[0] == 'start_failed'), 2)}")
    assert trace == expected_trace
    assert breaker == expected_breaker
    # One log event per crash and per failed start, however the supervisor reacted to it.
    assert crash_logs == sum(1 for entry in trace if entry[0] in {"crash", "start_failed"})


# -- the intensity window alone ----------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]), max_size=25),
    max_restarts=st.integers(0, 4),
    period=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
)
def test_intensity_gives_up_exactly_at_the_first_window_over_the_limit(
    gaps: list[float], max_restarts: int, period: float
) -> None:
    times, now = [], 0.0
    for gap in gaps:
        now += gap
        times.append(now)
    intensity = RestartIntensity(max_restarts, period)
    verdicts = [intensity.allow(t) for t in times]
    expected_first_refusal = next(
        (i for i in range(len(times)) if exceeds_intensity(times[: i + 1], max_restarts, period)),
        None,
    )
    first_refusal = verdicts.index(False) if False in verdicts else None
    assert first_refusal == expected_first_refusal
