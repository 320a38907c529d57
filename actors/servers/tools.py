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
from actors.servers.proxy import MAX_TOOLS, ProxiedServer
from runtime.mcp.client import Progress
from runtime.mcp.schema import ToolDescriptor
from runtime.mcp.tool_api import NAME_PATTERN
from runtime.mcp.tools import Tool, ToolContext, ToolOutput

__all__ = ["proxied_tools", "unservable_names"]

#: Tools taken from one server at most (the proxy reads no more of its listing).
MAX_TOOLS_PER_SERVER = MAX_TOOLS


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
    """The server's current tools as the node's (none while it is not up): those whose
    served name ``<server><separator><tool>`` is one MCP allows (1 to 128 of
    ``[A-Za-z0-9_.-]``, 2025-11-25 ``server/tools``, "Tool Names"), as exai's own must be,
    and whose input and output schemas are object schemas, as MCP's ``Tool`` requires.
    A server's tools reach every client's ``tools/list``, its access lists and exai's log:
    a newline, a control character or 10,000 characters in a name, or a schema a client
    refuses the whole listing for, are not passed on (:func:`unservable_names` says which)."""
    made: list[Tool[Any]] = []
    for listed in server.tools[:MAX_TOOLS_PER_SERVER]:
        name = f"{server.name}{separator}{listed.name}"
        if not _servable(name, listed):
            continue
        attributes: dict[str, Any] = {
            "name": name,
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


def unservable_names(server: ProxiedServer | ServerPool, separator: str) -> list[str]:
    """The names of the server's tools :func:`proxied_tools` leaves out, for the log: at most
    20, each as a Python literal (control characters escaped) clipped to 80 characters."""
    return [
        repr(listed.name)[:80]
        for listed in server.tools[:MAX_TOOLS_PER_SERVER]
        if not _servable(f"{server.name}{separator}{listed.name}", listed)
    ][:20]


def _servable(name: str, listed: ToolDescriptor) -> bool:
    # The server's own name must be one too: an empty one would serve the bare prefix.
    named = NAME_PATTERN.match(name) is not None and NAME_PATTERN.match(listed.name) is not None
    # MCP's Tool: inputSchema and outputSchema are object schemas ("type": "object"); a
    # client that checks (the TypeScript SDK) refuses a whole tools/list holding one that
    # is not, every other tool of the node with it.
    output = listed.output_schema
    objects = listed.input_schema.get("type") == "object" and (
        output is None or output.get("type") == "object"
    )
    return named and objects
