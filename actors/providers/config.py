"""Upstream configuration: providers from a TOML file, or one provider from the environment.

The file's ``[upstream]`` table (the rest of the file belongs to other settings)::

    [upstream]
    default_provider = "glm"

    [upstream.client_limits]       # each client identity, all its sessions together
    requests_per_minute = 30

    [upstream.providers.glm]
    preset = "glm"                 # base URL, key variable, models, prices, timeout, concurrency
    [upstream.providers.glm.limits]
    requests_per_minute = 60

With no file, ``EXAI_UPSTREAM_BASE_URL``, ``EXAI_UPSTREAM_API_KEY`` and ``EXAI_UPSTREAM_MODEL``
describe one provider; its preset is recognised from the URL's host when it is a known one.

API keys are :class:`pydantic.SecretStr` from the moment they are read: their repr, their
``model_dump`` and every error message built here show ``**********`` or nothing. Validation
errors are rebuilt without the offending input, because pydantic's own message quotes it (a
key under a misspelt field name would otherwise be printed in full).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.providers.errors import ProviderNotConfigured
from actors.providers.presets import PRESET_HOSTS, PRESETS, PresetName
from actors.providers.usage import Price
from actors.rate_ledger import ClientLimits, ProviderLimits
from runtime.breaker import BreakerConfig

ENV_BASE_URL = "EXAI_UPSTREAM_BASE_URL"
ENV_API_KEY = "EXAI_UPSTREAM_API_KEY"
ENV_MODEL = "EXAI_UPSTREAM_MODEL"

HOW_TO_CONFIGURE = (
    f"set {ENV_BASE_URL}, {ENV_API_KEY} and {ENV_MODEL}, or add an "
    '[upstream.providers.<name>] table (preset = "glm", "kimi" or "openai") to the config '
    "file (--config or EXAI_CONFIG); see docs/providers.md"
)


class UpstreamConfigError(ValueError):
    """The upstream configuration is invalid; the message is for the operator, key-free."""


class RetryPolicy(BaseModel):
    """Retries of 429, 5xx and dropped connections, with full-jitter exponential backoff."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=3, ge=1, description="Attempts, the first included.")
    base_delay_seconds: float = Field(default=0.5, ge=0)
    max_delay_seconds: float = Field(default=8.0, ge=0)
    max_retry_after_seconds: float = Field(
        default=30.0,
        ge=0,
        description="A Retry-After longer than this is not waited for: the call fails with it.",
    )


class ProviderSettings(BaseModel):
    """One OpenAI-compatible upstream. A ``preset`` fills every field it knows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    preset: PresetName | None = None
    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(
        default=None, description="Variable the key is read from when api_key is not set."
    )
    default_model: str = Field(min_length=1)
    models: tuple[str, ...] = Field(
        default=(),
        description="The models a client may ask for; any other is refused before anything "
        "goes upstream. Default: the models with a price, and the default model.",
    )
    prices: dict[str, Price] = Field(default_factory=dict)
    timeout_seconds: float = Field(
        default=60.0, gt=0, description="A whole answer; for a stream, its first chunk."
    )
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    stream_idle_timeout_seconds: float | None = Field(
        default=None, gt=0, description="Longest gap between stream chunks (timeout_seconds)."
    )
    stream_usage_option: bool = Field(
        default=True, description="Send stream_options.include_usage (OpenAI needs it)."
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    limits: ProviderLimits = Field(default_factory=ProviderLimits)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("preset") in PRESETS:
            data = _merge(PRESETS[data["preset"]], data)
        if "models" not in data:
            # Priced models only (an unpriced one would slip past cost quotas), and the
            # default model, which the operator named.
            prices = data.get("prices")
            priced = list(prices) if isinstance(prices, dict) else []
            default = data.get("default_model")
            data = {**data, "models": sorted({*priced, *([default] if default else [])})}
        return data

    @model_validator(mode="after")
    def _default_model_offered(self) -> ProviderSettings:
        if self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not in models; add it, or leave "
                "models out (default: the priced models and the default model)"
            )
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        return value.rstrip("/")

    @property
    def stream_idle_timeout(self) -> float:
        return self.stream_idle_timeout_seconds or self.timeout_seconds

    def price(self, model: str) -> Price | None:
        return self.prices.get(model)


class UpstreamConfig(BaseModel):
    """Every upstream, which one ``chat`` uses by default, and the per-client limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    default_provider: str | None = None
    # `session_limits` is the name these had while they were kept per connection.
    client_limits: ClientLimits = Field(
        default_factory=ClientLimits,
        validation_alias=AliasChoices("client_limits", "session_limits"),
    )

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        # `[upstream.providers.glm]` names the provider "glm"; the table need not repeat it.
        if isinstance(data, dict) and isinstance(data.get("providers"), dict):
            providers = {
                name: {"name": name, **table} if isinstance(table, dict) else table
                for name, table in data["providers"].items()
            }
            return {**data, "providers": providers}
        return data

    @model_validator(mode="after")
    def _default_exists(self) -> UpstreamConfig:
        if self.default_provider is not None and self.default_provider not in self.providers:
            known = ", ".join(sorted(self.providers)) or "none"
            raise ValueError(
                f"default_provider {self.default_provider!r} is not a configured provider "
                f"(configured: {known})"
            )
        return self

    @property
    def configured(self) -> bool:
        return bool(self.providers)

    def provider(self, name: str | None = None) -> ProviderSettings:
        """The named provider, or the default one; :class:`ProviderNotConfigured` if none."""
        if not self.providers:
            raise ProviderNotConfigured(
                f"no upstream LLM provider is configured: {HOW_TO_CONFIGURE}"
            )
        if name is None:
            name = self.default_provider or next(iter(self.providers))
        settings = self.providers.get(name)
        if settings is None:
            known = ", ".join(sorted(self.providers))
            raise ProviderNotConfigured(
                f"no upstream provider named {name!r} is configured (configured: {known})",
                provider=name,
            )
        return settings

    def provider_limits(self) -> dict[str, ProviderLimits]:
        return {name: settings.limits for name, settings in self.providers.items()}


