"""``@tool``: a plain function as an MCP tool (``from runtime.mcp import tool, ToolContext``).

```python
@tool(annotations={"readOnlyHint": True}, timeout=30)
def search(query: str, limit: int = 10) -> list[Hit]:
    \"\"\"Search the team's notes.\"\"\"
```

The function's type hints are the tool's schemas, through pydantic: every parameter (but one
typed :class:`~runtime.mcp.tools.ToolContext`, which is given the call's context) is a
property of the input schema, required unless it has a default; ``Annotated[int,
Field(ge=1, description=...)]`` adds constraints and descriptions. The return type is the
output schema (MCP's ``outputSchema``, and the result's ``structuredContent`` in protocol
versions that have it, ``runtime/mcp/versions.py``):

=====================================  ===================================================
returns                                the result
=====================================  ===================================================
``str`` (or no annotation)             text only, no output schema
a pydantic model, dataclass,           ``structuredContent`` is the object (its schema the
``TypedDict`` (an object's schema)     output schema); the text is its JSON
anything else (``int``, ``list[...]``) wrapped, as MCP's output schema must be an object:
                                       ``{"result": value}``; the text is ``value``'s JSON
:class:`~runtime.mcp.tools.ToolOutput` as it is (``is_error`` to say it could not)
=====================================  ===================================================

The docstring (or ``description=``) is the tool's description and is required: it is what
tells a model what the tool does. Options: ``name`` (default: the function's), ``annotations``
(MCP's hints: ``readOnlyHint``, ``destructiveHint``, ``idempotentHint``, ``openWorldHint``,
``title``; ``readOnlyHint`` also spares a call's intent its fsync, storage/durability.py),
``timeout`` (seconds; past it the call is answered as an ``isError`` result) and
``max_concurrency`` (calls of this tool running at once over the node; more wait for a
place, within their session's slots).

An ``async def`` runs on the event loop and must never block it (a loop-stall watchdog names
one that does: runtime/tool_workers.py). A plain ``def`` runs in a worker thread
(:mod:`runtime.tool_workers`): cancelled or timed out, its call is answered at once and the
thread runs on until it returns, holding its call's slots; ``ctx.cancelled`` (a
``threading.Event``) tells it to stop early.

A mistake in a declaration (a parameter without a type hint, a type pydantic cannot make a
schema of, no docstring, a bad name) raises :class:`ToolDeclarationError` when the module is
imported, so ``exai serve`` refuses to start naming it (exit 2), instead of a client finding
out. Errors a tool raises are answered as any tool's are (``runtime/mcp/translation.py``):
``storage.errors.ToolFailed("why")`` as an ``isError`` result with that text, others as
-32603 with the traceback in the server's log.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal, cast, get_type_hints, overload

import pydantic_core
import trio
from pydantic import (
    BaseModel,
    RootModel,
    TypeAdapter,
    ValidationError,
    create_model,
)

from runtime.mcp.schema import ToolAnnotations, ToolDescriptor
from runtime.mcp.tools import Tool, ToolContext, ToolOutput
from runtime.tool_workers import ToolWorkers
from storage.errors import ToolFailed

#: MCP's tool names (2025-11-25, server/tools, "Tool Names"): 1 to 128 of these characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

#: The annotations a tool may declare, by their MCP names.
ANNOTATION_NAMES = frozenset(
    {"title", "readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"}
)

_workers_var: trio.lowlevel.RunVar[ToolWorkers] = trio.lowlevel.RunVar("exai_tool_workers")


def use_workers(workers: ToolWorkers) -> None:
    """Make ``workers`` the tools' threads and watchdog for this trio run (the node does,
    before its tree starts; trio keeps its own default thread limiter the same way)."""
    _workers_var.set(workers)


def current_workers() -> ToolWorkers:
    """This run's :class:`ToolWorkers`: the node's, or one made with defaults (a test's
    in-memory session)."""
    try:
        return _workers_var.get()
    except LookupError:
        workers = ToolWorkers()
        _workers_var.set(workers)
        return workers


class ToolDeclarationError(TypeError):
    """A ``@tool`` declaration is wrong; the message names the function and what to fix."""


class ToolTimedOut(ToolFailed):
    """The call ran past its tool's ``timeout``: answered as an ``isError`` result."""


class ToolOutputInvalid(Exception):
    """The function returned what its own return type does not allow: a bug in the tool,
    answered -32603 and logged with the validation error."""


_Shape = Literal["text", "output", "model", "object", "wrapped"]


