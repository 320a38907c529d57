"""The one translation point: every domain error class x every protocol era -> its answer.

The expected answers are written out by hand, each as the tool that used to map the error
answered it before the translation existed (``chat`` mapped eight types, ``threads`` two, the
call runner the rest): the wire a client sees did not change. Two things are checked:

* :func:`runtime.mcp.translation.call_failure` itself, for every case in every era, with the
  task row's text; and that every class of the tree (``storage.errors.ExaiError`` and all its
  subclasses in the code) has a case here, so a new class cannot go unanswered;
* the same table through a whole session (``actors.session.memory``: reader, actor, call
  runner, persistence), one session per era: the call runner really answers through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import actors.node  # noqa: F401  (imports every module that defines a domain error)
from actors.conversation import (
    ConversationError,
    PromptOnlyHistory,
    ThreadExpired,
    ThreadFull,
    ThreadListUnavailable,
    ThreadNotFound,
    ThreadStoreUnavailable,
    UpstreamNotReady,
)
from actors.providers import (
    ModelNotOffered,
    ProviderConnectionError,
    ProviderError,
    ProviderNotConfigured,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
)
from actors.rate_ledger import LimitName
from actors.rate_limiter import LimitSpent, RateLimited, RateLimitedForNow, Refusal
from actors.servers import ServerDown
from actors.servers.pool import PoolFull
from actors.session import SessionServices
from actors.session.memory import memory_session
from runtime.breaker import BreakerOpen, BreakerState
from runtime.mcp import translation, versions
from runtime.mcp.client import ClientError, ServerError, ServerGone, TooManyRequests
from runtime.mcp.errors import InvalidParams, LimitExceeded, Unavailable
from runtime.mcp.jsonrpc import ErrorObject
from runtime.mcp.tool_api import ToolTimedOut
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from runtime.memory_transport import MemoryClient
from storage.errors import (
    ActorUnavailable,
    ExaiError,
    InvalidInput,
    LimitExhausted,
    Refused,
    RetryLater,
    StorageError,
    StorageUnavailable,
    ToolFailed,
    WriteConflict,
    WriteRejected,
)
from storage.session_handover import SessionClaimError
from storage.task_queries import TaskReadError
from storage.thread_search import InvalidSearchQuery
from storage.threads import InvalidThreadCursor, ThreadReadError
from tests.memory_support import migrated_database, running_persistence, session_services

TOOL = "raises"
ERAS = versions.SUPPORTED_VERSIONS
FIRST_INPUT_AS_RESULT = "2025-11-25"
INTERNAL = {"code": -32603, "message": f"tool {TOOL!r} failed; see server log"}
STORAGE_FULL = (
    "storage unavailable: the write journal is full: the database is unreachable or behind; "
    "nothing was done, retry later"
)
THREAD_UNREADABLE = (
    "storage unavailable: the thread cannot be read (reading threads failed: PoolTimeout); "
    "nothing was sent upstream, retry later"
)
THREADS_UNREADABLE = (
    "storage unavailable: threads cannot be read (reading threads failed: PoolTimeout); retry later"
)
NOT_OFFERED = "model 'gpt-x' is not offered by this server; the models offered are: glm-4.6"


def _refusal(limit: LimitName, *, permanent: bool, retry_after: float | None) -> Refusal:
    return Refusal(
        limit=limit,
        message=f"the {limit.value} limit refused the call",
        retry_after=retry_after,
        permanent=permanent,
        session_id="s1",
        provider="glm",
    )


def _provider(kind: type[ProviderError], message: str, **kwargs: Any) -> ProviderError:
    return kind(message, provider="glm", **kwargs)


# -- the expected answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Error:
    """A JSON-RPC error in every era."""

    code: int
    message: str
    data: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            body["data"] = self.data
        return body


@dataclass(frozen=True)
class Result:
    """An ``isError`` result in every era."""

    text: str


@dataclass(frozen=True)
class Input:
    """Invalid input: -32602 before 2025-11-25, an ``isError`` result from it on."""

    message: str


@dataclass(frozen=True)
class Internal:
    """-32603, its text kept only on the task row (and the server log)."""


Expected = Error | Result | Input | Internal


def answer(expected: Expected, version: str) -> tuple[str, dict[str, Any]]:
    """What the client receives in ``version``: ("error", error object) or ("result", body)."""
    if isinstance(expected, Input):
        if versions.at_least(version, FIRST_INPUT_AS_RESULT):
            expected = Result(expected.message)
        else:
            return "error", {"code": -32602, "message": expected.message}
    if isinstance(expected, Internal):
        return "error", dict(INTERNAL)
    if isinstance(expected, Error):
        return "error", expected.wire()
    body: dict[str, Any] = {"content": [{"type": "text", "text": expected.text}], "isError": True}
    if versions.is_modern(version):
        body["resultType"] = "complete"
    return "result", body


def chat_data(
    limit: str, retry_after: float | None, provider: str | None, *, permanent: bool = False
) -> dict[str, Any]:
    """The ``data`` of ``chat``'s -32004/-32005 answers (docs/chat.md), as it always was."""
    return {
        "limit": limit,
        "retry_after": retry_after,
        "retryAfterMs": None if retry_after is None else int(retry_after * 1000 + 0.999),
        "provider": provider,
        "permanent": permanent,
    }


