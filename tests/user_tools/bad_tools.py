"""A module that declares a tool wrongly: ``exai serve`` must refuse to start, naming it."""

from runtime.mcp import tool


@tool
def untyped(query) -> str:  # type: ignore[no-untyped-def]  (no type hint: the mistake under test)
    """Search for something."""
    return str(query)