class FunctionTool(Tool[BaseModel]):
    """A ``@tool`` function as a :class:`~runtime.mcp.tools.Tool`, so that the call runner,
    task rows, traces, limits and ``tools/list`` treat it as any other. Calling it calls the
    function (so it can be tested as one)."""

    #: Set per tool on its own subclass (``_declare``).
    function: Callable[..., Any]
    timeout: float | None = None
    max_concurrency: int | None = None
    _is_async: bool
    _fields: tuple[str, ...]
    _context_parameter: str | None
    _shape: _Shape
    _concurrency: trio.CapacityLimiter | None
    #: The output schema as listed: for a dataclass or TypedDict, its own (inline, with
    #: ``"type": "object"`` on top as MCP requires), not its RootModel's ``$ref``.
    _output_schema: dict[str, Any] | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def descriptor(self) -> ToolDescriptor:
        return super().descriptor().model_copy(update={"output_schema": self._output_schema})

    def __repr__(self) -> str:
        return f"<tool {self.name!r}: {self.function.__module__}.{self.function.__qualname__}>"

    @property
    def is_async(self) -> bool:
        """Whether it runs on the event loop (``async def``), not in a worker thread."""
        return self._is_async

    @property
    def concurrency(self) -> trio.CapacityLimiter | None:
        """Its ``max_concurrency`` limiter (``borrowed_tokens``: its calls running now)."""
        return self._concurrency

    @property
    def origin(self) -> str:
        """Where it was declared: ``module.function``."""
        return f"{self.function.__module__}.{self.function.__qualname__}"

    async def run(self, args: BaseModel, ctx: ToolContext) -> ToolOutput:
        kwargs = {field: getattr(args, field) for field in self._fields}
        if self._context_parameter is not None:
            kwargs[self._context_parameter] = ctx
        if self._is_async:
            value = await self._run_async(kwargs, ctx)
        else:
            value = await self._run_in_thread(kwargs, ctx)
        return self._output(value)

    async def _run_async(self, kwargs: dict[str, Any], ctx: ToolContext) -> Any:
        workers = current_workers()
        timeout = self.timeout if self.timeout is not None else math.inf
        concurrency = self._concurrency if self._concurrency is not None else nullcontext()
        try:
            with workers.running(self.name), trio.move_on_after(timeout) as timer:
                async with concurrency:
                    return await cast(Awaitable[Any], self.function(**kwargs))
        except trio.Cancelled:
            ctx.cancelled.set()
            raise
        assert timer.cancelled_caught
        ctx.cancelled.set()
        raise self._timed_out()

    async def _run_in_thread(self, kwargs: dict[str, Any], ctx: ToolContext) -> Any:
        """In a worker thread; answered at once on a cancel or the timeout while the thread
        runs on, holding the call's slots until it returns (runtime/tool_workers.py)."""
        hold = current_workers().hold(
            self.name,
            ctx.session_id,
            ctx.request_id,
            concurrency=self._concurrency,
            keep_slots=ctx.keep_slots,
        )
        cancelled = ctx.cancelled  # made here, in the trio thread, before the thread reads it
        timer = trio.move_on_after(self.timeout if self.timeout is not None else math.inf)
        try:
            with timer:
                return await trio.to_thread.run_sync(
                    partial(self.function, **kwargs),
                    abandon_on_cancel=True,
                    # Any object with trio's limiter methods will do (trio documents it);
                    # this one is released only once the thread has returned.
                    limiter=cast(trio.CapacityLimiter, hold),
                    thread_name=f"exai tool {self.name}",
                )
        except trio.Cancelled:
            cancelled.set()
            hold.answered("cancelled")
            raise
        cancelled.set()
        hold.answered("timed out")
        raise self._timed_out()

    def _timed_out(self) -> ToolTimedOut:
        return ToolTimedOut(
            f"tool {self.name!r} timed out after {self.timeout:g} s (its declared timeout); "
            "nothing is left running for it on the event loop"
        )

    def _output(self, value: Any) -> ToolOutput:
        shape = self._shape
        if shape == "output":
            if not isinstance(value, ToolOutput):
                raise ToolOutputInvalid(
                    f"tool {self.name!r} returned {type(value).__name__}, not ToolOutput"
                )
            return value
        if shape == "text":
            text = value if isinstance(value, str) else _json(value)
            return ToolOutput(text=text)
        model = self.Output
        assert model is not None
        try:
            if shape == "wrapped":
                structured = model.model_validate({"result": value})
                text = _json(structured.model_dump(mode="json")["result"])
                return ToolOutput(text=text, structured=structured)
            if shape == "object":
                structured = model.model_validate(value)
            else:
                structured = value if isinstance(value, model) else model.model_validate(value)
        except ValidationError as exc:
            raise ToolOutputInvalid(
                f"tool {self.name!r} returned what its return type does not allow: {exc}"
            ) from None
        return ToolOutput(text=structured.model_dump_json(), structured=structured)


def _json(value: Any) -> str:
    return pydantic_core.to_json(value, fallback=str).decode()


