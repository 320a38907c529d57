"""Client-chosen strings are bounded and made safe (storage/untrusted.py), over real sockets.

A client name of a mebibyte is clipped to 256 characters (with a marker giving its real length)
in the log, the session row and ``exai status``; a name made of terminal escapes, a carriage
return and a forged log line reaches ``exai status``, ``exai trace`` and the console escaped;
an id longer than 256 bytes is refused (-32600, id null); a stored tool result is bounded;
the journal holds its bound with the database away, whatever the records. Every test also
checks that the other sessions and the node still answer.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import ValidationError

from storage.rows import RECORD, TaskFinished
from storage.untrusted import MAX_JSON_DEPTH, clip
from tests.harness import (
    EXAI,
    RawClient,
    ServerProcess,
    open_raw,
    own_postgres,
    query,
    session_row,
    start_server,
    wait_until,
)
from tests.test_logs import run as run_logging_program

#: ESC ] 0 ; title BEL (window title), ESC [ 2 J (clear screen), CR LF and a forged JSON event,
#: a C1 CSI and a right-to-left override.
HOSTILE = '\x1b]0;owned\x07\x1b[2J\r\n{"event":"forged","level":"critical"}\x9b31m\u202etxt.exe'
#: What a terminal would obey: every C0 control but the newline that ends a line, DEL, C1,
#: bidi controls, line and paragraph separators.
OBEYED = (
    {chr(c) for c in range(0x20) if c != 0x0A}
    | {chr(0x7F)}
    | {chr(c) for c in range(0x80, 0xA0)}
    | set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BIG = 1 << 20  # a 1 MiB client name: the default max message (4 MiB) lets it through


def obeyed(text: str) -> set[str]:
    return {ch for ch in text if ch in OBEYED}


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The console in text form (as on a terminal), and a small stored-result bound."""
    handle = start_server(
        tmp_path_factory.mktemp("untrusted"),
        database_url=database_url,
        extra_env={"EXAI_LOG_CONSOLE": "text", "EXAI_MAX_STORED_RESULT_BYTES": "4096"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()[-3000:]


def file_events(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON-lines log file (its console is text here)."""
    text = (server.state_dir / "logs" / "exai.log").read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


async def initialize(client: RawClient, name: str, version: str = "1.0") -> str:
    reply = await client.request(
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": name, "version": version},
        },
    )
    await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    session_id: str = reply["result"]["_meta"]["exai/sessionId"]
    return session_id


async def still_answers(client: RawClient) -> None:
    """The session is untouched: ping and echo answer."""
    assert (await client.request("ping"))["result"] == {}
    echoed = await client.request("tools/call", {"name": "echo", "arguments": {"text": "ok"}})
    assert echoed["result"]["content"][0]["text"] == "ok", echoed


def exai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXAI), *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_a_huge_client_name_is_clipped_in_log_row_and_status(
    server: ServerProcess, database_url: str
) -> None:
    clipped = "n" * 256 + f"…[truncated, {BIG} chars]"
    async with open_raw(server.authed_url()) as other_ws, open_raw(server.authed_url()) as ws:
        other = RawClient(other_ws)
        await initialize(other, "bystander")
        session_id = await initialize(RawClient(ws), "n" * BIG, "v" * BIG)
        await still_answers(RawClient(ws))
        await still_answers(other)

        await wait_until(
            lambda: (session_row(database_url, session_id) or {}).get("client_name") is not None,
            what="the session row to carry the client",
        )
        row = session_row(database_url, session_id)
        assert row is not None
        assert row["client_name"] == clipped
        assert row["client_version"] == "v" * 256 + f"…[truncated, {BIG} chars]"

        (initialized,) = [
            e
            for e in file_events(server)
            if e["event"] == "session.initialized" and e.get("session_id") == session_id
        ]
        assert initialized["client"] == clipped

        status = exai("status", "--state-dir", str(server.state_dir), "--json")
        assert status.returncode == 0, status.stderr
        (mine,) = [
            s for s in json.loads(status.stdout)["sessions"] if s["session_id"] == session_id
        ]
        assert mine["client_name"] == clipped
    # No line the server wrote, on the console or in its log file, carries the whole name.
    for output in (server.stderr_path, server.state_dir / "logs" / "exai.log"):
        assert max(len(line) for line in output.read_text().splitlines()) < 16_384


async def test_a_hostile_client_name_reaches_status_trace_and_console_escaped(
    server: ServerProcess,
) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = await initialize(client, HOSTILE)
        await still_answers(client)

        status = exai("status", "--state-dir", str(server.state_dir))
        assert status.returncode == 0, status.stderr
        trace = exai("trace", "--state-dir", str(server.state_dir), "--session", session_id)
        assert trace.returncode == 0, trace.stderr
        for output in (status.stdout, trace.stdout):
            assert obeyed(output) == set()
            assert not any(
                '"forged"' in line and session_id not in line for line in output.splitlines()
            )
        (row,) = [line for line in status.stdout.splitlines() if line.startswith(session_id)]
        assert "\\x1b]0;owned\\x07\\x1b[2J\\r\\n{" in row
        assert "\\x9b31m\\u202etxt.exe" in row
        (initialized,) = [
            line for line in trace.stdout.splitlines() if "session.initialized" in line
        ]
        assert "\\x1b]0;owned\\x07" in initialized
    # The server's own console (text, as on a terminal) printed nothing a terminal obeys.
    assert obeyed(server.stderr_path.read_text()) == set()


def test_the_console_escapes_and_the_file_clips_client_text_in_any_field(tmp_path: Path) -> None:
    """A library's log message (the event itself) or a traceback can quote a client."""
    body = f"""
hostile = {HOSTILE!r}
log.info("client said " + hostile, note="x" * 100_000)
try:
    raise ValueError("bad input: " + hostile)
except ValueError:
    log.exception("tool.failed")
logging.getLogger("trio-websocket").warning("handshake from " + hostile)
close_logging()
"""
    out = run_logging_program(tmp_path, body, settings={"log_console": "text"})
    assert obeyed(out.stderr) == set()
    assert "\\x1b]0;owned\\x07" in out.stderr
    assert not any(line.startswith('{"event":"forged"') for line in out.stderr.splitlines())
    (said, failed, handshake) = out.events
    assert said["note"] == clip("x" * 100_000, 4096)
    assert said["event"] == "client said " + HOSTILE  # JSON escapes it; kept whole
    assert HOSTILE in failed["exception"]
    assert handshake["event"] == "handshake from " + HOSTILE


async def test_an_id_longer_than_256_bytes_is_refused_with_id_null(server: ServerProcess) -> None:
    async with open_raw(server.authed_url()) as other_ws, open_raw(server.authed_url()) as ws:
        other = RawClient(other_ws)
        await initialize(other, "bystander")
        client = RawClient(ws)
        await initialize(client, "long-ids")
        for long_id in ("i" * 257, "é" * 129, 10**300):
            await client.send({"jsonrpc": "2.0", "id": long_id, "method": "ping"})
            reply = await client.receive()
            assert reply["id"] is None, reply
            assert reply["error"]["code"] == -32600
            assert "at most 256 are accepted" in reply["error"]["message"]
        # At the bound an id is echoed exactly, on a tool call too.
        for exact in ("i" * 256, "é" * 128, 10**255):
            call = {"name": "echo", "arguments": {"text": "at the bound"}}
            await client.send(
                {"jsonrpc": "2.0", "id": exact, "method": "tools/call", "params": call}
            )
            reply = await client.receive()
            assert reply["id"] == exact, reply
            assert reply["result"]["content"][0]["text"] == "at the bound"
        await still_answers(client)
        await still_answers(other)


async def test_a_stored_tool_result_is_bounded_with_a_marker_and_its_real_size(
    server: ServerProcess, database_url: str
) -> None:
    text = "r" * 100_000
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = await initialize(client, "big-results")
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": "big",
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}},
            }
        )
        reply = await client.receive()
        assert reply["result"]["content"][0]["text"] == text  # the client gets all of it
        await still_answers(client)

    def stored_result() -> list[tuple[Any, ...]]:
        return query(
            database_url,
            "select result, length(result::text) from tasks"
            " where session_id = %s and request_id = %s and result is not null",
            (session_id, '"big"'),
        )

    # The final record was journaled before the reply (EXAI_DURABILITY=journal); the
    # database has it once the writer's next batch lands.
    await wait_until(lambda: bool(stored_result()), what="the big result's row")
    ((stored, size),) = stored_result()
    assert stored["truncated"] is True
    assert stored["max_bytes"] == 4096
    real = stored["size_bytes"]
    assert real > 2 * len(text)  # the text twice: content and structuredContent
    assert stored["json_prefix"].startswith('{"content":[{"type":"text","text":"rrrr')
    assert stored["json_prefix"].endswith(f"…[truncated, {real} bytes]")
    assert size <= 4096 + 64  # jsonb's text adds a space after each separator


