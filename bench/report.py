"""The results table, the issue's targets as PASS/MISS lines, and docs/benchmarks.md.

``docs/benchmarks.md`` keeps every run under its own "End-to-end" heading: the newest run goes
right under the marker line, older runs stay below it, so the trend reads top to bottom. Other
sections of the file (``bench.actors`` writes its own) are left where they are.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.runner import Measurement
from bench.targets import LABELS

MARKER = "<!-- bench: newest results first; `python -m bench` inserts below this line -->"

TITLE = "# Benchmarks\n"

SECTION = f"""## End-to-end: exai serve, the floor and the SDK servers (issue 5)

End-to-end numbers of issue 5: `exai serve` side by side with the bare trio-websocket floor and
the official MCP SDK servers, same load, same run, same 2-core machine. Made by
`python -m bench` (quick) or `python -m bench full`; how it measures is in `bench/README.md`.
Read them as ratios within one table: the machine is shared and noisy.

Columns: calls/s over the measured window (all sessions together); latency percentiles of the
calls answered in it; server CPU s = utime+stime of the server process over the window (for
exai, `+ db` is its embedded Postgres); CPU µs/call = both divided by the calls; peak RSS =
VmHWM of the server process; client CPU s = the load generators' own CPU over the window (when
server + client CPU approach 2 s per second of window, the two cores are saturated); other CPU s
= what the rest of the machine burnt meanwhile (noise: other work on the shared machine);
KiB/idle = (RSS with all sessions connected, before any calls - RSS before) / sessions.

{MARKER}
"""


@dataclass(frozen=True)
class Target:
    """One of issue 5's targets, checked on the ratios of a single run."""

    label: str
    verdict: str  # PASS, MISS or n/a
    detail: str

    def line(self) -> str:
        return f"{self.verdict} {self.label}: {self.detail}"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return f"{cores} cores{f' ({model})' if model else ''}, Python {platform.python_version()}"


def _find(ms: Sequence[Measurement], scenario: str, server: str) -> Measurement | None:
    for m in ms:
        if m.scenario == scenario and m.server == server and not m.failure and m.calls:
            return m
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _throughput(m: Measurement | None) -> float | None:
    return m.throughput if m else None


