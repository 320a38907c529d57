"""pykka services as children of a trio supervisor, reached through a stable name.

A stopped pykka actor cannot be restarted (pykka's docs for ``ActorRef.stop``), so supervising
one means starting a fresh actor and handing out the new ref. Callers never hold a ref: they
hold an :class:`ActorName`, which resolves to whichever incarnation is current, and waits for
the next one while a restart is under way. A restart is therefore invisible to callers, except
for requests that were in flight at the crash: those fail with
:class:`~runtime.bridge.ActorUnavailable`, never hang.

Death is detected without parking a thread: :class:`~runtime.bridge.BridgedActor` reports the
end of its loop from its own thread through ``TrioToken.run_sync_soon``. The supervisor tells
a crash from a requested stop by whether it asked for the stop.

This is one of the five modules of a pykka service (:mod:`runtime.pykka_service` lists them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pykka
import structlog
import trio

from runtime.bridge import BridgedActor, wait_reply, watch_death
from runtime.pacer import Pacer
from runtime.supervision.spec import ChildContext, StartFunction
from storage.errors import ActorUnavailable

log = structlog.get_logger("supervision")

A = TypeVar("A", bound=BridgedActor)


class ActorCrashed(Exception):
    """A supervised pykka actor stopped without being asked to (its error is in pykka's log
    and, when known, in ``__cause__``)."""


class _Incarnation:
    """One started actor and the trio tasks currently waiting on its replies."""

    __slots__ = ("dead", "ref", "waiters")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref
        self.dead = False
        self.waiters: set[trio.CancelScope] = set()

    def bury(self) -> None:
        """Runs in the trio thread after the actor's loop ended: release every waiter."""
        self.dead = True
        for scope in self.waiters:
            scope.cancel()


class ActorName(Generic[A]):
    """The stable address of a supervised pykka actor, e.g. ``/root/persistence``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._current: _Incarnation | None = None
        self._changed = trio.Event()
        self.incarnations = 0

    @property
    def ref(self) -> pykka.ActorRef[A]:
        """The current incarnation's ref; :class:`ActorUnavailable` between incarnations."""
        current = self._current
        if current is None or current.dead:
            raise ActorUnavailable(f"{self.path} is not running")
        return current.ref

    def resolve(self) -> pykka.ActorRef[A]:
        """:attr:`ref` as a function: a :class:`~runtime.pykka_client.ServiceClient`'s
        ``resolve``, called at each send."""
        return self.ref

    async def running(self, incarnation: int = 1) -> pykka.ActorRef[A]:
        """Wait until the ``incarnation``-th incarnation (1: the first) or a later one runs,
        and return its ref. Bound the wait with ``trio.fail_after``."""
        while True:
            current = self._current
            if self.incarnations >= incarnation and current is not None and not current.dead:
                return current.ref
            await self._changed.wait()

    async def ask(self, message: object, *, restart_wait: float = 30.0) -> Any:
        """Ask the current incarnation and await its answer in trio.

        If no incarnation is running (a restart is under way), wait up to ``restart_wait``
        seconds for one. Raises :class:`ActorUnavailable` if the incarnation dies before
        answering; whatever the actor raised while handling the message is raised here.
        Bound the whole wait with ``trio.fail_after`` around the call.
        """
        incarnation = await self._resolve(restart_wait)
        while not incarnation.ref.is_alive():
            # Dead, but its death has not reached trio yet. The message was not sent, so it
            # is safe to wait for the next incarnation instead of failing.
            incarnation.dead = True
            incarnation = await self._resolve(restart_wait)
        future = incarnation.ref.ask(message, block=False)
        scope = trio.CancelScope()
        incarnation.waiters.add(scope)
        try:
            with scope:
                return await wait_reply(future)
        finally:
            incarnation.waiters.discard(scope)
        # Reached only when the incarnation's death cancelled the wait.
        raise ActorUnavailable(
            f"{self.path} stopped before answering; the request may not have been done"
        )

    async def _resolve(self, restart_wait: float) -> _Incarnation:
        with trio.move_on_after(restart_wait):
            while self._current is None or self._current.dead:
                await self._changed.wait()
            return self._current
        raise ActorUnavailable(f"{self.path} did not come back within {restart_wait:g} s")

    def _install(self, incarnation: _Incarnation | None) -> None:
        self._current = incarnation
        if incarnation is not None:
            self.incarnations += 1
        self._changed.set()
        self._changed = trio.Event()


def pykka_child(
    name: ActorName[A],
    start: Callable[[], pykka.ActorRef[A]],
    *,
    pacer: Pacer | None = None,
    stop_timeout: float = math.inf,
) -> StartFunction:
    """A supervisor child function that runs one incarnation of a pykka actor.

    ``start`` makes and starts a fresh actor (``SomeActor.start(...)``), in the trio thread,
    so it may read ``trio.current_time()`` and take a pacer's :meth:`~Pacer.alarm`. ``pacer``
    (optional) runs beside the incarnation, in the child's nursery: it outlives none of them,
    and the next incarnation's child runs it again.

    The child reports started at once, returns normally after a requested stop
    (``ctx.stop_requested``: pykka queues the stop behind every message already sent, so
    nothing accepted is dropped) and raises :class:`ActorCrashed` when the actor dies on its
    own. A thread cannot be cancelled: on cancellation the actor is asked to stop and awaited,
    shielded, up to ``stop_timeout``.
    """

    async def run(ctx: ChildContext) -> None:
        token = trio.lowlevel.current_trio_token()
        died = trio.Event()
        ref = start()
        incarnation = _Incarnation(ref)
        cause: list[BaseException | None] = []

        def on_death(error: BaseException | None) -> None:  # in the actor's thread
            def in_trio() -> None:
                cause.append(error)
                incarnation.bury()
                died.set()

            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(in_trio)

        watch_death(ref, on_death)
        name._install(incarnation)
        ctx.started()
        stopping = False
        try:
            async with trio.open_nursery() as nursery:

                async def stop_when_asked() -> None:
                    nonlocal stopping
                    await ctx.stop_requested.wait()
                    stopping = True
                    ref.stop(block=False)

                nursery.start_soon(stop_when_asked)
                if pacer is not None:
                    nursery.start_soon(pacer.run)
                await died.wait()
                nursery.cancel_scope.cancel()
        finally:
            if name._current is incarnation:
                name._install(None)
            if not died.is_set():
                stopping = True
                ref.stop(block=False)
                with trio.CancelScope(shield=True), trio.move_on_after(stop_timeout):
                    await died.wait()
        if not stopping:
            raise ActorCrashed(f"{ctx.path} died") from (cause[0] if cause else None)

    return run
