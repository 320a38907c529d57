"""The node's one tree of domain errors (httpx's style: catch the meaning you can act on).

Every error a caller may have to act on, wherever it is raised (``storage``, ``runtime``,
``actors``), descends from :class:`ExaiError`, and each inner node says what the caller can
do about it::

    ExaiError                      base: ``message`` is a sentence for whoever reads it
    ├── Refused                    nothing was done; ``limit``/``retry_after``/``provider`` say why
    │   ├── RetryLater             waiting can help: retry after ``retry_after`` seconds
    │   │   ├── StorageUnavailable          database away and the write journal full (here)
    │   │   ├── BreakerOpen                 a circuit breaker refused the call (runtime.breaker)
    │   │   ├── UpstreamNotReady            providers or the rate limiter (re)starting
    │   │   ├── ThreadStoreUnavailable      threads cannot be read (actors.conversation.errors)
    │   │   │   └── ThreadListUnavailable
    │   │   ├── ProviderUnavailable         a provider's breaker is open (actors.providers.errors)
    │   │   ├── ProviderRateLimited         the upstream's 429
    │   │   ├── RateLimitedForNow           a limiter's rate limit (actors.rate_limiter)
    │   │   ├── ServerDown                  a proxied MCP server is not up (actors.servers)
    │   │   └── PoolFull                    its processes per identity/session are all taken
    │   └── LimitExhausted         waiting will not help (a spent quota, a call too large)
    │       └── LimitSpent                  a limiter's permanent refusal (actors.rate_limiter)
    ├── InvalidInput               the request's input is wrong: fix it, do not retry as is
    │   ├── ModelNotOffered                 (actors.providers.errors)
    │   ├── InvalidThreadCursor             (storage.threads)
    │   └── InvalidSearchQuery              (storage.thread_search)
    ├── ToolFailed                 the tool could not do what was asked; the text says why
    │   ├── ClientError (ServerGone, ServerError; TooManyRequests, also RetryLater): a proxied
    │   │   MCP server could not be asked (runtime.mcp.client)
    │   ├── ConversationError (ThreadNotFound, ThreadExpired, ThreadFull, PromptOnlyHistory)
    │   └── ProviderError (ProviderNotConfigured, ProviderTimeout, ProviderConnectionError,
    │       ProviderRejected, ProviderServerError, ProviderProtocolError; the three above too)
    ├── ActorUnavailable           an actor (trio or pykka) stopped or crashed before it
    │                              answered: the request may or may not have been done
    └── StorageError               a write or read of the database failed as the caller sees it
        ├── StorageUnavailable     (also RetryLater)
        ├── WriteConflict          a versioned write found the row moved (optimistic concurrency)
        ├── WriteRejected          the database refused the record itself
        └── ThreadReadError        a thread could not be read (storage.threads)

``RateLimited`` (actors.rate_limiter) is the limiter's refusal whichever way it goes: its two
leaves are ``RateLimitedForNow`` and ``LimitSpent``. A class with two parents (say
``ProviderRateLimited``: a ``ProviderError`` and a ``RetryLater``) answers as the more
specific meaning, in the order of :mod:`runtime.mcp.translation`, the one place where these
errors become JSON-RPC errors or ``isError`` tool results.

The tree lives in ``storage``, the bottom layer, so that every layer can subclass it (as
``storage.untrusted``); it names no protocol: the wire's own errors are
:mod:`runtime.mcp.errors` (``RpcError``), the translation's target.

**Not in this tree**, because each is a different idea:

* why ``exai serve`` cannot start, with its exit code: ``storage.startup_errors.StartupError``
  (and the configuration errors it reports: ``runtime.config.ConfigError``,
  ``runtime.admin.AdminConfigError``, ``actors.providers.config.UpstreamConfigError``,
  ``storage.migrations.MigrationError``);
* supervision's own outcomes (``runtime.supervision.errors``: a supervisor gave up, a child
  would not start) and a pykka child's death as its supervisor sees it
  (``runtime.pykka_supervision.ActorCrashed``);
* flow control inside the node, answered where it happens: a full mailbox
  (``runtime.mailbox.MailboxFull``, the reader's -32000 "server busy"), a connection going
  away (``runtime.connection.ConnectionGone``, ``runtime.memory_transport.MemoryClosed``);
* bugs: a message a pykka service does not accept (``runtime.pykka_service.UnknownMessage``),
  the test fault ``actors.session.methods.SessionCrashRequested``; and the status CLI's
  ``runtime.status_view.StatusFailure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class ExaiError(Exception):
    """Base of every domain error. ``message`` is a sentence safe to show a client (never a
    secret); :attr:`client_message` is what a client is told, the same unless a subclass says
    more."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def client_message(self) -> str:
        return self.message


