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
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import structlog
import trio

from actors.servers.pool import CATALOG, ServerPool
from actors.servers.proxy import (
    Endpoint,
    ProxiedServer,
    RemoteEndpoint,
    ServerState,
    StdioCommand,
)
from actors.servers.tools import proxied_tools
from runtime.child_process import ChildRecord
from runtime.config import ConfigError, ServerEntry
from runtime.mcp.tools import ToolRegistry
from runtime.status_model import ProxiedServerStatus
from runtime.supervision import ChildContext, ChildSpec, Strategy, Supervisor

__all__ = ["ProxiedServers", "endpoint", "expand_env"]

log = structlog.get_logger("servers")

#: Seconds the node waits for its proxied servers' first starts before it serves clients.
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
        on_change: Callable[[], None] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self.registry = registry
        self.record = ChildRecord(state_dir / "children")
        self.servers: dict[str, ProxiedServer | ServerPool] = {}
        self._separators: dict[str, str] = {}
        #: Called when what clients see changes (``notifications/tools/list_changed``).
        self._on_change = on_change
        #: Per server, what its clients last saw: down or not, and its tools.
        self._seen: dict[str, tuple[bool, tuple[str, ...]]] = {}
        self._pools_by_session: list[ServerPool] = []
        for name, entry in entries.items():
            self._separators[name] = entry.separator
            make = partial(self._make, name, entry, environ, max_message_bytes)
            if entry.share == "node":
                self.servers[name] = make(None)
                continue
            pool = ServerPool(
                name,
                make,
                share=entry.share,
                max_instances=entry.max_instances,
                idle_timeout=entry.idle_timeout,
            )
            self.servers[name] = pool
            if entry.share == "session":
                self._pools_by_session.append(pool)
        self.supervisor = Supervisor(
            [
                ChildSpec(name, partial(self._run, server), shutdown=10)
                for name, server in self.servers.items()
            ],
            strategy=Strategy.ONE_FOR_ONE,
        )

    def _make(
        self,
        name: str,
        entry: ServerEntry,
        environ: Mapping[str, str],
        max_message_bytes: int,
        key: str | None,
    ) -> ProxiedServer:
        """One process of ``entry``: the node's (``key`` None), or a pool's instance (only
        the pool's catalog reports its tools)."""
        lists_tools = key is None or key == CATALOG
        return ProxiedServer(
            name,
            endpoint(name, entry, environ),
            record=self.record,
            max_message_bytes=max_message_bytes,
            max_pending=entry.max_pending,
            max_restarts=entry.max_restarts,
            restart_period=entry.restart_period,
            retry_after=entry.retry_after,
            on_tools_changed=self._tools_changed if lists_tools else None,
        )

    def processes(self) -> dict[str, ProxiedServer]:
        """Each server's process whose health is the server's (a pool's: its catalog)."""
        return {
            name: source.catalog if isinstance(source, ServerPool) else source
            for name, source in self.servers.items()
        }

    def session_ended(self, session_id: str) -> None:
        """A session is over: the processes of ``share = "session"`` servers it had stop."""
        for pool in self._pools_by_session:
            pool.release(session_id)

    def status(self) -> list[ProxiedServerStatus]:
        """Each server's health, for ``exai status`` and ``/metrics``."""
        shown: list[ProxiedServerStatus] = []
        for name, source in self.servers.items():
            process = source.catalog if isinstance(source, ServerPool) else source
            shown.append(
                ProxiedServerStatus(
                    name=name,
                    endpoint=process.endpoint,
                    state=process.state.value,
                    pid=process.pid,
                    tools=len(process.tools),
                    restarts=process.restarts,
                    last_error=process.last_error,
                    server_name=process.server.server_info.name if process.server else None,
                    share=source.share if isinstance(source, ServerPool) else "node",
                    instances=source.instances if isinstance(source, ServerPool) else None,
                )
            )
        return shown

    def child_spec(self, name: str) -> ChildSpec:
        """This host as a child of the root: it reaps orphans, then supervises."""
        return ChildSpec(name, self._supervise, shutdown=30)

    async def _supervise(self, ctx: ChildContext) -> None:
        """Reap what a killed predecessor left, start every server at once, and report
        started once each one's first start ended (up, or failed) or after
        :data:`STARTUP_WAIT` seconds: so that clients connecting as soon as the node serves
        find the tools listed, without one slow server holding up the others' start."""
        reaped = self.record.reap()
        if reaped:
            log.warning("servers.orphans_reaped", groups=reaped)
        supervised = trio.Event()
        inner = ChildContext(
            ctx.id,
            ctx.path,
            restarts=ctx.restarts,
            last_error=ctx.last_error,
            stop_requested=ctx.stop_requested,
            on_started=supervised.set,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.supervisor.run, inner)
            await supervised.wait()
            with trio.move_on_after(STARTUP_WAIT):
                for source in self.servers.values():
                    process = source.catalog if isinstance(source, ServerPool) else source
                    await process.first_start.wait()
            ctx.started()

    async def _run(self, source: ProxiedServer | ServerPool, ctx: ChildContext) -> None:
        """One server's child (a pool's: its instances and catalog), until stopped."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            ctx.started()
            await ctx.stop_requested.wait()
            nursery.cancel_scope.cancel()

    def _tools_changed(self, server: ProxiedServer) -> None:
        """A server's tools or state changed: serve its tools as they are now, and tell the
        clients when what they see changed (its tools, or it went down or came back): not
        for a restart that brings the same tools back."""
        tools = proxied_tools(self.servers[server.name], self._separators[server.name])
        refused = self.registry.replace_group(server.name, tools)
        if refused:
            log.warning("servers.tool_names_taken", server=server.name, names=refused[:20])
        seen = (
            server.state is ServerState.DOWN,
            tuple(d.model_dump_json() for d in server.tools),
        )
        if self._seen.get(server.name) == seen:
            return
        self._seen[server.name] = seen
        log.info("servers.tools", server=server.name, state=server.state, tools=len(tools))
        if self._on_change is not None:
            self._on_change()
