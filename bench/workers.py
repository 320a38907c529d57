"""``python -m bench workers``: issue 18's ``exai serve --workers N``, 1 worker against 2.

50 and 1,000 WebSocket sessions (``bench/loadgen.py``, the End-to-end scenarios' load: each
session calls ``echo`` in a loop) against ``exai serve`` with ``EXAI_WORKERS=1`` (today's one
process) and ``EXAI_WORKERS=2`` (a parent and two worker nodes on one port, SO_REUSEPORT), in
one run, a fresh server for each measurement. Reported per measurement: calls/s, latency,
and the server's CPU per call: every process of ``exai serve``'s tree (the parent and its
workers), ``+ db`` the embedded Postgres.

**The machine's cores are shared with the load.** The generators run on the same machine:
the 50-session load is one generator process, the 1,000-session load two. On a 2-core
machine one generator takes about a core, so two workers do not have two cores to
themselves: what ``--workers 2`` buys there is at most the generator's leftovers, and the
figure that carries over to a bigger machine is the server's CPU per call (the price of a
second node: its own pools, heartbeats, writer), not calls/s. The notes of each run say how
many cores the machine has and how busy it was apart from us.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench import report
from bench.own_plan import exai_env, reject_options, windowed
from bench.proxy import build
from bench.runner import Measurement, RunOptions, measure
from bench.scenarios import FULL, Scenario
from bench.targets import Options, find_exai, started

#: The two loads of the issue, with the full run's windows (``--duration``/``--warmup``
#: override them).
PLAN: tuple[Scenario, ...] = tuple(s for s in FULL if s.key in ("s50", "s1000"))
#: The worker counts compared, in run order.
WORKERS = (1, 2)
#: Other work above this many cores in a window makes the run's figures preliminary.
BUSY_CORES = 0.25

MARKER = "<!-- bench workers: newest results first; `python -m bench workers` inserts below -->"
SECTION = f"""## Workers: `exai serve --workers 1` against `--workers 2` (issue 18)

50 and 1,000 WebSocket sessions calling `echo` against `exai serve` with one worker (the
single process) and with two (a parent supervising two worker nodes on one port), in one run,
a fresh server for each. Made by `python -m bench workers`; how it measures is in
`bench/workers.py`. Columns: calls/s over the measured window; latency percentiles at the
client; server CPU = `exai serve`'s whole process tree (parent and workers), `+ db` its
embedded Postgres; CPU µs/call = both over the calls answered; client CPU = the generators'.
On a machine with few cores the generators compete with the workers (module doc of
`bench/workers.py`): calls/s there measures the machine, CPU per call measures exai.

