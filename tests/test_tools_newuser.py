"""docs/tools.md followed as a new user would: what ``exai status`` shows of proxied servers.

The doc sends the user to ``exai status`` for a proxied server ("Each server is a child of
``/root/servers``"), and says a server that dies is restarted, and past 5 restarts in 60 s is
**down**. The tree must say so: a proxied server's node carries the server's own state
(``running`` while up, ``restarting`` between incarnations, ``down`` past its restart
intensity), the times its process was restarted, and why its last incarnation ended. Before,
the tree showed only the supervisor's view of the child task that runs the server: always
``running`` with 0 restarts, whatever the process did.

And progress: every ``notifications/progress`` a proxied server sent before its answer
reaches the client, before the answer. The proxy's forwarder used to be cancelled as soon as
the answer arrived, dropping whatever progress was still buffered (the last steps of
``trigger-long-running-operation``, now and then).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from actors.servers import ProxiedServer, StdioCommand
from runtime.child_process import ChildRecord
from runtime.mcp.client import Progress
from runtime.status_model import ActorStatus, NodeStatus
from tests.harness import ServerProcess, start_server, wait_for_status
from tests.test_proxy_client import SERVER_TIME

MISSING = "/nonexistent/exai-newuser/mcp-server"


def _node(status: NodeStatus, name: str) -> ActorStatus:
    (found,) = [a for a in status.actors if a.path == f"/root/servers/{name}"]
    return found


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    if not SERVER_TIME.exists():
        pytest.fail("server-time env missing: run `just setup-clients`")
    config = tmp_path / "exai.toml"
    config.write_text(
        f"""
[servers.time]
command = "{SERVER_TIME}"
args = ["--local-timezone", "UTC"]

[servers.ghost]
command = "{MISSING}"

[servers.quitter]
command = "{sys.executable}"
args = ["-c", "import sys; sys.exit(3)"]
"""
    )
    handle = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def test_status_shows_a_proxied_server_down_restarted_and_why(node: ServerProcess) -> None:
    # A command that does not exist: restarted with back-off (0.1 s doubling), then down.
    status = await wait_for_status(
        node, lambda s: _node(s, "ghost").state == "down", what="ghost shown down"
    )
    ghost = _node(status, "ghost")
    assert ghost.restarts >= 5
    assert ghost.last_error is not None
    assert "No such file or directory" in ghost.last_error
    assert MISSING in ghost.last_error

    # A server that exits at once: down too, and the error says how its process ended.
    status = await wait_for_status(
        node, lambda s: _node(s, "quitter").state == "down", what="quitter shown down"
    )
    quitter = _node(status, "quitter")
    assert quitter.last_error is not None
    assert quitter.last_error.endswith("(exit status 3)"), quitter.last_error

    # The server that is up is shown running, never restarted.
    time_node = _node(status, "time")
    assert (time_node.state, time_node.restarts, time_node.last_error) == ("running", 0, None)

    # Killed with SIGKILL: it is started again, and the tree counts that restart and says why.
    (up,) = [
        e for e in node.log_events() if e.get("event") == "server.up" and e["server"] == "time"
    ]
    os.kill(up["pid"], signal.SIGKILL)
    status = await wait_for_status(
        node,
        lambda s: _node(s, "time").restarts == 1 and _node(s, "time").state == "running",
        what="time restarted once and running again",
    )
    assert _node(status, "time").last_error == "it exited (killed by SIGKILL)"


#: A stdio MCP server whose one tool sends its progress and its answer in one write: the
#: answer arrives while the progress is still buffered on exai's side.
PROGRESS_THEN_ANSWER = """
import json, sys

def send(*messages):
    sys.stdout.write("".join(json.dumps(m) + "\\n" for m in messages))
    sys.stdout.flush()

for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    if msg["method"] == "initialize":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}}, "serverInfo": {"name": "burst", "version": "0"}}})
    elif msg["method"] == "tools/list":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": [
            {"name": "steps", "description": "Three steps.", "inputSchema": {"type": "object"}}]}})
    elif msg["method"] == "tools/call":
        token = msg["params"]["_meta"]["progressToken"]
        send(*[{"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": token, "progress": n, "total": 3}} for n in (1, 2, 3)],
             {"jsonrpc": "2.0", "id": msg["id"], "result": {
                 "content": [{"type": "text", "text": "done"}]}})
"""


async def test_progress_sent_before_the_answer_is_all_forwarded_before_it(tmp_path: Path) -> None:
    server = ProxiedServer(
        "burst",
        StdioCommand(sys.executable, ("-c", PROGRESS_THEN_ANSWER)),
        record=ChildRecord(tmp_path / "children"),
        max_message_bytes=1 << 20,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        await server.wait_up()
        for _ in range(20):
            seen: list[float] = []

            async def on_progress(note: Progress, seen: list[float] = seen) -> None:
                await trio.lowlevel.checkpoint()  # a client's outbox: forwarding awaits
                seen.append(note.progress)

            result = await server.call("steps", {}, on_progress=on_progress)
            assert result["content"][0]["text"] == "done"
            assert seen == [1, 2, 3]
        nursery.cancel_scope.cancel()
