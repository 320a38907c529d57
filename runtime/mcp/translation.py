"""The one place where the node's domain errors become what an MCP client is answered.

A tool, the conversation service, the rate limiter, storage: each raises a domain error of the
node's tree (``storage.errors``) and none of them knows JSON-RPC. The session's call runner
(``actors/session/calls.py``) hands whatever ended a ``tools/call`` to :func:`call_failure`,
and a refusal at admission to :func:`refusal`; the answer depends on the error's inner node
(what the caller can do) and, for invalid input, on the request's protocol era
(``runtime/mcp/versions.py``). Checked in this order, so a class with two parents answers as
its more specific meaning:

==========================  ======================================  ==========================
raised                      answered (every era unless said)        the task row's ``error``
==========================  ======================================  ==========================
``InvalidParams`` (wire),   -32602 before 2025-11-25; from it on an  the message
``InvalidInput``            ``isError`` result with the message
                            (SEP-1303, MCP 2025-11-25 "Tools":
                            input validation errors are tool
                            execution errors)
other ``RpcError``          itself (code, message, data)            the message
``LimitExhausted``          -32005 ``LimitExceeded``, refusal data  the message
``RetryLater``              -32004 ``Unavailable``, refusal data    the message
``ToolFailed``              ``isError`` result with the message     the message
anything else               -32603 "tool 'NAME' failed; see server  ``repr`` (1,000 chars),
(``ActorUnavailable``,      log" (the text may not be for clients)  logged with its traceback
``StorageError``, a bug)                                            by the caller
==========================  ======================================  ==========================

*Refusal data* (``Refused``: ``limit``, ``retry_after`` in seconds, ``provider``):
``{"retryAfterMs"}`` when no limit is named (storage refusing new work); otherwise
``{"limit", "retry_after", "retryAfterMs"}`` plus ``{"provider", "permanent"}`` when the class
names its provider (``chat``'s refusals, docs/chat.md). ``retryAfterMs`` is
``ceil(retry_after * 1000)``, ``null`` when ``retry_after`` is unknown. The message is always
the error's ``client_message``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.mcp import versions
from runtime.mcp.errors import InternalError, InvalidParams, LimitExceeded, RpcError, Unavailable
from runtime.mcp.jsonrpc import JsonObject
from storage.errors import (
    ExaiError,
    InvalidInput,
    LimitExhausted,
    Refused,
    ToolFailed,
)

#: The longest ``repr`` of an unexpected error kept on a task row.
RECORDED_REPR_CHARS = 1000


@dataclass(frozen=True, slots=True)
class CallFailure:
    """How a failed ``tools/call`` is answered: exactly one of ``error`` (a JSON-RPC error)
    and ``result`` (an ``isError`` ``CallToolResult`` body in the request's era).

    ``record`` is what the task row and the trace say; ``unexpected`` marks an error that is
    no answer of the tree (a bug, an actor gone): the caller logs it with its traceback.
    """

    error: RpcError | None
    result: JsonObject | None
    record: str
    unexpected: bool = False


def refusal(error: RpcError | ExaiError) -> RpcError:
    """The JSON-RPC error a request refused before it ran is answered with (admission: no
    tool result exists yet, so every era gets an error). A ``ToolFailed`` or an unexpected
    domain error cannot refuse a call: answered -32603."""
    if isinstance(error, RpcError):
        return error
    if isinstance(error, InvalidInput):
        return InvalidParams(error.client_message)
    if isinstance(error, Refused):
        return _refused(error)
    return InternalError(error.client_message)


def call_failure(error: Exception, *, tool: str, version: str) -> CallFailure:
    """How a ``tools/call`` of ``tool`` in protocol ``version`` that ended with ``error`` is
    answered (module doc's table)."""
    if isinstance(error, InvalidParams):
        return _invalid_input(error.message, version, error)
    if isinstance(error, RpcError):
        return CallFailure(error, None, error.message)
    if isinstance(error, InvalidInput):
        return _invalid_input(error.client_message, version, None)
    if isinstance(error, Refused):
        answer = _refused(error)
        return CallFailure(answer, None, answer.message)
    if isinstance(error, ToolFailed):
        text = error.client_message
        return CallFailure(None, tool_error_result(text, version), text)
    failure = InternalError(f"tool {tool!r} failed; see server log")
    return CallFailure(failure, None, repr(error)[:RECORDED_REPR_CHARS], unexpected=True)


def tool_error_result(text: str, version: str) -> JsonObject:
    """An ``isError`` ``CallToolResult`` saying ``text``, in ``version``'s era (2026-07-28
    tags every result with ``resultType``)."""
    body: JsonObject = {"content": [{"type": "text", "text": text}], "isError": True}
    if versions.is_modern(version):
        body["resultType"] = "complete"
    return body


def refusal_data(error: Refused) -> JsonObject:
    """The ``data`` of a -32004 or -32005 answer (module doc)."""
    retry_after = error.retry_after
    retry_after_ms = math.ceil(retry_after * 1000) if retry_after is not None else None
    if error.limit is None:
        return {"retryAfterMs": retry_after_ms}
    data: JsonObject = {
        "limit": str(error.limit),
        "retry_after": retry_after,
        "retryAfterMs": retry_after_ms,
    }
    if error.names_provider:
        data["provider"] = error.provider
        data["permanent"] = isinstance(error, LimitExhausted)
    return data


def _refused(error: Refused) -> RpcError:
    if isinstance(error, LimitExhausted):
        return LimitExceeded(error.client_message, refusal_data(error))
    # A RetryLater, or a refusal that does not say waiting is useless: nothing was done, so
    # retrying is safe.
    return Unavailable(error.client_message, refusal_data(error))


def _invalid_input(message: str, version: str, error: InvalidParams | None) -> CallFailure:
    """Invalid tool input: -32602, or since 2025-11-25 a tool error the model can read."""
    if versions.input_errors_are_tool_results(version):
        return CallFailure(None, tool_error_result(message, version), message)
    return CallFailure(error if error is not None else InvalidParams(message), None, message)
