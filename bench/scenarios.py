"""The scenarios of issue 5 and their quick/full timings.

Every server gets the same load. Sessions are spread over ``generators`` load-generator
processes; the 1-session and 50-session loads use one (a second one only competes for the
same two cores), the 1,000-session and idle loads use two so that connecting is not
serialised through one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    active: int
    idle: int = 0
    pipeline: int = 1
    generators: int = 1
    warmup: float = 1.0
    duration: float = 4.0

    @property
    def sessions(self) -> int:
        return self.active + self.idle


def idle_scenario(idle: int, warmup: float, duration: float) -> Scenario:
    return Scenario(
        "idle",
        f"{idle:,} idle + 100 active",
        active=100,
        idle=idle,
        generators=2,
        warmup=warmup,
        duration=duration,
    )


# Quick keeps 2,000 idle sessions: opening 10,000 takes exai about a minute on its own.
QUICK: tuple[Scenario, ...] = (
    Scenario("seq1", "1 session, sequential", active=1, warmup=1.0, duration=3.0),
    Scenario("s50", "50 sessions", active=50, warmup=1.0, duration=4.0),
    Scenario("s1000", "1,000 sessions", active=1000, generators=2, warmup=2.0, duration=4.0),
    idle_scenario(2_000, warmup=1.0, duration=4.0),
)

FULL: tuple[Scenario, ...] = (
    replace(QUICK[0], warmup=2.0, duration=10.0),
    replace(QUICK[1], warmup=3.0, duration=15.0),
    Scenario(
        "s50p8", "50 sessions, 8 in flight each", active=50, pipeline=8, warmup=3.0, duration=15.0
    ),
    replace(QUICK[2], warmup=4.0, duration=15.0),
    idle_scenario(10_000, warmup=3.0, duration=15.0),
)

PROFILE = replace(QUICK[1], warmup=2.0, duration=10.0)


def by_key(mode: str) -> dict[str, Scenario]:
    return {s.key: s for s in (FULL if mode == "full" else QUICK)}
