"""What the chat, threads and identity tests share: the fake upstream in a thread of its own,
config files, and a client that calls tools and keeps the progress it was sent.

A module's ``exai serve`` outlives each test's trio run, so the loopback OpenAI server it
talks to cannot live in one: it runs its own ``trio.run`` in a thread for the module. The
script and the record of requests are a ``deque`` and a ``list``, which the test thread may
touch while the server thread serves (single operations on them are atomic in CPython).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.fake_openai import FakeOpenAI, fake_openai
from tests.harness import RawClient

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"


@contextmanager
def upstream_thread() -> Iterator[FakeOpenAI]:
    """The fake OpenAI-compatible server, serving from its own thread until the block ends."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with fake_openai() as fake:
            box["fake"] = fake
            box["token"] = trio.lowlevel.current_trio_token()
            box["stop"] = stop = trio.Event()
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=trio.run, args=(serve,), name="fake-openai", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise TimeoutError("the fake upstream did not start")
    try:
        yield box["fake"]
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(30)


def provider_table(name: str, base_url: str, model: str, extra: str = "") -> str:
    """One ``[upstream.providers.<name>]`` table; retries off, so each call is one request."""
    return (
        f'[upstream.providers.{name}]\nbase_url = "{base_url}"\ndefault_model = "{model}"\n'
        f"[upstream.providers.{name}.retry]\nmax_attempts = 1\n{extra}"
    )


def write_config(
    path: Path,
    *,
    chat: str = "",
    providers: str = "",
    clients: dict[str, str] | None = None,
) -> Path:
    """A config file; ``clients`` defaults to alice and bob."""
    named = {"alice": ALICE, "bob": BOB} if clients is None else clients
    parts = []
    if named:
        parts.append("[clients]\n" + "".join(f'{n} = "{t}"\n' for n, t in named.items()))
    if chat:
        parts.append(f"[chat]\n{chat}\n")
    if providers:
        parts.append(providers)
    path.write_text("\n".join(parts))
    path.chmod(0o600)  # it holds raw tokens: the server refuses it readable by others
    return path


class Caller:
    """A session's client: initialise once, then call tools; keeps the progress it got."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.progress: list[dict[str, Any]] = []
        self._id = 0

    async def call(
        self, tool: str, arguments: dict[str, Any], *, progress: bool = False
    ) -> dict[str, Any]:
        """The JSON-RPC response to one ``tools/call`` (result or error)."""
        self._id += 1
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if progress:
            params["_meta"] = {"progressToken": f"p{self._id}"}
        await self.client.send(
            {"jsonrpc": "2.0", "id": self._id, "method": "tools/call", "params": params}
        )
        while True:
            message = await self.client.receive()
            if message.get("method") == "notifications/progress":
                self.progress.append(message["params"])
                continue
            if "id" in message:
                assert message["id"] == self._id, message
                return message

    async def chat(self, prompt: str, **arguments: Any) -> dict[str, Any]:
        """A chat turn that must succeed: its structured content."""
        reply = await self.call("chat", {"prompt": prompt, **arguments})
        assert "result" in reply, reply
        assert reply["result"]["isError"] is False, reply
        structured: dict[str, Any] = reply["result"]["structuredContent"]
        return structured


def error_text(reply: dict[str, Any]) -> str:
    """The text of an ``isError`` result."""
    result = reply["result"]
    assert result["isError"] is True, reply
    return str(result["content"][0]["text"])


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def stored_messages(url: str, thread_id: str) -> list[tuple[int, str, str, str | None, Any]]:
    """``(turn_index, role, content, tool_name, files)`` of a thread, in stored order."""
    rows = query(
        url,
        "select turn_index, role, content, tool_name, files from messages where thread_id = %s"
        " order by turn_index, created_at",
        (thread_id,),
    )
    return [
        (r[0], r[1], r[2], r[3], json.loads(r[4]) if isinstance(r[4], str) else r[4]) for r in rows
    ]
