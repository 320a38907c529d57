"""Structured logs: JSON lines to a rotated file under the state dir, and to the console.

Every event goes through one structlog pipeline and then to up to two outputs:

* **the log file** ``<state-dir>/logs/exai.log``: always JSON lines, rotated by size
  (``exai.log.1`` is the newest backup). It is what ``exai trace`` reads, so it is written
  whatever the console shows.
* **the console** (stderr): readable text on a terminal, JSON lines otherwise (log collectors,
  and the tests, which parse the server's stderr).

Secrets never reach either output: :func:`redact` runs on every event after tracebacks are
formatted, so a token inside an exception message is caught too. It masks the values of fields
named like a secret (``token``, ``api_key``, ``password``, ``authorization``...), bearer
credentials, secret-named query parameters (``?token=``), passwords in URLs, well-known API key
shapes, and every exact value registered with :func:`register_secret` (the server's tokens).

Client text is bounded and made safe on the way: :func:`clip_fields` bounds every string
field, and the console's text renderer gets the fields it prints raw escaped
(:func:`storage.untrusted.printable`); JSON lines escape control characters by themselves.

Levels: one global level plus per-logger overrides (``EXAI_LOG_LEVELS="trace=warning"``), so
the per-message trace events can be turned down without silencing the rest. Sampling of those
events is :mod:`runtime.trace`'s; :func:`configure_logging` hands it the configured rate.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import pydantic_core
import structlog
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from runtime import trace
from runtime.log_writer import LogWriter
from storage.untrusted import clip, printable, printable_block

LEVELS = ("debug", "info", "warning", "error", "critical")
REDACTED = "[REDACTED]"
LOG_DIR = "logs"
LOG_NAME = "exai.log"


def log_path(state_dir: Path) -> Path:
    """Where a server with this state dir writes its JSON-lines log."""
    return state_dir / LOG_DIR / LOG_NAME


class LogSettings(BaseSettings):
    """Log outputs, levels and trace sampling. Fields map to ``EXAI_<NAME>`` like
    :class:`runtime.config.Settings`; kept apart so that logging can be set up before, and
    independently of, the server's own settings (``exai bridge`` logs too)."""

    model_config = SettingsConfigDict(env_prefix="EXAI_", extra="ignore", frozen=True)

    log_console: Literal["auto", "text", "json", "off"] = Field(
        default="auto", description="stderr format; auto: text on a terminal, JSON otherwise."
    )
    log_console_trace: bool = Field(
        default=False,
        description="Print the per-message trace events (actor.message) on the console too. "
        "They always go to the log file; on the console they would double a service's log "
        "volume. Failed messages are printed either way.",
    )
    log_file_max_bytes: int = Field(
        default=32 * 1024 * 1024, ge=4096, description="Size at which the log file rotates."
    )
    log_file_backups: int = Field(default=5, ge=0, description="Rotated files kept.")
    # NoDecode: the variable is "name=level,...", not the JSON pydantic-settings expects for
    # a dict; the validator below parses it.
    log_levels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Per-logger levels, e.g. 'trace=warning,persistence=debug' (logger names "
        "are the first argument of structlog.get_logger: session, trace, persistence...).",
    )
    trace_sample: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of traces whose per-message events are logged (failures always are).",
    )

    @field_validator("log_levels", mode="before")
    @classmethod
    def _parse_levels(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        levels: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, level = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected logger=level, got {item!r}")
            levels[name.strip()] = level.strip()
        return levels

    @field_validator("log_levels")
    @classmethod
    def _known_levels(cls, value: dict[str, str]) -> dict[str, str]:
        for name, level in value.items():
            if level.lower() not in LEVELS:
                raise ValueError(f"{name}: level must be one of {', '.join(LEVELS)}")
        return {name: level.lower() for name, level in value.items()}


# -- redaction -------------------------------------------------------------------------------

_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "key",
        "apikey",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "cookie",
        "bearer",
    }
)
#: Fields the runtime itself writes on every event: never secrets, skipped for speed. Not
#: ``kind`` and ``rpc_id``: a peer's method and request id, its own words, which may hold
#: anything (a token pasted into a method name); ``kind`` is redacted through a cache
#: (:func:`_redacted_kind`: the kinds seen are few), ``rpc_id`` only when it is a string.
_SAFE_FIELDS = frozenset(
    {
        "level",
        "timestamp",
        "logger",
        "trace_id",
        "session_id",
        "actor",
        "outcome",
        "child",
        "depth",
        "capacity",
        "waited_ms",
        "handled_ms",
    }
)
#: The words of a field name: snake_case, kebab-case, camelCase and SHOUTING alike.
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_NAME = r"(?:[a-z0-9]+[_-])*(?:token|secret|password|passwd|api[_-]?key|key|authorization)"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization header values, in headers, reprs and prose alike.
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{4,}"), rf"\1\2{REDACTED}"),
    # key=value and "key": "value", e.g. ?token=..., api_key=..., {"password": "..."}.
    (
        re.compile(
            rf"(?i)(?<![a-z0-9])({_SECRET_NAME})(?![a-z0-9])([\"']?\s*[=:]\s*[\"']?)"
            r"(?!\[REDACTED\])(?!(?:bearer|basic)\s)[^\s\"'&,;}\])]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    # user:password@ in URLs (database URLs above all).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]+@"), rf"\1:{REDACTED}@"),
    # Shapes of well-known keys: OpenAI-style sk-..., GitHub, Slack, AWS access keys, JWTs.
    (
        re.compile(
            r"\b(?:sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}"
            r"|AKIA[0-9A-Z]{16}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
        ),
        REDACTED,
    ),
)
#: Cheap pre-check: a string matching none of these cannot match a pattern above.
_SUSPECT = re.compile(
    r"(?i)bearer|basic|token|secret|passw|key|auth|://|sk-|gh[pousr]_|xox|AKIA|eyJ"
)


