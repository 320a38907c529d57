"""The actor side of a pykka service: typed messages, one handler, replies it may owe.

A *pykka service* is work that must be serialised across sessions, on a thread of its own
(the persistence actor, the rate limiter). Each is built the same way, from five small
modules, one idea each:

* this module: :class:`ServiceActor`, the actor (which messages, how it answers);
* :mod:`runtime.pykka_client`: :class:`~runtime.pykka_client.ServiceClient`, its trio side;
* :mod:`runtime.pykka_supervision`: its stable :class:`~runtime.pykka_supervision.ActorName`
  and :func:`~runtime.pykka_supervision.pykka_child`, how a supervisor runs it;
* :mod:`runtime.pacer`: :class:`~runtime.pacer.Pacer`, what wakes it at the times it asks for;
* :mod:`runtime.bridge`: the reply future that wakes the asking trio task, and the death watch.

**Messages.** A service declares the messages it accepts as a union type parameter,
``class Limiter(ServiceActor[Acquire | Settle | Tick])``, and handles them in :meth:`handle`,
a ``match`` ending in ``assert_never`` so that mypy finds a message nobody handles. Anything
else is refused with :class:`UnknownMessage` before ``handle`` sees it: a bug, raised to the
asker (an ``ask``) or stopping the actor (a ``tell``, pykka's rule), which is how
:meth:`~runtime.pykka_client.ServiceClient.crash_for_test` crashes one on purpose.

**Deferred replies.** An actor that cannot answer at once (a call that must wait for
capacity) answers its ``ask`` with a :class:`~runtime.bridge.CallbackFuture` the caller sent
in the message, after :meth:`ServiceActor.defer`, and sets it later with
:meth:`ServiceActor.answer`; the client waits on it in the same call. Whatever it still owes
when its thread ends, by a stop or a crash, is failed with
:class:`~runtime.bridge.ActorUnavailable`, after pykka has failed the asks still in its
inbox: so a caller never hangs on a dead service.
"""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar, Generic, TypeVar, cast

import pykka

from runtime.bridge import BridgedActor, CallbackFuture
from storage.errors import ActorUnavailable

M = TypeVar("M")
T = TypeVar("T")


class UnknownMessage(TypeError):
    """A service was sent a message it does not accept (a bug in the sender)."""


class ServiceActor(BridgedActor, Generic[M]):
    """Base of a pykka service; subclass as ``ServiceActor[MessageA | MessageB]``."""

    #: The classes of the type parameter, found once per subclass.
    accepts: ClassVar[tuple[type[Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is ServiceActor:
                (accepted,) = typing.get_args(base)
                cls.accepts = _classes(accepted)

    def __init__(self) -> None:
        super().__init__()
        self._owed: set[CallbackFuture[Any]] = set()

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, self.accepts):
            raise UnknownMessage(f"{type(self).__name__} got {type(message).__name__}")
        return self.handle(cast(M, message))

    def handle(self, message: M) -> Any:
        """Handle one accepted message; what it returns answers an ``ask``."""
        raise NotImplementedError

    # -- deferred replies --------------------------------------------------------------------

    def defer(self, reply: CallbackFuture[T]) -> CallbackFuture[T]:
        """Owe ``reply`` (return it to answer the ``ask`` with "later")."""
        self._owed.add(reply)
        return reply

    def answer(self, reply: CallbackFuture[T], value: T) -> None:
        """Pay an owed reply: the waiting trio task wakes with ``value``."""
        self._owed.discard(reply)
        reply.set(value)

    def drop(self, reply: CallbackFuture[Any]) -> None:
        """Owe ``reply`` no more: its caller withdrew and waits for nothing."""
        self._owed.discard(reply)

    def tell_self(self, message: M) -> bool:
        """Queue ``message`` behind the inbox; ``False`` once stopping (nothing is queued)."""
        if self.actor_stopped.is_set():
            return False
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            return False
        return True

    def _loop_ended(self) -> None:
        owed, self._owed = self._owed, set()
        for reply in owed:
            error = ActorUnavailable(f"{type(self).__name__} stopped before answering")
            reply.set_exception((type(error), error, None))


def _classes(accepted: Any) -> tuple[type[Any], ...]:
    if typing.get_origin(accepted) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(accepted) for c in _classes(arg))
    if isinstance(accepted, type):
        return (accepted,)
    raise TypeError(f"a service accepts classes, not {accepted!r}")
