"""Load generator over MCP's stdio transport: one process, one server it starts, N callers.

Run as ``python -m bench.stdiogen --url stdio: --active N --command '["server", "arg"]'
--tool NAME --arguments '{...}' ...``; it speaks ``bench.loadgen``'s line protocol with the
orchestrator (``ready``, ``go T0``, ``result``) and writes the latencies of the calls answered
inside the window the same way.

It is the *direct* client of ``python -m bench proxy``: a stdio MCP server called with no exai
in between. It starts ``--command`` as its own child (stdin and stdout are pipes, stderr
goes to this process's log), sends ``initialize`` + ``notifications/initialized``, and names
the child's pid in its ``ready`` event so that the harness measures that process as the
server. Then each of the ``--active`` callers sends ``tools/call`` and waits for its answer,
as fast as answers come: with N callers, N requests are in flight on the one connection,
told apart by their JSON-RPC ids, the load the server sees through exai's ``share = "node"``
from N sessions.

The transport is the spec's (modelcontextprotocol ``docs/specification/2025-11-25/basic/
transports.mdx``, "stdio"): UTF-8 JSON-RPC messages, one per line, no embedded newlines.
The client is minimal on purpose (``json`` and trio, no SDK): its cost per call is small next
to the server's, so the direct figures are the server's own. When this process exits the
child sees stdin close (stdio servers exit then); the harness also kills this process's group,
which the child shares.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.loadgen import (
    PROTOCOL_VERSION,
    Plan,
    Shared,
    _check,
    call_template,
    initialize_message,
    raise_nofile_limit,
    run,
)

_INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'


class StdioClosed(Exception):
    """The server closed its stdout (it exited) before answering."""


@dataclass
class _Pending:
    """A request waiting for its answer."""

    done: trio.Event = field(default_factory=trio.Event)
    message: Any = None
    at: float = 0.0


class StdioConnection:
    """One server's stdin/stdout: requests sent whole under a lock, a reader routing each
    response to its request by id. Messages without a pending id (notifications, log lines of
    the server's own) are skipped."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self.closed = False

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, line: bytes) -> None:
        async with self._send_lock:
            await self._stdin.send_all(line)

    async def request(self, request_id: int, line: bytes) -> _Pending:
        """Send ``line`` (ending in a newline) and wait for the response to ``request_id``;
        its ``at`` is when the reader saw it (perf_counter s). Raises StdioClosed."""
        if self.closed:
            raise StdioClosed("the server's stdout is closed")
        pending = self._pending[request_id] = _Pending()
        await self.send(line)
        await pending.done.wait()
        if pending.message is None:
            raise StdioClosed("the server's stdout closed before its answer")
        return pending

    async def read_forever(self) -> None:
        """Route every response line to its request until the server's stdout ends."""
        buf = b""
        pending = self._pending
        loads = json.loads
        perf = time.perf_counter
        while True:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            at = perf()
            for line in lines:
                if not line.strip():
                    continue
                msg = loads(line)
                waiter = pending.pop(msg.get("id"), None) if isinstance(msg, dict) else None
                if waiter is not None:
                    waiter.message, waiter.at = msg, at
                    waiter.done.set()
        self.closed = True
        for waiter in pending.values():
            waiter.done.set()
        pending.clear()


async def handshake(conn: StdioConnection) -> dict[str, Any]:
    """``initialize`` + ``notifications/initialized``; the server's ``initialize`` result.
    Raises StdioClosed or RuntimeError (an error answer)."""
    init_id = conn.new_id()
    text = initialize_message(PROTOCOL_VERSION).replace('"id": 0', f'"id": {init_id}', 1)
    answer = (await conn.request(init_id, text.encode() + b"\n")).message
    result = answer.get("result")
    if "error" in answer or not isinstance(result, dict):
        raise RuntimeError(f"initialize failed: {answer}")
    await conn.send(_INITIALIZED)
    return result


async def _caller(conn: StdioConnection, call: str, sh: Shared, active: bool) -> None:
    """One caller on the shared connection (``bench.loadgen.SessionTask`` once ``conn`` and
    ``call`` are bound): sequential calls, each measured from send to the reader seeing its
    answer."""
    stats, window = sh.stats, sh.window
    stats.connected += 1
    await sh.ready.send(True)
    if not active:
        await trio.sleep_forever()
    counted = False
    try:
        await sh.go.wait()
        slot = len(stats.answered)
        stats.answered.append(0)
        perf = time.perf_counter
        record = stats.latencies.append
        while True:
            request_id = conn.new_id()
            sent = perf()
            answer = await conn.request(request_id, (call % request_id).encode() + b"\n")
            if answer.at >= window.end:
                break
            if _check(answer.message, stats) and answer.at >= window.start:
                record(answer.at - sent)
                stats.answered[slot] += 1
        counted = True
        sh.session_done()
    except StdioClosed as exc:
        stats.error(f"caller: {exc}")
    if not counted:
        sh.session_done()
    await trio.sleep_forever()  # the process exits with os._exit


async def _main(plan: Plan, latency_file: str, command: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr
        )
        conn = StdioConnection(process)
        nursery.start_soon(conn.read_forever)
        with trio.fail_after(plan.connect_timeout):
            await handshake(conn)
        session = functools.partial(_caller, conn, plan.call)
        await run(plan, latency_file, session, ready_info={"server_pid": process.pid})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stdiogen", description=__doc__)
    parser.add_argument("--url", default="stdio:", help="ignored: the server is --command")
    parser.add_argument("--command", required=True, help="the server's argv, a JSON list")
    parser.add_argument("--active", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0, choices=(0,))
    parser.add_argument("--pipeline", type=int, default=1, choices=(1,))
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--latency-file", required=True)
    parser.add_argument("--tool", required=True)
    parser.add_argument("--arguments", default="{}", help="the tool's arguments (JSON)")
    args = parser.parse_args(argv)
    command = json.loads(args.command)
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise SystemExit("--command must be a non-empty JSON list of strings")
    raise_nofile_limit()
    plan = Plan(
        url=args.url,
        active=args.active,
        idle=0,
        pipeline=1,
        warmup=args.warmup,
        duration=args.duration,
        connect_concurrency=1,
        connect_timeout=args.connect_timeout,
        call=call_template(args.tool, args.arguments),
    )
    trio.run(_main, plan, args.latency_file, command)


if __name__ == "__main__":
    main()