def load_upstream(path: Path | None = None, env: Mapping[str, str] | None = None) -> UpstreamConfig:
    """The file's ``[upstream]`` providers plus the one ``EXAI_UPSTREAM_*`` describes, if any.

    A provider name defined in both is an error rather than a silent precedence rule.
    Raises :class:`UpstreamConfigError` with a message naming the setting at fault.
    """
    environ: Mapping[str, str] = env if env is not None else {}
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UpstreamConfigError(f"cannot read config file {path}: {exc}") from None
        section = document.get("upstream", {})
        if not isinstance(section, dict):
            raise UpstreamConfigError(f"{path}: [upstream] must be a table")
        data = dict(section)
    from_env = _provider_from_env(environ)
    if from_env is not None:
        providers = dict(data.get("providers") or {})
        if from_env["name"] in providers:
            raise UpstreamConfigError(
                f"provider {from_env['name']!r} is defined both in the config file and by "
                f"{ENV_BASE_URL}: keep one"
            )
        providers[from_env["name"]] = from_env
        data["providers"] = providers
    config = _validate(data)
    return _with_keys(config, environ)


def _provider_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    base_url = env.get(ENV_BASE_URL)
    api_key = env.get(ENV_API_KEY)
    model = env.get(ENV_MODEL)
    if not (base_url or api_key or model):
        return None
    if not base_url:
        raise UpstreamConfigError(f"{ENV_API_KEY} or {ENV_MODEL} is set but {ENV_BASE_URL} is not")
    preset = PRESET_HOSTS.get(urlsplit(base_url).hostname or "")
    if model is None and preset is None:
        raise UpstreamConfigError(
            f"{ENV_MODEL} is required: {base_url} is not a known provider with a default model"
        )
    table: dict[str, Any] = {
        "name": preset or "upstream",
        "preset": preset,
        "base_url": base_url,
        "api_key_env": ENV_API_KEY,
    }
    if model:
        table["default_model"] = model
    return table


def _with_keys(config: UpstreamConfig, env: Mapping[str, str]) -> UpstreamConfig:
    """Read each key from its variable; a preset provider without a key is an error.

    A provider without a preset and without ``api_key_env`` may have no key at all (a local
    server, say): it is then called without an Authorization header.
    """
    resolved: dict[str, ProviderSettings] = {}
    for name, settings in config.providers.items():
        key = settings.api_key
        if key is None and settings.api_key_env:
            value = env.get(settings.api_key_env)
            key = SecretStr(value) if value else None
            if key is None and settings.preset is not None:
                raise UpstreamConfigError(
                    f"provider {name!r} has no API key: set {settings.api_key_env}, or api_key "
                    f"in [upstream.providers.{name}]"
                )
        resolved[name] = settings.model_copy(update={"api_key": key})
    return config.model_copy(update={"providers": resolved})


def _validate(data: dict[str, Any]) -> UpstreamConfig:
    try:
        return UpstreamConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'upstream'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise UpstreamConfigError(f"invalid [upstream] configuration: {problems}") from None


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``defaults``, table by table (a preset's limits keep what is unset)."""
    merged = dict(defaults)
    for key, value in overrides.items():
        base = merged.get(key)
        if isinstance(base, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(base, value)
        else:
            merged[key] = value
    return merged
