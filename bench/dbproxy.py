"""``python -m bench.dbproxy``: a database's network round trip, on loopback, in its own process.

``tests/tcp_proxy.py``'s :class:`TcpProxy` (every chunk held ``--delay`` seconds in each
direction, so a request and its answer take ``2 * delay`` more; throughput not limited) run as
a process of the harness's, so that its CPU is counted apart (``/proc``) and its event loop
shares no interpreter with the orchestrator or the server under test.

Prints one line ``{"event": "listening", "port": N}`` on stdout once it accepts connections on
``127.0.0.1:N``, then forwards until it is terminated (SIGTERM: the default action ends it).
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from tests.tcp_proxy import TcpProxy


async def _serve(target_port: int, target_unix: str | None, delay: float) -> None:
    proxy = TcpProxy(target_port, target_unix=target_unix, delay=delay)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        sys.stdout.write(json.dumps({"event": "listening", "port": proxy.port}) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dbproxy", description=__doc__)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-port", type=int, help="forward to 127.0.0.1:PORT")
    target.add_argument("--target-unix", help="forward to this Unix socket (its full path)")
    p.add_argument("--delay", type=float, required=True, help="one-way delay, seconds")
    args = p.parse_args(argv)
    trio.run(_serve, args.target_port or 0, args.target_unix, args.delay)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