class _KnownSecrets:
    """Exact secret values to mask; the pattern is rebuilt on each (rare) registration."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None


_known = _KnownSecrets()


def register_secret(value: str) -> None:
    """Mask every occurrence of ``value`` in every later event (the server's own tokens).

    Values shorter than 8 characters are ignored: masking them would mangle ordinary words.
    """
    if len(value) < 8:
        return
    with _known.lock:
        _known.values.add(value)
        alternatives = sorted(_known.values, key=len, reverse=True)
        _known.pattern = re.compile("|".join(re.escape(s) for s in alternatives))
    _redacted_short_kind.cache_clear()  # what it remembers was redacted without this secret


def secret_named(name: str) -> bool:
    """Whether a field (or header) named ``name`` holds a secret: one of its words is
    ``token``, ``key``, ``authorization``, ``cookie``..."""
    return _secret_named(name)


@functools.lru_cache(maxsize=4096)  # field names are few; bounded all the same
def _secret_named(name: str) -> bool:
    return any(word.lower() in _SECRET_WORDS for word in _WORDS.findall(name))


def redact_text(text: str) -> str:
    """``text`` with every secret it visibly contains masked."""
    known = _known.pattern
    if known is not None:
        text = known.sub(REDACTED, text)
    if _SUSPECT.search(text) is None:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


#: Longest kind remembered by :func:`_redacted_kind` (a peer's method may be a megabyte).
_KIND_CACHED_CHARS = 128


def _redacted_kind(kind: str) -> str:
    """A message's kind (a peer's method name, an actor message's type) redacted: one per
    event, mostly the same few, so remembered (forgotten when a secret is registered)."""
    if len(kind) > _KIND_CACHED_CHARS:
        return redact_text(kind)
    return _redacted_short_kind(kind)


@functools.lru_cache(maxsize=4096)  # the kinds of messages are few; a peer's many, bounded
def _redacted_short_kind(kind: str) -> str:
    return redact_text(kind)


def _redact_value(value: Any, *, secret: bool) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value  # counts and flags: `input_tokens=5` is not a secret
    if secret:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {
            key: _redact_value(item, secret=isinstance(key, str) and _secret_named(key))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item, secret=False) for item in value]
    # Anything else is rendered with repr() later: redact that text now.
    return redact_text(repr(value))


def redact(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every field (see the module doc)."""
    for key, value in event_dict.items():
        event_dict[key] = _redacted_field(key, value)
    return event_dict


def _redacted_field(key: str, value: Any) -> Any:
    """The value of the field ``key`` with its secrets masked: the one rule of
    :func:`redact` and of trace events' direct path (:func:`_trace_event`)."""
    if key in _SAFE_FIELDS:
        return value
    if key == "kind" and isinstance(value, str):
        return _redacted_kind(value)
    return _redact_value(value, secret=_secret_named(key))


# -- bounds ----------------------------------------------------------------------------------

#: Longest string value of a log field, in characters: client text (a method name, a name in
#: an error) must not fill the log and push its history out of rotation.
LOG_FIELD_CHARS = 4096
#: Tracebacks are ours and may be long; still bounded, since their messages may quote a client.
LOG_TRACEBACK_CHARS = 65536
_LONG_FIELDS = frozenset({"exception", "stack"})


def clip_fields(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: every string field clipped to :data:`LOG_FIELD_CHARS` (tracebacks
    to :data:`LOG_TRACEBACK_CHARS`) with a marker giving its real length. Runs after
    :func:`redact`, which must see a secret whole to recognise it."""
    for key, value in event_dict.items():
        event_dict[key] = _clipped_field(key, value)
    return event_dict


def _clipped_field(key: str, value: Any) -> Any:
    """The value of the field ``key`` within its bound (the rule of :func:`clip_fields`)."""
    if isinstance(value, str) and len(value) > LOG_FIELD_CHARS:
        return clip(value, LOG_TRACEBACK_CHARS if key in _LONG_FIELDS else LOG_FIELD_CHARS)
    return value


#: Fields structlog's ConsoleRenderer prints as they are (the others it prints with repr(),
#: which escapes control characters already).
_RAW_COLUMNS = frozenset({"event", "timestamp", "level", "logger", "logger_name"})


def _console_safe(event_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The event with what the console renderer prints raw made :func:`printable`: a client's
    name must not retitle the operator's terminal, clear it or start a forged line."""
    safe = dict(event_dict)
    for key, value in event_dict.items():
        if not isinstance(value, str):
            continue
        if key in _RAW_COLUMNS:
            safe[key] = printable(value)
        elif key in _LONG_FIELDS:
            safe[key] = printable_block(value)
    return safe


# -- outputs ---------------------------------------------------------------------------------


class RotatingFile:
    """An append-only file rotated by size; safe to write from any thread.

    Each line is flushed as it is written, so ``exai trace --follow`` and a crash both see
    every event that was logged. Created 0600: redaction is best effort, and logs hold
    session ids and client addresses anyway.
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file = self._open()
        self._size = self._file.tell()

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab")

    def write(self, lines: Sequence[bytes]) -> None:
        """Append ``lines`` (each a whole line), rotating between two lines where the next
        would pass ``max_bytes``; flushed once, at the end."""
        with self._lock:
            for line in lines:
                if self._size > 0 and self._size + len(line) > self._max_bytes:
                    self._rotate()
                self._file.write(line)  # buffered: the flush below is the system call
                self._size += len(line)
            self._file.flush()

    def _rotate(self) -> None:
        self._file.flush()
        self._file.close()
        if self._backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self._backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


def render_json(event_dict: Mapping[str, Any]) -> bytes:
    """One JSON line. pydantic-core's serializer: several times faster than ``json.dumps``,
    which matters on the per-message trace path. ASCII only: a client's U+2028 in a logged
    value must not split the line for readers that split on every Unicode line break."""
    line = pydantic_core.to_json(
        event_dict, fallback=repr, inf_nan_mode="strings", ensure_ascii=True
    )
    return line + b"\n"


@dataclass(frozen=True, slots=True)
class _Line:
    """One event as its outputs want it, made on the logging thread: ``json`` (the file's
    line, and the console's when it prints JSON; ``b""`` when neither wants it) and, when
    the console prints it, ``console``: ``True`` for the JSON line, else the event to render
    as text (on the writer's thread: the text renderer is the slow one)."""

    json: bytes
    console: bool | dict[str, Any]


@dataclass
class _Outputs:
    """The log file and the console, written by a :class:`~runtime.log_writer.LogWriter`
    thread: a caller renders its event's JSON line and queues it, never waiting on either
    output (``runtime/log_writer.py`` says why, and what a full queue does)."""

    file: RotatingFile | None = None
    console: TextIO | None = None
    console_text: structlog.dev.ConsoleRenderer | None = None
    console_trace: bool = True

    def __post_init__(self) -> None:
        self._writer: LogWriter[_Line] | None = None
        if self.file is not None or self.console is not None:
            self._writer = LogWriter(self._write_batch, self._dropped)

    def write(self, event_dict: dict[str, Any]) -> None:
        writer = self._writer
        if writer is None:
            return
        line = render_json(event_dict) if self.file or self.console_text is None else b""
        console: bool | dict[str, Any] = self.console is not None
        if (
            console
            and self.file is not None
            and not self.console_trace
            and event_dict.get("event") == trace.TRACE_EVENT
            and event_dict.get("outcome") == trace.OK
        ):
            console = False  # the file has it; see LogSettings.log_console_trace
        if console and self.console_text is not None:
            console = _console_safe(event_dict)
        if not console and self.file is None:
            return
        if event_dict.get("event") == trace.TRACE_EVENT and event_dict.get("outcome") == trace.OK:
            # One per message handled: queued, the event loop's time is what this saves.
            level = str(event_dict.get("level", "info"))
            writer.put(_Line(line, console), size=len(line), level=level)
        else:
            # Rare, and looked for as soon as what they tell has happened: written now, in
            # order after what is queued (runtime/log_writer.py).
            writer.write_now(_Line(line, console))

    def _write_batch(self, lines: Sequence[_Line]) -> None:
        """On the writer's thread: every line gathered, one write and flush per output."""
        if self.file is not None:
            self.file.write([line.json for line in lines if line.json])
        if self.console is None:
            return
        texts = []
        for line in lines:
            if line.console is True:
                texts.append(line.json.decode())
            elif isinstance(line.console, dict) and self.console_text is not None:
                texts.append(str(self.console_text(None, "", line.console)) + "\n")
        if texts:
            self.console.write("".join(texts))
            self.console.flush()

    def _dropped(self, counts: dict[str, int]) -> _Line:
        """The event that says how many lines a full queue dropped (a warning)."""
        event: dict[str, Any] = {
            "event": "logs.dropped",
            "dropped": counts,
            "logger": "logs",
            "level": "warning",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        return _Line(
            render_json(event),
            (_console_safe(event) if self.console_text is not None else True)
            if self.console is not None
            else False,
        )

    def flush(self) -> None:
        """Wait until every event logged so far is written (module doc of log_writer)."""
        if self._writer is not None:
            self._writer.flush()

    def dropped(self) -> int:
        """Lines dropped so far because the writer's queue was full."""
        return sum(self._writer.dropped.values()) if self._writer is not None else 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.file is not None:
            self.file.close()


class _Config:
    """What configure_logging chose. Loggers look it up per event, so loggers cached before
    a reconfiguration write to the new outputs."""

    outputs = _Outputs(console=sys.stderr)
    logger_levels: dict[str, int] = {}  # noqa: RUF012 - replaced whole, never mutated
    default_level = logging.INFO


_config = _Config()


class _Sink:
    """What structlog wraps: it only carries the logger's name and hands events on."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, event_dict: dict[str, Any]) -> None:
        _config.outputs.write(event_dict)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _sink_factory(*args: Any) -> _Sink:
    return _Sink(str(args[0]) if args else "exai")


def _name_and_filter(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Name the logger in the event, and apply its own level if it has one."""
    name = logger.name if isinstance(logger, _Sink) else "exai"
    event_dict.setdefault("logger", name)
    levels = _config.logger_levels
    if levels:
        wanted = levels.get(name, _config.default_level)
        if _METHOD_LEVELS.get(method_name, logging.INFO) < wanted:
            raise structlog.DropEvent
    return event_dict


_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _emit(logger: object, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    return ((dict(event_dict),), {})


class _StdlibBridge(logging.Handler):
    """Routes the standard library's records (psycopg, pykka, trio-websocket) through the same
    pipeline, so they are redacted and land in the log file too."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            level = record.levelname.lower()
            method = getattr(logger, level if level in _METHOD_LEVELS else "info")
            method(record.getMessage(), exc_info=record.exc_info or None)
        except Exception:
            self.handleError(record)


#: Fields of an ``actor.message`` event whose values :class:`runtime.trace.handling` makes
#: itself (actor paths, ids it generated, numbers): nothing a peer wrote, so neither redacted
#: nor clipped. The rest (``kind`` and ``rpc_id``, a peer's method and id; noted fields such
#: as a tool's name; an error's text) are redacted and clipped as any event's fields are.
_TRACE_OWN_FIELDS = frozenset(
    {
        "event",
        "logger",
        "level",
        "timestamp",
        "actor",
        "trace_id",
        "trace_ids",
        "session_id",
        "sender",
        "depth",
        "capacity",
        "waited_ms",
        "handled_ms",
        "outcome",
    }
)


def _trace_event(level: str, event: dict[str, Any]) -> None:
    """The direct path of ``actor.message`` events (:func:`runtime.trace.set_event_sink`):
    what the pipeline of :func:`configure_logging` does to them, without the steps that
    cannot apply (no context variables are bound through structlog; the event already names
    its trace, session and actor, which ``merge_trace`` would add; it carries no exception
    or stack), and with :func:`redact` and :func:`clip_fields` in one pass over the fields a
    peer may have written (:data:`_TRACE_OWN_FIELDS`). One of these per message every actor
    handles: a tenth of the event loop's time went to the general pipeline for these alone,
    and a third of what was left to redacting the event's own fields (issue 17)."""
    if _METHOD_LEVELS[level] < _config.logger_levels.get("trace", _config.default_level):
        return
    for key, value in event.items():
        if key not in _TRACE_OWN_FIELDS:
            event[key] = _clipped_field(key, _redacted_field(key, value))
    event["event"] = trace.TRACE_EVENT
    event["logger"] = "trace"
    event["level"] = level
    event["timestamp"] = _timestamps.now()
    _config.outputs.write(event)


class _Timestamps:
    """ISO 8601 UTC timestamps with microseconds, as structlog's ``TimeStamper(fmt="iso",
    utc=True)`` writes them (``2026-12-01T13:09:41.829987Z``), the whole seconds formatted
    once per second: ``datetime.isoformat`` per event was a visible share of a trace
    event's cost. Called from any thread (the tuple is replaced whole)."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def now(self) -> str:
        now = time.time_ns() // 1000
        second, micros = divmod(now, 1_000_000)
        cached, prefix = self._second
        if second != cached:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)
        return f"{prefix}.{micros:06d}Z"


_timestamps = _Timestamps()


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    log_file: Path | None = None,
    settings: LogSettings | None = None,
    cache: bool = True,
) -> None:
    """Configure structlog, the standard library's loggers and trace sampling.

    ``json`` forces the console format (``None``: ``settings.log_console``). ``log_file``
    turns on the rotated JSON-lines file. ``cache=False`` lets a process reconfigure levels
    (tests); the outputs follow every reconfiguration either way.
    """
    settings = settings or LogSettings()
    mapping = logging.getLevelNamesMapping()
    default_level = mapping[level.upper()]
    levels = {name: mapping[lvl.upper()] for name, lvl in settings.log_levels.items()}
    lowest = min([default_level, *levels.values()])

    console_format = settings.log_console
    if json is not None:
        console_format = "json" if json else "text"
    if console_format == "auto":
        console_format = "text" if sys.stderr.isatty() else "json"
    previous = _config.outputs
    _config.outputs = _Outputs(
        file=(
            RotatingFile(
                log_file,
                max_bytes=settings.log_file_max_bytes,
                backups=settings.log_file_backups,
            )
            if log_file is not None
            else None
        ),
        console=None if console_format == "off" else sys.stderr,
        console_text=(
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
            if console_format == "text"
            else None
        ),
        console_trace=settings.log_console_trace,
    )
    previous.close()
    _config.default_level = default_level
    _config.logger_levels = levels
    trace.set_sample_rate(settings.trace_sample)
    trace.set_event_sink(_trace_event)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            trace.merge_trace,
            _name_and_filter,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            clip_fields,
            _emit,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=cache,
    )
    root = logging.getLogger()
    root.handlers = [_StdlibBridge()]
    # Third-party libraries are chatty at INFO; their warnings and errors are what matter.
    root.setLevel(max(default_level, logging.WARNING))


def flush_logging() -> None:
    """Wait (a few seconds at most) until every event logged so far is written: before a
    process prints its last words, so that they come after its log lines."""
    _config.outputs.flush()


def dropped_log_lines() -> int:
    """Log lines dropped since logging was last configured, the writer's queue being full."""
    return _config.outputs.dropped()


def close_logging() -> None:
    """Write what is queued and close the outputs (end of the process, or between tests)."""
    previous, _config.outputs = _config.outputs, _Outputs(console=sys.stderr)
    previous.close()


@atexit.register
def _close_at_exit() -> None:
    # The writer thread is a daemon (runtime/log_writer.py): what it holds is written here.
    _config.outputs.close()
