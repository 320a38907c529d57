"""The OpenAI chat-completions wire format: what we send, and what we accept back.

Only the fields this runtime uses are modelled; everything else an upstream adds is ignored,
so GLM's and Kimi's extensions (``reasoning_content``, usage inside the last choice) do not
break parsing. Server-sent events are decoded line by line (:class:`SseDecoder`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """One call: the conversation so far, and how much may be generated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(default=None, description="The provider's default when unset.")
    max_tokens: int = Field(default=4096, gt=0, description="Also what the limiter reserves.")
    temperature: float | None = Field(default=None, ge=0, le=2)


def request_body(
    request: ChatRequest,
    model: str,
    *,
    stream: bool,
    max_tokens_field: str,
    stream_usage_option: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [message.model_dump() for message in request.messages],
        max_tokens_field: request.max_tokens,
        "stream": stream,
    }
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if stream and stream_usage_option:
        body["stream_options"] = {"include_usage": True}
    return body


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class WireUsage(_Lenient):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


class _Message(_Lenient):
    content: str | None = None


class _Choice(_Lenient):
    message: _Message | None = None
    finish_reason: str | None = None


class Completion(_Lenient):
    """A non-streamed answer."""

    model: str | None = None
    choices: list[_Choice] = Field(min_length=1)
    usage: WireUsage | None = None

    @property
    def text(self) -> str:
        message = self.choices[0].message
        return (message.content or "") if message else ""


class _Delta(_Lenient):
    content: str | None = None


class _ChunkChoice(_Lenient):
    delta: _Delta | None = None
    finish_reason: str | None = None
    usage: WireUsage | None = None  # Kimi reports a stream's usage here


class Chunk(_Lenient):
    """One streamed event."""

    model: str | None = None
    choices: list[_ChunkChoice] = Field(default_factory=list)
    usage: WireUsage | None = None

    @property
    def text(self) -> str:
        return "".join(c.delta.content for c in self.choices if c.delta and c.delta.content)

    @property
    def finish_reason(self) -> str | None:
        return next((c.finish_reason for c in self.choices if c.finish_reason), None)

    @property
    def reported_usage(self) -> WireUsage | None:
        return self.usage or next((c.usage for c in self.choices if c.usage), None)


class _ErrorDetail(_Lenient):
    message: str | None = None


class ErrorBody(_Lenient):
    """``{"error": {"message": ...}}``, the shape every OpenAI-compatible upstream uses."""

    error: _ErrorDetail | str | None = None

    @property
    def message(self) -> str | None:
        if isinstance(self.error, str):
            return self.error
        return self.error.message if self.error else None


DONE = "[DONE]"


class SseDecoder:
    """Server-sent events, fed one line at a time (``httpx``'s ``aiter_lines``).

    Returns an event's data when a blank line ends it. Only ``data`` fields matter for the
    chat-completions stream; comments (``: keep-alive``) and other fields are skipped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The event in progress, if any (also for a stream that ends without a blank line)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data
