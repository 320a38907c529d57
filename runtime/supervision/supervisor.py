"""An Erlang/OTP-style supervisor whose children are trio tasks.

A :class:`Supervisor` owns one nursery. Each child runs in that nursery inside a cancel scope
of its own, which is **shielded**: cancelling the supervisor does not reach the children
directly, so the supervisor decides the order in which they go. That is the one trick that
lets structured concurrency give OTP's ordering guarantees (children stop in reverse start
order, always), and it costs one task, one cancel scope and two events per child.

What stops a supervisor, and what each way does:

``ctx.stop_requested`` set (graceful shutdown)
    Once any restart in progress has finished, children are stopped in reverse start order
    (all at once with ``concurrent_shutdown``). Each is sent ``ctx.stop_requested``, given its
    spec's ``shutdown`` grace to return, then cancelled. :meth:`Supervisor.run` then returns
    normally.

restart intensity exceeded (give up)
    Children are stopped as in a graceful shutdown, then :meth:`Supervisor.run` raises
    :class:`SupervisorGaveUp`, an abnormal exit its own parent reacts to.

the supervisor's task is cancelled (its owner's cancel scope)
    Whatever the supervisor was doing (a graceful stop included) is abandoned and every child
    still alive is cancelled, one at a time in reverse start order, each waited for before the
    next (all at once with ``concurrent_shutdown``); nobody is sent ``stop_requested`` and no
    grace applies. A child that is itself a supervisor does the same with its own children.
    :meth:`Supervisor.run` then lets ``trio.Cancelled`` propagate as trio requires. As always
    in trio, a child that does not respond to cancellation (say, blocked in an
    uncancellable thread) holds its supervisor, and everything above it, until it returns.

Restarts, ``start_child`` and ``terminate_child`` are serialised by one lock, as an OTP
supervisor serialises them through its mailbox: while a child is starting (until it calls
``ctx.started()``) no other child of the same supervisor is started, stopped or restarted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import structlog
import trio

from runtime.supervision.errors import (
    ChildStartError,
    DuplicateChild,
    SupervisionError,
    SupervisorGaveUp,
    SupervisorNotRunning,
    UnknownChild,
)
from runtime.supervision.handle import ChildExit, ChildHandle, ExitReason
from runtime.supervision.intensity import RestartIntensity
from runtime.supervision.snapshot import ChildSnapshot, ChildState, SupervisorSnapshot
from runtime.supervision.spec import ChildContext, ChildSpec, Restart, Strategy
from storage.startup_errors import StartupError

__all__ = ["Supervisor", "run_root"]

_log = structlog.get_logger(__name__)

_RETURNED_EARLY = "returned before calling ctx.started()"


class _Child:
    """A supervisor's record of one child, kept across its restarts."""

    __slots__ = (
        "handle",
        "last_error",
        "own_intensity",
        "path",
        "run",
        "spec",
        "started_at",
        "starts",
        "state",
    )

    def __init__(self, spec: ChildSpec, path: str) -> None:
        self.spec = spec
        self.path = path
        self.state = ChildState.STARTING
        self.starts = 0
        self.started_at: float | None = None
        self.last_error: str | None = None
        self.run: _Run | None = None
        #: The starter's handle; only dynamic children have one.
        self.handle: ChildHandle | None = None
        #: The window of ``spec.intensity``, made at the first restart (most never restart).
        self.own_intensity: RestartIntensity | None = None

    def intensity(self) -> RestartIntensity | None:
        """The child's own restart window, if its spec gives it one."""
        limit = self.spec.intensity
        if limit is None:
            return None
        if self.own_intensity is None:
            self.own_intensity = RestartIntensity(limit.max_restarts, limit.period)
        return self.own_intensity


