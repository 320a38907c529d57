"""The trio side of a pykka service: ask it, tell it, and follow it across restarts.

A client never holds an actor's ref: it holds ``resolve``, called at each send, which returns
the current incarnation (``ActorName.resolve`` for a supervised service, so a restart is
picked up without the client noticing; a fixed ref in tests and tools). Each send costs one
pykka ``ask`` and waiting costs no thread (:func:`runtime.bridge.wait_reply`): nothing is
added per call on the hot path, no task and no thread hop.

What a caller sees when the service dies (docs/supervision.md, "pykka services"): a request
sent to an incarnation that dies before answering fails with
:class:`~runtime.bridge.ActorUnavailable` (pykka fails the asks left in the inbox, and
:class:`~runtime.pykka_service.ServiceActor` the replies it deferred); a request sent while
no incarnation runs fails at once with the same error. Never a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import outcome
import pykka
import structlog

from runtime.bridge import CallbackFuture, wait_reply
from storage.errors import ActorUnavailable

log = structlog.get_logger("pykka")

#: Returns the service's current incarnation; raises if there is none.
Resolve = Callable[[], "pykka.ActorRef[Any]"]


class _CrashForTest:
    """No service accepts this message: handling it raises, as a bug in the actor would."""


class ServiceClient:
    """Base of a pykka service's trio face (see the module doc). Trio thread only."""

    def __init__(self, resolve: Resolve) -> None:
        self._resolve: Resolve = resolve

    def ref(self) -> pykka.ActorRef[Any]:
        """The current incarnation; :class:`ActorUnavailable` if there is none."""
        try:
            return self._resolve()
        except ActorUnavailable:
            raise
        except Exception as exc:  # a resolver of a test or a tool: same meaning
            raise ActorUnavailable(f"no actor to send to: {exc}") from exc

    async def ask(self, message: object) -> object:
        """Send ``message`` and await the answer, following a deferred reply (an answer that
        is a :class:`CallbackFuture` the actor will set later). Raises what the actor raised
        handling it, or :class:`ActorUnavailable`. Bound it with ``trio.fail_after``."""
        answer: object = await wait_reply(self.ref().ask(message, block=False))
        if isinstance(answer, CallbackFuture):
            answer = await wait_reply(answer)
        return answer

    def send(self, message: object) -> None:
        """Send ``message`` without waiting, from any trio context (a cleanup path, a
        cancelled scope). An error in handling it is logged; one sent while no incarnation
        runs, or to one that dies first, is dropped: its state died with it."""
        # `ask`, not `tell`: an exception while handling a pykka `tell` stops the actor.
        try:
            ref = self.ref()
        except ActorUnavailable:
            return
        future = ref.ask(message, block=False)
        assert isinstance(future, CallbackFuture)
        future.add_done_callback(
            partial(_log_failure, ref.actor_class.__name__, type(message).__name__)
        )

    def crash_for_test(self) -> None:
        """Test-only fault: make the current incarnation fail as a bug would, by telling it a
        message it does not accept (a failing pykka ``tell`` stops the actor), so that
        supervision is tested with the real actor under real load."""
        self.ref().tell(_CrashForTest())


def _log_failure(actor: str, message: str, result: outcome.Outcome[object]) -> None:
    # Runs in the actor's thread: structlog is thread-safe, nothing else is touched.
    if isinstance(result, outcome.Error) and not isinstance(
        result.error, pykka.ActorDeadError | ActorUnavailable
    ):
        log.error("pykka.message_failed", actor=actor, message=message, error=repr(result.error))
