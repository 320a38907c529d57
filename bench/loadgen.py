"""Load generator: one process holding many MCP sessions over WebSocket.

Run as ``python -m bench.loadgen --url ws://... --active N [--idle M] [--pipeline K] ...``.
It speaks a line protocol with the orchestrator (``bench.runner``):

1. opens ``active + idle`` sessions (``initialize`` then ``notifications/initialized``),
   at most ``--connect-concurrency`` handshakes at a time, then prints
   ``{"event": "ready", ...}``;
2. waits for ``go T0`` on stdin, ``T0`` a wall-clock time shared by all generator processes;
3. every active session calls ``tools/call echo`` (``--tool``/``--arguments`` name another
   tool, such as a proxied server's) as fast as answers come (``--pipeline K`` requests in
   flight), warm-up from ``T0``, measured window ``[T0+warmup, T0+warmup+duration)``;
4. writes the latencies of the calls answered inside the window to ``--latency-file`` (raw
   ``array('d')`` of seconds), prints ``{"event": "result", ...}`` and exits at once, leaving
   the kernel to close the sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

PROTOCOL_VERSION = "2025-06-18"
ECHO_TEXT = "hello"
#: ``tools/call echo`` with its id to fill in (``CALL % request_id``), the same for every
#: transport's generator.
CALL = (
    '{"jsonrpc":"2.0","id":%d,"method":"tools/call",'
    '"params":{"name":"echo","arguments":{"text":"' + ECHO_TEXT + '"}}}'
)


def call_template(tool: str, arguments: str) -> str:
    """``CALL`` for another tool: ``tools/call`` of ``tool`` with ``arguments`` (a JSON object's
    text), its id to fill in with ``%``. Raises ValueError (not JSON) or TypeError (JSON, not
    an object)."""
    parsed = json.loads(arguments)
    if not isinstance(parsed, dict):
        raise TypeError(f"--arguments must be a JSON object, not {arguments}")
    params = json.dumps({"name": tool, "arguments": parsed}, separators=(",", ":"))
    return (
        '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":' + params.replace("%", "%%") + "}"
    )


def initialize_message(version: str) -> str:
    """The generators' ``initialize`` request (id 0) for protocol ``version``."""
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "exai-bench", "version": "0.1"},
            },
        }
    )


_INITIALIZE = initialize_message(PROTOCOL_VERSION)
_INITIALIZED = '{"jsonrpc":"2.0","method":"notifications/initialized"}'


@dataclass
class Window:
    """The measured window in ``time.perf_counter()`` seconds."""

    start: float = 0.0
    end: float = 0.0