class _Run:
    """One start of one child: its context, its cancel scope and how it ended."""

    __slots__ = (
        "_finished",
        "child",
        "ctx",
        "done",
        "error",
        "ready",
        "scope",
        "stop_reason",
        "stopping",
    )

    def __init__(self, child: _Child, cause: Exception | None) -> None:
        self.child = child
        self.ctx = ChildContext(
            child.spec.id,
            child.path,
            restarts=child.starts,
            last_error=cause,
            on_started=self._on_started,
        )
        # Shielded so that only the supervisor cancels it: see the module docstring.
        self.scope = trio.CancelScope(shield=True)
        self.ready = trio.Event()  # set by ctx.started(), or when the run ends without it
        self.done = False  # the run's task has ended
        self._finished: trio.Event | None = None  # made only for someone who waits
        self.error: Exception | None = None
        # Set by the supervisor before it stops this run, so the run's end is not mistaken
        # for a failure to react to.
        self.stopping = False
        self.stop_reason = "shutdown"

    def finish(self) -> None:
        self.done = True
        if self._finished is not None:
            self._finished.set()

    async def wait_finished(self) -> None:
        if not self.done:
            if self._finished is None:
                self._finished = trio.Event()
            await self._finished.wait()

    def _on_started(self) -> None:
        if not self.stopping:
            self.child.state = ChildState.RUNNING
            self.child.started_at = trio.current_time()
        _log.log(
            _progress(self.child), "child.started", path=self.child.path, child=self.child.spec.id
        )
        self.ready.set()


def _progress(child: _Child) -> int:
    """The level a child's progress (started, stopped or exited normally) is logged: at info for
    the static children a node starts once, at debug for dynamic ones, which come and go
    with their work (a session each: its own events say so), as OTP logs its supervisors'
    progress reports below the default level. Failures are logged at their level always."""
    return logging.DEBUG if child.handle is not None else logging.INFO


def _should_restart(restart: Restart, abnormal: bool) -> bool:
    return restart is Restart.PERMANENT or (restart is Restart.TRANSIENT and abnormal)