async def test_a_nul_in_a_stored_tool_result_is_replaced_and_a_typed_escape_kept(
    server: ServerProcess, database_url: str
) -> None:
    # PostgreSQL's jsonb cannot hold U+0000: it is stored as U+FFFD; the six characters
    # "\\u0000" typed by a client are ordinary text and stay as they are.
    texts = {"nul": "a\x00b", "typed": "a\\u0000b", "both": "\\u0000\x00"}
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        session_id = await initialize(client, "nul-results")
        for request_id, text in texts.items():
            await client.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": text}},
                }
            )
            reply = await client.receive()
            assert reply["result"]["content"][0]["text"] == text  # the client gets it as sent

    def stored() -> dict[str, str]:
        rows = query(
            database_url,
            "select request_id, result from tasks where session_id = %s and result is not null",
            (session_id,),
        )
        return {json.loads(rid): result["content"][0]["text"] for rid, result in rows}

    await wait_until(lambda: len(stored()) == len(texts), what="the results' rows")
    assert stored() == {"nul": "a\ufffdb", "typed": "a\\u0000b", "both": "\\u0000\ufffd"}


def test_a_stored_result_takes_what_pydantic_json_takes_as_plain_json() -> None:
    class Colour(StrEnum):
        RED = "red\x00"

    class Size(IntEnum):
        BIG = 3

    result = {"colour": Colour.RED, Colour.RED: [Size.BIG, 1.5, True, None], "n": {"m": []}}
    finished = TaskFinished(
        task_id=uuid.uuid4(), status="completed", completed_at=NOW, version=3, result=result
    )
    assert finished.result == {
        "colour": "red\ufffd",
        "red\ufffd": [3, 1.5, True, None],
        "n": {"m": []},
    }
    assert isinstance(finished.result, dict)
    assert type(finished.result["colour"]) is str
    assert RECORD.validate_json(finished.model_dump_json()) == finished
    for not_json in ({"a": (1, 2)}, {1: "a"}, {"a": {1, 2}}, {"a": b"x"}):
        with pytest.raises(ValidationError, match="not a JSON"):
            TaskFinished(
                task_id=uuid.uuid4(),
                status="completed",
                completed_at=NOW,
                version=3,
                result=not_json,
            )