def targets(ms: Sequence[Measurement]) -> list[Target]:
    """Issue 5's targets; never asserted, only reported. A run of exai that lost calls (stalled
    sessions, errors) is a MISS whatever its numbers; a faulty anchor makes the target n/a."""
    out: list[Target] = []

    def check(
        label: str,
        value: float | None,
        ok: bool,
        text: str,
        *involved: Measurement | None,
        before_calls: bool = False,
    ) -> None:
        """``before_calls``: the value was read before any call, only failed opens spoil it."""
        if value is None or any(m is None for m in involved):
            out.append(Target(label, "n/a", "not measured in this run"))
            return
        for m in involved:
            if m is None:
                continue
            faults = m.faults if not before_calls else m.open_faults
            if faults and m.server == "exai":
                out.append(Target(label, "MISS", f"{text}, not valid: exai {faults}"))
                return
            if faults:
                out.append(Target(label, "n/a", f"{m.server} run not clean: {faults}"))
                return
        out.append(Target(label, "PASS" if ok else "MISS", text))

    exai50, floor50, sdk50 = (_find(ms, "s50", s) for s in ("exai", "floor", "sdk"))
    r = _ratio(_throughput(exai50), _throughput(floor50))
    check(
        "50 sessions, throughput exai/floor >= 0.5x",
        r,
        r is not None and r >= 0.5,
        f"{r or 0:.2f}x",
        exai50,
        floor50,
    )
    r = _ratio(_throughput(exai50), _throughput(sdk50))
    check(
        "50 sessions, throughput exai/SDK >= 3x",
        r,
        r is not None and r >= 3.0,
        f"{r or 0:.2f}x",
        exai50,
        sdk50,
    )
    exai1, floor1 = _find(ms, "seq1", "exai"), _find(ms, "seq1", "floor")
    r = _ratio(exai1.p50_ms if exai1 else None, floor1.p50_ms if floor1 else None)
    check(
        "1 session, p50 exai/floor <= 1.5x",
        r,
        r is not None and r <= 1.5,
        f"{r or 0:.2f}x ({exai1.p50_ms or 0:.3f} vs {floor1.p50_ms or 0:.3f} ms)"
        if exai1 and floor1
        else "",
        exai1,
        floor1,
    )
    idle = _find(ms, "idle", "exai")
    n = f"{idle.idle:,}" if idle else "10,000"
    small = idle is not None and idle.idle < 10_000
    kib = idle.kib_per_idle_session if idle else None
    check(
        f"{n} idle sessions, <= 64 KiB per idle session",
        kib,
        kib is not None and kib <= 64.0,
        f"{kib or 0:.1f} KiB",
        idle,
        before_calls=True,
    )
    # Issue 17's: against the mcp 2.x low-level server (full runs), and CPU per call.
    mcp2 = _find(ms, "s50", "mcp2")
    r = _ratio(_throughput(exai50), _throughput(mcp2))
    check(
        "50 sessions, throughput exai/SDK 2.3 low-level >= 1.0x (issue 17)",
        r,
        r is not None and r >= 1.0,
        f"{r or 0:.2f}x",
        exai50,
        mcp2,
    )
    calls = exai50.calls if exai50 else 0
    per_call = exai50.server_cpu_s / calls * 1e6 if exai50 and calls else None
    db = exai50.db_cpu_s / calls * 1e6 if exai50 and calls else 0.0
    check(
        "50 sessions, exai server CPU per call <= 100 us, the database's apart (issue 17)",
        per_call,
        per_call is not None and per_call <= 100.0,
        f"{per_call or 0:,.0f} us (the embedded Postgres {db:,.0f} us more)",
        exai50,
    )
    p99 = idle.p99_ms if idle else None
    check(
        f"{n} idle sessions, p99 of the 100 active < 50 ms"
        + (" (the target is set at 10,000: see `full`)" if small else ""),
        p99,
        p99 is not None and p99 < 50.0,
        f"{p99 or 0:.1f} ms",
        idle,
    )
    return out


def busy_machine_note(ms: Sequence[Measurement], threshold: float = 0.25) -> str | None:
    """A warning when other work took more than ``threshold`` of a core during some window."""
    worst = max((m.other_cpu_s / m.duration_s for m in ms if m.duration_s), default=0.0)
    if worst <= threshold:
        return None
    return (
        f"the machine was busy with other work during this run (up to {worst:.1f} cores "
        "besides the benchmark, see `other CPU s`): absolute numbers are low and ratios noisy"
    )


def _cell(text: str, limit: int = 160) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.replace("|", "/").split())[:limit]


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _ratio_cell(m: Measurement, other: Measurement | None) -> str:
    if m.server != "exai" or other is None or m.failure or not m.calls:
        return ""
    if m.faults:
        return "not valid"
    t = _ratio(m.throughput, other.throughput)
    p = _ratio(m.p50_ms, other.p50_ms)
    return f"{t:.2f}x, {p:.2f}x" if t is not None and p is not None else ""


