"""MCP payloads as pydantic models: what each method takes and returns on the wire.

Field names are the wire's camelCase through aliases; unknown fields from newer clients are
accepted (``extra="allow"`` where the spec lets objects grow) so that a client one version ahead
never gets ``-32602`` for a field we do not know yet.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    StrictInt,
    StrictStr,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticKnownError

from storage.untrusted import NAME_CHARS, clip


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Implementation(WireModel):
    """A client's (or our) name and version. Every string field, known or extra, is clipped to
    :data:`~storage.untrusted.NAME_CHARS` characters with a marker here, at the boundary, so
    logs, the journal, the database and ``exai status`` only ever see bounded names."""

    name: str
    version: str
    title: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _clip_strings(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        return {
            key: clip(value, NAME_CHARS) if isinstance(value, str) else value
            for key, value in data.items()
        }


class InitializeParams(WireModel):
    protocol_version: str
    capabilities: dict[str, Any] = Field(default_factory=dict)
    client_info: Implementation


class ToolsCapability(WireModel):
    list_changed: bool = False


class LoggingCapability(WireModel):
    pass


class TaskRequestsCapability(WireModel):
    """``tasks.requests``: which requests may be task-augmented (exhaustive: MCP 2025-11-25,
    basic/utilities/tasks, "Capabilities")."""

    tools: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"call": dict[str, Any]()})


class TasksCapability(WireModel):
    """The server's ``tasks`` capability (2025-11-25): ``tasks/list``, ``tasks/cancel`` and
    task-augmented ``tools/call``."""

    list: dict[str, Any] = Field(default_factory=dict)
    cancel: dict[str, Any] = Field(default_factory=dict)
    requests: TaskRequestsCapability = Field(default_factory=TaskRequestsCapability)


class ServerCapabilities(WireModel):
    tools: ToolsCapability = Field(default_factory=ToolsCapability)
    logging: LoggingCapability | None = Field(default_factory=LoggingCapability)
    #: Only for sessions whose version has tasks (``versions.has_tasks``).
    tasks: TasksCapability | None = None
    #: Extensions offered, by identifier (2026-07-28: ``io.modelcontextprotocol/tasks``);
    #: an empty object means offered with no settings (SEP-2133).
    extensions: dict[str, dict[str, Any]] | None = None


class InitializeResult(WireModel):
    protocol_version: str
    capabilities: ServerCapabilities
    server_info: Implementation
    instructions: str | None = None
    meta: dict[str, str] | None = Field(default=None, alias="_meta")


class ListToolsParams(WireModel):
    cursor: str | None = None


class DiscoverResult(WireModel):
    """``server/discover`` (2026-07-28): what a handshake would have told the client."""

    supported_versions: list[str]
    capabilities: ServerCapabilities
    instructions: str | None = None
    meta: dict[str, Any] | None = Field(default=None, alias="_meta")


class ToolAnnotations(WireModel):
    """Hints about a tool's behaviour (MCP 2025-03-26 on, ``ToolAnnotations`` in the schema):
    hints, never guarantees, to a client; to this server, ``readOnlyHint`` also says that a
    call that never finished had no effect worth a durable record (storage/durability.py)."""

    title: str | None = None
    read_only_hint: bool | None = None
    destructive_hint: bool | None = None
    idempotent_hint: bool | None = None
    open_world_hint: bool | None = None


#: ``execution.taskSupport`` (2025-11-25): whether a tool may be called as a task. Absent
#: means ``forbidden``.
TaskSupport = Literal["forbidden", "optional", "required"]


class ToolExecution(WireModel):
    """A tool's ``execution`` (2025-11-25, ``ToolExecution`` in the schema)."""

    task_support: TaskSupport | None = None


class ToolDescriptor(WireModel):
    name: str
    title: str | None = None
    #: Optional in the schema (a proxied server may list a tool without one).
    description: str | None = None
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    annotations: ToolAnnotations | None = None
    #: Listed only to sessions whose version has tasks (``versions.has_tasks``).
    execution: ToolExecution | None = None


class ListToolsResult(WireModel):
    tools: list[ToolDescriptor]
    next_cursor: str | None = None


class RequestMeta(WireModel):
    """A request's ``_meta``, parsed once per request (``tools/call``): its progress token, and
    what a 2026-07-28 client names in every request (its version, its identity), left as the
    client sent them: the session decides what a bad one means (-32022), not this model."""

    # Strict: a lax int would turn `true` into 1, a token the client never sent.
    progress_token: StrictStr | StrictInt | None = None
    protocol_version: Any = Field(default=None, alias="io.modelcontextprotocol/protocolVersion")
    client_info: Any = Field(default=None, alias="io.modelcontextprotocol/clientInfo")
    #: 2026-07-28: the least severe ``notifications/message`` level the client wants for
    #: this request; without it none may be sent (``server/utilities/logging.mdx``).
    log_level: Any = Field(default=None, alias="io.modelcontextprotocol/logLevel")
    #: 2026-07-28: the client's capabilities for this request (its ``extensions`` say
    #: whether it may be answered with a task: ``versions.declares_extension``).
    client_capabilities: Any = Field(
        default=None, alias="io.modelcontextprotocol/clientCapabilities"
    )


