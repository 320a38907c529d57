"""``python -m bench http``: exai and the ``mcp`` 2.x SDK over Streamable HTTP, same run.

In one run, on one machine, a fresh server per scenario:

floor           ``bench/servers/http_floor.py``: bare h11 over trio, a canned JSON answer per
                POST (what HTTP costs in the runtime's own stack)
exai            ``exai serve`` defaults (embedded Postgres, every call persisted at the default
                durability, auth on), clients at ``http://HOST:PORT/mcp``
exai-ws         the same ``exai serve`` over its WebSocket endpoint (``bench.loadgen``): what
                HTTP costs exai against its other transport, for information
mcp2-stateless  ``bench/servers/mcp2_http.py --stateless``: the SDK's own Streamable HTTP app
                (``Server.streamable_http_app(stateless_http=True)``) under uvicorn
mcp2-stateful   the same app with sessions (``Mcp-Session-Id``)

Load (``bench.httpgen``, the same generator for every server): ``seq1``, one client, one call
at a time (latency); ``s50``, 50 clients, each its own session (stateless: none) on its own
keep-alive connection, one ``tools/call echo`` in flight each, split over 2 generator
processes with a common wall-clock start. Before each measurement one probe call records how
the server answers (``application/json`` or ``text/event-stream``).

Target (benchmark, not test; PASS/MISS from this run's figures): "exai >= the SDK with every
call persisted": exai's calls/s against each SDK mode's, with 50 clients and with 1 (where
calls/s is 1 / latency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from bench import report, venvs
from bench.httpgen import PROTOCOL_VERSION, Client, Endpoint, handshake
from bench.launch import Owned, free_port, wait_for_port
from bench.own_plan import chosen_servers, exai_env, reject_options, windowed
from bench.profile import summarize
from bench.runner import Measurement, RunOptions, measure
from bench.scenarios import Scenario
from bench.targets import BENCH, REPO, Options, Running, find_exai, started

SERVERS = ("floor", "exai", "exai-ws", "mcp2-stateless", "mcp2-stateful")
LABELS = {
    "floor": "floor (h11/trio JSON echo)",
    "exai": "exai serve",
    "exai-ws": "exai serve over WebSocket",
    "mcp2-stateless": "SDK 2.3 HTTP, stateless",
    "mcp2-stateful": "SDK 2.3 HTTP, sessions",
}
ANCHORS = ("mcp2-stateless", "mcp2-stateful")

SEQ1 = Scenario("seq1", "1 client, sequential", active=1, warmup=1.0, duration=5.0)
S50 = Scenario("s50", "50 clients", active=50, generators=2, warmup=2.0, duration=8.0)
PLAN = (SEQ1, S50)

#: Other work above this many cores in a window makes the run's figures preliminary.
BUSY_CORES = 0.25

MARKER = "<!-- bench http: newest results first; `python -m bench http` inserts below -->"
SECTION = f"""## Streamable HTTP: exai serve and the SDK's own HTTP app

`exai serve` (its defaults: embedded Postgres, every call persisted) over MCP's Streamable
HTTP transport, beside the `mcp` 2.3 SDK's own Streamable HTTP app (low-level `Server`,
`streamable_http_app()` under uvicorn) stateless and with sessions, and a bare h11/trio JSON
echo (the floor), all in one run with the same HTTP/1.1 keep-alive generator
(`bench/httpgen.py`). Made by `python -m bench http`; how it measures is in `bench/README.md`
and `bench/streamable_http.py`.

Columns: calls/s over the measured window (all clients together); latency percentiles of the
calls answered in it (send to response; for an SSE answer, to the event holding the response);
server CPU s = utime+stime of the server process over the window (exai: `+ db` is its embedded
Postgres); CPU µs/call = both divided by the calls; answers = the Content-Type of a
`tools/call` answer, probed before the window; client CPU s = the generators' own CPU; other
CPU s = the rest of the machine meanwhile (noise). Target (benchmark, not test): exai's
calls/s >= each SDK mode's, with every call persisted, with 50 clients and with 1.

