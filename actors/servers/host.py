"""``/root/servers``: the node's proxied MCP servers, one supervised child each.

Built from the config file's ``[servers]`` (:class:`runtime.config.ServerEntry`). At its start
it kills the process groups a previous node on the same state dir left behind
(:meth:`runtime.child_process.ChildRecord.reap`: a node killed with SIGKILL cannot stop its
children), then starts every server (:class:`~actors.servers.proxy.ProxiedServer`), each in
its own child of this supervisor (OTP one_for_one: a bug in one restarts that one only).
Each server's tools are served through the node's :class:`~runtime.mcp.tools.ToolRegistry`
as ``<server><separator><tool>``, replaced whenever the server lists them again
(:meth:`ToolRegistry.replace_group`). A server that is down keeps its last tools listed:
calling them answers that it is down (-32004).

Shutdown: stopping a child cancels its server's loop, which stops its process (stdin closed,
SIGTERM, then SIGKILL to its group: ``Child.stop``), within the child's shutdown time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import structlog
import trio

from actors.servers.proxy import Endpoint, ProxiedServer, RemoteEndpoint, StdioCommand
from actors.servers.tools import proxied_tools
from runtime.child_process import ChildRecord
from runtime.config import ConfigError, ServerEntry
from runtime.mcp.tools import ToolRegistry
from runtime.status_model import ProxiedServerStatus
from runtime.supervision import ChildContext, ChildSpec, Strategy, Supervisor

__all__ = ["ProxiedServers", "endpoint", "expand_env"]

log = structlog.get_logger("servers")

#: Seconds the node waits for each proxied server's first start before it serves clients.
STARTUP_WAIT = 30.0

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(
    entry: str, values: Mapping[str, str], environ: Mapping[str, str], *, table: str = "env"
) -> dict[str, str]:
    """``values`` (``servers.<entry>.<table>``) with each ``${NAME}`` replaced by the node's
    variable; :class:`ConfigError` naming the server, the table, the key and the variable if
    one is unset (never quoting a value)."""
    expanded: dict[str, str] = {}
    for key, value in values.items():

        def substitute(match: re.Match[str], key: str = key) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(
                    f"servers.{entry}.{table}.{key}: the variable {name} is not set for the node"
                )
            return environ[name]

        expanded[key] = _VARIABLE.sub(substitute, value)
    return expanded


def endpoint(name: str, entry: ServerEntry, environ: Mapping[str, str]) -> Endpoint:
    """How to reach the server of ``[servers.<name>]``: its command, or its URL and headers
    (``${NAME}`` expanded in ``env`` and ``headers`` values)."""
    if entry.url is not None:
        headers = expand_env(name, entry.headers, environ, table="headers")
        for key, value in headers.items():
            if any(c in value for c in "\r\n\x00"):
                raise ConfigError(
                    f"servers.{name}.headers.{key}: a variable's value has a line break or NUL"
                )
        return RemoteEndpoint(entry.url, headers)
    assert entry.command is not None  # ServerEntry: exactly one of the two
    return StdioCommand(
        entry.command,
        tuple(entry.args),
        expand_env(name, entry.env, environ),
        str(entry.cwd) if entry.cwd is not None else None,
    )


class ProxiedServers:
    """The servers of ``[servers]`` and the supervisor that runs them."""

    def __init__(
        self,
        entries: Mapping[str, ServerEntry],
        *,
        registry: ToolRegistry,
        state_dir: Path,
        max_message_bytes: int,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self.registry = registry
        self.record = ChildRecord(state_dir / "children")
        self.servers: dict[str, ProxiedServer] = {}
        self._separators: dict[str, str] = {}
        for name, entry in entries.items():
            self._separators[name] = entry.separator
            self.servers[name] = ProxiedServer(
                name,
                endpoint(name, entry, environ),
                record=self.record,
                max_message_bytes=max_message_bytes,
                max_pending=entry.max_pending,
                on_tools_changed=self._tools_changed,
            )
        self.supervisor = Supervisor(
            [
                ChildSpec(name, partial(self._run, server), shutdown=10)
                for name, server in self.servers.items()
            ],
            strategy=Strategy.ONE_FOR_ONE,
        )

    def status(self) -> list[ProxiedServerStatus]:
        """Each server's health, for ``exai status`` and ``/metrics``."""
        return [
            ProxiedServerStatus(
                name=name,
                state=server.state.value,
                pid=server.pid,
                tools=len(server.tools),
                restarts=server.restarts,
                last_error=server.last_error,
                server_name=server.server.server_info.name if server.server else None,
            )
            for name, server in self.servers.items()
        ]

    def child_spec(self, name: str) -> ChildSpec:
        """This host as a child of the root: it reaps orphans, then supervises."""
        return ChildSpec(name, self._supervise, shutdown=30)

    async def _supervise(self, ctx: ChildContext) -> None:
        reaped = self.record.reap()
        if reaped:
            log.warning("servers.orphans_reaped", groups=reaped)
        await self.supervisor.run(ctx)

    async def _run(self, server: ProxiedServer, ctx: ChildContext) -> None:
        """One server's child: started once its first start ended (up, or failed) or after
        :data:`STARTUP_WAIT` seconds, so that clients connecting as soon as the node serves
        find its tools listed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            with trio.move_on_after(STARTUP_WAIT):
                await server.first_start.wait()
            ctx.started()
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()

    def _tools_changed(self, server: ProxiedServer) -> None:
        tools = proxied_tools(server, self._separators[server.name])
        refused = self.registry.replace_group(server.name, tools)
        if refused:
            log.warning("servers.tool_names_taken", server=server.name, names=refused[:20])
        log.info("servers.tools", server=server.name, state=server.state, tools=len(tools))