{MARKER}
"""


@dataclass
class Result:
    workers: int
    m: Measurement


def table(results: Sequence[Result], titles: dict[str, str]) -> str:
    head = (
        "| scenario | workers | calls/s | p50 ms | p99 ms | max ms | server CPU s "
        "| CPU µs/call | client CPU s | other CPU s | errors | calls/s vs 1 worker |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        m = r.m
        lead = [titles.get(m.scenario, m.scenario), str(r.workers)]
        if m.failure:
            rows.append("| " + " | ".join([*lead, f"failed: {report._cell(m.failure)}"]) + " |")
            continue
        per_call = m.server_cpu_us_per_call
        one = next((o.m for o in results if o.workers == 1 and o.m.scenario == m.scenario), None)
        ratio = (
            f"{m.throughput / one.throughput:.2f}x"
            if one is not None and one.throughput and not one.failure
            else ""
        )
        cells = [
            *lead,
            f"{m.throughput:,.0f}",
            report._ms(m.p50_ms),
            report._ms(m.p99_ms),
            report._ms(m.max_ms),
            f"{m.server_cpu_s:.2f}" + (f" + db {m.db_cpu_s:.2f}" if m.db_cpu_s else ""),
            "" if per_call is None else f"{per_call:.0f}",
            f"{m.client_cpu_s:.2f}",
            f"{m.other_cpu_s:.2f}",
            str(m.errors + m.connect_failed),
            ratio,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def section(results: Sequence[Result], titles: dict[str, str], notes: Sequence[str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"### {stamp} · `workers` · {report.machine()}", "", table(results, titles)]
    extra = report.notes_section(
        notes, [(f"{r.m.scenario} / {r.workers} worker(s)", r.m) for r in results], BUSY_CORES
    )
    return "\n".join(lines + extra) + "\n"


def _plan_note(plan: Sequence[Scenario], env: dict[str, str], elapsed: float, py: str) -> str:
    windows = ", ".join(
        f"{s.key} {s.warmup:g} s warm-up + {s.duration:g} s, {s.generators} generator(s)"
        for s in plan
    )
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items()))
    cores = os.cpu_count() or 1
    return (
        f"commit {build()}; {cores} cores, shared by the server and the generators (each "
        f"generator takes up to a core: with {cores} cores, 2 workers and 2 generators "
        "compete); a fresh server per measurement; windows: "
        f"{windows}; exai: `exai serve` defaults plus EXAI_WORKERS"
        + (f" and {settings}" if settings else "")
        + f"; the run took {elapsed:.0f} s; clients on {py}"
    )


def run_all(
    plan: Sequence[Scenario], counts: Sequence[int], opts: Options, work: Path
) -> list[Result]:
    """Every scenario against every worker count, alternating counts within a scenario."""
    results: list[Result] = []
    for s in plan:
        for count in counts:
            tag = f"{s.key}-w{count}"
            env = dict(opts.exai_env, EXAI_WORKERS=str(count))
            try:
                with started("exai", replace(opts, exai_env=env), tag, s.sessions + 1) as running:
                    m = measure(s, running, RunOptions(opts.generator_python, work, None), tag)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                m = Measurement(
                    s.key, "exai", s.active, s.idle, s.pipeline, s.generators, s.duration
                )
                m.failure = f"{type(exc).__name__}: {exc}"
            results.append(Result(count, m))
            print(
                f"  {s.key:6} {count} worker(s) {m.throughput:9,.0f} calls/s  "
                f"server CPU {m.server_cpu_s:5.2f}+{m.db_cpu_s:4.2f} s  "
                f"errors {m.errors + m.connect_failed}"
                + (f"  FAILED {m.failure}" if m.failure else ""),
                flush=True,
            )
    return results


def main(args: argparse.Namespace) -> int:
    """The ``workers`` mode of ``python -m bench`` (argument parsing is ``bench.__main__``'s)."""
    reject_options(args, "workers", ("--servers", "--idle", "--generators", "--modes", "--py-spy"))
    keys = args.scenarios.split(",") if args.scenarios else [s.key for s in PLAN]
    table_ = {s.key: s for s in PLAN}
    unknown = [k for k in keys if k not in table_]
    if unknown:
        raise SystemExit(f"unknown scenario(s) for workers: {', '.join(unknown)} (of s50,s1000)")
    plan = windowed([table_[k] for k in keys], args)
    env = exai_env(args.exai_env)
    work = Path(tempfile.mkdtemp(prefix="exai-bench-workers-"))
    opts = Options(args.python, find_exai(args.exai), args.exai_database_url, work, exai_env=env)
    if opts.exai is None:
        raise SystemExit("exai not found (no .venv/bin/exai yet): run `just setup`")
    began = time.monotonic()
    print(f"bench workers: {', '.join(keys)} x workers 1,2; logs in {work}", flush=True)
    interrupted = False
    results: list[Result] = []
    try:
        results = run_all(plan, WORKERS, opts, work)
    except KeyboardInterrupt:
        interrupted = True
    notes = [_plan_note(plan, env, time.monotonic() - began, args.python)]
    if interrupted:
        notes.append("interrupted: partial results, not written to docs/")
    text = section(results, {s.key: s.title for s in plan}, notes)
    print()
    print(text)
    (work / "results.json").write_text(
        json.dumps([dict(r.m.to_json(), workers=r.workers) for r in results], indent=1)
    )
    if not args.no_write and not interrupted:
        report.append(args.output, text, MARKER, SECTION)
        print(f"appended to {args.output}")
    if any(r.m.failure for r in results) or args.keep_work:
        print(f"logs and raw results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0
