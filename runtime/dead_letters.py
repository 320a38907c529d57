"""Dead letters: messages that could not be delivered, each counted and logged (the log lines
throttled per reason, since a peer can cause them: see ``runtime.log_throttle``).

A message is dead when its target's mailbox is full under the ``drop`` policy, when the target
has stopped, or when an ask outlives the actor that should have answered it. Nothing is
retried here: the point is that no message disappears without a trace.
"""

from __future__ import annotations

import threading
from collections import Counter

import structlog

from runtime.log_throttle import LogThrottle

log = structlog.get_logger("dead_letters")


class DeadLetters:
    """Process-wide tally of undeliverable messages, by reason. Safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_reason: Counter[str] = Counter()
        self._throttle = LogThrottle()

    def record(self, *, target: str, sender: str, reason: str, kind: str) -> None:
        """Count one dead letter and log it, throttled per reason and kind (the next line
        carries how many were not logged, as ``suppressed``)."""
        with self._lock:
            self._by_reason[reason] += 1
        self._throttle.emit(
            log.warning,
            "dead_letter",
            key=f"{reason}/{kind}",
            target=target,
            sender=sender,
            reason=reason,
            kind=kind,
        )

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_reason.values())

    def by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_reason)


#: The process's dead-letter office. Module-level because, like a post office, there is one.
dead_letters = DeadLetters()