@dataclass
class Stats:
    """What one generator process saw."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    first_error: str = ""
    connected: int = 0
    connect_failed: int = 0
    finished: int = 0
    # Calls answered inside the window, per active session: a session at 0 stalled.
    answered: list[int] = field(default_factory=list)

    def error(self, what: str, *, count: bool = True) -> None:
        """Count a bad answer or a dropped session (count=False: only keep the first text)."""
        self.errors += count
        if not self.first_error:
            self.first_error = what[:300]


def raise_nofile_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _await_response(ws: WebSocketConnection, request_id: int) -> dict[str, Any]:
    """Read messages until the response to ``request_id`` (skipping notifications)."""
    while True:
        msg = json.loads(await ws.get_message())
        if isinstance(msg, dict) and msg.get("id") == request_id:
            return msg


def _check(msg: dict[str, Any], stats: Stats) -> bool:
    result = msg.get("result")
    if not isinstance(result, dict) or result.get("isError"):
        stats.error(json.dumps(msg))
        return False
    return True


async def _sequential_calls(
    ws: WebSocketConnection, window: Window, stats: Stats, slot: int, call: str = CALL
) -> None:
    """One request in flight: send, wait for its answer, repeat."""
    perf = time.perf_counter
    loads = json.loads
    record = stats.latencies.append
    answered = stats.answered
    request_id = 0
    while True:
        request_id += 1
        sent = perf()
        await ws.send_message(call % request_id)
        while True:
            msg = loads(await ws.get_message())
            if msg.get("id") == request_id:
                break
        done = perf()
        if done >= window.end:
            return
        if _check(msg, stats) and done >= window.start:
            record(done - sent)
            answered[slot] += 1


async def _pipelined_calls(
    ws: WebSocketConnection,
    window: Window,
    stats: Stats,
    slot: int,
    depth: int,
    *,
    call: str = CALL,
) -> None:
    """``depth`` requests in flight: a sender and a receiver sharing a semaphore."""
    perf = time.perf_counter
    slots = trio.Semaphore(depth)
    in_flight: dict[int, float] = {}
    sending_done = trio.Event()
    drained = trio.Event()

    async def sender() -> None:
        request_id = 0
        while perf() < window.end:
            await slots.acquire()
            request_id += 1
            in_flight[request_id] = perf()
            await ws.send_message(call % request_id)
        sending_done.set()

    async def receiver() -> None:
        record = stats.latencies.append
        while True:
            msg = json.loads(await ws.get_message())
            sent = in_flight.pop(msg.get("id"), None)
            if sent is None:
                continue
            done = perf()
            slots.release()
            if _check(msg, stats) and window.start <= done < window.end:
                record(done - sent)
                stats.answered[slot] += 1
            if sending_done.is_set() and not in_flight:
                drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
        await sending_done.wait()
        # Answers still in flight after the window do not count: allow them a moment.
        if in_flight:
            with trio.move_on_after(2.0):
                await drained.wait()
        nursery.cancel_scope.cancel()


@dataclass
class Plan:
    url: str
    active: int
    idle: int
    pipeline: int
    warmup: float
    duration: float
    connect_concurrency: int
    connect_timeout: float
    #: The ``tools/call`` to send (``call_template``), its id to fill in with ``%``.
    call: str = CALL


@dataclass
class Shared:
    """What every session task of one generator shares."""

    plan: Plan
    limiter: trio.CapacityLimiter
    ready: trio.MemorySendChannel[bool]
    go: trio.Event
    finished: trio.Event
    window: Window
    stats: Stats

    def session_done(self) -> None:
        self.stats.finished += 1
        if self.stats.finished == self.plan.active:
            self.finished.set()


async def _session(sh: Shared, active: bool) -> None:
    """One session in its own nursery, so its failure (a refused handshake raised by
    trio-websocket's reader task, a dropped connection) stays its own."""
    plan, stats = sh.plan, sh.stats
    ready_sent = counted = False
    try:
        async with trio.open_nursery() as nursery:
            async with sh.limiter:
                with trio.fail_after(plan.connect_timeout):
                    ws = await connect_websocket_url(nursery, plan.url, subprotocols=["mcp"])
                    await ws.send_message(_INITIALIZE)
                    init = await _await_response(ws, 0)
                    if "result" not in init:
                        raise RuntimeError(f"initialize failed: {init}")  # noqa: TRY301
                    await ws.send_message(_INITIALIZED)
            stats.connected += 1
            ready_sent = True
            await sh.ready.send(True)
            if not active:
                await trio.sleep_forever()  # idle: connected, initialized, silent
            await sh.go.wait()
            slot = len(stats.answered)
            stats.answered.append(0)
            if plan.pipeline > 1:
                await _pipelined_calls(ws, sh.window, stats, slot, plan.pipeline, call=plan.call)
            else:
                await _sequential_calls(ws, sh.window, stats, slot, plan.call)
            counted = True
            sh.session_done()
            await trio.sleep_forever()  # stay connected: the process exits with os._exit
    except Exception as exc:  # counted; the other sessions go on
        if ready_sent:
            stats.error(f"session: {exc!r}")
        else:
            stats.connect_failed += 1
            stats.error(f"connect: {exc!r}", count=False)
            await sh.ready.send(False)
    if active and not counted:
        sh.session_done()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


#: A session's task: ``(shared, active)``; it sends ``True`` on ``shared.ready`` once connected
#: and initialized (``False`` if it could not open), and calls ``shared.session_done()`` when
#: an active session has finished its calls (or failed).
SessionTask = Callable[[Shared, bool], Awaitable[None]]


async def run(
    plan: Plan,
    latency_file: str,
    session: SessionTask = _session,
    ready_info: dict[str, Any] | None = None,
) -> None:
    """The line protocol with the orchestrator around ``plan.active + plan.idle`` sessions,
    each ``session`` (this module's WebSocket session unless given: ``bench.httpgen`` passes
    its HTTP one, ``bench.stdiogen`` its stdio one). ``ready_info`` goes into the ``ready``
    event (``bench.stdiogen``: the pid of the server it started)."""
    stats = Stats()
    window = Window()
    go = trio.Event()
    finished = trio.Event()
    limiter = trio.CapacityLimiter(plan.connect_concurrency)
    total = plan.active + plan.idle
    ready_send, ready_recv = trio.open_memory_channel[bool](total)
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        sh = Shared(plan, limiter, ready_send, go, finished, window, stats)
        # Idle sessions first, so the active ones are the last connected (as in real life).
        for i in range(total):
            nursery.start_soon(session, sh, i >= plan.idle)
        for _ in range(total):
            await ready_recv.receive()
        _emit(
            {
                "event": "ready",
                "connected": stats.connected,
                "connect_failed": stats.connect_failed,
                "connect_s": time.perf_counter() - began,
                "first_error": stats.first_error,
                **(ready_info or {}),
            }
        )
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if not line.startswith("go "):
            os._exit(2)
        t0 = float(line.split()[1])
        now_perf, now_wall = time.perf_counter(), time.time()
        window.start = now_perf + (t0 - now_wall) + plan.warmup
        window.end = window.start + plan.duration
        cpu = [0.0, 0.0]
        nursery.start_soon(_sample_cpu, window, cpu)
        await trio.sleep(max(0.0, t0 - now_wall))
        go.set()
        # Sessions end on their first answer after the window; give stragglers a grace period.
        with trio.move_on_after(window.end - time.perf_counter() + 3.0):
            await finished.wait()
        await trio.Path(latency_file).write_bytes(stats.latencies.tobytes())
        _emit(
            {
                "event": "result",
                "calls": len(stats.latencies),
                "errors": stats.errors,
                "first_error": stats.first_error,
                "client_cpu_s": cpu[1] - cpu[0],
                "unfinished_sessions": plan.active - stats.finished,
                "stalled_sessions": plan.active - sum(1 for n in stats.answered if n),
            }
        )
        sys.stdout.flush()
        os._exit(0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sample_cpu(window: Window, out: list[float]) -> None:
    """This process's CPU seconds at the start and at the end of the window."""
    await trio.sleep(max(0.0, window.start - time.perf_counter()))
    out[0] = _cpu()
    await trio.sleep(max(0.0, window.end - time.perf_counter()))
    out[1] = _cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--active", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--latency-file", required=True)
    parser.add_argument("--tool", default="echo", help="the tool every call calls")
    parser.add_argument(
        "--arguments", default=json.dumps({"text": ECHO_TEXT}), help="its arguments (JSON)"
    )
    args = parser.parse_args(argv)
    raise_nofile_limit()
    plan = Plan(
        url=args.url,
        active=args.active,
        idle=args.idle,
        pipeline=args.pipeline,
        warmup=args.warmup,
        duration=args.duration,
        connect_concurrency=args.connect_concurrency,
        connect_timeout=args.connect_timeout,
        call=call_template(args.tool, args.arguments),
    )
    trio.run(run, plan, args.latency_file)


if __name__ == "__main__":
    main()
