"""How a tool is declared: typed arguments in, typed output out, schemas derived from the types.

A tool never parses JSON itself. Its ``Args`` model is the single source of its input schema
(``tools/list``) and of argument validation (``tools/call``), so the two cannot disagree.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import trio
from pydantic import BaseModel, ValidationError

from runtime.mcp.errors import invalid_params
from runtime.mcp.progress import Progress
from runtime.mcp.schema import (
    LogLevel,
    TaskSupport,
    ToolAnnotations,
    ToolDescriptor,
    ToolExecution,
)
from runtime.tool_access import ToolAccess

ArgsT = TypeVar("ArgsT", bound=BaseModel)


class ToolContext:
    """What a running tool may know about its caller, and how it talks back while it runs.

    ``identity`` is the client identity the session's token named (``default`` for the node's
    own token): what a tool keeps for a client (conversation threads) belongs to it.

    Cancellation reaches an ``async def`` tool as ``trio.Cancelled``. A plain ``def`` tool runs
    in a worker thread, which nothing can interrupt: :attr:`cancelled` is set once its call
    was cancelled or timed out (and answered), so that it can stop early; from that thread it
    reports with :meth:`report_progress_from_thread` and :meth:`log_from_thread`.
    """

    __slots__ = (
        "_cancelled",
        "_keep_slots",
        "_log",
        "_progress",
        "identity",
        "request_id",
        "session_id",
    )

    def __init__(
        self,
        session_id: str,
        request_id: str | int,
        *,
        identity: str = "default",
        progress: Progress | None = None,
        log: Callable[[LogLevel, object, str | int], Awaitable[None]] | None = None,
        keep_slots: Callable[[], Callable[[], None]] | None = None,
    ) -> None:
        self.session_id = session_id
        self.request_id = request_id
        self.identity = identity
        self._progress = progress
        self._log = log
        self._keep_slots = keep_slots
        #: Made on first use: most calls never need one (a threading.Event is a lock and a
        #: condition). A worker thread's tool has it made before its thread starts.
        self._cancelled: threading.Event | None = None

    @property
    def wants_progress(self) -> bool:
        """Whether the client asked for progress (a token): worth streaming for, then."""
        return self._progress is not None

    @property
    def cancelled(self) -> threading.Event:
        """Set (from the trio thread) once the call was cancelled or timed out: its client has
        had its answer, and whatever the tool still does is wasted. Thread-safe: a worker
        thread polls ``is_set()`` or waits on it."""
        if self._cancelled is None:
            self._cancelled = threading.Event()
        return self._cancelled

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Tell the client how far along the call is (only if it asked, with a token)."""
        if self._progress is not None and not self._over():
            await self._progress.report(progress, total, message)

    async def log(self, level: LogLevel, data: object) -> None:
        """A ``notifications/message`` to the client, if its log level lets it through; it
        relates to this call's request (``log`` is given the request id)."""
        if self._log is not None and not self._over():
            await self._log(level, data, self.request_id)

    def report_progress_from_thread(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """:meth:`report_progress` from a plain ``def`` tool's worker thread (blocks it until
        sent); dropped once the call is over."""
        if self._progress is not None and not self._over():
            trio.from_thread.run(self.report_progress, progress, total, message)

    def log_from_thread(self, level: LogLevel, data: object) -> None:
        """:meth:`log` from a plain ``def`` tool's worker thread; dropped once the call is
        over."""
        if self._log is not None and not self._over():
            trio.from_thread.run(self.log, level, data)

    def keep_slots(self) -> Callable[[], None]:
        """For a tool whose work outlives its answer (a worker thread cannot be stopped):
        the call's slots (its session's and the node's) stay taken after the call is answered
        until the returned function is called, once, in the trio thread. Outside a session's
        call runner there are none, and it does nothing."""
        if self._keep_slots is None:
            return _nothing
        return self._keep_slots()

    def _over(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """A tool's answer: text for every client, plus structured content for clients that take it.

    ``is_error``: the tool ran but could not do what was asked (MCP's ``isError`` result), and
    ``text`` says why, for the model to read and adapt. A refusal (retry later, a limit,
    invalid input, a failure its callee raised) is raised as a domain error of the node's tree
    (``storage.errors``) instead, and answered by :mod:`runtime.mcp.translation`.
    """

    text: str
    structured: BaseModel | None = None
    is_error: bool = False
    #: A proxied server's own ``content`` blocks and ``structuredContent``, passed through
    #: as it sent them (``text`` is then only what the task row records).
    content: list[dict[str, Any]] | None = None
    structured_content: dict[str, Any] | None = None


class Tool(ABC, Generic[ArgsT]):
    """Subclass with ``name``, ``description``, ``Args`` (and ``Output`` if structured)."""

    name: ClassVar[str]
    description: ClassVar[str]
    Args: type[ArgsT]
    Output: ClassVar[type[BaseModel] | None] = None
    #: MCP's behaviour hints, listed with the tool. ``readOnlyHint`` also tells the call
    #: runner that the call's intent need not be fsynced before it runs (``journal``
    #: durability): a read-only call lost with the machine had no effect.
    annotations: ClassVar[ToolAnnotations | None] = None
    #: ``execution.taskSupport`` (2025-11-25): whether it may be called as a task
    #: (docs/tasks.md); ``forbidden``, the protocol's default, is not listed.
    task_support: ClassVar[TaskSupport] = "forbidden"

    @property
    def read_only(self) -> bool:
        return self.annotations is not None and self.annotations.read_only_hint is True

    def parse(self, arguments: Mapping[str, Any] | None) -> ArgsT:
        """Validate raw arguments; raise :class:`InvalidParams` naming every bad field."""
        try:
            return self.Args.model_validate(arguments or {})
        except ValidationError as exc:
            raise invalid_params(
                f"arguments for tool {self.name!r}", exc, root="arguments"
            ) from None

    @abstractmethod
    async def run(self, args: ArgsT, ctx: ToolContext) -> ToolOutput:
        """Do the work. Cancellation (client cancel, shutdown) arrives as ``trio.Cancelled``.

        Raise a domain error (``storage.errors``: ``RetryLater``, ``LimitExhausted``,
        ``InvalidInput``, ``ToolFailed``); the call runner answers it through
        :mod:`runtime.mcp.translation`, in the request's era. An
        :class:`~runtime.mcp.errors.RpcError` is answered as it is; any other exception is a
        bug, answered as an internal error (-32603).
        """

    def descriptor(self) -> ToolDescriptor:
        return ToolDescriptor(
            name=self.name,
            description=self.description,
            input_schema=self.Args.model_json_schema(),
            output_schema=self.Output.model_json_schema() if self.Output else None,
            annotations=self.annotations,
            execution=(
                None
                if self.task_support == "forbidden"
                else ToolExecution(task_support=self.task_support)
            ),
        )


class ToolRegistry:
    """The tools a server offers, in declaration order; descriptors are built once.

    ``access``: which of them each client identity may see and call
    (:mod:`runtime.tool_access`); without it, every identity sees every tool.
    """

    def __init__(self, tools: Iterable[Tool[Any]], access: ToolAccess | None = None) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"tool {tool.name!r} declared twice")
            self._tools[tool.name] = tool
        self._access = access if access is not None else ToolAccess()
        #: Tools served by group (proxied servers: :meth:`replace_group`), by name.
        self._groups: dict[str, set[str]] = {}
        #: A restricted identity's lists, by (identity, execution), for the access rules'
        #: generation they were made from (bounded: identities come from the config file).
        self._listed: dict[tuple[str, bool], list[ToolDescriptor]] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        self._with_execution = [tool.descriptor() for tool in self._tools.values()]
        # Versions before tasks never see `execution` (runtime/mcp/versions.py, has_tasks).
        self._descriptors = [
            d.model_copy(update={"execution": None}) if d.execution is not None else d
            for d in self._with_execution
        ]
        self._listed.clear()
        self._listed_generation = self._access.generation

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def own(self) -> list[Tool[Any]]:
        """The tools served outside every group: the node's own, not a proxied server's."""
        grouped = set().union(*self._groups.values()) if self._groups else set()
        return [tool for name, tool in self._tools.items() if name not in grouped]

    def replace_group(self, group: str, tools: Iterable[Tool[Any]]) -> list[str]:
        """Serve ``tools`` as the group ``group`` (a proxied server's), in place of what the
        group served before; the names refused because a tool outside the group has them.
        Lists made from now on show the change; calls look tools up as they come."""
        own = self._groups.get(group, set())
        for name in own:
            self._tools.pop(name, None)
        refused: list[str] = []
        kept: set[str] = set()
        for tool in tools:
            if tool.name in self._tools or tool.name in kept:
                refused.append(tool.name)
                continue
            self._tools[tool.name] = tool
            kept.add(tool.name)
        self._groups[group] = kept
        self._rebuild()
        return refused

    def get(self, name: str, identity: str | None = None) -> Tool[Any] | None:
        """The tool, or ``None`` if there is none by that name, or ``identity`` (when given)
        may not call it: the caller answers both alike."""
        tool = self._tools.get(name)
        if tool is None or identity is None or self._access.allows(identity, name):
            return tool
        return None

    def descriptors(
        self, *, execution: bool = False, identity: str | None = None
    ) -> list[ToolDescriptor]:
        """Every tool's descriptor (those ``identity`` may call, when given); ``execution``:
        with ``execution.taskSupport`` (sessions whose version has tasks)."""
        every = self._with_execution if execution else self._descriptors
        access = self._access
        if identity is None or not access.restricted(identity):
            return list(every)
        if self._listed_generation != access.generation:
            self._listed.clear()
            self._listed_generation = access.generation
        key = (identity, execution)
        listed = self._listed.get(key)
        if listed is None:
            listed = self._listed[key] = [d for d in every if access.allows(identity, d.name)]
        return list(listed)
