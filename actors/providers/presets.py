"""Known upstreams: base URL, key variable, models, prices, timeouts, concurrency.

A preset only supplies defaults; any field set in the config file wins. Prices are USD per
million input/output tokens at the providers' standard (non-cached, non-batch) rates and
change over time: override them under ``prices`` in the config file when they do.

Sources, read 2026 (see docs/providers.md):

* GLM (Z.ai, international endpoint; ``https://open.bigmodel.cn/api/paas/v4`` is the mainland
  one): glm-4.6 and glm-4.5 at $0.60 / $2.20 (Z.ai's published rate as listed by Bifrost's cost
  calculator and PipeLLM's "official pricing" table; glm-4.5 as listed in hexdocs' agentic Z.ai
  provider).
* Kimi (Moonshot, international endpoint; ``https://api.moonshot.cn/v1`` is the mainland one):
  kimi-k2-thinking $0.60 / $2.50 and kimi-k2-turbo-preview $1.15 / $8.00 (cache-miss input),
  as listed in Lava's Moonshot provider reference.
* OpenAI: gpt-5 $1.25 / $10, gpt-5-mini $0.25 / $2, gpt-4.1 $2 / $8, gpt-4.1-mini $0.40 / $1.60,
  gpt-4o-mini $0.15 / $0.60 (OpenAI's pricing page, as tabulated March 2026 by Deploybase).

Timeouts and concurrency of GLM and Kimi are those of the EX-AI MCP server this project upgrades
(github.com/Zazzles2908/EX-AI-MCP-Server): GLM 30 s and 4 calls at once, Kimi 40 s and 6.
"""

from __future__ import annotations

from typing import Any, Literal

PresetName = Literal["glm", "kimi", "openai"]


def _prices(table: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    return {
        model: {"input_per_million": inp, "output_per_million": out}
        for model, (inp, out) in table.items()
    }


PRESETS: dict[str, dict[str, Any]] = {
    "glm": {
        "base_url": "https://api.z.ai/api/paas/v4",
        "api_key_env": "GLM_API_KEY",
        "default_model": "glm-4.6",
        "prices": _prices({"glm-4.6": (0.60, 2.20), "glm-4.5": (0.60, 2.20)}),
        "timeout_seconds": 30.0,
        "limits": {"max_concurrency": 4},
        # GLM and Kimi report usage in a stream's last chunk unasked; an unknown field is
        # a risk not worth taking.
        "stream_usage_option": False,
    },
    "kimi": {
        "base_url": "https://api.moonshot.ai/v1",
        "api_key_env": "MOONSHOT_API_KEY",
        "default_model": "kimi-k2-thinking",
        "prices": _prices(
            {"kimi-k2-thinking": (0.60, 2.50), "kimi-k2-turbo-preview": (1.15, 8.00)}
        ),
        "timeout_seconds": 40.0,
        "limits": {"max_concurrency": 6},
        "stream_usage_option": False,
    },
    "openai": {
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY",
        "default_model": "gpt-5-mini",
        "prices": _prices(
            {
                "gpt-5": (1.25, 10.00),
                "gpt-5-mini": (0.25, 2.00),
                "gpt-4.1": (2.00, 8.00),
                "gpt-4.1-mini": (0.40, 1.60),
                "gpt-4o-mini": (0.15, 0.60),
            }
        ),
        "timeout_seconds": 60.0,
        "stream_usage_option": True,
        # OpenAI's reasoning models (gpt-5, o-series) refuse `max_tokens`.
        "max_tokens_field": "max_completion_tokens",
    },
}

# Hosts that identify a preset when only EXAI_UPSTREAM_BASE_URL is given.
PRESET_HOSTS: dict[str, str] = {
    "api.z.ai": "glm",
    "open.bigmodel.cn": "glm",
    "api.moonshot.ai": "kimi",
    "api.moonshot.cn": "kimi",
    "api.openai.com": "openai",
}
