"""Load generator over MCP's Streamable HTTP transport: one process, many clients, raw h11.

Run as ``python -m bench.httpgen --url http://HOST:PORT/mcp --active N [--stateless] ...``; it
speaks ``bench.loadgen``'s line protocol with the orchestrator (``ready``, ``go T0``,
``result``) and writes the latencies of the calls answered inside the window the same way.

Each client holds one persistent HTTP/1.1 connection (keep-alive, one request at a time: HTTP/1.1
has no multiplexing, so ``--pipeline`` must be 1) and is, as the spec's client is
(modelcontextprotocol ``docs/specification/2025-11-25/basic/transports.mdx``, "Streamable
HTTP"):

1. unless ``--stateless``: ``POST initialize`` without a session id; the ``Mcp-Session-Id``
   of the answer, if any, goes on every later request; then ``POST
   notifications/initialized`` (202). A stateless server (the SDK's ``stateless_http``)
   answers requests without a handshake, so its clients skip it;
2. every request carries ``Content-Type: application/json``, ``Accept: application/json,
   text/event-stream`` and, after the handshake (from the start when stateless),
   ``MCP-Protocol-Version`` (the negotiated version, else ``PROTOCOL_VERSION``);
3. ``tools/call echo {"text": "hello"}`` as fast as answers come.

An answer is ``application/json`` (the body is the response) or ``text/event-stream`` (events
until the one carrying the response; the latency stops there, and the rest of the stream is
read to its end so the connection can carry the next request). A ``?token=`` in ``--url`` (the
harness's way of giving exai's token) is sent as ``Authorization: Bearer`` and left out of the
request target, as an HTTP client sends it. h11 over trio sockets keeps the client's CPU per call
low; the same generator runs against every server.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from bench.loadgen import (
    CALL,
    Plan,
    Shared,
    Stats,
    Window,
    _check,
    initialize_message,
    raise_nofile_limit,
    run,
)

PROTOCOL_VERSION = "2025-11-25"
_INITIALIZE = initialize_message(PROTOCOL_VERSION).encode()
_INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
_EVENT_STREAM = b"text/event-stream"


class HttpError(Exception):
    """An answer the client cannot use: a status other than expected, no response, a close."""


@dataclass(frozen=True)
class Endpoint:
    """Where the clients POST and what every request carries."""

    host: str
    port: int
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise SystemExit(f"--url must be http://HOST:PORT/PATH, not {url}")
        headers = [
            (b"host", f"{parts.hostname}:{parts.port}".encode()),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json, text/event-stream"),
        ]
        token = parse_qs(parts.query).get("token")
        if token:
            headers.append((b"authorization", b"Bearer " + token[0].encode()))
        return cls(parts.hostname, parts.port, (parts.path or "/").encode(), tuple(headers))


@dataclass
class Answer:
    """One POST's outcome: status, response headers (names lower-case), the JSON-RPC response
    to the request (None for a notification's 202), when it arrived (perf_counter s)."""

    status: int
    headers: dict[bytes, bytes]
    message: Any
    at: float


class Client:
    """One keep-alive HTTP/1.1 connection speaking Streamable HTTP."""

    def __init__(self, stream: trio.SocketStream, endpoint: Endpoint) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.conn = h11.Connection(h11.CLIENT)
        self.headers: list[tuple[bytes, bytes]] = list(endpoint.headers)

    def session(self, session_id: bytes | None, version: str) -> None:
        """Headers every later request carries."""
        if session_id:
            self.headers.append((b"mcp-session-id", session_id))
        self.headers.append((b"mcp-protocol-version", version.encode()))

    async def post(self, body: bytes, request_id: int | None) -> Answer:
        conn = self.conn
        head = h11.Request(
            method=b"POST",
            target=self.endpoint.target,
            headers=[*self.headers, (b"content-length", b"%d" % len(body))],
        )
        await self.stream.send_all(
            conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status = 0
        headers: dict[bytes, bytes] = {}
        stream = False
        buf = b""
        message: Any = None
        at = 0.0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                conn.receive_data(chunk)  # b"" is the peer's close: h11 reports it next
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = dict(event.headers)
                stream = headers.get(b"content-type", b"").startswith(_EVENT_STREAM)
            elif isinstance(event, h11.Data):
                buf += event.data
                if stream and message is None and request_id is not None:
                    message = sse_response(buf, request_id)
                    if message is not None:
                        at = time.perf_counter()
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("the server closed the connection")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            raise HttpError(f"the server will not keep the connection (status {status})")
        conn.start_next_cycle()
        if not stream and request_id is not None and buf:
            message = json.loads(buf)
            at = time.perf_counter()
        if request_id is not None and message is None:
            raise HttpError(f"status {status}, no response: {buf[:200]!r}")
        return Answer(status, headers, message, at)


def sse_response(buf: bytes, request_id: int) -> Any:
    """The JSON-RPC response to ``request_id`` among the complete events of ``buf``, or None.
    Events end with a blank line; ``data:`` lines of one event are joined with newlines
    (WHATWG HTML, "Interpreting an event stream"); comments and other messages are skipped."""
    text = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for raw in text.split(b"\n\n")[:-1]:
        data = [
            line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
        ]
        if not data:
            continue
        msg = json.loads(b"\n".join(data))
        if isinstance(msg, dict) and msg.get("id") == request_id:
            return msg
    return None


async def handshake(client: Client) -> None:
    """``initialize`` + ``notifications/initialized``; sets the session's headers."""
    init = await client.post(_INITIALIZE, 0)
    result = init.message.get("result") if isinstance(init.message, dict) else None
    if init.status != 200 or not isinstance(result, dict):
        raise HttpError(f"initialize: status {init.status}: {init.message}")
    client.session(init.headers.get(b"mcp-session-id"), str(result["protocolVersion"]))
    done = await client.post(_INITIALIZED, None)
    if done.status != 202:
        raise HttpError(f"notifications/initialized: status {done.status}")


async def _calls(client: Client, window: Window, stats: Stats, slot: int) -> None:
    """One request in flight: POST, wait for its response, repeat until past the window."""
    perf = time.perf_counter
    record = stats.latencies.append
    answered = stats.answered
    request_id = 0
    while True:
        request_id += 1
        sent = perf()
        answer = await client.post((CALL % request_id).encode(), request_id)
        if answer.at >= window.end:
            return
        if answer.status != 200:
            stats.error(f"status {answer.status}: {json.dumps(answer.message)}")
            continue
        if _check(answer.message, stats) and answer.at >= window.start:
            record(answer.at - sent)
            answered[slot] += 1


async def _session(endpoint: Endpoint, stateless: bool, sh: Shared, active: bool) -> None:
    """One client (``bench.loadgen.SessionTask`` once ``endpoint`` and ``stateless`` are
    bound); its failure is counted and stays its own."""
    plan, stats = sh.plan, sh.stats
    ready_sent = counted = False
    try:
        async with sh.limiter:
            with trio.fail_after(plan.connect_timeout):
                sock = await trio.open_tcp_stream(endpoint.host, endpoint.port)
                client = Client(sock, endpoint)
                if stateless:
                    client.session(None, PROTOCOL_VERSION)
                else:
                    await handshake(client)
        stats.connected += 1
        ready_sent = True
        await sh.ready.send(True)
        if not active:
            await trio.sleep_forever()  # idle: connected, initialized, silent
        await sh.go.wait()
        slot = len(stats.answered)
        stats.answered.append(0)
        await _calls(client, sh.window, stats, slot)
        counted = True
        sh.session_done()
        await trio.sleep_forever()  # stay connected: the process exits with os._exit
    except (OSError, HttpError, h11.ProtocolError, ValueError, trio.TooSlowError) as exc:
        if ready_sent:
            stats.error(f"session: {exc!r}")
        else:
            stats.connect_failed += 1
            stats.error(f"connect: {exc!r}", count=False)
            await sh.ready.send(False)
    if active and not counted:
        sh.session_done()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.httpgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--active", type=int, default=1)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--pipeline", type=int, default=1, choices=(1,))
    parser.add_argument("--stateless", action="store_true", help="no handshake, no session")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--latency-file", required=True)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    plan = Plan(
        url=args.url,
        active=args.active,
        idle=args.idle,
        pipeline=1,
        warmup=args.warmup,
        duration=args.duration,
        connect_concurrency=args.connect_concurrency,
        connect_timeout=args.connect_timeout,
    )
    session = functools.partial(_session, Endpoint.parse(args.url), args.stateless)
    trio.run(run, plan, args.latency_file, session)


if __name__ == "__main__":
    main()