@dataclass(frozen=True)
class Case:
    make: Callable[[], Exception]
    expected: Expected


CASES: dict[str, Case] = {
    # the inner nodes, raised as they are
    "ExaiError": Case(lambda: ExaiError("something"), Internal()),
    "Refused": Case(lambda: Refused("refused"), Error(-32004, "refused", {"retryAfterMs": None})),
    "RetryLater": Case(lambda: RetryLater("later"), Error(-32004, "later", {"retryAfterMs": None})),
    "LimitExhausted": Case(
        lambda: LimitExhausted("spent"), Error(-32005, "spent", {"retryAfterMs": None})
    ),
    "InvalidInput": Case(lambda: InvalidInput("bad input"), Input("bad input")),
    "ToolFailed": Case(lambda: ToolFailed("could not"), Result("could not")),
    "ToolTimedOut": Case(
        lambda: ToolTimedOut("tool 'x' timed out after 1 s"),
        Result("tool 'x' timed out after 1 s"),
    ),
    "ActorUnavailable": Case(lambda: ActorUnavailable("/root/x stopped"), Internal()),
    "StorageError": Case(lambda: StorageError("write failed"), Internal()),
    # storage
    # Admission's refusal (calls.py) as it always was; a tool raising it is answered the same.
    "StorageUnavailable": Case(
        lambda: StorageUnavailable(STORAGE_FULL),
        Error(-32004, STORAGE_FULL, {"retryAfterMs": 1000}),
    ),
    "WriteConflict": Case(lambda: WriteConflict("moved", current="running@2"), Internal()),
    "WriteRejected": Case(lambda: WriteRejected("constraint"), Internal()),
    "ThreadReadError": Case(lambda: ThreadReadError("reading threads failed"), Internal()),
    "TaskReadError": Case(lambda: TaskReadError("reading tasks failed"), Internal()),
    # Never reaches a tool call (a resume's handshake answers 503 for it), but if it did it
    # would be what any storage failure is.
    "SessionClaimError": Case(lambda: SessionClaimError("reading sessions failed"), Internal()),
    "InvalidThreadCursor": Case(
        lambda: InvalidThreadCursor("invalid cursor 'zz': not one this server issued"),
        Input("invalid cursor 'zz': not one this server issued"),
    ),
    "InvalidSearchQuery": Case(
        lambda: InvalidSearchQuery("query too long: 300 characters, at most 256"),
        Input("query too long: 300 characters, at most 256"),
    ),
    # runtime: a breaker is turned into ProviderUnavailable by its provider; raised raw, it
    # is a retry later with its delay (before the tree: -32603).
    "BreakerOpen": Case(
        lambda: BreakerOpen("glm", BreakerState.OPEN, 18.0),
        Error(
            -32004,
            "circuit breaker 'glm' is open: calls fail at once until a trial in 18.0 s",
            {"retryAfterMs": 18000},
        ),
    ),
    # the conversation (chat, threads)
    "UpstreamNotReady": Case(
        lambda: UpstreamNotReady("the upstream providers are starting; retry in a moment"),
        Error(
            -32004,
            "the upstream providers are starting; retry in a moment",
            chat_data("upstream_starting", 1.0, None),
        ),
    ),
    "ThreadStoreUnavailable": Case(
        lambda: ThreadStoreUnavailable(THREAD_UNREADABLE),
        Error(-32004, THREAD_UNREADABLE, chat_data("storage", 1.0, None)),
    ),
    "ThreadListUnavailable": Case(
        lambda: ThreadListUnavailable(THREADS_UNREADABLE),
        Error(
            -32004,
            THREADS_UNREADABLE,
            {"limit": "storage", "retry_after": 1.0, "retryAfterMs": 1000},
        ),
    ),
    "ConversationError": Case(lambda: ConversationError("refused"), Result("refused")),
    "ThreadNotFound": Case(
        lambda: ThreadNotFound("unknown continuation_id x"), Result("unknown continuation_id x")
    ),
    "ThreadExpired": Case(lambda: ThreadExpired("thread x expired"), Result("thread x expired")),
    "ThreadFull": Case(lambda: ThreadFull("thread x is full"), Result("thread x is full")),
    "PromptOnlyHistory": Case(lambda: PromptOnlyHistory("nothing new"), Result("nothing new")),
    # the providers
    "ProviderError": Case(
        lambda: _provider(ProviderError, "upstream 'glm' failed"),
        Result("upstream 'glm' failed. Nothing was stored; the turn may be retried."),
    ),
    "ProviderNotConfigured": Case(
        lambda: ProviderNotConfigured("no upstream is configured: set EXAI_UPSTREAM_BASE_URL"),
        Result("no upstream is configured: set EXAI_UPSTREAM_BASE_URL"),
    ),
    "ModelNotOffered": Case(
        lambda: ModelNotOffered(NOT_OFFERED), Input(f"invalid arguments: {NOT_OFFERED}")
    ),
    "ProviderUnavailable": Case(
        lambda: _provider(ProviderUnavailable, "upstream 'glm' is unavailable", retry_after=12.5),
        Error(
            -32004,
            "upstream 'glm' is unavailable",
            chat_data("provider_circuit_open", 12.5, "glm"),
        ),
    ),
    "ProviderRateLimited": Case(
        lambda: _provider(ProviderRateLimited, "upstream 'glm' answered 429", retry_after=None),
        Error(
            -32004,
            "upstream 'glm' answered 429",
            chat_data("upstream_rate_limit", None, "glm"),
        ),
    ),
    "ProviderTimeout": Case(
        lambda: _provider(ProviderTimeout, "upstream 'glm' timed out"),
        Result("upstream 'glm' timed out. Nothing was stored; the turn may be retried."),
    ),
    "ProviderConnectionError": Case(
        lambda: _provider(ProviderConnectionError, "upstream 'glm' unreachable"),
        Result("upstream 'glm' unreachable. Nothing was stored; the turn may be retried."),
    ),
    "ProviderRejected": Case(
        lambda: ProviderRejected("upstream 'glm' refused: 400", provider="glm", status=400),
        Result("upstream 'glm' refused: 400. Nothing was stored; the turn may be retried."),
    ),
    "ProviderServerError": Case(
        lambda: ProviderServerError("upstream 'glm' failed: 502", provider="glm", status=502),
        Result("upstream 'glm' failed: 502. Nothing was stored; the turn may be retried."),
    ),
    "ProviderProtocolError": Case(
        lambda: _provider(ProviderProtocolError, "upstream 'glm' answered no choices"),
        Result("upstream 'glm' answered no choices. Nothing was stored; the turn may be retried."),
    ),
    # exai's MCP client, talking to a proxied server (runtime/mcp/client.py)
    "ClientError": Case(lambda: ClientError("time: no answer"), Result("time: no answer")),
    "ServerGone": Case(lambda: ServerGone("time went away"), Result("time went away")),
    "ServerError": Case(
        lambda: ServerError("time", ErrorObject(code=-32602, message="Unknown tool: x")),
        Result("time answered -32602: Unknown tool: x"),
    ),
    "PoolFull": Case(
        lambda: PoolFull("proxied server 'b' runs 8 instances"),
        Error(-32004, "proxied server 'b' runs 8 instances", {"retryAfterMs": None}),
    ),
    "ServerDown": Case(
        lambda: ServerDown("proxied server 'time' is starting; retry in a moment"),
        Error(
            -32004, "proxied server 'time' is starting; retry in a moment", {"retryAfterMs": None}
        ),
    ),
    "TooManyRequests": Case(
        lambda: TooManyRequests("time has 64 requests in flight; retry later"),
        Error(-32004, "time has 64 requests in flight; retry later", {"retryAfterMs": None}),
    ),
    # the rate limiter
    "RateLimited": Case(
        lambda: RateLimited(
            _refusal(LimitName.PROVIDER_CONCURRENCY, permanent=False, retry_after=None)
        ),
        Error(
            -32004,
            "rate limited (provider_concurrency): the provider_concurrency limit refused the call",
            chat_data("provider_concurrency", None, "glm"),
        ),
    ),
    "RateLimitedForNow": Case(
        lambda: RateLimited.of(
            _refusal(LimitName.PROVIDER_TOKENS, permanent=False, retry_after=12.0)
        ),
        Error(
            -32004,
            "rate limited (provider_tokens_per_minute): the provider_tokens_per_minute limit "
            "refused the call",
            chat_data("provider_tokens_per_minute", 12.0, "glm"),
        ),
    ),
    "LimitSpent": Case(
        lambda: RateLimited.of(_refusal(LimitName.CLIENT_TOKENS, permanent=True, retry_after=None)),
        Error(
            -32005,
            "rate limited (client_token_quota): the client_token_quota limit refused the call",
            chat_data("client_token_quota", None, "glm", permanent=True),
        ),
    ),
    # what a tool may still raise that is not a domain error
    "InvalidParams": Case(lambda: InvalidParams("invalid x"), Input("invalid x")),
    "LimitExceeded": Case(
        lambda: LimitExceeded("limit reached", {"limit": "x"}),
        Error(-32005, "limit reached", {"limit": "x"}),
    ),
    "Unavailable": Case(
        lambda: Unavailable("later", {"retryAfterMs": 5}),
        Error(-32004, "later", {"retryAfterMs": 5}),
    ),
    "RuntimeError": Case(lambda: RuntimeError("tool bug"), Internal()),
}


