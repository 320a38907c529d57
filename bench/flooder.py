"""Flooding clients of issue 11: one process, one MCP session that misbehaves on purpose.

Run as ``python -m bench.flooder --url ws://... --kind pipeline|noread|slowread [...]``. It
speaks the line protocol of ``bench.loadgen`` with the orchestrator (``bench.flood``):

1. connects, sends ``initialize`` + ``notifications/initialized``, prints
   ``{"event": "ready", ...}``;
2. waits for ``go`` on stdin, then floods until ``stop`` arrives (or ``--max-seconds``);
3. stops sending, reads whatever is still coming for ``--drain`` seconds at full speed, prints
   ``{"event": "result", ...}`` and exits at once (the kernel closes the socket).

Kinds:

``pipeline``  sends ``tools/call echo`` as fast as the socket takes them, never waiting for
              answers, and reads every reply as it comes (a reader task beside the sender).
``noread``    sends large echo requests (``--payload-bytes``, up to ``--max-bytes`` in all) and
              never reads a reply while flooding. The socket's TCP state is polled in
              ``/proc/net/tcp`` to see when the server closes it without reading a frame; the
              close code, if the server sent one, is learnt in the drain.
``slowread``  pipelines like ``pipeline`` but reads one frame per ``--read-interval`` seconds.

Every request is counted once: answered with a result, refused with -32000 ("server busy"),
answered with another error, or unanswered (no reply by the end of the drain: silence).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from bench.loadgen import _INITIALIZE, _INITIALIZED, _await_response, raise_nofile_limit

BUSY = -32000
_CALL_HEAD = '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":'
_TCP_STATES = {
    "01": "ESTABLISHED",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0B": "CLOSING",
}


@dataclass
class Counts:
    """What the flooder saw; ``result()`` is its report."""

    kind: str
    payload_bytes: int
    sent: int = 0
    sent_bytes: int = 0
    ok: int = 0
    busy: int = 0
    other_errors: int = 0
    first_error: str = ""
    frames_read: int = 0
    frames_read_flooding: int = 0
    first_busy_s: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    closed_at_s: float | None = None  # first sign of a close, seconds after go
    closed_how: str = ""  # "frame" (a close frame was read), "send", or "tcp <STATE>"
    flood_s: float = 0.0
    send_stopped: str = ""
    outstanding: set[int] = field(default_factory=set)
    began: float = 0.0

    def since_go(self) -> float:
        return time.monotonic() - self.began

    def closed(self, how: str, code: int | None = None, reason: str | None = None) -> None:
        if self.closed_at_s is None:
            self.closed_at_s = self.since_go()
            self.closed_how = how
        if code is not None and self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def result(self, client_cpu_s: float, drain_s: float) -> dict[str, Any]:
        return {
            "event": "result",
            "kind": self.kind,
            "payload_bytes": self.payload_bytes,
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "ok": self.ok,
            "busy": self.busy,
            "other_errors": self.other_errors,
            "first_error": self.first_error,
            "unanswered": len(self.outstanding),
            "frames_read": self.frames_read,
            "frames_read_flooding": self.frames_read_flooding,
            "first_busy_s": self.first_busy_s,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "closed_at_s": self.closed_at_s,
            "closed_how": self.closed_how,
            "flood_s": self.flood_s,
            "send_stopped": self.send_stopped,
            "drain_s": drain_s,
            "client_cpu_s": client_cpu_s,
        }


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tcp_state(local_port: int) -> str | None:
    """State of this process's loopback socket on ``local_port`` (``None``: gone)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == local_port:
                return _TCP_STATES.get(parts[3], parts[3])
    return None


def _classify(raw: str | bytes, c: Counts) -> None:
    c.frames_read += 1
    try:
        msg = json.loads(raw)
    except ValueError:
        c.other_errors += 1
        c.first_error = c.first_error or f"not JSON: {raw[:200]!r}"
        return
    if not isinstance(msg, dict):
        return
    rid = msg.get("id")
    if not isinstance(rid, int) or rid not in c.outstanding:
        return  # a notification, or an id we did not send
    c.outstanding.discard(rid)
    error = msg.get("error")
    if isinstance(error, dict) and error.get("code") == BUSY:
        c.busy += 1
        if c.first_busy_s is None:
            c.first_busy_s = c.since_go()
    elif error is not None or not isinstance(msg.get("result"), dict):
        c.other_errors += 1
        c.first_error = c.first_error or json.dumps(msg)[:300]
    else:
        c.ok += 1


