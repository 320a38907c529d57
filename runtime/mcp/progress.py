"""One request's ``notifications/progress``: strictly increasing, with heartbeats.

The spec requires progress values to increase strictly. A tool reports on its own scale; a
heartbeat (sent while the tool is silent, so clients and proxies know it is alive) must not
disturb that scale, so it advances the last value by the smallest step a float can take
(``math.nextafter``). A report that would not increase is dropped, not sent.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from runtime.connection import RequestId
from runtime.mcp import jsonrpc
from runtime.mcp.schema import ProgressParams

METHOD = "notifications/progress"


class Progress:
    """Progress for the request ``request_id`` that carried ``token``; ``send`` is the
    session's :meth:`runtime.connection.Connection.send` (each notification relates to the
    request, so Streamable HTTP sends it on that request's stream)."""

    __slots__ = ("_last", "_last_sent_at", "_send", "request_id", "token")

    def __init__(
        self,
        token: str | int,
        send: Callable[[str, RequestId | None], Awaitable[None]],
        request_id: RequestId,
    ) -> None:
        self.token = token
        self.request_id = request_id
        self._send = send
        self._last: float | None = None
        self._last_sent_at = trio.current_time()

    async def report(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> bool:
        """Send a progress notification; ``False`` if dropped for not increasing."""
        if self._last is not None and not progress > self._last:
            return False
        self._last = progress
        self._last_sent_at = trio.current_time()
        params = ProgressParams(
            progress_token=self.token, progress=progress, total=total, message=message
        )
        await self._send(jsonrpc.encode_notification(METHOD, params), self.request_id)
        return True

    async def heartbeat(self, interval: float) -> None:
        """Until cancelled: whenever ``interval`` passes without a report, send one."""
        started = trio.current_time()
        while True:
            await trio.sleep_until(self._last_sent_at + interval)
            if trio.current_time() - self._last_sent_at < interval:
                continue  # the tool reported meanwhile
            step = math.nextafter(self._last if self._last is not None else 0.0, math.inf)
            elapsed = trio.current_time() - started
            await self.report(step, message=f"still running ({elapsed:.0f} s)")
