"""Awaiting a pykka actor's reply from trio without parking a thread.

pykka futures have no done-callback and block the thread that waits on them, so the obvious
``trio.to_thread.run_sync(future.get)`` costs a worker thread per waiting task and caps
concurrency at the thread limiter (``bench/actors.py``, docs/benchmarks.md: with 100 tasks, a
sixth of the bridge's round trips/s). Instead, actors that trio talks to create
:class:`CallbackFuture` replies: when the actor thread sets the reply, the future hands it to
trio through :meth:`trio.lowlevel.TrioToken.run_sync_soon`, which wakes exactly the task that
asked.

Cancellation: the waiting task is parked with an abort function that always succeeds. A reply
that arrives after the wait was cancelled finds the waiter marked gone and is dropped, so it can
never be delivered to a different waiter.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import outcome
import pykka
import trio

from storage.errors import ActorUnavailable

T = TypeVar("T")


class CallbackFuture(pykka.ThreadingFuture[T], Generic[T]):
    """A pykka future that runs callbacks (in the setting thread) once it holds a value."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[outcome.Outcome[T]], None]] = []
        self._done_lock = threading.Lock()
        self._outcome: outcome.Outcome[T] | None = None

    def set(self, value: Any | None = None) -> None:
        super().set(value)
        self._resolve(outcome.Value(cast(T, value)))

    def set_exception(self, exc_info: Any = None) -> None:
        super().set_exception(exc_info)
        error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if error is None:  # pykka's convention: "the exception being handled now"
            error = sys.exc_info()[1]
        assert isinstance(error, BaseException)
        self._resolve(outcome.Error(error))

    def add_done_callback(self, callback: Callable[[outcome.Outcome[T]], None]) -> None:
        """Run ``callback(outcome)`` once the reply is set: now, if it already is."""
        with self._done_lock:
            done = self._outcome
            if done is None:
                self._callbacks.append(callback)
                return
        callback(done)

    def _resolve(self, result: outcome.Outcome[T]) -> None:
        with self._done_lock:
            self._outcome = result
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(result)


class BridgedActor(pykka.ThreadingActor):
    """Base for pykka actors that trio code asks: their replies wake trio tasks directly,
    and their death is reported to whoever :func:`watch_death`-es them.

    Two of pykka's private hooks are used (pinned to pykka 4): ``_create_future`` (the reply
    type) and ``_actor_loop`` (the thread's whole life, so its end is observable).
    """

    _last_failure: BaseException | None = None

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return CallbackFuture()

    def _handle_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._last_failure = exception_value
        super()._handle_failure(exception_type, exception_value, traceback)

    def _loop_ended(self) -> None:
        """In the actor's thread, after pykka's teardown and before its death is reported:
        a subclass fails here whatever it still owes."""

    def _actor_loop(self) -> None:
        try:
            super()._actor_loop()
        finally:
            # After pykka's teardown: every queued ask has been answered with ActorDeadError.
            try:
                self._loop_ended()
            finally:
                with _watch_lock:
                    watcher = _watchers.pop(self.actor_urn, None)
                if watcher is not None:
                    watcher(self._last_failure)


_watch_lock = threading.Lock()
_watchers: dict[str, Callable[[BaseException | None], None]] = {}


def watch_death(ref: pykka.ActorRef[Any], callback: Callable[[BaseException | None], None]) -> None:
    """Call ``callback(error_or_None)`` once the actor's thread has finished, from that thread
    (or from here, at once, if it already has). One watcher per actor."""
    with _watch_lock:
        if not ref.actor_stopped.is_set():
            _watchers[ref.actor_urn] = callback
            return
    # Already stopped, and its loop may or may not have passed the point of reading the
    # watchers: the error is unknown here, pykka's log has it.
    callback(None)


async def wait_reply(future: pykka.Future[T]) -> T:
    """Wait for ``future`` (from :class:`BridgedActor` ``ask(..., block=False)``) in trio.

    Raises :class:`ActorUnavailable` if the actor died before answering. Bound the wait the
    trio way, with ``trio.fail_after`` around the call. On cancellation the reply, if it ever
    comes, is dropped.
    """
    if not isinstance(future, CallbackFuture):
        raise TypeError("wait_reply needs a CallbackFuture: ask a BridgedActor")
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = True

    def deliver(result: outcome.Outcome[T]) -> None:
        # Runs in the trio thread, so it is ordered with `abort` below: no lock needed.
        if waiting:
            trio.lowlevel.reschedule(task, result)

    def on_done(result: outcome.Outcome[T]) -> None:
        # Runs in the actor's thread.
        with contextlib.suppress(trio.RunFinishedError):  # nobody is left to tell
            token.run_sync_soon(deliver, result)

    def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(on_done)
    try:
        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
    except pykka.ActorDeadError as exc:
        # pykka says "<actor> not found" (dead when asked) or "<actor> stopped before
        # handling the message" (dead with it in its inbox): to the caller, one thing.
        raise ActorUnavailable(f"the actor stopped before answering ({exc})") from exc
