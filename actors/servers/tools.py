"""A proxied server's tools as the node's own: ``<server><separator><tool>``.

Each tool the server lists becomes a :class:`~runtime.mcp.tools.Tool` whose descriptor is the
server's (input and output schemas, annotations, title, as it sent them; only the name is
prefixed) and whose call is forwarded to the server (:meth:`ProxiedServer.call`). It is then
served as every tool is: admitted under the session's and the node's slots, recorded as a task
row, traced, cancellable. Its arguments are not validated here (the server validates its own;
a JSON object is all that is checked, as for every call); its answer is passed through:
``content`` blocks and ``structuredContent`` as the server sent them, and its ``isError``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from actors.servers.pool import ServerPool
from actors.servers.proxy import ProxiedServer
from runtime.mcp.client import Progress
from runtime.mcp.schema import ToolDescriptor
from runtime.mcp.tools import Tool, ToolContext, ToolOutput

__all__ = ["proxied_tools"]

#: Tools taken from one server at most; the rest are left out (and logged by the caller).
MAX_TOOLS_PER_SERVER = 1000


class PassThrough(BaseModel):
    """A proxied tool's arguments: any JSON object, for its server to validate."""

    model_config = ConfigDict(extra="allow")


class ProxiedTool(Tool[PassThrough]):
    """Base of the classes :func:`proxied_tools` makes, one per proxied tool."""

    Args = PassThrough
    server: ClassVar[ProxiedServer | ServerPool]
    remote_name: ClassVar[str]
    listed: ClassVar[ToolDescriptor]

    def descriptor(self) -> ToolDescriptor:
        return self.listed.model_copy(update={"name": self.name, "execution": None})

    async def run(self, args: PassThrough, ctx: ToolContext) -> ToolOutput:
        forward = None
        if ctx.wants_progress:

            async def forward(note: Progress) -> None:
                await ctx.report_progress(note.progress, note.total, note.message)

        server = self.server
        if isinstance(server, ServerPool):
            # One process per identity, or per session (share): the caller's own.
            key = ctx.identity if server.share == "identity" else ctx.session_id
            result = await server.call(key, self.remote_name, args.model_extra, on_progress=forward)
        else:
            result = await server.call(self.remote_name, args.model_extra, on_progress=forward)
        content = result.get("content")
        blocks: list[dict[str, Any]] = (
            [block for block in content if isinstance(block, dict)]
            if isinstance(content, list)
            else []
        )
        structured = result.get("structuredContent")
        text = next((str(block.get("text")) for block in blocks if block.get("type") == "text"), "")
        return ToolOutput(
            text=text[:2000],
            is_error=result.get("isError") is True,
            content=blocks,
            structured_content=structured if isinstance(structured, dict) else None,
        )


def proxied_tools(server: ProxiedServer | ServerPool, separator: str) -> list[Tool[Any]]:
    """The server's current tools as the node's (none while it is not up)."""
    made: list[Tool[Any]] = []
    for listed in server.tools[:MAX_TOOLS_PER_SERVER]:
        attributes: dict[str, Any] = {
            "name": f"{server.name}{separator}{listed.name}",
            "description": listed.description or "",
            "annotations": listed.annotations,
            "server": server,
            "remote_name": listed.name,
            "listed": listed,
            "__module__": __name__,
        }
        cls = type("ProxiedTool_" + server.name, (ProxiedTool,), attributes)
        made.append(cls())
    return made