@overload
def tool(function: Callable[..., Any], /) -> FunctionTool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    annotations: ToolAnnotations | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    max_concurrency: int | None = None,
) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    annotations: ToolAnnotations | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    max_concurrency: int | None = None,
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Declare a tool (module doc): ``@tool`` or ``@tool(name=..., ...)``; raises
    :class:`ToolDeclarationError` for a declaration that cannot be served."""

    def declare(function: Callable[..., Any]) -> FunctionTool:
        return _declare(
            function,
            name=name,
            description=description,
            annotations=annotations,
            timeout=timeout,
            max_concurrency=max_concurrency,
        )

    if function is not None:
        return declare(function)
    return declare


def _declare(
    function: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    annotations: ToolAnnotations | Mapping[str, Any] | None,
    timeout: float | None,
    max_concurrency: int | None,
) -> FunctionTool:
    if not inspect.isfunction(function):
        raise ToolDeclarationError(
            f"@tool takes a function (def or async def), not {type(function).__name__}"
        )
    where = f"{function.__module__}.{function.__qualname__}"

    def refuse(why: str) -> ToolDeclarationError:
        return ToolDeclarationError(f"tool {where}: {why}")

    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        raise refuse("a generator cannot be a tool: return the whole result")

    tool_name = name if name is not None else function.__name__
    if not NAME_PATTERN.match(tool_name):
        raise refuse(f"name {tool_name!r} must be 1 to 128 letters, digits, '_', '-' or '.' (MCP)")
    text = description if description is not None else inspect.getdoc(function)
    if not text or not text.strip():
        raise refuse("no description: give it a docstring (what it does, for the model)")
    if timeout is not None and not timeout > 0:
        raise refuse(f"timeout must be a positive number of seconds, not {timeout!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise refuse(f"max_concurrency must be at least 1, not {max_concurrency!r}")
    hints = _hints(function, refuse)
    fields: dict[str, Any] = {}
    context_parameter: str | None = None
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise refuse(f"*{parameter.name}: a tool's arguments are named, one by one")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise refuse(f"parameter {parameter.name!r} is positional-only; arguments are named")
        hint = hints.get(parameter.name, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty:
            raise refuse(f"parameter {parameter.name!r} has no type hint (it is its schema)")
        if hint is ToolContext:
            context_parameter = parameter.name
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (hint, default)
    model_name = _model_name(tool_name)
    try:
        args_model = create_model(f"{model_name}Arguments", **fields)
        args_model.model_json_schema()
    except Exception as exc:  # pydantic's errors, and whatever a type's own hooks raise
        raise refuse(f"its parameters give no JSON schema: {_first_line(exc)}") from None
    shape, output_model, output_schema = _output(
        hints.get("return", inspect.Parameter.empty), model_name, refuse
    )
    attributes: dict[str, Any] = {
        "name": tool_name,
        "description": text.strip(),
        "Args": args_model,
        "Output": output_model,
        "annotations": _annotations(annotations, refuse),
        "function": staticmethod(function),
        "timeout": timeout,
        "max_concurrency": max_concurrency,
        "_is_async": inspect.iscoroutinefunction(function),
        "_fields": tuple(fields),
        "_context_parameter": context_parameter,
        "_shape": shape,
        "_output_schema": output_schema,
        "_concurrency": (
            trio.CapacityLimiter(max_concurrency) if max_concurrency is not None else None
        ),
        "__module__": function.__module__,
        "__doc__": function.__doc__,
    }
    cls = type(f"{model_name}Tool", (FunctionTool,), attributes)
    return cast(FunctionTool, cls())


def _hints(
    function: Callable[..., Any], refuse: Callable[[str], ToolDeclarationError]
) -> dict[str, Any]:
    try:
        return get_type_hints(function, include_extras=True)
    except Exception as exc:  # a name in a hint that does not resolve, in any way
        raise refuse(f"its type hints cannot be resolved: {_first_line(exc)}") from None


def _output(
    hint: Any, model_name: str, refuse: Callable[[str], ToolDeclarationError]
) -> tuple[_Shape, type[BaseModel] | None, dict[str, Any] | None]:
    """How the function's return value becomes the result, its output model and its output
    schema, if any."""
    if hint is inspect.Parameter.empty or hint is str or hint is Any:
        return "text", None, None
    if hint is ToolOutput:
        return "output", None, None
    if hint is None or hint is type(None):
        raise refuse("returns None: return what the caller should read (str, or a type)")
    try:
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return "model", hint, hint.model_json_schema()
        schema = TypeAdapter(hint).json_schema()
        if schema.get("type") == "object" and "properties" in schema:
            rooted: type[BaseModel] = RootModel[hint]
            return "object", rooted, schema
        wrapped = create_model(f"{model_name}Output", result=(hint, ...))
        return "wrapped", wrapped, wrapped.model_json_schema()
    except Exception as exc:  # pydantic's errors, and whatever a type's own hooks raise
        raise refuse(f"its return type gives no JSON schema: {_first_line(exc)}") from None


def _annotations(
    given: ToolAnnotations | Mapping[str, Any] | None,
    refuse: Callable[[str], ToolDeclarationError],
) -> ToolAnnotations | None:
    if given is None or isinstance(given, ToolAnnotations):
        return given
    unknown = sorted(set(given) - ANNOTATION_NAMES)
    if unknown:
        raise refuse(
            f"unknown annotation(s) {', '.join(map(repr, unknown))}; MCP's are "
            + ", ".join(sorted(ANNOTATION_NAMES))
        )
    try:
        return ToolAnnotations.model_validate(dict(given))
    except ValidationError as exc:
        raise refuse(f"bad annotations: {_first_line(exc)}") from None


def _model_name(tool_name: str) -> str:
    """``team.search-notes`` -> ``TeamSearchNotes``: the schemas' titles."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[_.\-]+", tool_name))


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
