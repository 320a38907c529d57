"""Run one scenario against one started server and measure it.

The orchestrator starts the scenario's generator processes, waits until every session is
connected and initialized, reads the server's RSS, then sends all generators the same wall-clock
start time. It samples the server's CPU (and its database's, for exai) at the start and the end
of the measured window, reads its peak RSS, and merges the generators' latencies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import proc
from bench.launch import Owned
from bench.scenarios import Scenario
from bench.targets import REPO, Running


@dataclass
class Measurement:
    """One scenario against one server."""

    scenario: str
    server: str
    active: int
    idle: int
    pipeline: int
    generators: int
    duration_s: float
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    connect_failed: int = 0
    connect_s: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    server_cpu_s: float = 0.0
    db_cpu_s: float = 0.0
    #: CPU of the processes under the server counted apart (``Running.apart``: exai's proxied
    #: MCP servers); in neither ``server_cpu_s`` nor ``server_cpu_us_per_call``.
    apart_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    peak_rss_kib: int = 0
    loaded_rss_kib: int = 0
    baseline_rss_kib: int | None = None
    unfinished_sessions: int = 0
    stalled_sessions: int = 0
    failure: str = ""

    @property
    def throughput(self) -> float:
        return self.calls / self.duration_s if self.duration_s else 0.0

    @property
    def faults(self) -> str:
        """What makes this run not clean ("" when every call was answered well)."""
        parts = []
        if self.stalled_sessions:
            parts.append(f"{self.stalled_sessions} of {self.active} sessions stalled")
        if self.errors:
            parts.append(f"{self.errors} errors")
        if self.open_faults:
            parts.append(self.open_faults)
        return ", ".join(parts)

    @property
    def open_faults(self) -> str:
        return f"{self.connect_failed} sessions failed to open" if self.connect_failed else ""

    @property
    def other_cpu_s(self) -> float:
        """CPU the machine spent on anything but this server and its load (noise)."""
        ours = self.server_cpu_s + self.db_cpu_s + self.apart_cpu_s + self.client_cpu_s
        return max(0.0, self.machine_cpu_s - ours)

    @property
    def server_cpu_us_per_call(self) -> float | None:
        cpu = self.server_cpu_s + self.db_cpu_s
        return cpu / self.calls * 1e6 if self.calls else None

    @property
    def kib_per_idle_session(self) -> float | None:
        if not self.idle or self.baseline_rss_kib is None or not self.loaded_rss_kib:
            return None
        # Read before the window starts: the active sessions are connected and silent too.
        return (self.loaded_rss_kib - self.baseline_rss_kib) / (self.idle + self.active)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["throughput"] = self.throughput
        data["kib_per_idle_session"] = self.kib_per_idle_session
        data["other_cpu_s"] = self.other_cpu_s
        return data


@dataclass(frozen=True)
class RunOptions:
    generator_python: str
    work: Path
    profile_out: Path | None = None
    py_spy: str | None = None
    #: The load generator's module: WebSocket (``bench.loadgen``) or HTTP (``bench.httpgen``).
    generator: str = "bench.loadgen"


def _percentile(ordered: array[float], q: float) -> float:
    """Nearest-rank percentile of an ascending array, in milliseconds."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1] * 1000.0


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


Snapshot = tuple[dict[int, float], dict[int, float], dict[int, float]]


def _snapshot(running: Running) -> Snapshot:
    """CPU seconds per process: the server's, its database's, and those counted apart."""
    db_tree = set(proc.tree(running.db_pids()))
    apart_tree = set(proc.tree(running.apart())) - db_tree if running.apart else set()
    server = {
        p: proc.cpu_seconds(p)
        for p in proc.tree([running.pid])
        if p not in db_tree and p not in apart_tree
    }
    db = {p: proc.cpu_seconds(p) for p in db_tree}
    apart = {p: proc.cpu_seconds(p) for p in apart_tree}
    return server, db, apart


def _events(gen: Owned, deadline: float, kind: str) -> dict[str, Any]:
    while True:
        line = gen.read_line(deadline)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == kind:
                return event


def measure(s: Scenario, running: Running, opts: RunOptions, tag: str) -> Measurement:
    """Run scenario ``s`` against ``running``; failures are recorded, not raised."""
    m = Measurement(s.key, running.name, s.active, s.idle, s.pipeline, s.generators, s.duration)
    try:
        if s.idle:
            # Baseline: the server after one short session, before the idle ones connect.
            prime = replace(
                s, key="prime", active=1, idle=0, generators=1, warmup=0.0, duration=0.5
            )
            scratch = Measurement("prime", running.name, 1, 0, 1, 1, prime.duration)
            _drive(prime, running, opts, f"{tag}-prime", scratch)
            time.sleep(0.3)
            m.baseline_rss_kib = proc.Memory.of(running.pid).rss_kib
        _drive(s, running, opts, tag, m)
    except (RuntimeError, TimeoutError, EOFError, OSError, ValueError) as exc:
        m.failure = f"{type(exc).__name__}: {exc}"
    return m


