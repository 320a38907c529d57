"""Trio actors: an object that handles one message at a time from its bounded mailbox.

An actor's state is touched only by its own loop, so it needs no locks; others reach it only
through its :class:`~runtime.mailbox.ActorRef`. The loop (:func:`run_actor`) gives the same
guarantees as pykka's, so both kinds of actor behave alike under supervision:

* an exception while handling a ``tell`` is a crash: the loop calls ``on_failure`` and
  re-raises, so the actor's supervisor sees an abnormal exit and applies its restart policy;
* an exception while handling an ``ask`` goes back to the asker and the actor lives on;
* an ask being handled when the actor crashes, or is cancelled, is answered with
  :class:`~storage.errors.ActorUnavailable` rather than left hanging.

The mailbox belongs to the actor's *name*, not to one incarnation: a restarted actor reads the
same mailbox, so messages queued behind a crash are handled by the next incarnation. Only when
the name itself goes away does :func:`close_mailbox` turn what is left into dead letters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import outcome
import trio

from runtime.dead_letters import dead_letters
from runtime.mailbox import Ask, Inbox
from storage.errors import ActorUnavailable

M = TypeVar("M")


class Actor(Generic[M]):
    """Subclass and implement :meth:`receive`; the hooks default to doing nothing."""

    path: str = "?"

    async def on_start(self) -> None:
        """Runs before the first message. Raising here fails the start."""

    async def receive(self, message: M) -> Any:
        """Handle one message; the return value answers an ask."""
        raise NotImplementedError

    async def on_failure(self, error: Exception) -> None:
        """Runs when ``receive`` crashed the actor, before the supervisor hears of it."""

    async def on_stop(self) -> None:
        """Runs last, however the actor ended (shielded from cancellation, so keep it short)."""

    @asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        """Resources that live as long as this incarnation, e.g. a nursery for its tasks."""
        yield


async def run_actor(
    actor: Actor[M],
    inbox: Inbox[M],
    *,
    started: Callable[[], None] | None = None,
) -> None:
    """Run ``actor`` until its mailbox is closed and drained (a normal end) or it crashes."""
    current: Ask[M] | None = None
    try:
        async with actor.lifetime():
            await actor.on_start()
            if started is not None:
                started()
            async for envelope in inbox:
                if isinstance(envelope, Ask):
                    current = envelope
                    try:
                        value = await actor.receive(envelope.message)
                    except Exception as error:
                        envelope.reply.set(outcome.Error(error))
                    else:
                        envelope.reply.set(outcome.Value(value))
                    current = None
                else:
                    await actor.receive(envelope)
    except Exception as error:
        # The lifetime's nursery wraps a crash in an exception group; supervisors and logs
        # should see the error itself.
        cause = sole_exception(error)
        await actor.on_failure(cause)
        if cause is error:
            raise
        raise cause from None
    finally:
        if current is not None:
            ended = ActorUnavailable(f"{actor.path} ended before answering")
            current.reply.set(outcome.Error(ended))
        with trio.CancelScope(shield=True):
            await actor.on_stop()


def sole_exception(error: Exception) -> Exception:
    """The one exception inside (nested) single-member groups, or ``error`` itself."""
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def close_mailbox(path: str, inbox: Inbox[Any]) -> None:
    """The actor's name is gone: fail every queued ask, dead-letter every queued tell."""
    while True:
        try:
            envelope = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if isinstance(envelope, Ask):
            envelope.reply.set(outcome.Error(ActorUnavailable(f"{path} stopped")))
        kind = type(envelope.message if isinstance(envelope, Ask) else envelope).__name__
        dead_letters.record(target=path, sender="?", reason="actor stopped", kind=kind)
    inbox.close()