class Supervisor:
    """Starts children in order, restarts them by strategy, stops them in reverse order.

    A supervisor is an ordinary trio task: run it with :func:`run_root`, or put
    :meth:`child_spec` (whose start function is :meth:`run`) among another supervisor's
    children. The object outlives its runs, so other code can hold it to call
    :meth:`start_child`; every run starts from the initial ``children`` again (dynamic
    children do not survive a restart of their supervisor, as in OTP).
    """

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        period: float = 5.0,
        concurrent_shutdown: bool = False,
    ) -> None:
        """Describe a supervisor; nothing runs until :meth:`run`.

        ``max_restarts`` and ``period`` are OTP's intensity and period: more than
        ``max_restarts`` restarts within ``period`` seconds make the supervisor give up.
        With ``concurrent_shutdown`` every child is asked to stop at once and the grace
        periods overlap, instead of one child after another in reverse order; that is OTP's
        ``simple_one_for_one`` behaviour, meant for many interchangeable dynamic children.
        """
        ids = [spec.id for spec in children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"child ids must be unique, got {ids}")
        self._intensity = RestartIntensity(max_restarts, period)  # validates both
        self.strategy = Strategy(strategy)
        for spec in children:
            self._check_spec(spec)
        self.max_restarts = max_restarts
        self.period = period
        self.concurrent_shutdown = concurrent_shutdown
        self._specs = tuple(children)
        self._path: str | None = None
        self._children: dict[str, _Child] = {}  # in start order
        self._runs: set[_Run] = set()  # every run whose task has not ended
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._inbox: trio.MemorySendChannel[_Run | None] | None = None
        self._running = False
        self._accepting = False

    @property
    def path(self) -> str | None:
        """The path of the current or last run, ``None`` before the first."""
        return self._path

    def child_spec(
        self, id: str, *, restart: Restart = Restart.PERMANENT, shutdown: float | None = None
    ) -> ChildSpec:
        """A spec that runs this supervisor as a child of another one.

        ``shutdown`` defaults to ``None`` (wait for as long as it takes), as OTP advises for
        supervisors: each grandchild already has a grace period of its own.
        """
        return ChildSpec(id=id, start=self.run, restart=restart, shutdown=shutdown)

    async def run(self, ctx: ChildContext) -> None:
        """Supervise until stopped; a :data:`StartFunction`, so a supervisor can be a child.

        Starts the initial children in order, each only after the previous one called
        ``ctx.started()``, then calls ``ctx.started()`` itself. Returns normally after a
        graceful stop (``ctx.stop_requested``). Raises :class:`ChildStartError` if an initial
        child fails to start and :class:`SupervisorGaveUp` if the restart intensity is
        exceeded, in both cases after stopping every child. Cancellation: see the module
        docstring. Both errors are raised bare, outside any exception group.
        """
        if self._running:
            raise RuntimeError(f"supervisor {self._path} is already running")
        self._running = True
        self._path = ctx.path
        self._children = {}
        self._intensity = RestartIntensity(self.max_restarts, self.period)
        failure: SupervisionError | None = None
        send, receive = trio.open_memory_channel[_Run | None](math.inf)
        try:
            with send, receive:
                self._inbox = send
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        failure = await self._supervise(ctx, receive)
                    finally:
                        # Normally a no-op: everything is stopped already. After a cancel it
                        # is the whole shutdown, so it must not be cancelled itself.
                        self._accepting = False
                        with trio.CancelScope(shield=True):
                            await self._stop(self._in_stop_order(), reason="cancelled")
                        # Belt and braces: a run no record points at (its start_child caller
                        # was cancelled, or a bug) must not keep this nursery open forever.
                        for run in self._runs:
                            run.scope.cancel()
                    # Only the stop-request watcher is left. Not done on the way out of an
                    # exception: this scope would then swallow our owner's Cancelled.
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._inbox = None
            self._running = False
            # Every child still on record has been stopped with this run: its starter hears
            # of it now (the record itself stays, for a snapshot taken after the stop).
            for child in self._children.values():
                if child.handle is not None:
                    last = child.run.error if child.run is not None else None
                    child.handle._end(ChildExit(ExitReason.STOPPED, last))
        if failure is not None:
            raise failure
        _log.info("supervisor.stopped", path=self._path, reason="shutdown")

    async def start_child(self, spec: ChildSpec) -> ChildHandle:
        """Add a child after the others and start it; return once it called ``started()``.

        Returns the child's :class:`ChildHandle`, which tells when and how the child leaves
        the supervisor for good (its restarts are not an end). Raises :class:`DuplicateChild`
        if the id exists, :class:`SupervisorNotRunning` if the supervisor is not running or is
        stopping, :class:`ChildStartError` if the child fails before ``started()`` (it is then
        not added, and the supervisor is unaffected, as with OTP's ``start_child`` returning
        an error), and ``ValueError`` if the spec has an ``intensity`` of its own and this
        supervisor is not ``ONE_FOR_ONE``. If the caller is cancelled while the child starts,
        the child is cancelled and not added.
        """
        self._check_spec(spec)
        async with self._lock:
            if not self._accepting:
                raise SupervisorNotRunning(self._path)
            if spec.id in self._children:
                raise DuplicateChild(f"supervisor {self._path} already has a child {spec.id!r}")
            child = self._add(spec)
            child.handle = ChildHandle(spec.id, child.path)
            try:
                error = await self._start(child)
            except BaseException:
                self._discard(child, ChildExit(ExitReason.STOPPED))
                raise
            if error is not None:
                self._discard(child, ChildExit(ExitReason.CRASHED, error))
                if not self._accepting:
                    raise SupervisorNotRunning(self._path) from error
                raise ChildStartError(child.path, repr(error)) from error
            return child.handle

    async def terminate_child(self, id: str) -> None:
        """Stop a child (graceful, with its ``shutdown`` grace) and remove it.

        Raises :class:`UnknownChild` if there is no such child (a temporary or transient child
        that has ended is already gone) and :class:`SupervisorNotRunning` if the supervisor
        is not running. If the caller is cancelled meanwhile, the child is cancelled at once.
        """
        async with self._lock:
            if not self._accepting:
                raise SupervisorNotRunning(self._path)
            child = self._children.get(id)
            if child is None:
                raise UnknownChild(f"supervisor {self._path} has no child {id!r}")
            try:
                await self._stop([child])
            finally:
                self._discard(child, ChildExit(ExitReason.STOPPED))

    def snapshot(self) -> SupervisorSnapshot:
        """The supervisor and its children, in start order, as of now. Costs O(children)."""
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # outside trio.run
            now = None
        return SupervisorSnapshot(
            path=self._path,
            strategy=self.strategy,
            max_restarts=self.max_restarts,
            period=self.period,
            running=self._running,
            taken_at=now,
            restart_times=self._intensity.recent(now),
            children=tuple(
                ChildSnapshot(
                    id=child.spec.id,
                    path=child.path,
                    restart=child.spec.restart,
                    state=child.state,
                    restarts=max(child.starts - 1, 0),
                    started_at=child.started_at,
                    last_error=child.last_error,
                )
                for child in self._children.values()
            ),
        )

    # -- the supervisor's own task ------------------------------------------------------------

    async def _supervise(
        self, ctx: ChildContext, inbox: trio.MemoryReceiveChannel[_Run | None]
    ) -> SupervisionError | None:
        async with self._lock:
            for spec in self._specs:
                child = self._add(spec)
                error = await self._start(child)
                if error is not None:
                    await self._stop(self._in_stop_order())
                    start_failure = ChildStartError(child.path, repr(error))
                    start_failure.__cause__ = error
                    return start_failure
            self._accepting = True
        assert self._nursery is not None
        assert self._inbox is not None
        self._nursery.start_soon(self._forward_stop_request, ctx.stop_requested, self._inbox)
        _log.info("supervisor.started", path=self._path, children=len(self._children))
        ctx.started()
        async for run in inbox:
            if run is None:  # stop requested
                break
            async with self._lock:
                failure = await self._on_child_exit(run)
            if failure is not None:
                return failure
        async with self._lock:
            self._accepting = False
            await self._stop(self._in_stop_order())
        return None

    @staticmethod
    async def _forward_stop_request(
        stop_requested: trio.Event, inbox: trio.MemorySendChannel[_Run | None]
    ) -> None:
        # Through the inbox rather than by cancelling the loop, so that a stop request never
        # interrupts a restart half-way.
        await stop_requested.wait()
        inbox.send_nowait(None)

    async def _on_child_exit(self, run: _Run) -> SupervisionError | None:
        child = run.child
        if self._children.get(child.spec.id) is not child or child.run is not run:
            return None  # stale: the child was restarted or removed since it ended
        abnormal = run.error is not None
        if not _should_restart(child.spec.restart, abnormal):
            reason = ExitReason.CRASHED if abnormal else ExitReason.NORMAL
            self._discard(child, ChildExit(reason, run.error))
            return None
        return await self._restart(child, run.error)

    async def _restart(self, failed: _Child, error: Exception | None) -> SupervisionError | None:
        # Loops when a restarted child fails before started(): OTP counts that as one more
        # restart and applies the strategy again, with that child as the failed one.
        while True:
            own = failed.intensity()
            if own is not None:
                # Its own window, not ours (ChildSpec.intensity): only it can give up here.
                if not own.allow(trio.current_time()):
                    self._give_up_child(failed, error)
                    return None
            elif not self._intensity.allow(trio.current_time()):
                return await self._give_up(failed, error)
            group = self._restart_group(failed)
            siblings = [child for child in group if child is not failed]
            await self._stop(reversed(siblings))
            for child in siblings:
                if child.spec.restart is Restart.TEMPORARY:
                    self._discard(child, ChildExit(ExitReason.STOPPED))
            group = [child for child in group if self._children.get(child.spec.id) is child]
            for child in group:
                child.state = ChildState.RESTARTING
            cause = "crashed" if error is not None else "exited"
            for child in group:
                _log.info(
                    "child.restarting",
                    path=child.path,
                    child=child.spec.id,
                    reason=f"{failed.spec.id} {cause}",
                    restarts=child.starts,
                )
                start_error = await self._start(child, cause=error if child is failed else None)
                if start_error is not None:
                    failed, error = child, start_error
                    break
            else:
                return None

    def _give_up_child(self, child: _Child, error: Exception | None) -> None:
        """``child`` exceeded its own intensity: it is removed, and nothing else changes."""
        limit = child.spec.intensity
        assert limit is not None
        _log.error(
            "child.gave_up",
            path=child.path,
            child=child.spec.id,
            reason=f"more than {limit.max_restarts} restart(s) within {limit.period:g} s",
        )
        self._discard(child, ChildExit(ExitReason.GAVE_UP, error))

    def _restart_group(self, failed: _Child) -> list[_Child]:
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [failed]
        children = list(self._children.values())
        if self.strategy is Strategy.ONE_FOR_ALL:
            return children
        return children[children.index(failed) :]

    async def _give_up(self, failed: _Child, error: Exception | None) -> SupervisionError:
        _log.error(
            "supervisor.gave_up",
            path=self._path,
            child=failed.spec.id,
            reason=f"more than {self.max_restarts} restart(s) within {self.period:g} s",
        )
        self._accepting = False
        await self._stop(self._in_stop_order())
        assert self._path is not None
        failure = SupervisorGaveUp(self._path, failed.spec.id, self.max_restarts, self.period)
        failure.__cause__ = error
        return failure

    # -- children ------------------------------------------------------------------------------

    def _check_spec(self, spec: ChildSpec) -> None:
        if spec.intensity is not None and self.strategy is not Strategy.ONE_FOR_ONE:
            raise ValueError(
                f"child {spec.id!r} has an intensity of its own, which only a one_for_one "
                f"supervisor can honour (this one is {self.strategy.value})"
            )

    def _add(self, spec: ChildSpec) -> _Child:
        child = _Child(spec, f"{self._path}/{spec.id}")
        self._children[spec.id] = child
        return child

    def _discard(self, child: _Child, exit: ChildExit) -> None:
        if self._children.get(child.spec.id) is child:
            del self._children[child.spec.id]
        child.state = ChildState.STOPPED
        if child.handle is not None:
            child.handle._end(exit)

    def _in_stop_order(self) -> list[_Child]:
        return list(reversed(self._children.values()))

    async def _start(self, child: _Child, *, cause: Exception | None = None) -> Exception | None:
        """Start one run of ``child`` (``cause``: the crash it restarts after, for its
        context); wait until it reports started or ends.

        Returns the reason it failed to start, or ``None``. If the waiting task is cancelled,
        the run is cancelled too (it is never left half-started) and ``Cancelled`` propagates.
        """
        assert self._nursery is not None
        run = _Run(child, cause)
        child.starts += 1
        child.run = run
        child.state = ChildState.STARTING
        self._runs.add(run)
        self._nursery.start_soon(self._run_child, run, name=child.path)
        try:
            await run.ready.wait()
        except BaseException:
            run.stopping = True
            run.stop_reason = "cancelled"
            run.scope.cancel()
            raise
        if run.ctx.has_started:
            return None
        return run.error if run.error is not None else RuntimeError(_RETURNED_EARLY)

    async def _run_child(self, run: _Run) -> None:
        child = run.child
        try:
            # The scope absorbs our own cancellation; whatever else the child raised (an
            # exception group that also held Cancelled included) is caught below.
            with run.scope:
                await child.spec.start(run.ctx)
        except Exception as exc:
            run.error = exc
            child.last_error = repr(exc)
        finally:
            self._runs.discard(run)
            run.finish()
            run.ready.set()
        if not run.stopping:
            child.state = ChildState.STOPPED
        self._log_end(run)
        if not run.stopping and run.ctx.has_started and self._inbox is not None:
            # A run that ends before started() is reported by _start to whoever waits there.
            self._inbox.send_nowait(run)

    @staticmethod
    def _log_end(run: _Run) -> None:
        # Exactly one event per end of a run, logged here and nowhere else, so that every
        # crash is logged once even when the supervisor later finds its exit stale.
        child = run.child
        fields = {"path": child.path, "child": child.spec.id}
        if run.stopping:
            if run.error is None:
                _log.log(_progress(child), "child.stopped", reason=run.stop_reason, **fields)
            else:
                _log.warning(
                    "child.stopped", reason=run.stop_reason, error=repr(run.error), **fields
                )
        elif run.error is not None:
            # A supervision error was logged where it happened, and a start-up error explains
            # itself in its message (the listener's bind): no traceback for either.
            explained = isinstance(run.error, SupervisionError | StartupError)
            exc_info = None if explained else run.error
            started = run.ctx.has_started
            _log.error(
                "child.crashed" if started else "child.start_failed",
                reason=repr(run.error),
                exc_info=exc_info,
                **fields,
            )
        elif not run.ctx.has_started:
            _log.error("child.start_failed", reason=_RETURNED_EARLY, **fields)
        else:
            _log.log(_progress(child), "child.exited", reason="normal", **fields)

    async def _stop(self, children: Iterable[_Child], *, reason: str | None = None) -> None:
        """Stop ``children`` in the given order, one after the other or all at once.

        ``reason="cancelled"`` (the supervisor's own task was cancelled) cancels each child
        at once instead of sending ``stop_requested``. If the waiting task is cancelled, every
        child it was stopping is cancelled before ``Cancelled`` propagates.
        """
        if self.concurrent_shutdown:
            await self._stop_batch(list(children), reason)
        else:
            for child in children:
                await self._stop_batch([child], reason)

    @staticmethod
    async def _stop_batch(children: list[_Child], reason: str | None) -> None:
        pending: list[tuple[float, _Child, _Run]] = []
        now = trio.current_time()
        try:
            for child in children:
                run = child.run
                if run is None or run.done:
                    child.state = ChildState.STOPPED
                    continue
                run.stopping = True
                child.state = ChildState.STOPPING
                grace = 0.0 if reason == "cancelled" else child.spec.shutdown
                if grace == 0:
                    run.stop_reason = reason or "brutal_kill"
                    run.scope.cancel()
                else:
                    run.ctx.stop_requested.set()
                pending.append((math.inf if grace is None else now + grace, child, run))
            # Waiting in deadline order keeps every child within its own grace period.
            pending.sort(key=lambda item: item[0])
            for deadline, _, run in pending:
                if not run.done:
                    with trio.move_on_at(deadline):
                        await run.wait_finished()
                if not run.done:
                    run.stop_reason = "killed"
                    run.scope.cancel()
            for _, child, run in pending:
                if not run.done:
                    await run.wait_finished()
                child.state = ChildState.STOPPED
        finally:
            for _, _, run in pending:
                if not run.done:
                    run.stop_reason = "cancelled"
                    run.scope.cancel()


async def run_root(
    supervisor: Supervisor,
    *,
    name: str = "root",
    stop_requested: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``supervisor`` as the root of a tree, at path ``/<name>``.

    With ``nursery.start(run_root, sup)`` it returns once every initial child has started.
    Set ``stop_requested`` for a graceful shutdown, after which it returns normally. A root
    that gives up raises :class:`SupervisorGaveUp` here, bare (the CLI prints it and exits
    non-zero); one whose initial children fail to start raises :class:`ChildStartError`.
    """
    ctx = ChildContext(
        name, f"/{name}", stop_requested=stop_requested, on_started=task_status.started
    )
    await supervisor.run(ctx)