def _generators(
    s: Scenario, running: Running, opts: RunOptions, tag: str, stack: contextlib.ExitStack
) -> list[tuple[Owned, Path]]:
    """Start the scenario's generator processes (stopped when ``stack`` closes)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = []
    shares = zip(_split(s.active, s.generators), _split(s.idle, s.generators), strict=True)
    for i, (active, idle) in enumerate(shares):
        file = opts.work / f"{tag}-gen{i}.lat"
        argv = [opts.generator_python, "-m", opts.generator, "--url", running.url]
        argv += running.client_args
        argv += ["--active", str(active), "--idle", str(idle), "--pipeline", str(s.pipeline)]
        argv += ["--warmup", str(s.warmup), "--duration", str(s.duration)]
        argv += ["--latency-file", str(file)]
        log = opts.work / f"{tag}-gen{i}.log"
        gen = Owned(f"generator {i}", argv, log, env=env, cwd=REPO, pipe_stdio=True)
        out.append((stack.enter_context(gen), file))
    return out


def _drive(s: Scenario, running: Running, opts: RunOptions, tag: str, m: Measurement) -> None:
    """Start the generators, run the window, fill ``m``. Generators are always stopped."""
    with contextlib.ExitStack() as stack:
        gens = _generators(s, running, opts, tag, stack)
        connect_deadline = time.monotonic() + 30.0 + s.sessions / 150.0
        for gen, _ in gens:
            ready = _events(gen, connect_deadline, "ready")
            m.connect_failed += int(ready["connect_failed"])
            m.connect_s = max(m.connect_s, float(ready["connect_s"]))
            m.first_error = m.first_error or str(ready.get("first_error") or "")
            if "server_pid" in ready:  # a generator that started the server (bench.stdiogen)
                running = replace(running, pid=int(ready["server_pid"]))
        time.sleep(0.2)
        m.loaded_rss_kib = proc.Memory.of(running.pid).rss_kib
        t0 = time.time() + 0.3
        for gen, _ in gens:
            gen.send_line(f"go {t0}")
        _sleep_until(t0 + s.warmup)
        server0, db0, apart0 = _snapshot(running)
        busy0 = proc.machine_busy_seconds()
        profiler = _start_profiler(running, s, opts, tag)
        if profiler is not None:
            stack.enter_context(profiler)
        _sleep_until(t0 + s.warmup + s.duration)
        server1, db1, apart1 = _snapshot(running)
        m.machine_cpu_s = proc.machine_busy_seconds() - busy0
        m.peak_rss_kib = proc.Memory.of(running.pid).peak_kib
        m.server_cpu_s = proc.cpu_delta(server0, server1)
        m.db_cpu_s = proc.cpu_delta(db0, db1)
        m.apart_cpu_s = proc.cpu_delta(apart0, apart1)
        latencies = _collect(gens, m)
        if profiler is not None:
            profiler.proc.wait(timeout=s.duration + 30)
    m.calls = len(latencies)
    if latencies:
        ordered = array("d", sorted(latencies))
        m.p50_ms = _percentile(ordered, 0.50)
        m.p90_ms = _percentile(ordered, 0.90)
        m.p99_ms = _percentile(ordered, 0.99)
        m.max_ms = ordered[-1] * 1000.0


def _collect(gens: list[tuple[Owned, Path]], m: Measurement) -> array[float]:
    """Every generator's result line and latencies, merged into ``m`` and returned."""
    deadline = time.monotonic() + 15.0
    latencies: array[float] = array("d")
    for gen, file in gens:
        result = _events(gen, deadline, "result")
        m.errors += int(result["errors"])
        m.first_error = m.first_error or str(result.get("first_error") or "")
        m.client_cpu_s += float(result["client_cpu_s"])
        m.unfinished_sessions += int(result["unfinished_sessions"])
        m.stalled_sessions += int(result["stalled_sessions"])
        latencies.frombytes(file.read_bytes())
        file.unlink()
    return latencies


def _start_profiler(running: Running, s: Scenario, opts: RunOptions, tag: str) -> Owned | None:
    """py-spy attached to the server for the measured window (profile mode only)."""
    if opts.profile_out is None or opts.py_spy is None:
        return None
    argv = [opts.py_spy, "record", "--pid", str(running.pid), "--duration", str(int(s.duration))]
    argv += ["--rate", "200", "--format", "raw", "--output", str(opts.profile_out), "--nonblocking"]
    # One root frame per thread: the event loop's share is told apart from the pykka actors'
    # and the log writer's.
    argv += ["--threads"]
    return Owned("py-spy", argv, opts.work / f"{tag}-py-spy.log")
