"""A child process's stdio as a :class:`~runtime.mcp.client.MessageStream`: MCP's stdio
transport, client side (specification ``basic/transports``, "stdio": one JSON-RPC message
per line of UTF-8 on the child's stdin and stdout; anything on stderr is the child's log).

Bounded: a line over ``max_message_bytes`` breaks the stream (:class:`ServerGone`), and
:func:`log_stderr` writes the child's stderr to the node's log a line at a time, each line
clipped (one over 64 KiB is skipped, and said so), at most one line a second past a burst of
100 (the rest are counted). Stderr is read to its end whatever it holds.
"""

from __future__ import annotations

import contextlib

import structlog
import trio

from runtime.lines import LineReader, LineTooLong
from runtime.mcp.client import ServerGone

__all__ = ["StdioStream", "log_stderr"]

log = structlog.get_logger("servers")

#: Characters of one stderr line kept in the log.
_STDERR_LINE_CHARS = 2000
#: Bytes of one stderr line read before it is cut (the rest of it is skipped).
_STDERR_LINE_BYTES = 64 * 1024
#: Lines logged at once before the pace slows to one a second.
_STDERR_BURST = 100


class StdioStream:
    """The client's side of one stdio server: writes to its stdin, reads its stdout."""

    def __init__(
        self,
        stdin: trio.abc.SendStream,
        stdout: trio.abc.ReceiveStream,
        *,
        name: str,
        max_message_bytes: int,
    ) -> None:
        self.name = name
        self._stdin = stdin
        self._lines = LineReader(stdout, max_message_bytes)
        self._max = max_message_bytes
        # trio streams take one sender at a time; requests come from many tasks.
        self._sending = trio.Lock()

    async def send(self, message: str) -> None:
        data = message.encode("utf-8") + b"\n"
        async with self._sending:
            try:
                await self._stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ServerGone(f"{self.name}'s stdin is closed") from None

    async def receive(self) -> str | None:
        try:
            line = await self._lines.receive_line()
        except LineTooLong:
            raise ServerGone(
                f"{self.name} sent a message longer than {self._max} bytes (EXAI_MAX_MESSAGE_BYTES)"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return None if line is None else line.decode("utf-8", errors="replace")


async def log_stderr(stderr: trio.abc.ReceiveStream, name: str) -> None:
    """Log the child's stderr, line by line, as ``server.stderr`` events under its name,
    until it closes (module doc for the bounds)."""
    lines = LineReader(stderr, _STDERR_LINE_BYTES)
    budget = float(_STDERR_BURST)
    last = trio.current_time()
    dropped = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            try:
                line = await lines.receive_line()
            except LineTooLong:
                # Skipped, never a reason to stop reading: a child whose stderr is not read
                # blocks on its next 64 KiB of log, and answers nothing more.
                await lines.skip_line()
                line = b"(a line over 64 KiB; skipped)"
            if line is None:
                return
            now = trio.current_time()
            budget = min(float(_STDERR_BURST), budget + (now - last))
            last = now
            if budget < 1:
                dropped += 1
                continue
            budget -= 1
            text = line.decode("utf-8", errors="replace")[:_STDERR_LINE_CHARS]
            if dropped:
                log.info("server.stderr", server=name, line=text, dropped=dropped)
                dropped = 0
            else:
                log.info("server.stderr", server=name, line=text)
