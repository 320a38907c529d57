"""``exai trace``: read the JSON-lines log, filter it, follow it, lay one trace out in time.

The log is ``<state-dir>/logs/exai.log`` plus its rotated backups (``exai.log.1`` newest), read
oldest first so events come out in the order they were written. Lines that are not complete
JSON objects (a line being written while we read, or a foreign line) are skipped.

A *timeline* places every ``actor.message`` event of one trace (see :mod:`runtime.trace`) on
one time axis. Each event is logged when its handling ended, with how long it was handled and
how long it had waited in the mailbox, so: ``end = timestamp``, ``start = end - handled``,
``posted = start - waited``. Times are the node's wall clock at microsecond resolution.

Logged values may be a client's text, so everything printed goes through
:func:`storage.untrusted.printable` (the ``--json`` output is the log's own JSON, escaped).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from runtime.trace import TRACE_EVENT
from storage.untrusted import printable, printable_block

Event = dict[str, Any]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def log_files(path: Path) -> list[Path]:
    """``path`` and its rotated backups that exist, oldest first."""
    backups = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            backups.append((int(suffix), candidate))
    files = [p for _, p in sorted(backups, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def parse_line(line: str) -> Event | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def read_events(files: Iterable[Path]) -> Iterator[Event]:
    for path in files:
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue  # rotated away between listing and opening
        with handle:
            for line in handle:
                event = parse_line(line)
                if event is not None:
                    yield event


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no offset), or a duration ago: ``90s``, ``5m``, ``2h``, ``1d``."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO time (2026-11-24T10:00:00Z) nor a duration (5m, 2h)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def event_time(event: Event) -> datetime | None:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events to show. Every given criterion must hold.

    ``session``: the session id or a prefix of it. ``trace``: the trace id (also found in
    ``trace_ids`` of events that gather several traces). ``actor``: an actor path, matching
    it and everything under it (``/root/sessions`` matches every session); a value without a
    leading ``/`` matches any actor path or logger name containing it. ``event``: an event
    name, or a prefix ending in ``*`` (``session.*``).
    """

    session: str | None = None
    trace: str | None = None
    actor: str | None = None
    event: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, event: Event) -> bool:
        if self.session is not None:
            session = event.get("session_id")
            if not isinstance(session, str) or not session.startswith(self.session):
                return False
        if self.trace is not None and not _in_trace(event, self.trace):
            return False
        if self.actor is not None and not _actor_matches(event, self.actor):
            return False
        if self.event is not None:
            name = str(event.get("event", ""))
            if self.event.endswith("*"):
                if not name.startswith(self.event[:-1]):
                    return False
            elif name != self.event:
                return False
        if self.since is not None or self.until is not None:
            when = event_time(event)
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        return True


def _in_trace(event: Event, trace_id: str) -> bool:
    if event.get("trace_id") == trace_id:
        return True
    many = event.get("trace_ids")
    return isinstance(many, list) and trace_id in many


def _actor_matches(event: Event, wanted: str) -> bool:
    paths = [event.get(key) for key in ("actor", "path")]
    if wanted.startswith("/"):
        prefix = wanted.rstrip("/")
        return any(
            isinstance(path, str) and (path == prefix or path.startswith(prefix + "/"))
            for path in paths
        )
    names = [*paths, event.get("logger")]
    return any(isinstance(name, str) and wanted in name for name in names)


# -- one line per event ----------------------------------------------------------------------

_HEAD_FIELDS = ("timestamp", "level", "event", "logger", "actor", "trace_id", "session_id")


def format_event(event: Event) -> str:
    """One readable line: time, level, event, where, then the remaining fields."""
    when = event_time(event)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if when else "?"
    level = str(event.get("level", "")).upper()
    where = event.get("actor") or event.get("path") or event.get("logger") or ""
    parts = [stamp, f"{level:<7}", str(event.get("event", "?")), f"[{where}]"]
    if "trace_id" in event:
        parts.append(f"trace={event['trace_id']}")
    if "session_id" in event and str(event["session_id"]) not in str(where):
        parts.append(f"session={event['session_id']}")
    for key, value in event.items():
        if key in _HEAD_FIELDS or key in ("path", "exception"):
            continue
        parts.append(f"{key}={_short(value)}")
    # Values may be a client's text: escaped so that they can neither act on the terminal
    # nor start a line of their own (a forged event).
    line = printable(" ".join(parts))
    if "exception" in event:
        line += "\n" + printable_block(str(event["exception"]).rstrip())
    return line


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if " " not in text else json.dumps(text)


