"""Newline-delimited messages over a byte stream, bounded: MCP's stdio framing.

MCP's stdio transport sends each JSON-RPC message as one line of UTF-8, "delimited by
newlines, and MUST NOT contain embedded newlines" (MCP specification,
``basic/transports``, "stdio"). A peer that never sends a newline must not make the reader
buffer without end, so a line longer than ``max_bytes`` is refused with
:class:`LineTooLong`; the reader is then unusable (where the next line starts is unknown)
unless its owner skips the rest of that line (:meth:`LineReader.skip_line`), as a log may.
"""

from __future__ import annotations

import trio

__all__ = ["LineReader", "LineTooLong"]

#: Bytes asked of the stream per read.
_CHUNK = 65536


class LineTooLong(Exception):
    """A line exceeded the reader's bound (in bytes, without its newline)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"a line longer than {max_bytes} bytes")
        self.max_bytes = max_bytes


class LineReader:
    """Reads lines from ``stream``, each at most ``max_bytes`` long (its newline excluded).

    Blank lines are skipped (a peer may end its last message with ``\\r\\n`` or pad between
    messages). Not safe for two tasks at once, as the stream itself is not.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        #: Bytes of the buffer already searched for a newline (none was found there).
        self._scanned = 0
        self._eof = False

    async def receive_line(self) -> bytes | None:
        """The next non-blank line, without its line ending; ``None`` at the end of the
        stream (a last line without a newline is still returned first).

        Raises :class:`LineTooLong`, or what the stream raises. Cancellation: safe; bytes
        read so far stay buffered for the next call.
        """
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline]).rstrip(b"\r")
                if len(line) > self._max_bytes:
                    raise LineTooLong(self._max_bytes)
                del self._buffer[: newline + 1]
                self._scanned = 0
                if line.strip():
                    return line
                continue
            self._scanned = len(self._buffer)
            if self._scanned > self._max_bytes + 1:  # + 1: the "\r" of a "\r\n" to come
                raise LineTooLong(self._max_bytes)
            if self._eof:
                rest = bytes(self._buffer).strip()
                self._buffer.clear()
                self._scanned = 0
                return rest or None
            chunk = await self._stream.receive_some(_CHUNK)
            if not chunk:
                self._eof = True
            self._buffer += chunk

    async def skip_line(self) -> None:
        """Drop the rest of the current line, through its newline (or to the end of the
        stream), reading ``_CHUNK`` bytes at a time and keeping none: after
        :class:`LineTooLong`, the next :meth:`receive_line` reads the line after it. Raises
        what the stream raises."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                del self._buffer[: newline + 1]
                self._scanned = 0
                return
            self._buffer.clear()
            self._scanned = 0
            if self._eof:
                return
            chunk = await self._stream.receive_some(_CHUNK)
            if not chunk:
                self._eof = True
            self._buffer += chunk
