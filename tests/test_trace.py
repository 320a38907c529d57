"""``exai trace`` on a real log: one call's timeline across a trio actor, its tool task and a
pykka actor; filters; ``--follow`` across a rotation.

The log is written by a real program (a subprocess, so the logging configuration stays out of
the test process): a session-like trio actor on a real mailbox, a tool task it starts, and a
pykka actor asked over the real bridge, each instrumented with :mod:`runtime.trace` exactly as
the node's actors are.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runtime.trace_view import build_timeline, read_events
from tests.harness import EXAI, ROOT

SESSION = "5e55-1011"
CALLS = 3

PROGRAM = """
import json, sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from runtime import trace
from runtime.actor import Actor, run_actor
from runtime.bridge import BridgedActor, wait_reply
from runtime.logs import LogSettings, close_logging, configure_logging
from runtime.mailbox import open_mailbox

SESSION = sys.argv[2]
PATH = f"/root/sessions/{SESSION}"


@dataclass(frozen=True)
class Save:
    text: str
    mark: trace.Postmark = field(default_factory=trace.postmark)


class Store(BridgedActor):
    def on_receive(self, message):
        with trace.handling("/root/persistence", type(message).__name__,
                            postmark=message.mark, depth=self.actor_inbox.qsize()):
            return message.text.upper()


class Session(Actor):
    path = PATH

    def __init__(self, ref, store, calls, done):
        self.ref, self.store = ref, store
        self.calls, self.done = calls, done

    async def receive(self, envelope):
        message, mark = envelope.message, envelope.mark
        with trace.handling(self.path, message["method"], postmark=mark, session_id=SESSION,
                            rpc_id=message["id"], depth=self.ref.depth,
                            capacity=self.ref.capacity):
            self.calls.start_soon(self.call, message)

    async def call(self, message):
        with trace.handling(f"{self.path}/tools/echo", "tools/call", rpc_id=message["id"]):
            await trio.lowlevel.checkpoint()
            answer = await wait_reply(self.store.ask(Save(message["text"]), block=False))
            assert answer == message["text"].upper()
        self.done.append(message["id"])


async def main():
    store = Store.start()
    ref, inbox = open_mailbox(PATH, 8)
    traces = {}
    for rpc_id in range(1, int(sys.argv[3]) + 1):
        message = {"method": "tools/call", "id": rpc_id, "text": f"call {rpc_id}"}
        envelope = trace.post(message, sender=f"{PATH}/reader")
        ref.tell(envelope, sender=f"{PATH}/reader")
        traces[rpc_id] = envelope.mark.trace_id
    ref.close()
    done = []
    async with trio.open_nursery() as calls:
        await run_actor(Session(ref, store, calls, done), inbox)
    await trio.to_thread.run_sync(store.stop)
    assert sorted(done) == sorted(traces)
    print(json.dumps(traces))


