"""What an upstream call consumes: tokens (reported or estimated) and what they cost."""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

CHARS_PER_TOKEN = 4  # the EX-AI MCP server's estimate (len(text) // 4); no tokenizer per upstream


def estimate_tokens(texts: Iterable[str]) -> int:
    """Characters / 4, rounded up: cheap, tokenizer-free, and close enough for budgets."""
    return math.ceil(sum(len(text) for text in texts) / CHARS_PER_TOKEN)


class Usage(BaseModel):
    """Tokens of one call. ``estimated``: the upstream did not report them (a stream without
    usage, for instance), so they were estimated from characters."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Price(BaseModel):
    """USD per million input and output tokens, as upstreams publish them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_per_million + output_tokens * self.output_per_million
        ) / 1_000_000