# -- following a growing, rotating file ------------------------------------------------------


def follow(path: Path, *, poll: float = 0.2, ready: TextIO | None = None) -> Iterator[Event]:
    """Events appended to ``path`` from now on, across rotations, until interrupted.

    Polls: a log file gives no event to wait on. ``ready`` gets one line once the end of the
    file has been reached, so a caller knows later lines will be seen.
    """
    handle: TextIO | None = None
    inode: int | None = None
    pending = ""
    announced = False
    while True:
        if handle is None:
            try:
                handle = path.open(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                if not announced and ready is not None:
                    ready.write(f"following {path} (not created yet)\n")
                    ready.flush()
                    announced = True
                time.sleep(poll)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if not announced:
                handle.seek(0, os.SEEK_END)  # from now on; earlier events: without --follow
        chunk = handle.read()
        if chunk:
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                event = parse_line(line)
                if event is not None:
                    yield event
            continue
        if not announced:
            if ready is not None:
                ready.write(f"following {path}\n")
                ready.flush()
            announced = True
        if _replaced(path, inode, handle.tell()):
            handle.close()
            handle = None  # rotated: the new file is read from its start
            continue
        time.sleep(poll)


def _replaced(path: Path, inode: int | None, position: int) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False  # between rename and re-create; look again next poll
    return stat.st_ino != inode or stat.st_size < position


# -- one trace as a timeline -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One unit of work of the trace; times in ms from the trace's first moment."""

    actor: str
    kind: str
    rpc_id: object
    outcome: str
    posted_ms: float
    start_ms: float
    end_ms: float
    event: Event

    @property
    def waited_ms(self) -> float:
        return self.start_ms - self.posted_ms

    @property
    def handled_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True, slots=True)
class Mark:
    """Any other event of the trace (a tool failure, a restart...), at its moment."""

    at_ms: float
    event: Event


@dataclass(frozen=True, slots=True)
class Timeline:
    trace_id: str
    origin: datetime
    steps: tuple[Step, ...]
    marks: tuple[Mark, ...]

    @property
    def total_ms(self) -> float:
        ends = [s.end_ms for s in self.steps] + [m.at_ms for m in self.marks]
        return max(ends, default=0.0)

    def per_actor(self) -> list[tuple[str, float, float]]:
        """``(actor, waited_ms, handled_ms)`` summed per actor, in order of first appearance."""
        totals: dict[str, list[float]] = {}
        for step in self.steps:
            total = totals.setdefault(step.actor, [0.0, 0.0])
            total[0] += step.waited_ms
            total[1] += step.handled_ms
        return [(actor, w, h) for actor, (w, h) in totals.items()]


def build_timeline(events: Iterable[Event], trace_id: str) -> Timeline | None:
    """The timeline of ``trace_id`` from ``events``; ``None`` if no event belongs to it."""
    spans: list[tuple[datetime, datetime, datetime, Event]] = []
    others: list[tuple[datetime, Event]] = []
    for event in events:
        if not _in_trace(event, trace_id):
            continue
        end = event_time(event)
        if end is None:
            continue
        if event.get("event") != TRACE_EVENT:
            others.append((end, event))
            continue
        start = end - timedelta(milliseconds=_number(event.get("handled_ms")))
        posted = start - timedelta(milliseconds=_number(event.get("waited_ms")))
        spans.append((posted, start, end, event))
    if not spans and not others:
        return None
    origin = min([s[0] for s in spans] + [o[0] for o in others])

    def ms(when: datetime) -> float:
        return (when - origin) / timedelta(milliseconds=1)

    steps = tuple(
        sorted(
            (
                Step(
                    actor=printable(str(event.get("actor", "?"))),
                    kind=printable(str(event.get("kind", "?"))),
                    rpc_id=event.get("rpc_id"),
                    outcome=str(event.get("outcome", "?")),
                    posted_ms=ms(posted),
                    start_ms=ms(start),
                    end_ms=ms(end),
                    event=event,
                )
                for posted, start, end, event in spans
            ),
            key=lambda s: (s.start_ms, s.end_ms),
        )
    )
    marks = tuple(sorted((Mark(ms(at), e) for at, e in others), key=lambda m: m.at_ms))
    return Timeline(trace_id, origin, steps, marks)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


