"""Issue 15 (c) over Streamable HTTP: an MCP task (2025-11-25, SEP-1686) outlives the HTTP
session that started it.

A client starts a long call as a task on one 2025-era HTTP session, ends that session
(DELETE), and fetches the task's result from a new session of the same identity; another
identity cannot see it. Real sockets, real ``exai serve``, real Postgres.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import ServerProcess, query, start_server
from tests.test_streamable_http import BOB, Session, http_url


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(
        tmp_path_factory.mktemp("http-tasks"),
        database_url=database_url,
        extra_env={"EXAI_CLIENT_TOKENS": f"bob={BOB}"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


def rpc(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def test_a_task_outlives_its_http_session(server: ServerProcess, database_url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        first = Session(client, http_url(server), server.token)
        init = await first.open()
        assert "tasks" in init["capabilities"]
        started = await first.request(
            rpc(
                2,
                "tools/call",
                {"name": "exai_test_sleep", "arguments": {"seconds": 1.0}, "task": {}},
            )
        )
        task = started[0]["result"]["task"]
        assert task["status"] == "working"
        # The row is in the database before the handle came back.
        assert query(
            database_url, "select count(*) from tasks where id = %s", (task["taskId"],)
        ) == [(1,)]
        assert (await client.delete(first.url, headers=first.headers())).status_code == 200

        second = Session(client, http_url(server), server.token)
        await second.open()
        result = await second.request(rpc(3, "tasks/result", {"taskId": task["taskId"]}))
        assert result[0]["result"]["content"][0]["text"] == "slept 1 s"
        got = await second.request(rpc(4, "tasks/get", {"taskId": task["taskId"]}))
        assert got[0]["result"]["status"] == "completed"

        bob = Session(client, http_url(server), BOB)
        await bob.open()
        hidden = await bob.request(rpc(5, "tasks/get", {"taskId": task["taskId"]}))
        assert hidden[0]["error"]["code"] == -32602
        for s in (second, bob):
            await client.delete(s.url, headers=s.headers())
