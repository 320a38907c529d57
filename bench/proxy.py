"""``python -m bench proxy``: a third-party stdio MCP server called directly and through exai.

Issue 16: "a proxied call through exai vs the same server called directly over stdio, same
run: the overhead per call". In one run, on one machine, a fresh server per measurement, for
each MCP server:

direct      ``bench.stdiogen``: a minimal newline-JSON client (``json`` + trio, no SDK) starts
            the server as its child and calls its tool over stdio; N callers keep N requests
            in flight on the one connection (ids tell them apart)
exai        ``exai serve`` defaults (embedded Postgres, every call a task row at the default
            durability, auth on) with the server under ``[servers.<name>]`` in its config
            file (``share = "node"``: one process for every session), called as
            ``<name>__<tool>`` over WebSocket by ``bench.loadgen``, N sessions one call each

and, once per scenario, ``exai-own``: the same ``exai serve`` (the proxied ``time`` server
configured, idle) answering its own built-in ``echo``: exai's call path without the proxy
hop, to split the overhead.

MCP servers (each skipped, with a note, when it is not installed):

time        ``mcp-server-time`` from PyPI (the Python SDK's FastMCP), in
            ``bench/.venv-server-time`` (``requirements-server-time.txt``), tool
            ``get_current_time {"timezone": "UTC"}``
everything  ``@modelcontextprotocol/server-everything`` from npm (the TypeScript SDK), from
            ``.venv-clients/servers-node`` (``just setup-clients``), tool
            ``echo {"message": "hello"}``

Load: ``seq1``, 1 client, one call at a time (latency); ``c10``, 10 clients, one call in
flight each. The overhead per call is exai's latency minus direct's (p50 and p99), with
exai's CPU per call (its own process and its Postgres; the proxied server's CPU counted
apart). Information, not a target: the issue sets no bar, so nothing is PASS/MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench import report, venvs
from bench.own_plan import chosen_servers, exai_env, reject_options, windowed
from bench.runner import Measurement, RunOptions, measure
from bench.scenarios import Scenario
from bench.targets import REPO, Options, Running, find_exai, started


@dataclass(frozen=True)
class Server:
    """A third-party stdio MCP server and the call the benchmark makes to it."""

    name: str
    label: str
    tool: str
    arguments: str
    #: The server's argv, found or installed (raises ``FileNotFoundError`` when it cannot be
    #: had); ``work`` is for logs.
    command: Callable[[Path], list[str]]


def _server_time(work: Path) -> list[str]:
    python = venvs.ensure("server-time", log=work / "venv-server-time.log")
    return [str(python.parent / "mcp-server-time"), "--local-timezone", "UTC"]


def _server_everything(work: Path) -> list[str]:
    script = REPO / ".venv-clients" / "servers-node" / "node_modules" / ".bin"
    script = script / "mcp-server-everything"
    if not script.exists():
        raise FileNotFoundError(f"{script.relative_to(REPO)} missing: run `just setup-clients`")
    return [str(script), "stdio"]


SERVERS: dict[str, Server] = {
    "time": Server(
        "time",
        "mcp-server-time (PyPI)",
        "get_current_time",
        '{"timezone":"UTC"}',
        _server_time,
    ),
    "everything": Server(
        "everything",
        "server-everything (npm)",
        "echo",
        '{"message":"hello"}',
        _server_everything,
    ),
}

#: How each server is reached, in run order within a scenario.
PATHS = ("direct", "exai")
OWN = "exai-own"
PATH_LABELS = {
    "direct": "direct, stdio",
    "exai": "through exai, WebSocket",
    OWN: "exai's own `echo`, WebSocket",
}

SEQ1 = Scenario("seq1", "1 client, sequential", active=1, warmup=1.0, duration=5.0)
C10 = Scenario("c10", "10 clients, concurrent", active=10, warmup=2.0, duration=8.0)
PLAN = (SEQ1, C10)

#: Other work above this many cores in a window makes the run's figures preliminary.
BUSY_CORES = 0.25

MARKER = "<!-- bench proxy: newest results first; `python -m bench proxy` inserts below -->"
SECTION = f"""## Proxied MCP servers: a stdio server through exai and called directly (issue 16)

A third-party stdio MCP server called directly over stdio, and the same server declared under
`[servers.<name>]` and called through `exai serve` (its defaults: embedded Postgres, every
call a task row, auth on) over WebSocket, in one run; plus exai's own `echo` on the same
configuration, to split exai's share of the overhead from the proxy hop's. Made by
`python -m bench proxy`; how it measures is in `bench/README.md` and `bench/proxy.py`.