def table(ms: Sequence[Measurement], titles: dict[str, str]) -> str:
    head = (
        "| scenario | server | calls/s | p50 ms | p90 ms | p99 ms | max ms | server CPU s "
        "| CPU µs/call | peak RSS MiB | KiB/idle | client CPU s | other CPU s | errors "
        "| exai/floor (calls/s, p50) | exai/SDK (calls/s, p50) |"
    )
    rows = [head, "|" + "---|" * 16]
    for m in ms:
        label = LABELS.get(m.server, m.server)
        title = titles.get(m.scenario, m.scenario)
        if m.failure:
            rows.append(f"| {title} | {label} | failed: {_cell(m.failure)} |" + " |" * 13)
            continue
        per_call = m.server_cpu_us_per_call
        if per_call is None:
            rows.append(f"| {title} | {label} | 0 | no calls answered |" + " |" * 12)
            continue
        cpu = f"{m.server_cpu_s:.2f}" + (f" + db {m.db_cpu_s:.2f}" if m.db_cpu_s else "")
        kib = m.kib_per_idle_session
        cells = [
            title,
            label,
            f"{m.throughput:,.0f}",
            _ms(m.p50_ms),
            _ms(m.p90_ms),
            _ms(m.p99_ms),
            _ms(m.max_ms),
            cpu,
            f"{per_call:.0f}",
            f"{m.peak_rss_kib / 1024:.1f}",
            "" if kib is None else f"{kib:.1f}",
            f"{m.client_cpu_s:.2f}",
            f"{m.other_cpu_s:.2f}",
            str(m.errors + m.connect_failed)
            + (f" ({m.stalled_sessions} stalled)" if m.stalled_sessions else ""),
            _ratio_cell(m, _find(ms, m.scenario, "floor")),
            _ratio_cell(m, _find(ms, m.scenario, "sdk")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def section(
    ms: Sequence[Measurement], titles: dict[str, str], mode: str, notes: Sequence[str]
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"### {stamp} · `{mode}` · {machine()}", "", table(ms, titles), ""]
    if mode != "profile":
        lines += ["Targets (issues 5 and 17, ratios within this run):", ""]
        lines += [f"- {t.line()}" for t in targets(ms)]
    extra = list(notes)
    busy = busy_machine_note(ms)
    if busy:
        extra.insert(0, busy)
    for m in ms:
        where = f"{titles.get(m.scenario, m.scenario)} / {LABELS.get(m.server, m.server)}"
        if m.active + m.idle >= 1000 and m.connect_s and not m.failure:
            rate = (m.active + m.idle) / m.connect_s
            extra.append(f"{where}: sessions opened in {m.connect_s:.1f} s ({rate:,.0f}/s)")
        if m.first_error:
            extra.append(f"{where}: first error: `{_cell(m.first_error, 200)}`")
        if m.stalled_sessions:
            extra.append(
                f"{where}: {m.stalled_sessions} of {m.active} active sessions got no answer "
                "inside the window (stalled)"
            )
        if m.unfinished_sessions:
            extra.append(
                f"{where}: {m.unfinished_sessions} sessions still waiting for an answer "
                "3 s after the window"
            )
    if extra:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in extra]
    return "\n".join(lines) + "\n"


def append(
    path: Path, text: str, marker: str = MARKER, heading: str = SECTION, *, first: bool = False
) -> None:
    """Insert ``text`` as the newest run of ``path`` right under ``marker``; the file and the
    section (``heading``, which ends with ``marker``) are created when missing: at the end of
    the file, or right under its title with ``first``. Other sections are kept as they are.
    The defaults are the End-to-end section's."""
    current = path.read_text() if path.exists() else TITLE
    if marker not in current and first and current.startswith(TITLE):
        current = TITLE + "\n" + heading + "\n" + current[len(TITLE) :].lstrip("\n")
    elif marker not in current:
        current = current.rstrip("\n") + "\n\n" + heading
    before, after = current.split(marker, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    rest = after.lstrip("\n")
    path.write_text(before + marker + "\n\n" + text + ("\n" + rest if rest else ""))


def notes_section(
    notes: Sequence[str], labelled: Sequence[tuple[str, Measurement]], busy_cores: float
) -> list[str]:
    """The "Notes:" lines of a mode's table: a busy-machine warning first (``busy_cores``: the
    threshold of :func:`busy_machine_note`), then ``notes``, then each measurement's first
    error and stalled clients, named by its label; nothing when there is nothing to say."""
    extra = list(notes)
    busy = busy_machine_note([m for _, m in labelled], busy_cores)
    if busy:
        extra.insert(0, busy + "; preliminary figures, to be re-run on a quiet machine")
    for where, m in labelled:
        if m.first_error:
            extra.append(f"{where}: first error: `{_cell(m.first_error, 200)}`")
        if m.stalled_sessions:
            extra.append(f"{where}: {m.stalled_sessions} of {m.active} clients stalled")
    return ["", "Notes:", ""] + [f"- {n}" for n in extra] if extra else []
