"""A root supervisor that gives up stops the process with a clear message and exit code 1."""

from __future__ import annotations

from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from tests.harness import RawClient, open_raw, start_server


async def test_persistence_crashing_past_the_root_intensity_stops_the_server(
    database_url: str, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path / "state",
        database_url=database_url,
        extra_env={"EXAI_ROOT_MAX_RESTARTS": "1", "EXAI_ROOT_RESTART_PERIOD": "3600"},
    )
    try:
        async with open_raw(server.authed_url()) as ws:
            client = RawClient(ws)
            await client.initialize()
            # The first crash is restarted; the second exceeds the intensity of 1.
            for _ in range(2):
                try:
                    await client.request("$/exai/test/crash-persistence")
                    await client.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
                except ConnectionClosed:
                    break  # the tree is stopping: sessions are closed first
        code = await trio.to_thread.run_sync(lambda: server.process.wait(timeout=60))
        assert code == 1
        stderr = server.stderr_path.read_text()
        assert "exai: the server stopped: supervisor /root gave up" in stderr
    finally:
        if server.process.poll() is None:
            server.process.kill()
