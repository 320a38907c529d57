"""Progress and cancellation with the official Python SDK ``mcp==1.30.0`` over WebSocket.

Runs in .venv-clients/mcp1, driven by tests/test_real_clients.py: ``python
mcp1_progress_cancel.py URL``. It prints one JSON line with what it saw and exits.

* Progress: ``call_tool(progress_callback=...)`` on ``exai_test_steps``, with the log level
  set, so both ``notifications/progress`` and ``notifications/message`` reach the SDK.
* Cancel: the 1.30 SDK never sends ``notifications/cancelled`` on its own (cancelling the
  awaiting task only stops waiting), so, as its users must, the script sends the
  notification itself with ``send_notification`` and cancels its local wait with an anyio
  cancel scope. It waits for the blocked call's first heartbeat before cancelling: that
  heartbeat is the evidence the server is running the call (and names its request id, which
  1.30 uses as the progress token), so the cancel cannot overtake the request.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from mcp import ClientSession, types
from mcp.client.websocket import websocket_client
from mcp.shared.session import RequestResponder

Incoming = RequestResponder[types.ServerRequest, types.ClientResult] | types.ServerNotification


class Observer:
    """Everything the SDK hands the application besides results."""

    def __init__(self) -> None:
        self.progress_tokens: list[str | int] = []
        self.progress_seen = anyio.Event()
        self.logs: list[Any] = []
        #: The SDK reports a response it cannot correlate (e.g. one for a cancelled request)
        #: as an exception to the message handler.
        self.strays: list[str] = []

    async def on_message(self, message: Incoming | Exception) -> None:
        if isinstance(message, Exception):
            self.strays.append(repr(message))
        elif isinstance(message, types.ServerNotification) and isinstance(
            message.root, types.ProgressNotification
        ):
            self.progress_tokens.append(message.root.params.progressToken)
            self.progress_seen.set()

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)

    def expect_progress(self) -> None:
        self.progress_tokens.clear()
        self.progress_seen = anyio.Event()


async def main(url: str) -> None:
    seen = Observer()
    async with (
        websocket_client(url) as (read, write),
        ClientSession(
            read, write, logging_callback=seen.on_log, message_handler=seen.on_message
        ) as session,
    ):
        await session.initialize()
        await session.set_logging_level("info")

        steps: list[list[float | str | None]] = []

        async def on_steps(progress: float, total: float | None, message: str | None) -> None:
            steps.append([progress, total, message])

        stepped = await session.call_tool(
            "exai_test_steps", {"steps": 4}, progress_callback=on_steps
        )

        # Every progress frame of the steps call preceded its result on the socket, so from
        # here on a progress notification can only be the blocked call's heartbeat.
        seen.expect_progress()
        blocked_answered = False

        async def on_block(progress: float, total: float | None, message: str | None) -> None:
            pass  # passing a callback is what makes 1.30 send a progress token

        async def call_block() -> None:
            nonlocal blocked_answered
            await session.call_tool("exai_test_block", {}, progress_callback=on_block)
            blocked_answered = True

        async with anyio.create_task_group() as waiting:
            waiting.start_soon(call_block)
            await seen.progress_seen.wait()
            request_id = seen.progress_tokens[0]
            await session.send_notification(
                types.ClientNotification(
                    types.CancelledNotification(
                        params=types.CancelledNotificationParams(
                            requestId=request_id, reason="test: cancelled by the client"
                        )
                    )
                )
            )
            waiting.cancel_scope.cancel()

        # The server must go on answering after the cancel, and must never answer the
        # cancelled request: a late answer would reach on_message as a stray.
        echoed = await session.call_tool("echo", {"text": "after the cancel"})
        await session.send_ping()
        again = await session.call_tool("exai_test_steps", {"steps": 2})
        await session.send_ping()

        report = {
            "steps_result": [c.text for c in stepped.content if c.type == "text"],
            "steps_progress": steps,
            "logs": seen.logs,
            "cancelled_request_id": request_id,
            "blocked_answered": blocked_answered,
            "echo_after_cancel": [c.text for c in echoed.content if c.type == "text"],
            "steps_after_cancel": [c.text for c in again.content if c.type == "text"],
            "strays": seen.strays,
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
