"""Random (version 4) UUIDs from the operating system's generator, read in blocks.

``uuid.uuid4()`` reads 16 bytes from ``os.urandom`` per id: a system call per tool call's
task row, which showed in the event loop's profile. :func:`uuid4` reads 4 KiB at a time and
cuts ids from it: the same source and the same randomness per id (RFC 9562, section 5.4),
a system call per 256 ids. Thread-safe; a forked child starts a block of its own.
"""

from __future__ import annotations

import os
import threading
import uuid

_BLOCK = 4096
#: RFC 9562's version (4) and variant (0b10) bits, set on the id's 128-bit integer as
#: ``uuid.UUID(bytes=..., version=4)`` sets them: built from an int, a UUID skips most of
#: its constructor's work (issue 17).
_KEEP = ((1 << 128) - 1) & ~(0xF000 << 64) & ~(0xC000 << 48)
_VERSION_4 = (4 << 76) | (0x8000 << 48)


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.block = b""
        self.offset = 0


_pool = _Pool()


def _forget_after_fork() -> None:
    # A forked child must never cut ids from the block its parent cuts from too.
    _pool.block = b""
    _pool.offset = 0
    _pool.lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def uuid4() -> uuid.UUID:
    """A random UUID, as :func:`uuid.uuid4` makes (module doc)."""
    pool = _pool
    with pool.lock:
        if pool.offset + 16 > len(pool.block):
            pool.block = os.urandom(_BLOCK)
            pool.offset = 0
        raw = pool.block[pool.offset : pool.offset + 16]
        pool.offset += 16
    return uuid.UUID(int=int.from_bytes(raw, "big") & _KEEP | _VERSION_4)
