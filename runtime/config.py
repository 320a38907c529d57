"""Server configuration: one validated model for flags, environment and defaults.

Every knob lives here so that a bad value is refused once, at start-up, with a message that
names the setting, instead of surfacing later as a confusing failure deep in a session.
Precedence, highest first: command-line flag, ``EXAI_*`` environment variable, default.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """The configuration is invalid; the message is meant for the operator as it is."""


class Settings(BaseSettings):
    """Everything ``exai serve`` can be told. Field names map to ``EXAI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EXAI_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to listen on.")
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    state_dir: Path = Field(
        default=Path(".exai"),
        description="Token, server.json, embedded Postgres data and journals live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; when unset an embedded Postgres runs under the state dir.",
    )
    token: str | None = Field(
        default=None,
        min_length=16,
        description="Client token; when unset one is generated and kept in <state-dir>/token.",
    )
    max_sessions: int = Field(
        default=10_000, ge=1, description="Concurrent sessions; more are refused with HTTP 503."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest WebSocket message accepted; larger ones close the socket (1009).",
    )
    session_mailbox: int = Field(
        default=64,
        ge=1,
        description="Capacity of each session actor's mailbox (messages waiting to be handled).",
    )
    session_max_restarts: int = Field(
        default=3,
        ge=0,
        description="Session actor restarts tolerated within the period before the socket "
        "is closed with 1011 (OTP intensity).",
    )
    session_restart_period: float = Field(
        default=10.0, gt=0, description="Seconds over which session restarts are counted."
    )
    max_inflight_per_session: int = Field(
        default=8, ge=1, description="Concurrent tools/call requests one session may run."
    )
    max_inflight_total: int = Field(
        default=1024, ge=1, description="Concurrent tools/call requests over all sessions."
    )
    heartbeat_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds of tool silence after which a heartbeat progress is sent "
        "(only to requests that carry a progress token).",
    )
    page_size: int = Field(default=50, ge=1, description="Items per page of list results.")
    resume_grace: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a session whose socket dropped can be resumed by presenting its "
        "id (Mcp-Session-Id header or ?session=); 0 disables resume.",
    )
    journal_max_bytes: int = Field(
        default=128 * 2**20,
        ge=2**16,
        description="Bound of the write journal kept while the database is away; when it is "
        "full, new tool calls are refused with 'storage unavailable'.",
    )
    root_max_restarts: int = Field(
        default=5, ge=0, description="Restarts of the root's children tolerated per period."
    )
    root_restart_period: float = Field(
        default=60.0, gt=0, description="Seconds over which the root counts restarts."
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    test_faults: bool = Field(
        default=False,
        description="Enable test-only fault injection (never in production).",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return level

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @property
    def token_file(self) -> Path:
        return self.state_dir / "token"

    @property
    def server_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "pg"


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment plus explicit overrides (CLI flags).

    Overrides whose value is ``None`` are ignored so that an absent flag falls through to the
    environment. Raises :class:`ConfigError` with one line per invalid setting.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(
                f"  {name} (--{name.replace('_', '-')} / EXAI_{name.upper()}): {error['msg']}"
            )
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