# -- what the caller can do -----------------------------------------------------------------


class Refused(ExaiError):
    """Nothing was done: something refused the request before it started.

    ``limit`` names what refused (a limiter's ``LimitName``, ``storage``, ...; ``None``: a
    resource with nothing more to say), ``retry_after`` when to try again in seconds (``None``
    when unknown or never), ``provider`` the upstream concerned. Subclasses set them as class
    defaults or per instance.
    """

    limit: str | None = None
    retry_after: float | None = None
    provider: str | None = None
    #: Whether a client is told ``provider`` and ``permanent`` too (``chat``'s refusals,
    #: docs/chat.md); ``False`` keeps an older answer's shape as clients have seen it.
    names_provider: ClassVar[bool] = True


class RetryLater(Refused):
    """Waiting can help: the same request may succeed after ``retry_after`` seconds."""


class LimitExhausted(Refused):
    """A limit refused the request and waiting will not help (a quota is spent, a call is
    larger than a limit's whole allowance)."""


class InvalidInput(ExaiError):
    """The request's input is wrong (a tool's arguments): fix it; retrying as is cannot help."""


class ToolFailed(ExaiError):
    """The tool ran (or was refused) and could not do what was asked; :attr:`client_message`
    says why, for the model to read and adapt."""


class ActorUnavailable(ExaiError):
    """An actor stopped or crashed before it answered (a trio actor's mailbox is closed, a
    pykka service's incarnation died or is between incarnations): the request may or may not
    have been done. The node's one "actor is gone" error."""


class StorageError(ExaiError):
    """A database write or read failed, as its caller sees it."""


# -- storage's own leaves -------------------------------------------------------------------


class StorageUnavailable(StorageError, RetryLater):
    """The database is unreachable and the journal that stands in for it is full (or cannot
    be written). New work must be refused until storage recovers; nothing accepted is lost.
    A client is told to retry after a second."""

    retry_after = 1.0

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        #: What is unavailable, without the advice to retry: a caller that refuses its own
        #: work says it in its own words (``actors.session.calls``: "nothing was done").
        self.reason = reason or message

    @classmethod
    def journal_full(cls, detail: str = "") -> StorageUnavailable:
        """The one sentence for new work refused while the journal stands in for the database
        and is full (the persistence actor's own answer, and its client's from the actor's
        latest status); ``detail`` (say, the journal's size) follows it in parentheses."""
        where = f" ({detail})" if detail else ""
        reason = (
            f"storage unavailable: the write journal is full{where}: "
            "the database is unreachable or behind"
        )
        return cls(f"{reason}; retry later", reason=reason)


@dataclass(frozen=True, slots=True)
class RowVersion:
    """Where a versioned row stands: its state and its version (``storage.rows``' task
    versions: 1 pending, 2 running, 3 final)."""

    state: str
    version: int


class WriteConflict(StorageError):
    """A versioned write found the row moved by someone else (optimistic concurrency): the
    row was left as it was. ``current``: what the write found, ``None`` if no row."""

    def __init__(self, message: str, *, current: RowVersion | None = None) -> None:
        super().__init__(message)
        self.current = current


class WriteRejected(StorageError):
    """The database refused this record itself (a constraint or a bad value), so retrying
    cannot help. It was set aside in the journal's ``rejected.jsonl``, never silently dropped."""
