"""Protocol versions this server speaks, the negotiation rule, and what differs between them.

The server is dual-era. *Handshake* versions (2024-11-05 .. 2025-11-25) agree on a version
once, with ``initialize``. The *modern* version (2026-07-28) has no handshake: the client may
probe with ``server/discover``, and every request names its version in ``_meta``.

Versions are an enumerated set, not an ordered scalar (a future identifier need not be a
date), so every "from version X on" question is answered by position in
:data:`SUPPORTED_VERSIONS`, never by comparing strings.
"""

from __future__ import annotations

from typing import Final

HANDSHAKE_VERSIONS: Final[tuple[str, ...]] = (
    "2024-11-05",
    "2025-03-26",
    "2025-06-18",
    "2025-11-25",
)
MODERN_VERSIONS: Final[tuple[str, ...]] = ("2026-07-28",)
#: Oldest first.
SUPPORTED_VERSIONS: Final[tuple[str, ...]] = HANDSHAKE_VERSIONS + MODERN_VERSIONS
LATEST_HANDSHAKE_VERSION: Final[str] = HANDSHAKE_VERSIONS[-1]

#: Reserved ``_meta`` keys of the modern era.
PROTOCOL_VERSION_META: Final = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_META: Final = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPABILITIES_META: Final = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_META: Final = "io.modelcontextprotocol/serverInfo"
LOG_LEVEL_META: Final = "io.modelcontextprotocol/logLevel"
#: The Tasks extension's identifier (SEP-2663), in ``capabilities.extensions``.
TASKS_EXTENSION: Final = "io.modelcontextprotocol/tasks"


def negotiate(requested: str) -> str:
    """``initialize``: the client's version when we support it by handshake, else our latest.

    A modern version in ``initialize`` is answered with the latest handshake version: the
    modern era has no ``initialize``.
    """
    return requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE_VERSION


def declares_extension(capabilities: object, extension: str) -> bool:
    """Whether a client's capabilities (its ``_meta[CLIENT_CAPABILITIES_META]``, as sent)
    declare ``extension``: ``{"extensions": {extension: {...}}}`` (SEP-2133; an object, empty
    or with settings). Anything malformed declares nothing."""
    if not isinstance(capabilities, dict):
        return False
    extensions = capabilities.get("extensions")
    return isinstance(extensions, dict) and isinstance(extensions.get(extension), dict)


def at_least(version: str, first: str) -> bool:
    """Whether ``version`` is ``first`` or newer; unknown versions are never "at least"."""
    if version not in SUPPORTED_VERSIONS:
        return False
    return SUPPORTED_VERSIONS.index(version) >= SUPPORTED_VERSIONS.index(first)


def is_modern(version: str) -> bool:
    return version in MODERN_VERSIONS


def allows_batches(version: str) -> bool:
    """Only 2025-03-26 has JSON-RPC batches (2025-06-18 removed them)."""
    return version == "2025-03-26"


def has_structured_content(version: str) -> bool:
    """``structuredContent`` and ``outputSchema`` exist from 2025-06-18 on."""
    return at_least(version, "2025-06-18")


def input_errors_are_tool_results(version: str) -> bool:
    """From 2025-11-25, invalid tool arguments are ``isError`` results, not -32602."""
    return at_least(version, "2025-11-25")


def has_ping(version: str) -> bool:
    """2026-07-28 removed ``ping`` and ``logging/setLevel``."""
    return not is_modern(version)


def has_tasks(version: str) -> bool:
    """Core tasks (``tasks/get|result|list|cancel``, task-augmented ``tools/call`` with
    ``params.task``, ``execution.taskSupport``, the ``tasks`` capability) exist in 2025-11-25
    only (SEP-1686); 2026-07-28 moved tasks to an extension (:func:`has_tasks_extension`)."""
    return version == "2025-11-25"


def has_tasks_extension(version: str) -> bool:
    """The ``io.modelcontextprotocol/tasks`` extension (SEP-2663: ``tasks/get|update|cancel``,
    server-directed ``CreateTaskResult``) exists from 2026-07-28; SEP-2663's compatibility
    table: it "is not defined under the 2025-11-25 protocol version"."""
    return is_modern(version)
