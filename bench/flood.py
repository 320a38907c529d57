"""``python -m bench flood``: a quiet session beside sessions that flood the server (issue 11).

Each phase gets a fresh ``exai serve`` (its defaults, plus any ``--exai-env KEY=VALUE``) so that
its RSS growth and latencies are its own, except ``after``, which reuses the previous phase's
server. In each, a quiet session (``bench.loadgen``, one sequential ``tools/call echo`` at a
time, its own process) is measured for a window, alone or beside one flooding session
(``bench.flooder``, its own process, started first so that its flood is under way before the
quiet window opens):

alone     the quiet session alone: the baseline p50/p99
pipeline  beside a client that pipelines echo requests as fast as the socket takes them and
          reads every reply
slow      beside a client that pipelines 64 KiB echo requests and reads one frame per 100 ms
noread    beside a client that sends 512 KiB echo requests (512 MiB at most) and never reads
after     the quiet session alone again: has the server recovered?

The server's VmRSS is sampled every 50 ms through each phase, from just before the flooder
starts until its result is in: growth = peak - the phase's starting RSS. A harness guard stops a
flooder whose server grew by more than ``--rss-guard-mib`` (the report says so). Every wait is
bounded: the flooder stops when the quiet window has closed, reads what is left for a few
seconds, and requests still without an answer then are counted as unanswered (silence).

The issue's targets are reported as PASS/MISS, never asserted: the quiet p99 beside either
flood <= 3x its baseline and <= 50 ms; RSS growth under the non-reading flood < 200 MiB; the
pipelining flooder gets busy errors (-32000), never silence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import proc, report
from bench.launch import Owned
from bench.own_plan import exai_env
from bench.runner import Measurement, RunOptions, measure
from bench.scenarios import Scenario
from bench.targets import REPO, Options, Running, find_exai, started

MIB = 2**20
MARKER = "<!-- bench flood: newest results first; `python -m bench flood` inserts below -->"
SECTION = f"""## Floods and slow readers (issue 11)

A quiet session's `tools/call echo` latency alone, then beside one misbehaving session of the
same `exai serve` (defaults: persistence on, auth on): a pipelining flooder that reads its
replies, a slow reader (one frame per 100 ms), a flooder that never reads; and the server's RSS
meanwhile. Each phase runs on a fresh server, except "quiet alone again", which follows the
phase before it on that phase's server. Made by `python -m bench flood` (`just bench flood`);
how it measures is in `bench/README.md` and `bench/flood.py`.

Columns: quiet calls = the quiet session's calls answered in its window; p99 / alone = its p99
over the baseline phase's; RSS = the server's VmRSS at the phase's start -> its peak during the
phase (sampled every 50 ms), growth = the difference; flooder: requests sent (MiB), answered
with a result, refused busy (-32000), other errors, unanswered (no reply by the end of its
drain, 15 s after it stopped sending for the pipelining flooder, 5 s for the others: silence),
and how its connection ended (close code, seconds after it started flooding).

Targets (issue 11, benchmark not test): quiet p99 beside either flood <= 3x its baseline and
<= 50 ms; RSS growth under the non-reading flood < 200 MiB; the pipelining flooder gets busy
errors, never silence. The slow reader is held to the same bars for information.