configure_logging("info", log_file=Path(sys.argv[1]), settings=LogSettings(log_console="off"))
trio.run(main)
close_logging()
"""


@dataclass(frozen=True)
class Run:
    log: Path
    traces: dict[int, str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The log of three traced calls, written by the program above."""
    directory = tmp_path_factory.mktemp("trace")
    program = directory / "program.py"
    program.write_text(PROGRAM)
    log = directory / "logs" / "exai.log"
    done = subprocess.run(
        [sys.executable, str(program), str(log), SESSION, str(CALLS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    traces = {int(k): v for k, v in json.loads(done.stdout).items()}
    return Run(log, traces)


def exai_trace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXAI), "trace", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_each_call_is_one_trace_through_three_actors(run: Run) -> None:
    events = [e for e in read_events([run.log]) if e["event"] == "actor.message"]
    assert len(events) == 3 * CALLS
    assert len(set(run.traces.values())) == CALLS
    for rpc_id, trace_id in run.traces.items():
        mine = [e for e in events if e["trace_id"] == trace_id]
        assert sorted(e["actor"] for e in mine) == [
            "/root/persistence",
            f"/root/sessions/{SESSION}",
            f"/root/sessions/{SESSION}/tools/echo",
        ]
        assert {e["session_id"] for e in mine} == {SESSION}
        assert {e["outcome"] for e in mine} == {"ok"}
        session = next(e for e in mine if e["actor"] == f"/root/sessions/{SESSION}")
        assert (session["kind"], session["rpc_id"], session["capacity"]) == (
            "tools/call",
            rpc_id,
            8,
        )
        assert session["sender"] == f"/root/sessions/{SESSION}/reader"
        # All three were queued before the actor ran: each found the ones behind it.
        assert session["depth"] == CALLS - rpc_id
        store = next(e for e in mine if e["actor"] == "/root/persistence")
        assert store["kind"] == "Save"
        assert store["sender"] == f"/root/sessions/{SESSION}/tools/echo"
        for event in mine:
            assert event["handled_ms"] >= 0
            assert event.get("waited_ms", 0) >= 0


def test_timeline_reconstructs_one_call(run: Run) -> None:
    trace_id = run.traces[2]
    done = exai_trace("--file", str(run.log), "--timeline", trace_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"trace {trace_id} · session {SESSION} · ")
    assert lines[0].endswith(" ms end to end")
    assert lines[2].split() == [
        "start",
        "ms",
        "wait",
        "ms",
        "handle",
        "ms",
        "actor",
        "message",
        "outcome",
        "timeline",
    ]
    # Columns are two spaces apart: start, wait, handle, actor, message, outcome, bar.
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[3:6]]
    assert [row[3:6] for row in rows] == [
        [f"/root/sessions/{SESSION}", "tools/call #2", "ok"],
        [f"/root/sessions/{SESSION}/tools/echo", "tools/call #2", "ok"],
        ["/root/persistence", "Save", "ok"],
    ]

    # The same numbers the log holds, laid out on one axis (times in ms).
    timeline = build_timeline(read_events([run.log]), trace_id)
    assert timeline is not None
    session, tool, store = timeline.steps
    assert session.posted_ms == 0.0  # the trace began when the message was posted
    assert session.posted_ms <= session.start_ms <= session.end_ms <= tool.start_ms
    # The call's write (its intent, recorded before the tool runs: issue 14) is posted by the
    # call's task, which may stamp it a few microseconds before the tool's own span opens:
    # it belongs to the call (after the session took it) and ends before the tool does.
    assert session.start_ms <= store.posted_ms <= store.start_ms <= store.end_ms <= tool.end_ms
    for step, row in zip(timeline.steps, rows, strict=True):
        assert float(row[0]) == pytest.approx(step.start_ms, abs=0.001)
        assert float(row[1]) == pytest.approx(step.waited_ms, abs=0.001)
        assert float(row[2]) == pytest.approx(step.handled_ms, abs=0.001)
        assert step.waited_ms == pytest.approx(step.event.get("waited_ms", 0.0), abs=0.002)
        assert step.handled_ms == pytest.approx(step.event["handled_ms"], abs=0.002)
    summary = lines[lines.index("time in each actor (waiting in its mailbox + handling):") + 1 :]
    assert [line.split()[0] for line in summary] == [step.actor for step in timeline.steps]
    for line, step in zip(summary, timeline.steps, strict=True):
        assert float(line.split()[1]) == pytest.approx(step.waited_ms + step.handled_ms, abs=0.002)


def test_filters(run: Run) -> None:
    def shown(*args: str) -> list[dict[str, Any]]:
        done = exai_trace("--file", str(run.log), "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    messages = ("--event", "actor.message")
    assert len(shown(*messages)) == 3 * CALLS
    assert len(shown(*messages, "--session", SESSION[:6])) == 3 * CALLS  # a prefix will do
    assert shown("--session", "someone-else") == []
    assert {e["actor"] for e in shown("--actor", "/root/persistence")} == {"/root/persistence"}
    under_session = shown(*messages, "--actor", f"/root/sessions/{SESSION}")
    assert len(under_session) == 2 * CALLS  # the session and its tool tasks
    assert len(shown(*messages, "--actor", "tools/echo")) == CALLS  # a bare name: contains
    one = shown("--trace", run.traces[1])
    assert len(one) == 3
    assert {e["trace_id"] for e in one} == {run.traces[1]}
    assert len(shown(*messages, "--event", "actor.*")) == 3 * CALLS
    stamps = sorted(e["timestamp"] for e in shown(*messages))
    assert len(shown(*messages, "--since", stamps[-1])) >= 1
    assert shown("--since", "2099-01-01T00:00:00Z") == []
    assert shown("--until", "2000-01-01T00:00:00") == []
    assert len(shown(*messages, "--since", "1h")) == 3 * CALLS  # written moments ago
    text = exai_trace("--file", str(run.log), "--trace", run.traces[1]).stdout.splitlines()
    assert len(text) == 3
    assert all(f"trace={run.traces[1]}" in line and "actor.message" in line for line in text)


def test_missing_log_unknown_trace_and_bad_times(run: Run, tmp_path: Path) -> None:
    done = exai_trace("--state-dir", str(tmp_path))
    assert done.returncode == 3
    assert "no log at" in done.stderr
    done = exai_trace("--file", str(run.log), "--timeline", "0123456789abcdef")
    assert done.returncode == 1
    assert "no events of trace 0123456789abcdef" in done.stderr
    done = exai_trace("--file", str(run.log), "--since", "yesterday")
    assert done.returncode == 2
    assert "neither an ISO time" in done.stderr


class Follower:
    """``exai trace --follow`` in a subprocess; its output read line by line with a deadline."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(EXAI), "trace", "--follow", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, stream: Any, within: float = 30) -> str:
        deadline = time.monotonic() + within
        while True:
            ready, _, _ = select.select([stream], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no line within {within}s")
            line: str = stream.readline()
            if line:
                return line

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


@pytest.fixture
def follower_log(tmp_path: Path) -> Path:
    log = tmp_path / "exai.log"
    log.write_text(_line("before", "s-old") + _line("noise", "s-other"))
    return log


def _line(event: str, session: str) -> str:
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": event, "session_id": session, "timestamp": stamp}) + "\n"


def test_follow_prints_new_matching_events_across_a_rotation(follower_log: Path) -> None:
    follower = Follower("--file", str(follower_log), "--session", "s-new", "--json")
    try:
        # It has reached the end of the file: anything appended from now on is seen.
        assert follower.line(follower.process.stderr).startswith("following ")
        with follower_log.open("a") as log:
            log.write(_line("ignored", "s-other") + _line("first", "s-new"))
        assert json.loads(follower.line(follower.process.stdout))["event"] == "first"
        # A half-written line is held until its end arrives.
        with follower_log.open("a") as log:
            log.write(_line("second", "s-new")[:20])
            log.flush()
            log.write(_line("second", "s-new")[20:])
        assert json.loads(follower.line(follower.process.stdout))["event"] == "second"
        # Rotated, as the server rotates: renamed to .1, a new file takes its name.
        os.replace(follower_log, follower_log.with_name("exai.log.1"))
        follower_log.write_text(_line("after rotation", "s-new"))
        assert json.loads(follower.line(follower.process.stdout))["event"] == "after rotation"
    finally:
        assert follower.stop() == 0
    assert "before" not in (follower.process.stdout.read() if follower.process.stdout else "")


def test_rotated_files_are_read_oldest_first(tmp_path: Path) -> None:
    log = tmp_path / "exai.log"
    base = datetime(2026, 11, 24, tzinfo=UTC)
    for index, name in enumerate(["exai.log.2", "exai.log.1", "exai.log"]):
        stamp = (base + timedelta(seconds=index)).isoformat()
        (tmp_path / name).write_text(json.dumps({"event": name, "timestamp": stamp}) + "\n")
    (tmp_path / "exai.log.bak").write_text("{}\n")  # not a backup of ours
    done = exai_trace("--file", str(log), "--json")
    assert [json.loads(line)["event"] for line in done.stdout.splitlines()] == [
        "exai.log.2",
        "exai.log.1",
        "exai.log",
    ]
