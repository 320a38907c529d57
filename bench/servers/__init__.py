"""Servers under test. Each runs in its own process, started by ``bench.servers.spec``.

The anchor servers (``sdk_fastmcp``, ``mcp2_lowlevel``) run in their own virtual environments
and are started by file path: they import nothing from ``bench``.
"""
