"""``python -m bench [quick|full|profile|flood|durability|http|proxy|workers]``: end-to-end
benchmarks.

quick    every scenario, short windows (< 3 minutes); appends to docs/benchmarks.md
full     longer windows plus a pipelined scenario and the optional mcp 2.x anchor
profile  the 50-session load against one server (default exai) under py-spy; prints where the
         server's time goes (nothing is written to docs/)
flood    issue 11: a quiet session's latency alone, beside a pipelining flooder, a slow reader
         and a flooder that never reads, with exai's RSS (~2 minutes; --scenarios picks phases
         of alone,pipeline,slow,noread,after; --duration sets the quiet window)
durability  each EXAI_DURABILITY mode against the embedded Postgres and one 20 ms of round
         trip away, beside the floor, an fdatasync of the journal's disk and the persistence
         actor vs raw COPY (~4 minutes; --duration/--warmup set both scenarios' windows)
http     exai serve over Streamable HTTP beside the mcp 2.x SDK's own HTTP app, stateless and
         with sessions, exai over WebSocket and a bare h11 floor: 1 client and 50 clients
         (~3 minutes; --servers picks of floor,exai,exai-ws,mcp2-stateless,mcp2-stateful;
         --py-spy profiles exai's windows (both transports), writes nothing to docs/)
proxy    issue 16: a third-party stdio MCP server (mcp-server-time, server-everything) called
         directly over stdio and through exai's [servers] over WebSocket, 1 client and 10:
         the overhead per call (~3 minutes; --servers picks of time,everything)
workers  issue 18: 50 and 1,000 sessions against exai serve --workers 1 and --workers 2 in one
         run: calls/s and server CPU per call (~2 minutes; --scenarios picks of s50,s1000)

Run from the repository root with the runtime's interpreter (it needs trio-websocket):
``.venv/bin/python -m bench``. The anchor servers install themselves into bench/.venv-*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import (
    durability,
    flood,
    own_plan,
    proxy,
    report,
    scenarios,
    streamable_http,
    venvs,
    workers,
)
from bench.launch import interrupt_on_sigterm, raise_nofile_limit
from bench.profile import summarize
from bench.runner import Measurement, RunOptions, measure
from bench.targets import (
    EXAI_DEFAULT_MAX_SESSIONS,
    LABELS,
    REPO,
    SERVERS,
    Options,
    find_exai,
    started,
)

DEFAULT_SERVERS = {
    "quick": ("floor", "exai", "sdk"),
    "full": ("floor", "exai", "sdk", "mcp2"),
    "profile": ("exai",),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "mode",
        nargs="?",
        default="quick",
        choices=("quick", "full", "profile", "flood", "durability", "http", "proxy", "workers"),
    )
    p.add_argument("--servers", help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--scenarios", help="comma-separated subset of seq1,s50,s50p8,s1000,idle")
    p.add_argument("--duration", type=float, help="override every measured window (seconds)")
    p.add_argument("--warmup", type=float, help="override every warm-up (seconds)")
    p.add_argument("--idle", type=int, help="override the idle sessions of the idle scenario")
    p.add_argument("--generators", type=int, help="override the generator processes per scenario")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    p.add_argument("--exai", help="path of the exai console script (default: found)")
    p.add_argument("--exai-database-url", help="pass --database-url to exai serve")
    p.add_argument(
        "--exai-env",
        action="append",
        metavar="KEY=VALUE",
        help="an EXAI_* setting for exai serve (repeatable; recorded in the report)",
    )
    p.add_argument(
        "--label",
        help="flood, durability, http, proxy: words for the run's heading ('before the fix')",
    )
    p.add_argument(
        "--modes",
        help="durability: comma-separated EXAI_DURABILITY modes, in run order "
        "(default commit,journal,async)",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="http: profile exai's windows (HTTP, WebSocket) with py-spy; nothing written to docs/",
    )
    p.add_argument(
        "--rss-guard-mib",
        type=int,
        default=3072,
        help="flood: stop a flooder once the server has grown by this much",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the generators and the floor (needs trio-websocket)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep logs and raw files")
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> list[scenarios.Scenario]:
    if args.mode == "profile" and not args.scenarios:
        plan = [scenarios.PROFILE]
    else:
        table = scenarios.by_key("quick" if args.mode == "profile" else args.mode)
        keys = args.scenarios.split(",") if args.scenarios else list(table)
        unknown = [k for k in keys if k not in table]
        if unknown:
            raise SystemExit(f"unknown scenario(s) for {args.mode}: {', '.join(unknown)}")
        plan = [table[k] for k in keys]
    overrides: dict[str, float | int] = {}
    if args.duration is not None:
        overrides["duration"] = args.duration
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    if args.generators is not None:
        overrides["generators"] = args.generators
    out = [replace(s, **overrides) for s in plan]  # type: ignore[arg-type]
    if args.idle is not None:
        out = [
            scenarios.idle_scenario(args.idle, s.warmup, s.duration) if s.idle else s for s in out
        ]
    return out


def _check_generator_python(python: str) -> None:
    probe = subprocess.run(
        [python, "-c", "import trio, trio_websocket"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        raise SystemExit(f"{python} cannot import trio_websocket; pass --python")


def _own_plan(args: argparse.Namespace) -> int:
    """The modes that run a plan of their own (flood, durability, http, proxy, workers)."""
    raise_nofile_limit()
    interrupt_on_sigterm()
    _check_generator_python(args.python)
    if args.mode == "http":
        return streamable_http.main(args)
    if args.mode == "proxy":
        return proxy.main(args)
    if args.mode == "workers":
        return workers.main(args)
    return flood.main(args) if args.mode == "flood" else durability.main(args)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.mode in ("flood", "durability", "http", "proxy", "workers"):
        return _own_plan(args)
    servers = args.servers.split(",") if args.servers else list(DEFAULT_SERVERS[args.mode])
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        raise SystemExit(f"unknown server(s): {', '.join(bad)}")
    plan = _plan(args)
    raise_nofile_limit()
    interrupt_on_sigterm()
    _check_generator_python(args.python)
    work = Path(tempfile.mkdtemp(prefix="exai-bench-"))
    exai_env = own_plan.exai_env(args.exai_env)
    opts = Options(
        args.python, find_exai(args.exai), args.exai_database_url, work, exai_env=exai_env
    )
    notes: list[str] = []
    py_spy = None
    if args.mode == "profile":
        py_spy = str(venvs.ensure("anchors", log=work / "venv-anchors.log").parent / "py-spy")
    began = time.monotonic()
    print(f"bench {args.mode}: servers {', '.join(servers)}; logs in {work}", flush=True)
    for server in servers:
        reason = opts.unavailable(server)
        if reason:
            notes.append(f"{LABELS[server]}: {reason}")
            print(f"  skip {server}: {reason}", flush=True)
    servers = [s for s in servers if not opts.unavailable(s)]
    most = max(s.sessions + 1 for s in plan)
    if "exai" in servers and most > EXAI_DEFAULT_MAX_SESSIONS:
        notes.append(
            f"exai ran with EXAI_MAX_SESSIONS={most + 100} where a scenario opens more than its "
            f"default {EXAI_DEFAULT_MAX_SESSIONS:,} sessions; every other setting is its default"
        )
    results: list[Measurement] = []
    try:
        _run_all(plan, servers, opts, RunOptions(args.python, work, None, py_spy), results)
    except KeyboardInterrupt:
        notes.append("interrupted: partial results, not written to docs/")
        args.no_write = True
    elapsed = time.monotonic() - began
    notes.append(f"{args.mode} run took {elapsed:.0f} s; generators and floor on {args.python}")
    titles = {s.key: s.title for s in plan}
    text = report.section(results, titles, args.mode, notes)
    print()
    print(text)
    (work / "results.json").write_text(json.dumps([m.to_json() for m in results], indent=1))
    if args.mode != "profile" and not args.no_write:
        report.append(args.output, text)
        print(f"appended to {args.output}")
    failed = any(m.failure for m in results)
    if failed or args.keep_work or args.mode == "profile":
        print(f"logs and raw results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _run_all(
    plan: list[scenarios.Scenario],
    servers: list[str],
    opts: Options,
    base: RunOptions,
    results: list[Measurement],
) -> None:
    """Every scenario against every server, a fresh server each time; appends to results."""
    for s in plan:
        for server in servers:
            tag = f"{s.key}-{server}"
            profile_out = base.work / f"profile-{server}.raw" if base.py_spy else None
            run_opts = replace(base, profile_out=profile_out)
            try:
                with started(server, opts, tag, s.sessions + 1) as running:
                    m = measure(s, running, run_opts, tag)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                m = Measurement(
                    s.key, server, s.active, s.idle, s.pipeline, s.generators, s.duration
                )
                m.failure = f"{type(exc).__name__}: {exc}"
            results.append(m)
            _progress(m)
            if profile_out is not None and profile_out.exists():
                summary = summarize(profile_out)
                (base.work / f"profile-{server}.txt").write_text(summary)
                print(summary, flush=True)


def _progress(m: Measurement) -> None:
    if m.failure:
        print(f"  {m.scenario:8} {m.server:6} FAILED {m.failure}", flush=True)
        return
    kib = m.kib_per_idle_session
    print(
        f"  {m.scenario:8} {m.server:6} {m.throughput:9,.0f} calls/s  "
        f"p50 {m.p50_ms or 0:7.3f} ms  p99 {m.p99_ms or 0:7.3f} ms  "
        f"server CPU {m.server_cpu_s:5.2f}+{m.db_cpu_s:4.2f} s  "
        f"client CPU {m.client_cpu_s:5.2f} s  peak {m.peak_rss_kib / 1024:6.1f} MiB  "
        f"errors {m.errors + m.connect_failed}"
        + (f"  STALLED {m.stalled_sessions}/{m.active}" if m.stalled_sessions else "")
        + (f"  {kib:.1f} KiB/idle" if kib else "")
        + f"  other CPU {m.other_cpu_s:.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