# -- the translation itself -----------------------------------------------------------------


def _every_subclass(cls: type[ExaiError]) -> Iterator[type[ExaiError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _every_subclass(sub)


def test_every_class_of_the_tree_has_a_case() -> None:
    covered = {type(case.make()) for case in CASES.values()}
    missing = {cls.__qualname__ for cls in _every_subclass(ExaiError)} - {
        cls.__qualname__ for cls in covered
    }
    assert not missing, f"domain errors with no case in the table: {sorted(missing)}"


def test_the_leaves_are_where_the_tree_says() -> None:
    """The inner node of each leaf decides its answer: spot-check the two-parent classes."""
    assert isinstance(ModelNotOffered("x"), InvalidInput | ProviderError)
    assert isinstance(_provider(ProviderUnavailable, "x"), RetryLater)
    assert isinstance(_provider(ProviderRateLimited, "x"), RetryLater)
    assert isinstance(StorageUnavailable("x"), StorageError | RetryLater)
    spent = RateLimited.of(_refusal(LimitName.CLIENT_COST, permanent=True, retry_after=None))
    assert type(spent) is LimitSpent
    assert isinstance(spent, LimitExhausted)
    later = RateLimited.of(_refusal(LimitName.CLIENT_REQUESTS, permanent=False, retry_after=1))
    assert type(later) is RateLimitedForNow
    assert isinstance(later, RetryLater)
    assert not isinstance(later, LimitExhausted)


@pytest.mark.parametrize("version", ERAS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_call_failure_answers_each_error_in_each_era(name: str, version: str) -> None:
    case = CASES[name]
    error = case.make()
    failure = translation.call_failure(error, tool=TOOL, version=version)
    kind, body = answer(case.expected, version)
    if kind == "error":
        assert failure.result is None
        assert failure.error is not None
        got: dict[str, Any] = {"code": failure.error.code, "message": failure.error.message}
        if failure.error.data is not None:
            got["data"] = failure.error.data
        assert got == body
    else:
        assert failure.error is None
        assert failure.result == body
    # The task row keeps the sentence the client got, or the unexpected error's repr.
    if isinstance(case.expected, Internal):
        assert failure.unexpected
        assert failure.record == repr(error)[: translation.RECORDED_REPR_CHARS]
    else:
        assert not failure.unexpected
        shown = body["message"] if kind == "error" else body["content"][0]["text"]
        assert failure.record == shown


def test_a_refusal_at_admission_is_an_error_in_every_era() -> None:
    refused = translation.refusal(StorageUnavailable(STORAGE_FULL))
    assert (refused.code, refused.message, refused.data) == (
        -32004,
        STORAGE_FULL,
        {"retryAfterMs": 1000},
    )
    assert translation.refusal(InvalidInput("bad")).code == -32602
    unknown = InvalidParams("unknown tool: 'x'")
    assert translation.refusal(unknown) is unknown


# -- through a whole session ----------------------------------------------------------------


class _CaseArgs(BaseModel):
    case: str


class Raises(Tool[_CaseArgs]):
    """Raises the named case's error, as a tool whose callee refused would."""

    name = TOOL
    description = "Test only: raise a case's error."
    Args = _CaseArgs

    async def run(self, args: _CaseArgs, ctx: ToolContext) -> ToolOutput:
        raise CASES[args.case].make()


class _NoArgs(BaseModel):
    pass


class Unencodable(Tool[_NoArgs]):
    """Answers with text JSON cannot carry (a lone surrogate), as a tool passing on a
    callee's broken bytes might."""

    name = "unencodable"
    description = "Test only: a result that cannot be encoded."
    Args = _NoArgs

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutput:
        return ToolOutput(text="broken \ud800 text")


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    with migrated_database(database_url) as url:
        yield url


@pytest.fixture
async def services(db: str, tmp_path: Path) -> AsyncIterator[SessionServices]:
    async with running_persistence(db, tmp_path / "journal") as persistence:
        yield session_services(persistence, [Raises(), Unencodable()], node_id="translation-test")


async def _open(client: MemoryClient, version: str) -> dict[str, Any]:
    """Start the session in ``version``'s era; the ``_meta`` every call then carries."""
    if versions.is_modern(version):
        return {versions.PROTOCOL_VERSION_META: version}
    await client.request(
        "init",
        "initialize",
        {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "translation-test", "version": "1.0"},
        },
    )
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return {}


@pytest.mark.parametrize("version", ERAS)
async def test_the_call_runner_answers_through_the_translation(
    services: SessionServices, version: str
) -> None:
    async with memory_session(services) as session:
        client = session.client
        meta = await _open(client, version)
        for index, name in enumerate(sorted(CASES)):
            params: dict[str, Any] = {"name": TOOL, "arguments": {"case": name}}
            if meta:
                params["_meta"] = meta
            reply = await client.request(index, "tools/call", params)
            kind, body = answer(CASES[name].expected, version)
            assert reply.get(kind) == body, (name, reply)


async def test_a_result_that_cannot_be_encoded_is_the_tools_failure(
    services: SessionServices,
) -> None:
    """The reply's encoding fails: the call is answered as an unexpected tool failure and the
    session serves on (it ended the session's task before)."""
    async with memory_session(services) as session:
        client = session.client
        await _open(client, "2025-06-18")
        reply = await client.request(1, "tools/call", {"name": "unencodable", "arguments": {}})
        assert reply["error"]["code"] == -32603
        assert "unencodable" in reply["error"]["message"]
        again = await client.request(2, "tools/call", {"name": "unencodable", "arguments": {}})
        assert again["error"]["code"] == -32603
        assert (await client.request(3, "ping"))["result"] == {}
