"""When to try an upstream call again: ``Retry-After`` when the upstream says, else backoff."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from actors.providers.config import RetryPolicy


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds the upstream asks us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` is seconds or an HTTP date (RFC 9110); OpenAI also sends the finer
    ``retry-after-ms``. Unparseable or negative values count as absent.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
        return max(0.0, seconds)
    return seconds if seconds >= 0 else None


def backoff_delay(
    policy: RetryPolicy, attempt: int, retry_after: float | None, rng: random.Random
) -> float | None:
    """Seconds to sleep before attempt ``attempt + 1``; ``None``: do not retry.

    With ``retry_after``, wait that long plus up to 10 % (so that callers told the same
    moment do not all return in the same instant), unless it exceeds the policy's patience.
    Without it, full jitter: uniform in [0, min(max, base * 2**(attempt-1))] (AWS's
    "exponential backoff and jitter", which spreads retries best under contention).
    """
    if attempt >= policy.max_attempts:
        return None
    if retry_after is not None:
        if retry_after > policy.max_retry_after_seconds:
            return None
        return retry_after + rng.uniform(0, retry_after * 0.1)
    ceiling = min(policy.max_delay_seconds, policy.base_delay_seconds * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)