def _nested(depth: int, leaf: Any) -> Any:
    """``leaf`` inside ``depth`` lists and objects, alternating."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    "depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 400, 100_000]
)
def test_a_stored_result_nested_deeply_is_either_refused_or_written_whole(depth: int) -> None:
    """A result is accepted only if its record can be written to the journal: pydantic's
    serializer refuses ~255 levels (the record's own count), and a record accepted but not
    encodable failed the journal append of its whole batch. Pydantic's JsonValue validation
    refused from 255 levels; what it took up to MAX_JSON_DEPTH is still taken, and any depth
    is refused with a ValidationError (a 100k-deep list: no RecursionError)."""

    def finished() -> TaskFinished:
        return TaskFinished(
            task_id=uuid.uuid4(),
            status="completed",
            completed_at=NOW,
            version=3,
            result=_nested(depth, "leaf"),
        )

    if depth > MAX_JSON_DEPTH:
        with pytest.raises(ValidationError, match="nested more than"):
            finished()
    else:
        record = finished()
        assert json.loads(record.model_dump_json())["result"] == _nested(depth, "leaf")


async def test_the_journal_holds_its_bound_with_the_database_away(tmp_path: Path) -> None:
    """Sessions with 200 KiB names, then calls whose (bounded) results are a third of the
    journal each, while Postgres is down: the journal file never passes its 64 KiB; the
    (read-only) calls whose final records no longer fit are refused with -32004, loudly, never
    answered unrecorded (docs/persistence.md), then new work is refused; once the database is
    back, what was kept is replayed: every answered call is completed in the database."""
    bound = 65536
    with own_postgres() as postgres:
        url = postgres.start()
        server = start_server(
            tmp_path / "state",
            database_url=url,
            extra_env={
                "EXAI_JOURNAL_MAX_BYTES": str(bound),
                "EXAI_MAX_STORED_RESULT_BYTES": "20000",
            },
        )
        journal_dir = tmp_path / "state" / "journal"

        def journal_size() -> int:
            return max(p.stat().st_size for p in journal_dir.glob("journal-*.jsonl"))

        try:
            async with open_raw(server.authed_url()) as bystander_ws:
                bystander = RawClient(bystander_ws)
                await initialize(bystander, "bystander")
                await trio.to_thread.run_sync(postgres.crash)
                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(_named_session, server, f"{n}" * 200_000)
                assert journal_size() <= bound

                async with open_raw(server.authed_url()) as ws:
                    client = RawClient(ws)
                    await initialize(client, "worker")
                    answered, withheld, refused = await _fill_the_journal(
                        client, lambda: journal_size() <= bound
                    )
                    assert answered >= 2
                    assert withheld >= 1
                    assert refused == 1
                    assert (await bystander.request("ping"))["result"] == {}
                    assert (await client.request("ping"))["result"] == {}
                lost = [
                    e
                    for e in server.log_events()
                    if e["event"] == "task.not_recorded"
                    and "the write journal is full" in e.get("error", "")
                ]
                assert len(lost) == withheld, "each withheld call's final record did not fit"
                assert "a task_finished record of" in lost[0]["error"]
                status = json.loads(
                    exai("status", "--state-dir", str(server.state_dir), "--json").stdout
                )
                assert status["persistence"]["journal_full"] is True
                assert status["persistence"]["journal_bytes"] <= bound

                await trio.to_thread.run_sync(postgres.start)
                await wait_until(
                    lambda: journal_size() < 1024, what="the journal to drain", within=90
                )
                await _echo_answers_again(bystander)
            # What the journal kept was replayed: every answered call is completed in the
            # database (the refused one's final record was never kept).
            worker = {e["session_id"] for e in lost}
            assert len(worker) == 1
            (completed,) = query(
                url,
                "select count(*) from tasks where status = 'completed' and session_id = %s",
                (worker.pop(),),
            )[0]
            assert completed == answered
        finally:
            assert server.stop() == 0, server.stderr_path.read_text()[-3000:]


async def _fill_the_journal(
    client: RawClient, within_bound: Callable[[], bool]
) -> tuple[int, int, int]:
    """Large echo calls until new work is refused: how many were answered, withheld (their
    final record did not fit) and refused; the journal within its bound after each."""
    answered = refused = withheld = 0
    for n in range(40):
        reply = await client.request(
            "tools/call", {"name": "echo", "arguments": {"text": f"{n:03d}" * 20_000}}
        )
        assert within_bound()
        if "result" in reply:
            assert withheld == 0, "answered after a final record was refused"
            assert reply["result"]["content"][0]["text"] == f"{n:03d}" * 20_000
            answered += 1
            continue
        assert reply["error"]["code"] == -32004, reply
        assert "storage unavailable" in reply["error"]["message"]
        if "could not be recorded" in reply["error"]["message"]:
            withheld += 1  # its final record did not fit: not answered
            continue
        refused += 1  # new work refused: the journal is (nearly) full
        break
    return answered, withheld, refused


async def _echo_answers_again(client: RawClient) -> None:
    """Echo until it answers with a result: storage takes new work again once the replay
    is done and the session has heard so (at the persistence client's next beat). Polled,
    since no event crosses the process boundary; the deadline only bounds a failure."""
    with trio.fail_after(30):
        while True:
            reply = await client.request(
                "tools/call", {"name": "echo", "arguments": {"text": "back"}}
            )
            if "result" in reply:
                assert reply["result"]["content"][0]["text"] == "back"
                return
            assert reply["error"]["code"] == -32004, reply
            await trio.sleep(0.05)


async def _named_session(server: ServerProcess, name: str) -> None:
    async with open_raw(server.authed_url()) as ws:
        client = RawClient(ws)
        await initialize(client, name)
        assert (await client.request("ping"))["result"] == {}
