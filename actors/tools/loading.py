"""The team's own tools, loaded at start: the config file's ``[tools] modules`` and the
entry-point group ``exai.tools`` of installed packages (docs/tools.md).

Every :class:`~runtime.mcp.tools.Tool` instance at the top level of a listed module is served
(a ``@tool`` function is one; so is an instance of a ``Tool`` subclass). An entry point names
a module (``team_tools``: every tool in it) or one object (``team_tools:search``: a tool, or a
list of tools). A module or entry point that fails to load, or declares a bad tool, stops the
start, as do two tools with one name (the built-in ones included): :class:`ConfigError` with
one line naming it, which ``exai serve`` prints before exiting with 2. Nothing is retried
and nothing is skipped: a server that comes up without a tool its users expect is worse than
one that says why it does not come up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.config import ConfigError, ToolsConfig
from runtime.mcp.tool_api import FunctionTool, ToolDeclarationError
from runtime.mcp.tools import Tool

#: Installed packages offer tools under this entry-point group.
ENTRY_POINT_GROUP = "exai.tools"


def load_tools(
    config: ToolsConfig,
    *,
    config_dir: Path | None,
    builtin: Iterable[str],
    discover: bool | None = None,
) -> list[Tool[Any]]:
    """The modules' tools, then the entry points' (in the order the environment lists them),
    each once; ``builtin``: the names the node's own tools take. ``discover``: read the
    entry-point group (default: ``config.entry_points``). Raises :class:`ConfigError`."""
    for given in reversed(config.path):
        directory = config_dir / given if config_dir is not None else given
        resolved = str(directory.resolve())
        if resolved not in sys.path:
            sys.path.insert(0, resolved)
    found: list[tuple[Tool[Any], str]] = []
    for name in config.modules:
        module = _import(name)
        found.extend((tool, f"module {name!r}") for tool in _tools_of(module))
    if config.entry_points if discover is None else discover:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            found.extend((tool, _where(point)) for tool in _load_entry_point(point))
    taken: dict[str, str] = {name: f"the built-in {name!r}" for name in builtin}
    served: list[Tool[Any]] = []
    seen: set[int] = set()
    for tool, where in found:
        if id(tool) in seen:
            continue  # one tool reached twice (a module re-exporting another's): served once
        seen.add(id(tool))
        origin = f"{_origin(tool)} ({where})"
        other = taken.get(tool.name)
        if other is not None:
            raise ConfigError(f"tools: two tools are named {tool.name!r}: {other} and {origin}")
        taken[tool.name] = origin
        served.append(tool)
    return served


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ToolDeclarationError as exc:
        raise ConfigError(f"tools: module {name!r} declares a bad tool: {_one_line(exc)}") from None
    except Exception as exc:  # whatever the module's own code raises while it is imported
        raise ConfigError(f"tools: module {name!r} failed to import: {_one_line(exc)}") from None


def _tools_of(module: ModuleType) -> list[Tool[Any]]:
    return [value for value in vars(module).values() if isinstance(value, Tool)]


def _load_entry_point(point: EntryPoint) -> list[Tool[Any]]:
    try:
        loaded = point.load()
    except ToolDeclarationError as exc:
        raise ConfigError(f"tools: {_where(point)} declares a bad tool: {_one_line(exc)}") from None
    except Exception as exc:
        raise ConfigError(f"tools: {_where(point)} failed to load: {_one_line(exc)}") from None
    if isinstance(loaded, ModuleType):
        return _tools_of(loaded)
    if isinstance(loaded, Tool):
        return [loaded]
    if isinstance(loaded, list | tuple) and all(isinstance(item, Tool) for item in loaded):
        return list(loaded)
    raise ConfigError(
        f"tools: {_where(point)} is {type(loaded).__name__}: name a module, a tool or a list "
        "of tools"
    )


def _where(point: EntryPoint) -> str:
    dist = point.dist.name if point.dist is not None else "an unknown package"
    return f"entry point {point.name!r} = {point.value!r} of {dist}"


def _origin(tool: Tool[Any]) -> str:
    if isinstance(tool, FunctionTool):
        return tool.origin
    return f"{type(tool).__module__}.{type(tool).__qualname__}"


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a start-up error is one line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