async def _read(
    ws: WebSocketConnection, c: Counts, interval: float, *, until_answered: bool = False
) -> None:
    """Read and count replies, one per ``interval`` seconds (0: as fast as they come);
    ``until_answered``: return once every request sent has its reply."""
    try:
        while not (until_answered and not c.outstanding):
            _classify(await ws.get_message(), c)
            if interval:
                await trio.sleep(interval)
    except ConnectionClosed as closed:
        code, text = _code(closed)
        c.closed("frame" if code != 1006 else "tcp", code, text)


def _code(closed: ConnectionClosed) -> tuple[int, str | None]:
    """The close code and reason (1006 when the connection ended without a close frame)."""
    reason = closed.reason
    return (reason.code, reason.reason) if reason is not None else (1006, None)


async def _send(ws: WebSocketConnection, c: Counts, args: argparse.Namespace) -> None:
    """Send echo requests as fast as the socket takes them, until cancelled or the cap."""
    arguments = json.dumps({"text": "x" * args.payload_bytes}) + "}}"
    request_id = 0
    try:
        while args.max_bytes <= 0 or c.sent_bytes < args.max_bytes:
            request_id += 1
            frame = _CALL_HEAD % request_id + arguments
            c.outstanding.add(request_id)
            sent = False
            try:
                await ws.send_message(frame)
                sent = True
            finally:
                if not sent:  # cancelled or failed mid-send: not a request the server has
                    c.outstanding.discard(request_id)
            c.sent += 1
            c.sent_bytes += len(frame)
        c.send_stopped = "byte cap reached"
    except ConnectionClosed as closed:
        c.send_stopped = "connection closed"
        code, text = _code(closed)
        c.closed("send", *((code, text) if code != 1006 else (None, None)))
    await trio.sleep_forever()  # hold the socket open until the phase ends


async def _watch_tcp(ws: WebSocketConnection, c: Counts) -> None:
    """Notice the server closing the socket without reading from it (noread)."""
    port = ws.local.port if hasattr(ws.local, "port") else None
    if not isinstance(port, int):
        return
    while c.closed_at_s is None:
        state = await trio.to_thread.run_sync(_tcp_state, port)
        if state != "ESTABLISHED":
            c.closed(f"tcp {state or 'gone'}")
            return
        await trio.sleep(0.1)


async def _wait_stop(max_seconds: float) -> None:
    """Return on a ``stop`` line from the orchestrator (or its EOF), or after ``max_seconds``."""
    with trio.move_on_after(max_seconds):
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def run(args: argparse.Namespace) -> None:
    c = Counts(args.kind, args.payload_bytes)
    async with trio.open_nursery() as nursery:
        ws = await connect_websocket_url(
            nursery,
            args.url,
            subprotocols=["mcp"],
            max_message_size=256 * 2**20,
            receive_buffer_size=None,
            message_queue_size=1,
        )
        with trio.fail_after(30):
            await ws.send_message(_INITIALIZE)
            init = await _await_response(ws, 0)
            if "result" not in init:
                raise RuntimeError(f"initialize failed: {init}")
            await ws.send_message(_INITIALIZED)
        _emit({"event": "ready"})
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if not line.startswith("go"):
            os._exit(2)
        cpu0 = _cpu()
        c.began = time.monotonic()
        async with trio.open_nursery() as flood:
            flood.start_soon(_send, ws, c, args)
            if args.kind == "noread":
                flood.start_soon(_watch_tcp, ws, c)
            else:
                interval = args.read_interval if args.kind == "slowread" else 0.0
                flood.start_soon(_read, ws, c, interval)
            await _wait_stop(args.max_seconds)
            flood.cancel_scope.cancel()
        c.flood_s = c.since_go()
        c.frames_read_flooding = c.frames_read
        # The drain: everything the server still sends, at full speed, for a bounded time.
        drained = time.monotonic()
        with trio.move_on_after(args.drain):
            if c.close_code is None:
                await _read(ws, c, 0.0, until_answered=True)
        if c.close_code is None and ws.closed is not None:
            c.closed("frame", ws.closed.code, ws.closed.reason)
        _emit(c.result(_cpu() - cpu0, time.monotonic() - drained))
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flooder", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=("pipeline", "noread", "slowread"), required=True)
    p.add_argument("--payload-bytes", type=int, default=5, help="echo text length per request")
    p.add_argument("--max-bytes", type=int, default=0, help="stop sending after this (0: never)")
    p.add_argument("--read-interval", type=float, default=0.1, help="slowread: s per frame")
    p.add_argument("--max-seconds", type=float, default=120.0, help="flood at most this long")
    p.add_argument("--drain", type=float, default=5.0, help="s to read what is left after stop")
    args = p.parse_args(argv)
    raise_nofile_limit()
    trio.run(run, args)


if __name__ == "__main__":
    main()
