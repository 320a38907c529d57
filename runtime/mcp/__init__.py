"""MCP on the wire (JSON-RPC, schemas, versions, errors) and the public tool API:
``from runtime.mcp import tool, ToolContext`` (docs/tools.md)."""

from runtime.mcp.tool_api import ToolDeclarationError, tool
from runtime.mcp.tools import ToolContext, ToolOutput
from storage.errors import ToolFailed

__all__ = ["ToolContext", "ToolDeclarationError", "ToolFailed", "ToolOutput", "tool"]
