"""Protocol versions this server speaks, and the negotiation rule of the MCP spec."""

from __future__ import annotations

from typing import Final

#: Oldest first. The last one is what a client with an unknown version is offered.
SUPPORTED_VERSIONS: Final[tuple[str, ...]] = (
    "2024-11-05",
    "2025-03-26",
    "2025-06-18",
    "2025-11-25",
)
LATEST_VERSION: Final[str] = SUPPORTED_VERSIONS[-1]


def negotiate(requested: str) -> str:
    """Answer with the client's version when we support it, else with our latest (spec rule)."""
    return requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION


def has_structured_content(version: str) -> bool:
    """``structuredContent`` and ``outputSchema`` exist from 2025-06-18 on.

    Versions are ISO dates, so string order is chronological order.
    """
    return version >= "2025-06-18"