BAR_WIDTH = 32


def render_timeline(timeline: Timeline) -> str:
    total = timeline.total_ms
    sessions = {str(s.event["session_id"]) for s in timeline.steps if "session_id" in s.event} | {
        str(m.event["session_id"]) for m in timeline.marks if "session_id" in m.event
    }
    head = f"trace {printable(timeline.trace_id)}"
    if sessions:
        head += f" · session {printable(', '.join(sorted(sessions)))}"
    head += f" · {timeline.origin.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]} UTC"
    head += f" · {total:.3f} ms end to end"
    lines = [head, ""]
    width = max([len(s.actor) for s in timeline.steps] + [5])
    kinds = [_kind(s) for s in timeline.steps]
    kind_width = max([len(k) for k in kinds] + [7])
    lines.append(
        f"{'start ms':>10}  {'wait ms':>9}  {'handle ms':>10}  {'actor':<{width}}  "
        f"{'message':<{kind_width}}  {'outcome':<9}  timeline"
    )
    for step, kind in zip(timeline.steps, kinds, strict=True):
        lines.append(
            f"{step.start_ms:>10.3f}  {step.waited_ms:>9.3f}  {step.handled_ms:>10.3f}  "
            f"{step.actor:<{width}}  {kind:<{kind_width}}  {step.outcome:<9}  "
            f"|{_bar(step, total)}|"
        )
    if timeline.steps:
        lines += ["", "time in each actor (waiting in its mailbox + handling):"]
        for actor, waited, handled in timeline.per_actor():
            lines.append(
                f"  {actor:<{width}}  {waited + handled:>10.3f} ms"
                f"  (wait {waited:.3f}, handle {handled:.3f})"
            )
    if timeline.marks:
        lines += ["", "other events of this trace:"]
        for mark in timeline.marks:
            lines.append(f"  +{mark.at_ms:.3f} ms  {format_event(mark.event)}")
    return "\n".join(lines) + "\n"


def _kind(step: Step) -> str:
    return step.kind if step.rpc_id is None else printable(f"{step.kind} #{step.rpc_id}")


def _bar(step: Step, total: float) -> str:
    """``·`` while the message waited in the mailbox, ``█`` while it was handled."""
    if total <= 0:
        return " " * BAR_WIDTH
    scale = BAR_WIDTH / total
    posted = min(int(step.posted_ms * scale), BAR_WIDTH - 1)
    start = min(max(int(step.start_ms * scale), posted), BAR_WIDTH - 1)
    end = min(max(round(step.end_ms * scale), start + 1), BAR_WIDTH)
    return " " * posted + "·" * (start - posted) + "█" * (end - start) + " " * (BAR_WIDTH - end)


def select(files: Sequence[Path], wanted: EventFilter) -> Iterator[Event]:
    return (event for event in read_events(files) if wanted.matches(event))


def node_logs(path: Path) -> list[list[Path]]:
    """The log of ``path`` (``<state-dir>/logs/exai.log``) with its backups, then, for a
    ``--workers`` server, each worker's (``<state-dir>/workers/<index>/logs/exai.log``), by
    index; only those that exist."""
    state_dir = path.parent.parent
    workers = sorted(
        (int(d.name), d / "logs" / path.name)
        for d in (state_dir / "workers").glob("*")
        if d.name.isdigit()
    )
    found = [log_files(path)] + [log_files(log) for _, log in workers]
    return [files for files in found if files]


def select_merged(logs: Sequence[Sequence[Path]], wanted: EventFilter) -> Iterator[Event]:
    """:func:`select` over several processes' logs at once (a ``--workers`` parent and its
    workers), in time order: each log is in order already, so they are merged, not sorted."""
    if len(logs) == 1:
        return select(logs[0], wanted)
    never = datetime.min.replace(tzinfo=UTC)
    return heapq.merge(
        *(select(files, wanted) for files in logs), key=lambda e: event_time(e) or never
    )