{MARKER}
"""


@dataclass
class Result:
    """One scenario against one server, and the Content-Type its answers came in."""

    m: Measurement
    answers: str = ""


# ---------------------------------------------------------------------------------------------
# Servers


@contextlib.contextmanager
def start(server: str, opts: Options, tag: str) -> Iterator[Running]:
    """``server`` on a free loopback port, with an ``http://`` URL (exai's token in it as
    ``?token=``, which the generator sends as a Bearer header; ``exai-ws`` keeps its
    ``ws://`` one); stopped on exit."""
    if server in ("exai", "exai-ws"):
        with started("exai", opts, tag, S50.sessions + 1) as running:
            if server == "exai-ws":
                yield replace(running, name=server)
                return
            url = running.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
            yield replace(running, url=url)
        return
    port = free_port()
    log = opts.logs / f"{tag}-{server}.log"
    deadline = time.monotonic() + opts.start_timeout
    if server == "floor":
        argv = [opts.generator_python, str(BENCH / "servers" / "http_floor.py")]
    else:
        python = venvs.ensure("mcp2", log=opts.logs / "venv-mcp2.log")
        argv = [str(python), str(BENCH / "servers" / "mcp2_http.py")]
        if server == "mcp2-stateless":
            argv.append("--stateless")
    argv += ["--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    client_args = ("--stateless",) if server == "mcp2-stateless" else ()
    with Owned(server, argv, log, env=env, cwd=REPO) as owned:
        wait_for_port(port, deadline, owned)
        url = f"http://127.0.0.1:{port}/mcp"
        yield Running(server, url, owned, owned.pid, client_args=client_args)


def probe(running: Running, timeout: float = 10.0) -> str:
    """The Content-Type of one ``tools/call`` answer (after the handshake unless stateless).
    Its session, if any, is left idle: one more silent session beside the load."""

    async def one() -> str:
        endpoint = Endpoint.parse(running.url)
        with trio.fail_after(timeout):
            sock = await trio.open_tcp_stream(endpoint.host, endpoint.port)
            async with sock:
                client = Client(sock, endpoint)
                if "--stateless" in running.client_args:
                    client.session(None, PROTOCOL_VERSION)
                else:
                    await handshake(client)
                call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
                call += b'"arguments":{"text":"probe"}}}'
                answer = await client.post(call, 1)
                kind = answer.headers.get(b"content-type", b"?").decode()
                return kind.split(";", 1)[0].strip()

    try:
        return trio.run(one)
    except Exception as exc:  # the probe is information: its failure is noted, not fatal
        return f"probe failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# Running the plan


def run_all(
    plan: Sequence[Scenario], servers: Sequence[str], opts: Options, run_opts: RunOptions
) -> list[Result]:
    """Every scenario against every server, a fresh server each time."""
    out: list[Result] = []
    for s in plan:
        for server in servers:
            tag = f"http-{s.key}-{server}"
            result = Result(
                Measurement(s.key, server, s.active, s.idle, s.pipeline, s.generators, s.duration)
            )
            try:
                with start(server, opts, tag) as running:
                    over_ws = server == "exai-ws"
                    result.answers = "WebSocket" if over_ws else probe(running)
                    profile_out = None
                    if run_opts.py_spy and server in ("exai", "exai-ws"):
                        profile_out = run_opts.work / f"profile-{server}-{s.key}.raw"
                    gen = "bench.loadgen" if over_ws else run_opts.generator
                    each = replace(run_opts, profile_out=profile_out, generator=gen)
                    result.m = measure(s, running, each, tag)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                result.m.failure = f"{type(exc).__name__}: {exc}"
            out.append(result)
            _progress(result)
    return out


def _progress(r: Result) -> None:
    m = r.m
    if m.failure:
        print(f"  {m.scenario:5} {m.server:15} FAILED {m.failure}", flush=True)
        return
    print(
        f"  {m.scenario:5} {m.server:15} {m.throughput:8,.0f} calls/s  "
        f"p50 {m.p50_ms or 0:7.3f} ms  p99 {m.p99_ms or 0:7.3f} ms  "
        f"server CPU {m.server_cpu_s:5.2f}+{m.db_cpu_s:4.2f} s  "
        f"client CPU {m.client_cpu_s:5.2f} s  errors {m.errors + m.connect_failed}"
        + (f"  STALLED {m.stalled_sessions}/{m.active}" if m.stalled_sessions else "")
        + f"  other CPU {m.other_cpu_s:.2f} s  answers {r.answers}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Targets and the report


def _find(results: Sequence[Result], scenario: str, server: str) -> Measurement | None:
    for r in results:
        m = r.m
        if m.scenario == scenario and m.server == server and not m.failure and m.calls:
            return m
    return None


def targets(results: Sequence[Result]) -> list[report.Target]:
    """exai's calls/s >= each SDK mode's, 50 clients (throughput) and 1 client (latency: one
    call at a time, calls/s = 1 / latency); never asserted. An exai run that lost calls is a
    MISS whatever its numbers; a faulty anchor makes the target n/a."""
    out: list[report.Target] = []
    for s in (S50, SEQ1):
        exai = _find(results, s.key, "exai")
        for anchor in ANCHORS:
            label = f"{s.title}, exai serve (every call persisted) >= {LABELS[anchor]}, calls/s"
            sdk = _find(results, s.key, anchor)
            if exai is None or sdk is None:
                out.append(report.Target(label, "n/a", "not measured in this run"))
                continue
            ratio = exai.throughput / sdk.throughput
            text = f"{ratio:.2f}x ({exai.throughput:,.0f} vs {sdk.throughput:,.0f} calls/s"
            text += f", p50 {_ms(exai.p50_ms)} vs {_ms(sdk.p50_ms)} ms)"
            if exai.faults:
                out.append(report.Target(label, "MISS", f"{text}, not valid: exai {exai.faults}"))
            elif sdk.faults:
                out.append(report.Target(label, "n/a", f"{anchor} run not clean: {sdk.faults}"))
            else:
                out.append(report.Target(label, "PASS" if ratio >= 1.0 else "MISS", text))
    return out


def _latency_lines(results: Sequence[Result]) -> list[str]:
    """For information: exai over HTTP against the floor and against itself over WebSocket."""
    out = []
    for s in (S50, SEQ1):
        exai = _find(results, s.key, "exai")
        for other in ("floor", "exai-ws"):
            them = _find(results, s.key, other)
            if exai and them and exai.p50_ms and them.p50_ms:
                out.append(
                    f"{s.title}, exai/{LABELS[other]}: calls/s "
                    f"{exai.throughput / them.throughput:.2f}x, p50 "
                    f"{exai.p50_ms / them.p50_ms:.2f}x ({_ms(exai.p50_ms)} vs "
                    f"{_ms(them.p50_ms)} ms); server CPU per call {_us(exai)} vs {_us(them)} µs"
                )
    return out


def _us(m: Measurement) -> str:
    per_call = m.server_cpu_us_per_call
    return "-" if per_call is None else f"{per_call:,.0f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table(results: Sequence[Result]) -> str:
    head = (
        "| scenario | server | answers | calls/s | p50 ms | p90 ms | p99 ms | max ms "
        "| server CPU s | CPU µs/call | peak RSS MiB | client CPU s | other CPU s | errors "
        "| exai/this (calls/s) |"
    )
    rows = [head, "|" + "---|" * 15]
    titles = {s.key: s.title for s in PLAN}
    for r in results:
        m = r.m
        lead = [titles.get(m.scenario, m.scenario), LABELS.get(m.server, m.server)]
        if m.failure:
            rows.append("| " + " | ".join([*lead, f"failed: {report._cell(m.failure)}"]) + " |")
            continue
        per_call = m.server_cpu_us_per_call
        if per_call is None:
            rows.append("| " + " | ".join([*lead, r.answers, "0", "no calls answered"]) + " |")
            continue
        exai = _find(results, m.scenario, "exai")
        vs = (
            f"{exai.throughput / m.throughput:.2f}x"
            if exai is not None and m.server != "exai" and m.throughput
            else ""
        )
        cells = [
            *lead,
            f"`{r.answers}`" if "/" in r.answers and " " not in r.answers else r.answers,
            f"{m.throughput:,.0f}",
            _ms(m.p50_ms),
            _ms(m.p90_ms),
            _ms(m.p99_ms),
            _ms(m.max_ms),
            f"{m.server_cpu_s:.2f}" + (f" + db {m.db_cpu_s:.2f}" if m.db_cpu_s else ""),
            f"{per_call:.0f}",
            f"{m.peak_rss_kib / 1024:.1f}",
            f"{m.client_cpu_s:.2f}",
            f"{m.other_cpu_s:.2f}",
            str(m.errors + m.connect_failed)
            + (f" ({m.stalled_sessions} stalled)" if m.stalled_sessions else ""),
            vs,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def section(results: Sequence[Result], notes: Sequence[str], label: str | None = None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = f"### {stamp} · `http` · " + (f"{label} · " if label else "") + report.machine()
    lines = [head, "", table(results), ""]
    lines += ["Targets (ratios within this run):", ""]
    lines += [f"- {t.line()}" for t in targets(results)]
    info = _latency_lines(results)
    if info:
        lines += ["", "For information:", ""] + [f"- {i}" for i in info]
    lines += report.notes_section(
        notes,
        [(f"{r.m.scenario} / {LABELS.get(r.m.server, r.m.server)}", r.m) for r in results],
        BUSY_CORES,
    )
    return "\n".join(lines) + "\n"


def _plan_note(plan: Sequence[Scenario], env: dict[str, str], elapsed: float, py: str) -> str:
    windows = ", ".join(
        f"{s.key} {s.warmup:g} s warm-up + {s.duration:g} s ({s.generators} generator"
        f"{'s' if s.generators > 1 else ''})"
        for s in plan
    )
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items()))
    return (
        "a fresh server per scenario; every client one keep-alive HTTP/1.1 connection (h11 "
        "over trio), `initialize` + `notifications/initialized` first except against the "
        "stateless SDK (it answers without a handshake), then `tools/call echo` with "
        f"`MCP-Protocol-Version`; windows: {windows}; exai: `exai serve` defaults"
        + (f" plus {settings}" if settings else "")
        + f", token as `Authorization: Bearer`; the run took {elapsed:.0f} s; clients on {py}"
    )


def main(args: argparse.Namespace) -> int:
    """The ``http`` mode of ``python -m bench`` (argument parsing is ``bench.__main__``'s)."""
    reject_options(args, "http", ("--scenarios", "--idle", "--generators", "--modes"))
    servers = chosen_servers(args, "http", SERVERS)
    env = exai_env(args.exai_env)
    plan = windowed(PLAN, args)
    work = Path(tempfile.mkdtemp(prefix="exai-bench-http-"))
    opts = Options(args.python, find_exai(args.exai), args.exai_database_url, work, exai_env=env)
    notes: list[str] = []
    if "exai" in servers and opts.exai is None:
        notes.append("exai not found (no .venv/bin/exai yet): not measured")
        servers.remove("exai")
    py_spy = None
    if args.py_spy:
        py_spy = str(venvs.ensure("anchors", log=work / "venv-anchors.log").parent / "py-spy")
        args.no_write = True
    run_opts = RunOptions(args.python, work, None, py_spy, generator="bench.httpgen")
    began = time.monotonic()
    print(f"bench http: servers {', '.join(servers)}; logs in {work}", flush=True)
    interrupted = False
    results: list[Result] = []
    try:
        results = run_all(plan, servers, opts, run_opts)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted: partial results, not written to docs/")
    notes.insert(0, _plan_note(plan, env, time.monotonic() - began, args.python))
    text = section(results, notes, args.label)
    print()
    print(text)
    (work / "results.json").write_text(
        json.dumps([dict(r.m.to_json(), answers=r.answers) for r in results], indent=1)
    )
    for s in plan:
        for server in ("exai", "exai-ws"):
            profile = work / f"profile-{server}-{s.key}.raw"
            if profile.exists():
                summary = summarize(profile)
                profile.with_suffix(".txt").write_text(summary)
                print(f"{LABELS[server]}, {s.title}:\n{summary}", flush=True)
    if not args.no_write and not interrupted:
        report.append(args.output, text, MARKER, SECTION, first=True)
        print(f"appended to {args.output}")
    if any(r.m.failure for r in results) or args.keep_work or py_spy:
        print(f"logs and raw results kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0
