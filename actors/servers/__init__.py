"""Proxied MCP servers: other MCP servers the node runs and serves the tools of (issue 16)."""

from actors.servers.host import ProxiedServers
from actors.servers.proxy import (
    ProxiedServer,
    RemoteEndpoint,
    ServerDown,
    ServerState,
    StdioCommand,
)

__all__ = [
    "ProxiedServer",
    "ProxiedServers",
    "RemoteEndpoint",
    "ServerDown",
    "ServerState",
    "StdioCommand",
]
