"""JSON-RPC 2.0 framing: one text frame in, one typed message out, and the reverse.

Classification follows the spec strictly so every malformed frame gets the precise error:
not JSON is ``-32700`` with ``id: null``; JSON that is not a request, notification or response is
``-32600`` (with the request's id when one can be read from it, and is at most 256 bytes:
ids are echoed exactly, so a longer one is refused with ``id: null``). Decoding uses pydantic-core's
JSON parser, which is faster than the standard library's on the per-message hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from runtime.mcp.errors import InvalidRequest, ParseError, RpcError
from storage.untrusted import ID_BYTES

RequestId: TypeAlias = StrictStr | StrictInt
#: Params and results are JSON objects; their shape is validated per method, not here.
JsonObject: TypeAlias = dict[str, Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    jsonrpc: Literal["2.0"]


class Request(_Wire):
    id: RequestId
    method: Annotated[str, Field(min_length=1)]
    params: JsonObject | None = None


class Notification(_Wire):
    method: Annotated[str, Field(min_length=1)]
    params: JsonObject | None = None


class ErrorObject(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: int
    message: str
    data: Any = None


class Response(_Wire):
    """A response sent by the client (to a server-initiated request)."""

    id: RequestId
    result: JsonObject


class ErrorResponse(_Wire):
    id: RequestId | None
    error: ErrorObject


Inbound: TypeAlias = Request | Notification | Response | ErrorResponse


class Batch(BaseModel):
    """A JSON array of messages (2025-03-26 only); its members are classified one by one."""

    model_config = ConfigDict(frozen=True)

    items: list[Any]


def encode_batch(replies: list[str]) -> str:
    """Join already-encoded responses into one JSON array frame."""
    return "[" + ",".join(replies) + "]"


def decode(frame: str | bytes) -> Inbound | list[Any]:
    """Decode one frame. A JSON array is returned raw: whether batches are allowed depends on the
    session's protocol version, which framing does not know.

    Raises :class:`ParseError` or :class:`InvalidRequest` (carrying the id when readable, as
    ``error_id``).
    """
    try:
        # NaN and Infinity are not JSON (RFC 8259), whatever Python's parser tolerates.
        data = pydantic_core.from_json(frame, allow_inf_nan=False)
    except ValueError as exc:
        raise ParseError(f"parse error: {exc}") from None
    if isinstance(data, list):
        return data
    return classify(data)


def classify(data: object) -> Inbound:
    """Turn one decoded JSON value into a typed message, or raise :class:`InvalidRequest`."""
    if not isinstance(data, dict):
        raise InvalidRequest("invalid request: a JSON-RPC message must be a JSON object")
    if "method" in data:
        model: type[_Wire] = Request if "id" in data else Notification
    elif "error" in data:
        model = ErrorResponse
    elif "result" in data:
        model = Response
    else:
        raise _invalid(data, "invalid request: no 'method', 'result' or 'error' member")
    if model is Request:  # a response's id is never echoed: only logged, and clipped there
        _check_id_size(data.get("id"))
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise _invalid(data, f"invalid request: {where}: {first['msg']}") from None


def _check_id_size(request_id: object) -> None:
    """Refuse an id whose JSON text exceeds :data:`~storage.untrusted.ID_BYTES`.

    Ids are echoed exactly (JSON-RPC), so a long one cannot be cut: the message is refused
    with ``id: null`` instead, before the id reaches a log, a task row or the journal.
    """
    size = _id_bytes(request_id)
    if size > ID_BYTES:
        raise InvalidRequest(
            f"invalid request: the id is {size} bytes long; at most {ID_BYTES} are accepted"
        )


def _id_bytes(request_id: object) -> int:
    """Bytes of a string id as UTF-8 (the escaping JSON adds is not the client's doing), or
    digits of an integer id; 0 for anything that is no id."""
    if isinstance(request_id, str):
        if len(request_id) * 4 <= ID_BYTES:
            return 0  # cannot exceed: the common case costs no encoding
        return len(request_id.encode("utf-8", "surrogatepass"))
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        bits = request_id.bit_length()
        if bits < 60:
            return 0
        # str() refuses ints beyond 4300 digits; those are far too long anyway.
        return len(str(request_id)) if bits < 2000 else bits * 3 // 10
    return 0


class InvalidRequestWithId(InvalidRequest):
    """An invalid request whose id could still be read, so the error can be correlated."""

    def __init__(self, message: str, request_id: RequestId) -> None:
        super().__init__(message)
        self.request_id = request_id


def _invalid(data: dict[str, Any], message: str) -> InvalidRequest:
    request_id = data.get("id")
    if (
        isinstance(request_id, str)
        or (isinstance(request_id, int) and not isinstance(request_id, bool))
    ) and _id_bytes(request_id) <= ID_BYTES:
        return InvalidRequestWithId(message, request_id)
    return InvalidRequest(message)


def encode_result(request_id: RequestId, result: BaseModel | JsonObject) -> str:
    body = (
        result.model_dump(mode="json", by_alias=True, exclude_none=True)
        if isinstance(result, BaseModel)
        else result
    )
    return pydantic_core.to_json({"jsonrpc": "2.0", "id": request_id, "result": body}).decode()


def encode_encoded_result(request_id: RequestId, result: bytes) -> str:
    """A response around a result already encoded as compact JSON (``pydantic_core.to_json``):
    the same text :func:`encode_result` makes, for a caller that needs the result's JSON
    itself too (a ``tools/call`` stores it: ``actors.session.calls``), so it is made once."""
    request = pydantic_core.to_json(request_id).decode()
    return f'{{"jsonrpc":"2.0","id":{request},"result":{result.decode()}}}'


#: How every response this module encodes begins: ``jsonrpc`` first, ``id`` second (the
#: encoders below build their dicts in that order, and ``pydantic_core.to_json`` keeps it). A
#: notification has ``method`` second; a batch reply is a JSON array.
RESPONSE_PREFIX = '{"jsonrpc":"2.0","id":'


def is_response(encoded: str) -> bool:
    """Whether ``encoded``, a message made by this module's encoders, is a response (a result
    or an error) rather than a notification or a batch. O(1): a transport asks it of every
    outgoing message (Streamable HTTP ends a request's stream after its response). This
    server sends no requests of its own, which would also carry an ``id``."""
    return encoded.startswith(RESPONSE_PREFIX)


def rename_response(encoded: str, current: int, request_id: RequestId) -> str:
    """A response this module encoded for id ``current`` (an int), answering ``request_id``
    instead: the id is the message's second member (:data:`RESPONSE_PREFIX`), so it is
    replaced in place, the rest left as it is. Raises :class:`ValueError` if ``encoded`` is
    not a response to ``current``."""
    head = RESPONSE_PREFIX + str(current)
    rest = encoded[len(head) :]
    if not encoded.startswith(head) or not rest.startswith(","):
        raise ValueError(f"not a response to id {current}")
    return RESPONSE_PREFIX + pydantic_core.to_json(request_id).decode() + rest


def error_code(encoded: str, current: int) -> int | None:
    """The error code of ``encoded``, if it is an error response to id ``current`` (an int)
    made by :func:`encode_error` (``error`` follows the id, ``code`` comes first in it);
    ``None`` for anything else."""
    head = f'{RESPONSE_PREFIX}{current},"error":{{"code":'
    if not encoded.startswith(head):
        return None
    digits = encoded[len(head) : len(head) + 12].partition(",")[0]
    try:
        return int(digits)
    except ValueError:
        return None


def encode_error(request_id: RequestId | None, error: RpcError) -> str:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return pydantic_core.to_json({"jsonrpc": "2.0", "id": request_id, "error": body}).decode()


def encode_notification(method: str, params: BaseModel | JsonObject | None = None) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = (
            params.model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(params, BaseModel)
            else params
        )
    return pydantic_core.to_json(message).decode()
