"""A pacer: the trio task that wakes a pykka service at the times it asks for.

A pykka actor blocks on its inbox: it cannot sleep, and a timer thread of its own would be a
thread nobody owns. Work that is due at a time (a rate limit refilling for a waiter, a
waiter's deadline, a journal fsync, a heartbeat) is therefore started from trio: the pacer
keeps one due time, the earliest it was asked for, and when it comes calls ``tick(now)``,
which asks the actor to do what is due and returns the next time it wants (or ``None``).

Times are ``trio.current_time()`` seconds, so a test drives a pacer with ``MockClock``. Two
ways to ask for a time, both "earliest wins":

* :meth:`Pacer.wake_at`, from the trio thread;
* the function :meth:`Pacer.alarm` returns, from any thread (the actor's): it hands the time
  to trio through ``TrioToken.run_sync_soon``, so the actor never waits for trio.

``every`` adds a period: a tick at most ``every`` seconds after the previous one ended (the
persistence actor's pulse). The pacer runs in the nursery of whoever owns the service's trio
side (:func:`runtime.pykka_supervision.pykka_child` for a supervised service), and is
cancelled with it; it owns no thread and no other task. A tick whose actor is gone
(:class:`~runtime.bridge.ActorUnavailable`) is skipped: the supervisor is bringing the next
incarnation, which asks for its own times.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from storage.errors import ActorUnavailable

#: ``tick(now)``: do what is due at ``now``; the next time wanted, or ``None``.
Tick = Callable[[float], Awaitable[float | None]]


class Pacer:
    """Calls ``tick`` at the earliest time asked for (and every ``every`` seconds)."""

    def __init__(self, tick: Tick, *, every: float = math.inf) -> None:
        if every <= 0:
            raise ValueError("every must be positive (seconds)")
        self._tick = tick
        self._every = every
        self._due = math.inf
        self._changed = trio.Event()

    @property
    def due(self) -> float:
        """The next tick's time (``inf``: none asked for)."""
        return self._due

    def wake_at(self, at: float) -> None:
        """Tick at ``at`` (trio time) or earlier. Trio thread only."""
        if at < self._due:
            self._due = at
            self._changed.set()

    def alarm(self) -> Callable[[float], None]:
        """:meth:`wake_at` for another thread; call this in the trio thread that runs the
        pacer. Once that trio run has ended the request is dropped: nobody is left to tick."""
        token = trio.lowlevel.current_trio_token()

        def wake_at(at: float) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.wake_at, at)

        return wake_at

    async def run(self) -> NoReturn:
        """Tick when due, for ever; cancel it to stop (between ticks or during one)."""
        self.wake_at(trio.current_time() + self._every)
        while True:
            if trio.current_time() < self._due:
                self._changed = trio.Event()
                with trio.move_on_at(self._due):
                    await self._changed.wait()
                continue
            self._due = math.inf
            try:
                wanted = await self._tick(trio.current_time())
            except ActorUnavailable:
                wanted = None
            if wanted is not None:
                self.wake_at(wanted)
            self.wake_at(trio.current_time() + self._every)
