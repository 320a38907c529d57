"""The floor of ``python -m bench http``: a bare h11-over-trio HTTP/1.1 server answering each
POSTed JSON-RPC request with a canned ``application/json`` result.

No sessions to keep (``initialize`` hands out an ``Mcp-Session-Id`` nobody checks), no
validation, no auth, no persistence: what HTTP itself costs in the runtime's own stack (trio +
h11, as ``runtime.streamable_http``), one ``json.loads``/``json.dumps`` per message.
Notifications get 202; connections are kept alive.

    python -m bench.servers.http_floor --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import sys
import uuid

import h11
import trio

from bench.servers.floor import _result

_JSON = [(b"content-type", b"application/json")]


async def _send(stream: trio.SocketStream, conn: h11.Connection, events: list[h11.Event]) -> None:
    await stream.send_all(b"".join(conn.send(e) or b"" for e in events))


async def _handler(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            msg = json.loads(body) if body else None
            if not isinstance(msg, dict) or "id" not in msg or "method" not in msg:
                head = h11.Response(status_code=202, headers=[(b"content-length", b"0")])
                await _send(stream, conn, [head, h11.EndOfMessage()])
            else:
                reply = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": msg["id"],
                        "result": _result(msg["method"], msg.get("params")),
                    }
                ).encode()
                headers = [*_JSON, (b"content-length", b"%d" % len(reply))]
                if msg["method"] == "initialize":
                    headers.append((b"mcp-session-id", uuid.uuid4().hex.encode()))
                head = h11.Response(status_code=200, headers=headers)
                await _send(stream, conn, [head, h11.Data(data=reply), h11.EndOfMessage()])
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    except Exception as exc:  # one broken connection must not take the server down
        print(f"http floor: connection error {exc!r}", file=sys.stderr)
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers.http_floor")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(functools.partial(trio.serve_tcp, _handler, args.port, host=args.host))


if __name__ == "__main__":
    main()