class ProgressParams(WireModel):
    progress_token: str | int
    progress: float
    total: float | None = None
    message: str | None = None


LogLevel = Literal["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
#: RFC 5424 order, least severe first.
LOG_LEVELS: tuple[LogLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)


class SetLevelParams(WireModel):
    level: LogLevel


class LogMessageParams(WireModel):
    level: LogLevel
    logger: str | None = None
    data: Any


def _json_object(value: object) -> object:
    """An object as it is (no copy, nothing inside looked at): a tool's ``Args`` model
    validates what is in it, once (``Tool.parse``)."""
    if value is not None and not isinstance(value, dict):
        raise PydanticKnownError("dict_type")
    return value


class TaskMetadata(WireModel):
    """``params.task`` of a task-augmented request (2025-11-25): the retention the client
    asks for, in milliseconds from the task's creation."""

    ttl: Annotated[int, Field(ge=0)] | None = None


class CallToolParams(WireModel):
    name: str
    #: Checked to be an object here (-32602 at admission, as any bad param); its members are
    #: the tool's to validate, once.
    arguments: Annotated[dict[str, Any] | None, PlainValidator(_json_object)] = None
    meta: RequestMeta | None = Field(default=None, alias="_meta")
    #: Present: the call is to run as a task (2025-11-25, basic/utilities/tasks).
    task: TaskMetadata | None = None


# -- tasks (2025-11-25, basic/utilities/tasks) -------------------------------------------------

#: A task's status on the wire. The rows' statuses map onto it (docs/tasks.md).
TaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]
#: ``_meta`` key that ties a message to its task (``tasks/result``'s result carries it).
RELATED_TASK_META = "io.modelcontextprotocol/related-task"


class Task(WireModel):
    """``Task``: a task's state. ``ttl`` is the retention granted (``None``: unlimited)."""

    task_id: str
    status: TaskStatus
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl: int | None
    poll_interval: int | None = None


class CreateTaskResult(WireModel):
    """The answer to a task-augmented request: the task, not the request's result."""

    task: Task
    meta: dict[str, Any] | None = Field(default=None, alias="_meta")


class GetTaskResult(Task):
    """``tasks/get``: the task itself."""


class CancelTaskResult(Task):
    """``tasks/cancel``: the task, ``cancelled``."""


class TaskIdParams(WireModel):
    """``tasks/get``, ``tasks/result``, ``tasks/cancel``: the task by its id."""

    task_id: str


# -- the Tasks extension (2026-07-28, io.modelcontextprotocol/tasks, SEP-2663) ---------------


class DetailedTask(WireModel):
    """SEP-2663's ``Task`` with its status's payload inlined: ``CreateTaskResult``
    (``resultType: "task"``) and ``GetTaskResult`` (``"complete"``). ``result`` (the
    ``CallToolResult``) only when ``completed``, ``error`` (the JSON-RPC error object) only
    when ``failed``. Milliseconds throughout; ``ttlMs`` is always present (``null``:
    unlimited), the one field that survives ``exclude_none``."""

    result_type: Literal["complete", "task"]
    task_id: str
    status: TaskStatus
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @model_serializer(mode="wrap")
    def _ttl_always(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        data.setdefault("ttlMs" if "taskId" in data else "ttl_ms", self.ttl_ms)
        return data


class UpdateTaskParams(WireModel):
    """``tasks/update``: answers to the task's outstanding ``inputRequests``, by key."""

    task_id: str
    input_responses: dict[str, Any]


class ListTasksParams(WireModel):
    cursor: str | None = None


class ListTasksResult(WireModel):
    tasks: list[Task]
    next_cursor: str | None = None


class TextContent(WireModel):
    type: Literal["text"] = "text"
    text: str


class CallToolResult(WireModel):
    content: list[TextContent]
    structured_content: dict[str, Any] | None = None
    is_error: bool = False


class EmptyResult(WireModel):
    """``ping`` and other acknowledgements answer with an empty object."""


#: Results a 2026-07-28 client may cache; they carry ``ttlMs`` and ``cacheScope``.
CACHEABLE_RESULTS: tuple[type[WireModel], ...] = (ListToolsResult, DiscoverResult)