Columns: calls/s over the measured window (all clients together); latency percentiles of the
calls answered in it (send to answer, at the client); MCP server CPU µs/call = the stdio
server's process (through exai: exai's child); exai CPU µs/call = `exai serve`'s process tree
without that child, `+ db` its embedded Postgres; client CPU µs/call = the generator's own
(the direct client is a minimal newline-JSON one, the exai client the WebSocket load
generator); other CPU s = the rest of the machine meanwhile (noise). Overhead = through
exai minus direct, same scenario, same run. Information: the issue sets no target.

{MARKER}
"""


@dataclass
class Result:
    """One scenario against one server on one path."""

    server: str  # a SERVERS key, or "" for exai-own
    path: str  # direct, exai, exai-own
    m: Measurement


# ---------------------------------------------------------------------------------------------
# Starting each path


def config_text(server: Server, command: Sequence[str]) -> str:
    """exai's config file declaring ``server`` (TOML; strings as JSON strings, which TOML's
    basic strings read alike for the paths and arguments used here)."""
    return (
        f"[servers.{server.name}]\n"
        f"command = {json.dumps(command[0])}\n"
        f"args = {json.dumps(list(command[1:]))}\n"
    )


def proxied_groups(state_dir: Path) -> Callable[[], list[int]]:
    """The live process groups exai records for its proxied servers (``children`` in its state
    dir, ``PGID START_TIME`` per line; the leader's pid is the group's id)."""

    def read() -> list[int]:
        try:
            lines = (state_dir / "children").read_text().splitlines()
        except OSError:
            return []
        pids = [int(line.split()[0]) for line in lines if line.split()[:1]]
        return [p for p in pids if Path(f"/proc/{p}").exists()]

    return read


@contextlib.contextmanager
def start(
    path: str, server: Server, command: list[str], opts: Options, tag: str
) -> Iterator[Running]:
    """``path`` to ``server`` ready to load: for ``direct`` nothing runs yet (the generator
    starts the server and names its pid), for ``exai`` and ``exai-own`` a fresh ``exai serve``
    with ``server`` in its config file; stopped on exit."""
    call = ("--tool", f"{server.name}__{server.tool}", "--arguments", server.arguments)
    if path == "direct":
        args = ("--command", json.dumps(command), "--tool", server.tool)
        args += ("--arguments", server.arguments)
        yield Running(f"{server.name}-direct", "stdio:", None, 0, client_args=args)
        return
    config = opts.logs / f"{tag}.toml"
    config.write_text(config_text(server, command))
    config.chmod(0o600)  # exai refuses a config file others can read (it may hold tokens)
    env = dict(opts.exai_env, EXAI_CONFIG=str(config))
    with started("exai", replace(opts, exai_env=env), tag, C10.active + 1) as running:
        assert running.state_dir is not None
        apart = proxied_groups(running.state_dir)
        if not apart():
            log = running.owned.log if running.owned else opts.logs
            raise RuntimeError(f"exai started no proxied server; see {log}")
        if path == OWN:
            yield replace(running, name=OWN, apart=apart)
        else:
            yield replace(running, name=f"{server.name}-exai", client_args=call, apart=apart)


# ---------------------------------------------------------------------------------------------
# Running the plan


def run_all(
    plan: Sequence[Scenario],
    servers: dict[str, list[str]],
    own: bool,
    opts: Options,
    work: Path,
) -> list[Result]:
    """Every scenario: for each server direct then through exai, then exai's own ``echo``
    (on the first server's configuration), a fresh server each time."""
    out: list[Result] = []
    for s in plan:
        steps = [(name, path) for name in servers for path in PATHS]
        if own and servers:
            steps.append((next(iter(servers)), OWN))
        for name, path in steps:
            server = SERVERS[name]
            tag = f"proxy-{s.key}-{name}-{path}"
            gen = "bench.stdiogen" if path == "direct" else "bench.loadgen"
            run_opts = RunOptions(opts.generator_python, work, generator=gen)
            m = Measurement(s.key, path, s.active, s.idle, s.pipeline, s.generators, s.duration)
            try:
                with start(path, server, servers[name], opts, tag) as running:
                    m = measure(s, running, run_opts, tag)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                m.failure = f"{type(exc).__name__}: {exc}"
            result = Result("" if path == OWN else name, path, m)
            out.append(result)
            _progress(result)
    return out


def _progress(r: Result) -> None:
    m = r.m
    who = f"{r.server or '-':10} {r.path:8}"
    if m.failure:
        print(f"  {m.scenario:4} {who} FAILED {m.failure}", flush=True)
        return
    print(
        f"  {m.scenario:4} {who} {m.throughput:8,.0f} calls/s  "
        f"p50 {m.p50_ms or 0:7.3f} ms  p99 {m.p99_ms or 0:7.3f} ms  "
        f"CPU s: server {m.server_cpu_s:5.2f} db {m.db_cpu_s:4.2f} proxied {m.apart_cpu_s:4.2f} "
        f"client {m.client_cpu_s:5.2f}  errors {m.errors + m.connect_failed}"
        + (f"  STALLED {m.stalled_sessions}/{m.active}" if m.stalled_sessions else "")
        + f"  other CPU {m.other_cpu_s:.2f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# The report


def _find(results: Sequence[Result], scenario: str, server: str, path: str) -> Measurement | None:
    for r in results:
        m = r.m
        same = m.scenario == scenario and r.server == server and r.path == path
        if same and not m.failure and m.calls:
            return m
    return None


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _us(cpu_s: float, calls: int) -> str:
    return f"{cpu_s / calls * 1e6:,.0f}" if calls else "-"


def _server_cpu(r: Result) -> tuple[float, float]:
    """(the MCP server's CPU s, exai's CPU s) of one result: direct measures the stdio server
    as the server; through exai the server is exai and the stdio server is counted apart."""
    m = r.m
    if r.path == "direct":
        return m.server_cpu_s, 0.0
    return m.apart_cpu_s, m.server_cpu_s


def table(results: Sequence[Result]) -> str:
    head = (
        "| scenario | MCP server | path | calls/s | p50 ms | p90 ms | p99 ms | max ms "
        "| MCP server CPU µs/call | exai CPU µs/call | client CPU µs/call | other CPU s "
        "| errors |"
    )
    rows = [head, "|" + "---|" * 13]
    titles = {s.key: s.title for s in PLAN}
    for r in results:
        m = r.m
        who = SERVERS[r.server].label if r.server else "-"
        lead = [titles.get(m.scenario, m.scenario), who, PATH_LABELS[r.path]]
        if m.failure:
            rows.append("| " + " | ".join([*lead, f"failed: {report._cell(m.failure)}"]) + " |")
            continue
        if not m.calls:
            rows.append("| " + " | ".join([*lead, "0", "no calls answered"]) + " |")
            continue
        mcp_cpu, exai_cpu = _server_cpu(r)
        exai_cell = ""
        if r.path != "direct":
            exai_cell = _us(exai_cpu, m.calls) + f" + db {_us(m.db_cpu_s, m.calls)}"
        cells = [
            *lead,
            f"{m.throughput:,.0f}",
            _ms(m.p50_ms),
            _ms(m.p90_ms),
            _ms(m.p99_ms),
            _ms(m.max_ms),
            "" if r.path == OWN else _us(mcp_cpu, m.calls),
            exai_cell,
            _us(m.client_cpu_s, m.calls),
            f"{m.other_cpu_s:.2f}",
            str(m.errors + m.connect_failed)
            + (f" ({m.stalled_sessions} stalled)" if m.stalled_sessions else ""),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def overheads(results: Sequence[Result]) -> list[str]:
    """Per scenario and server: through exai minus direct (p50, p99), the calls/s ratio and
    exai's CPU per call. With exai's own ``echo`` beside it: one client at a time, the part
    of the p50 that is exai's call path and the rest, the proxy hop's; several clients, whose
    latency is mostly queueing (clients / calls/s), the proxy hop's share of exai's CPU."""
    out: list[str] = []
    for s in PLAN:
        own = _find(results, s.key, "", OWN)
        for name, server in SERVERS.items():
            direct = _find(results, s.key, name, "direct")
            exai = _find(results, s.key, name, "exai")
            if direct is None or exai is None:
                continue
            if direct.p50_ms is None or direct.p99_ms is None:
                continue
            if exai.p50_ms is None or exai.p99_ms is None:
                continue
            line = (
                f"{s.title}, {server.label}: through exai p50 {_ms(exai.p50_ms)} vs direct "
                f"{_ms(direct.p50_ms)} ms, **+{_ms(exai.p50_ms - direct.p50_ms)} ms per call** "
                f"(p99 {_ms(exai.p99_ms)} vs {_ms(direct.p99_ms)} ms, "
                f"+{_ms(exai.p99_ms - direct.p99_ms)} ms); calls/s "
                f"{exai.throughput / direct.throughput:.2f}x ({exai.throughput:,.0f} vs "
                f"{direct.throughput:,.0f}); exai's CPU {_us(exai.server_cpu_s, exai.calls)} "
                f"+ db {_us(exai.db_cpu_s, exai.calls)} µs per call"
            )
            if exai.faults or direct.faults:
                line += f" (not clean: {exai.faults or direct.faults})"
            if own is not None and own.p50_ms is not None:
                line += "; " + _split(exai, direct.p50_ms, own)
            out.append(line)
    return out


def _split(exai: Measurement, direct_p50: float, own: Measurement) -> str:
    """How much of the overhead is exai's own call path, and how much the proxy hop's."""
    assert exai.p50_ms is not None
    assert own.p50_ms is not None
    if exai.active == 1:
        hop = exai.p50_ms - direct_p50 - own.p50_ms
        return (
            f"of the +{_ms(exai.p50_ms - direct_p50)} ms, exai's own `echo` (same "
            f"configuration) takes p50 {_ms(own.p50_ms)} ms, leaving "
            f"{'+' if hop >= 0 else '-'}{_ms(abs(hop))} ms to the proxy hop"
        )
    mine = (exai.server_cpu_s + exai.db_cpu_s) / exai.calls * 1e6
    theirs = (own.server_cpu_s + own.db_cpu_s) / own.calls * 1e6
    hop = mine - theirs
    return (
        f"with {exai.active} in flight the latency is mostly queueing ({exai.active} / calls/s), "
        f"so compare CPU: exai's own `echo` costs it {theirs:,.0f} µs per call with db "
        f"({own.throughput:,.0f} calls/s), the proxied call {mine:,.0f}: "
        f"{'+' if hop >= 0 else '-'}{abs(hop):,.0f} µs for the proxy hop"
    )


def section(results: Sequence[Result], notes: Sequence[str], label: str | None = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = f"### {stamp} · `proxy` · " + (f"{label} · " if label else "") + report.machine()
    lines = [head, "", table(results), ""]
    over = overheads(results)
    if over:
        lines += ["Overhead per call (through exai minus direct, this run):", ""]
        lines += [f"- {o}" for o in over]
    lines += report.notes_section(
        notes,
        [(f"{r.m.scenario} / {r.server or '-'} / {r.path}", r.m) for r in results],
        BUSY_CORES,
    )
    return "\n".join(lines) + "\n"


def build() -> str:
    """The commit measured (``git rev-parse --short HEAD``), marked when the code under test
    differs from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "actors", "runtime", "bench"],
            timeout=10,
            check=False,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} with uncommitted changes" if dirty else head


def _plan_note(plan: Sequence[Scenario], env: dict[str, str], elapsed: float, py: str) -> str:
    windows = ", ".join(f"{s.key} {s.warmup:g} s warm-up + {s.duration:g} s" for s in plan)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items()))
    return (
        f"commit {build()}; a fresh server per measurement; direct: `bench/stdiogen.py`, "
        "a minimal newline-JSON client (no SDK) with the server as its child, N callers "
        "sharing its one stdio connection; through exai: `bench/loadgen.py`, one WebSocket "
        'session per client, `share = "node"` (one server process for all of them); one '
        "generator process each; "
        f"windows: {windows}; exai: `exai serve` defaults"
        + (f" plus {settings}" if settings else "")
        + f"; the run took {elapsed:.0f} s; clients on {py}"
    )


def main(args: argparse.Namespace) -> int:
    """The ``proxy`` mode of ``python -m bench`` (argument parsing is ``bench.__main__``'s)."""
    reject_options(
        args,
        "proxy",
        ("--scenarios", "--idle", "--generators", "--modes", "--py-spy", "--exai-database-url"),
    )
    names = chosen_servers(args, "proxy", SERVERS)
    env = exai_env(args.exai_env)
    plan = windowed(PLAN, args)
    work = Path(tempfile.mkdtemp(prefix="exai-bench-proxy-"))
    opts = Options(args.python, find_exai(args.exai), None, work, exai_env=env)
    notes: list[str] = []
    if opts.exai is None:
        raise SystemExit("exai not found (no .venv/bin/exai yet): run `just setup`")
    commands: dict[str, list[str]] = {}
    for name in names:
        try:
            commands[name] = SERVERS[name].command(work)
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"{SERVERS[name].label}: not measured: {exc}")
            print(f"  skip {name}: {exc}", flush=True)
    began = time.monotonic()
    print(f"bench proxy: servers {', '.join(commands)}; logs in {work}", flush=True)
    interrupted = False
    results: list[Result] = []
    try:
        results = run_all(plan, commands, True, opts, work)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted: partial results, not written to docs/")
    notes.insert(0, _plan_note(plan, env, time.monotonic() - began, args.python))
    text = section(results, notes, args.label)
    print()
    print(text)
    (work / "results.json").write_text(
        json.dumps(
            [dict(r.m.to_json(), mcp_server=r.server, path=r.path) for r in results], indent=1
        )
    )
    if not args.no_write and not interrupted:
        report.append(args.output, text, MARKER, SECTION, first=True)
        print(f"appended to {args.output}")
    if any(r.m.failure for r in results) or args.keep_work:
        print(f"logs and raw results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0
