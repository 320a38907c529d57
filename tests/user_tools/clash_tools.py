"""A module whose tool takes a built-in tool's name: ``exai serve`` must refuse to start."""

from runtime.mcp import tool


@tool
def echo(text: str) -> str:
    """Echo, again."""
    return text