{MARKER}
"""


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    flooder: str | None = None  # bench.flooder --kind
    payload_bytes: int = 5
    max_bytes: int = 0
    read_interval: float = 0.1
    # Seconds the flooder keeps reading after it stops sending; what is unanswered then is
    # silence. The pipelining flooder gets the 15 s of the issue's report.
    drain_s: float = 5.0
    # A fresh server (and embedded Postgres) for this phase, so that its RSS growth and its
    # quiet latency are its own; False: the previous phase's server, to see what it left.
    fresh_server: bool = True


PHASES: tuple[Phase, ...] = (
    Phase("alone", "quiet alone (baseline)"),
    Phase("pipeline", "beside a pipelining flooder", "pipeline", drain_s=15.0),
    Phase("slow", "beside a slow reader (64 KiB echoes, 1 frame/100 ms)", "slowread", 64 * 1024),
    Phase(
        "noread",
        "beside a non-reading flooder (512 KiB echoes, <= 512 MiB)",
        "noread",
        512 * 1024,
        max_bytes=512 * MIB,
    ),
    Phase("after", "quiet alone again, after the previous flood", fresh_server=False),
)
FLOODS = ("pipeline", "noread")  # the phases the issue's targets name

#: Quick timings: the flooder's head start, the quiet session's warm-up and window.
LEAD_S = 1.0
WARMUP_S = 1.0
WINDOW_S = 8.0
SETTLE_S = 1.0
P99_RATIO = 3.0
P99_MS = 50.0
RSS_GROWTH_MIB = 200.0


@dataclass
class PhaseResult:
    phase: Phase
    quiet: Measurement | None = None
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    flooder: dict[str, Any] | None = None
    guard_tripped_s: float | None = None
    failure: str = ""

    @property
    def growth_mib(self) -> float:
        return max(0, self.rss_peak_kib - self.rss_start_kib) / 1024

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("phase", "quiet")}
        data["phase"] = self.phase.key
        data["quiet"] = self.quiet.to_json() if self.quiet else None
        data["growth_mib"] = self.growth_mib
        return data


class RssSampler:
    """VmRSS of one process every ``interval`` s in a thread; trips ``on_guard`` once when it
    grows by more than ``guard_kib`` over the first sample."""

    def __init__(self, pid: int, guard_kib: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.guard_kib = guard_kib
        self.interval = interval
        self.start_kib = proc.status_kib(pid, "VmRSS")
        self.peak_kib = self.start_kib
        self.last_kib = self.start_kib
        self.began = time.monotonic()
        self.guard_tripped_s: float | None = None
        self.on_guard: list[Owned] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = proc.status_kib(self.pid, "VmRSS")
            if not rss:
                continue
            self.last_kib = rss
            self.peak_kib = max(self.peak_kib, rss)
            if self.guard_tripped_s is None and rss - self.start_kib > self.guard_kib:
                self.guard_tripped_s = time.monotonic() - self.began
                for owned in self.on_guard:
                    _tell_stop(owned)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.last_kib = proc.status_kib(self.pid, "VmRSS") or self.last_kib
        self.peak_kib = max(self.peak_kib, self.last_kib)


def _tell_stop(owned: Owned) -> None:
    with contextlib.suppress(OSError, ValueError):
        owned.send_line("stop")


def _event(owned: Owned, deadline: float, kind: str) -> dict[str, Any]:
    while True:
        line = owned.read_line(deadline)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == kind:
                return event


def _flooder(phase: Phase, running: Running, python: str, work: Path, max_seconds: float) -> Owned:
    assert phase.flooder is not None
    argv = [python, "-m", "bench.flooder", "--url", running.url, "--kind", phase.flooder]
    argv += ["--payload-bytes", str(phase.payload_bytes), "--max-bytes", str(phase.max_bytes)]
    argv += ["--read-interval", str(phase.read_interval), "--drain", str(phase.drain_s)]
    argv += ["--max-seconds", str(max_seconds)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = work / f"flood-{phase.key}-flooder.log"
    return Owned(f"flooder {phase.key}", argv, log, env=env, cwd=REPO, pipe_stdio=True)


def run_phase(
    phase: Phase, running: Running, quiet: Scenario, run_opts: RunOptions, guard_mib: int
) -> PhaseResult:
    """One phase against the running server; failures are recorded, not raised."""
    r = PhaseResult(phase)
    sampler = RssSampler(running.pid, guard_mib * 1024)
    try:
        with contextlib.ExitStack() as stack:
            flooder = None
            if phase.flooder:
                # Safety net only: the harness sends "stop" long before this.
                budget = 60.0 + LEAD_S + quiet.warmup + quiet.duration
                flooder = stack.enter_context(
                    _flooder(phase, running, run_opts.generator_python, run_opts.work, budget)
                )
                _event(flooder, time.monotonic() + 30.0, "ready")
                flooder.send_line("go")
                sampler.on_guard.append(flooder)
                time.sleep(LEAD_S)
            r.quiet = measure(replace_key(quiet, phase), running, run_opts, f"flood-{phase.key}")
            if flooder is not None:
                _tell_stop(flooder)
                r.flooder = _event(flooder, time.monotonic() + phase.drain_s + 20.0, "result")
    except (RuntimeError, TimeoutError, EOFError, OSError, ValueError) as exc:
        r.failure = f"{type(exc).__name__}: {exc}"
    finally:
        sampler.stop()
    r.rss_start_kib, r.rss_peak_kib = sampler.start_kib, sampler.peak_kib
    r.rss_end_kib = sampler.last_kib
    r.guard_tripped_s = sampler.guard_tripped_s
    return r


def replace_key(s: Scenario, phase: Phase) -> Scenario:
    return Scenario(phase.key, phase.title, active=1, warmup=s.warmup, duration=s.duration)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Verdicts:
    """PASS/MISS per target, per phase key, and the list printed under the table."""

    by_phase: dict[str, list[str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, key: str, label: str, verdict: str, detail: str, *, issue: bool = True) -> None:
        self.by_phase.setdefault(key, []).append(f"{verdict} {label}")
        suffix = "" if issue else " (same bar, for information)"
        self.lines.append(f"{verdict} {key}: {label}{suffix}: {detail}")


def _short_error(text: str) -> str:
    """A refused or closed connection's code and reason out of a generator's error text."""
    found = re.search(r"code=(\d+)(?:, name=\w+)?, reason=([^>]*)>", text)
    if found:
        return f"closed {found[1]} ({found[2]})"
    return text


def _quiet_fault(r: PhaseResult) -> str:
    q = r.quiet
    if r.failure:
        return r.failure
    if q is None:
        return "not measured"
    if "generator 0: no output in time" in q.failure:
        return "the quiet session was not open (initialize answered) after 30 s"
    if q.failure:
        return q.failure
    if q.connect_failed:
        return f"the quiet session could not open: {_short_error(q.first_error)}"
    if not q.calls:
        return "the quiet session got no answer in its window"
    return q.faults + (
        f"{', ' if q.faults else ''}its last call still unanswered 3 s after the window"
        if q.unfinished_sessions
        else ""
    )


def verdicts(results: Sequence[PhaseResult]) -> Verdicts:
    v = Verdicts()
    base = next((r for r in results if r.phase.key == "alone"), None)
    base_p99 = base.quiet.p99_ms if base and base.quiet and not _quiet_fault(base) else None
    for r in results:
        key = r.phase.key
        if r.phase.flooder is None:
            continue
        issue = key in FLOODS
        p99 = r.quiet.p99_ms if r.quiet else None
        fault = _quiet_fault(r)
        label = f"quiet p99 <= {P99_RATIO:g}x alone and <= {P99_MS:g} ms"
        if base_p99 is None:
            v.add(key, label, "n/a", "no valid baseline in this run", issue=issue)
        elif fault or p99 is None:
            v.add(key, label, "MISS", f"not valid: {fault}", issue=issue)
        else:
            ratio = p99 / base_p99
            ok = ratio <= P99_RATIO and p99 <= P99_MS
            v.add(
                key,
                label,
                "PASS" if ok else "MISS",
                f"{p99:.2f} ms, {ratio:.1f}x ({base_p99:.2f} ms alone)",
                issue=issue,
            )
        if key in ("noread", "slow"):
            label = f"RSS growth < {RSS_GROWTH_MIB:g} MiB"
            if r.failure or not r.rss_start_kib:
                v.add(key, label, "n/a", r.failure or "not sampled", issue=key == "noread")
            else:
                g = r.growth_mib
                v.add(
                    key,
                    label,
                    "PASS" if g < RSS_GROWTH_MIB else "MISS",
                    f"{g:,.0f} MiB",
                    issue=key == "noread",
                )
        if key == "pipeline":
            label = "busy errors, never silence"
            f = r.flooder
            if f is None:
                v.add(key, label, "n/a", r.failure or "no flooder result")
            else:
                ok = f["busy"] > 0 and f["unanswered"] == 0
                if f["unanswered"]:
                    silence = (
                        f"{f['unanswered']:,} of {f['sent']:,} unanswered "
                        f"{f['drain_s']:.0f} s after it stopped sending"
                    )
                else:
                    silence = (
                        f"all {f['sent']:,} answered, the last {f['drain_s']:.1f} s after it "
                        "stopped sending"
                    )
                v.add(key, label, "PASS" if ok else "MISS", f"{f['busy']:,} busy; {silence}")
    return v


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _closed(f: dict[str, Any]) -> str:
    if f.get("closed_at_s") is None:
        return "open"
    code = f.get("close_code")
    how = f.get("closed_how") or ""
    seen = f"{code}" if code is not None else "no close frame"
    return f"{seen} at {f['closed_at_s']:.1f} s ({how})"


def table(results: Sequence[PhaseResult], v: Verdicts) -> str:
    head = (
        "| phase | quiet calls | quiet p50 ms | quiet p99 ms | p99 / alone | server RSS MiB "
        "| RSS growth MiB | flooder sent | answered | busy | other errors | unanswered "
        "| flooder closed | targets |"
    )
    rows = [head, "|" + "---|" * 14]
    base = next((r for r in results if r.phase.key == "alone"), None)
    base_p99 = base.quiet.p99_ms if base and base.quiet else None
    for r in results:
        q = r.quiet
        fault = _quiet_fault(r)
        p99 = q.p99_ms if q else None
        ratio = f"{p99 / base_p99:.1f}x" if p99 and base_p99 and r is not base else ""
        calls = f"{q.calls:,}" if q else "-"
        if fault:
            calls += f" ({report._cell(fault, 80)})"
        rss = f"{r.rss_start_kib / 1024:,.0f} -> {r.rss_peak_kib / 1024:,.0f}"
        f = r.flooder
        if f:
            sent = f"{f['sent']:,} ({f['sent_bytes'] / MIB:,.1f} MiB)"
            outcome = [
                f"{f['ok']:,}",
                f"{f['busy']:,}",
                f"{f['other_errors']:,}",
                f"{f['unanswered']:,}",
                _closed(f),
            ]
        else:
            sent = "-" if r.phase.flooder is None else "no result"
            outcome = ["", "", "", "", ""]
        cells = [
            r.phase.title,
            calls,
            _ms(q.p50_ms if q else None),
            _ms(p99),
            ratio,
            rss,
            f"{r.growth_mib:,.0f}",
            sent,
            *outcome,
            "; ".join(v.by_phase.get(r.phase.key, [])),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def notes(results: Sequence[PhaseResult]) -> list[str]:
    out: list[str] = []
    prev: PhaseResult | None = None
    for r in results:
        f = r.flooder
        if r.failure:
            out.append(f"{r.phase.key}: failed: {report._cell(r.failure, 200)}")
        if r.guard_tripped_s is not None:
            out.append(
                f"{r.phase.key}: the harness stopped the flooder {r.guard_tripped_s:.1f} s into "
                "the phase: the server had grown past the RSS guard"
            )
        if f:
            rate = f["sent"] / f["flood_s"] if f["flood_s"] else 0.0
            first_busy = f.get("first_busy_s")
            out.append(
                f"{r.phase.key}: flooder ({f['kind']}, {f['payload_bytes']:,}-byte echo text) "
                f"sent for {f['flood_s']:.1f} s ({rate:,.0f} requests/s, stopped: "
                f"{f['send_stopped'] or 'by the harness'}), read {f['frames_read_flooding']:,} "
                f"frames while flooding and {f['frames_read'] - f['frames_read_flooding']:,} "
                f"in a {f['drain_s']:.1f} s drain; "
                + (f"first busy after {first_busy:.2f} s; " if first_busy is not None else "")
                + f"client CPU {f['client_cpu_s']:.1f} s"
                + (
                    f"; first error: `{report._cell(f['first_error'], 160)}`"
                    if f["first_error"]
                    else ""
                )
                + (
                    f"; close reason: `{report._cell(str(f['close_reason']), 120)}`"
                    if f.get("close_reason")
                    else ""
                )
            )
        q = r.quiet
        if q and q.connect_s > 1.0:
            out.append(f"{r.phase.key}: the quiet session took {q.connect_s:.1f} s to open")
        if q and q.duration_s and not q.failure:
            out.append(
                f"{r.phase.key}: over the quiet window the server used {q.server_cpu_s:.1f} s "
                f"of CPU (+ db {q.db_cpu_s:.1f} s) in {q.duration_s:g} s"
            )
            others = q.other_cpu_s - (f["client_cpu_s"] if f else 0.0)
            if others / q.duration_s > 0.25:
                out.append(
                    f"{r.phase.key}: the machine was busy with other work during the quiet "
                    f"window (about {others / q.duration_s:.1f} cores besides the server, its "
                    "database and the clients): latencies are noisy"
                )
        if q and q.first_error and not q.connect_failed:
            out.append(
                f"{r.phase.key}: quiet session's first error: `{report._cell(q.first_error)}`"
            )
        if not r.phase.fresh_server and prev is not None and prev.rss_start_kib:
            kept = (r.rss_start_kib - prev.rss_start_kib) / 1024
            out.append(
                f"{r.phase.key}: the server kept {kept:,.0f} MiB of RSS over its start before "
                f"{prev.phase.key}"
            )
        prev = r
    return out


def section(results: Sequence[PhaseResult], extra: Sequence[str], label: str | None = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    v = verdicts(results)
    head = f"### {stamp} · `flood` · " + (f"{label} · " if label else "") + report.machine()
    lines = [head, "", table(results, v), ""]
    lines += ["Targets (issue 11):", ""] + [f"- {line}" for line in v.lines]
    all_notes = list(extra) + notes(results)
    if all_notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in all_notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The mode


def _plan(args: argparse.Namespace) -> list[Phase]:
    table_ = {p.key: p for p in PHASES}
    keys = args.scenarios.split(",") if args.scenarios else list(table_)
    unknown = [k for k in keys if k not in table_]
    if unknown:
        raise SystemExit(f"unknown flood phase(s): {', '.join(unknown)} (of {', '.join(table_)})")
    return [table_[k] for k in keys]


def _progress(r: PhaseResult) -> None:
    q = r.quiet
    line = f"  {r.phase.key:8} "
    if q and q.calls:
        line += f"quiet {q.calls:6,} calls p50 {q.p50_ms or 0:7.2f} ms p99 {q.p99_ms or 0:8.2f} ms"
    else:
        line += f"quiet: {_quiet_fault(r)}"
    line += f"  RSS {r.rss_start_kib / 1024:,.0f} -> {r.rss_peak_kib / 1024:,.0f} MiB"
    f = r.flooder
    if f:
        line += (
            f"  flooder sent {f['sent']:,} ok {f['ok']:,} busy {f['busy']:,} "
            f"err {f['other_errors']:,} unanswered {f['unanswered']:,} closed {_closed(f)}"
        )
    if r.failure:
        line += f"  FAILED {r.failure}"
    print(line, flush=True)


def _run_all(
    phases: Sequence[Phase],
    opts: Options,
    quiet: Scenario,
    run_opts: RunOptions,
    *,
    guard_mib: int,
    results: list[PhaseResult],
) -> None:
    """Every phase in turn, each on a fresh server unless it asks for the previous one."""
    with contextlib.ExitStack() as server:
        running: Running | None = None
        for phase in phases:
            if phase.fresh_server or running is None:
                server.close()
                try:
                    running = server.enter_context(started("exai", opts, f"{phase.key}", 10))
                except (RuntimeError, TimeoutError, OSError) as exc:
                    running = None
                    r = PhaseResult(phase, failure=f"exai: {type(exc).__name__}: {exc}")
                    results.append(r)
                    _progress(r)
                    continue
            time.sleep(SETTLE_S)
            r = run_phase(phase, running, quiet, run_opts, guard_mib)
            results.append(r)
            _progress(r)


def main(args: argparse.Namespace) -> int:
    """The ``flood`` mode of ``python -m bench`` (argument parsing is ``bench.__main__``'s)."""
    if args.servers and args.servers != "exai":
        raise SystemExit("flood runs against exai only (--servers exai)")
    phases = _plan(args)
    env = exai_env(args.exai_env)
    work = Path(tempfile.mkdtemp(prefix="exai-bench-flood-"))
    opts = Options(args.python, find_exai(args.exai), args.exai_database_url, work, exai_env=env)
    if opts.exai is None:
        raise SystemExit("exai not found (no .venv/bin/exai yet): run `just setup`")
    quiet = Scenario(
        "quiet",
        "quiet",
        active=1,
        warmup=args.warmup if args.warmup is not None else WARMUP_S,
        duration=args.duration if args.duration is not None else WINDOW_S,
    )
    run_opts = RunOptions(args.python, work)
    began = time.monotonic()
    print(f"bench flood: phases {', '.join(p.key for p in phases)}; logs in {work}", flush=True)
    results: list[PhaseResult] = []
    extra: list[str] = []
    interrupted = False
    try:
        _run_all(phases, opts, quiet, run_opts, guard_mib=args.rss_guard_mib, results=results)
    except KeyboardInterrupt:
        interrupted = True
        extra.append("interrupted: partial results, not written to docs/")
    elapsed = time.monotonic() - began
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items()))
    extra.insert(
        0,
        "a fresh `exai serve` per phase (`after`: the previous phase's), "
        + (f"its defaults plus {settings}" if settings else "its default settings")
        + f"; quiet window {quiet.warmup:g} s warm-up + {quiet.duration:g} s, the flooder "
        f"started {LEAD_S:g} s before the quiet session; RSS guard "
        f"{args.rss_guard_mib:,} MiB; flood run took {elapsed:.0f} s; clients on {args.python}",
    )
    text = section(results, extra, args.label)
    print()
    print(text)
    (work / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=1))
    if not args.no_write and not interrupted and results:
        report.append(args.output, text, MARKER, SECTION)
        print(f"appended to {args.output}")
    failed = any(r.failure or (r.quiet and r.quiet.failure) for r in results)
    if failed or args.keep_work:
        print(f"logs and raw results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0
