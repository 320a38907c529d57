"""The log pipeline on real output: secrets redacted in the file and on the console, rotation
(also under concurrent writers), per-logger levels, trace sampling, console formats.

Each case runs a small program in a subprocess that configures logging exactly as ``exai
serve`` does and logs through structlog and the standard library; the test reads what it
wrote. A subprocess keeps the process-wide logging configuration out of the test process.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.trace_view import log_files, read_events
from tests.harness import EXAI, ROOT

PRELUDE = """
import json, logging, sys, threading
from pathlib import Path

import structlog

from runtime import trace
from runtime.logs import LogSettings, close_logging, configure_logging, register_secret

options = json.loads(sys.argv[1])
configure_logging(
    options.get("level", "info"),
    log_file=Path(options["log"]),
    settings=LogSettings(**options.get("settings", {})),
)
log = structlog.get_logger("app")
"""

SECRETS = {
    "registered token": "tok_9f8e7d6c5b4a39281706",
    "bearer jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
    "query token": "q-token-value-123456",
    "api key field": "sk-proj-abcdefghijklmnopqrstuvwx",
    "db password": "hunter2-db-pass",
    "password field": "pa55w0rd-field",
    "secret field": "s3cr3t-field-value",
    "basic auth": "dXNlcjpwYXNzd29yZA==",
    "nested camelCase key": "nested-secret-value",
    "in an exception": "exc-secret-abcdef",
    "stdlib record": "stdlib-secret-value",
    "github token": "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "admin token in prose": "adm_0123456789abcdefghij",
}

SECRETS_PROGRAM = f"""
S = {SECRETS!r}
register_secret(S["registered token"])
register_secret(S["admin token in prose"])
url = "ws://127.0.0.1:8765/mcp?token=" + S["query token"] + "&session=abc"
log.info("client.connected", url=url)
log.info("upstream.request", headers={{"Authorization": "Bearer " + S["bearer jwt"]}},
         api_key=S["api key field"], input_tokens=1200, output_tokens=34, max_tokens=1000)
log.info("db.connect", dsn="postgresql://exai:" + S["db password"] + "@db.example:5432/exai")
log.info("user.login", password=S["password field"], client_secret=S["secret field"],
         session_id="0b1c2d3e-session", tokens_reserved=5)
log.warning("proxy.header", header="Authorization: Basic " + S["basic auth"])
log.info("config.loaded", providers=[{{"name": "glm", "apiKey": S["nested camelCase key"]}}])
log.info("token.leak", note="the token " + S["registered token"] + " was echoed")
log.info("admin", note="admin says " + S["admin token in prose"], progress="step 1 of 3")
log.info("git.remote", remote="https://" + S["github token"] + "@github.com/o/r.git")
try:
    raise RuntimeError("upstream said: invalid api_key=" + S["in an exception"])
except RuntimeError:
    log.exception("call.failed", keyboard="not a key")
logging.getLogger("psycopg").error("connection failed: password=" + S["stdlib record"])
close_logging()
"""


@dataclass(frozen=True)
class Output:
    log: Path
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(read_events(log_files(self.log)))

    def text(self) -> str:
        return "".join(path.read_text() for path in log_files(self.log))


def run(tmp_path: Path, body: str, **options: Any) -> Output:
    log = tmp_path / "logs" / "exai.log"
    tmp_path.mkdir(parents=True, exist_ok=True)
    program = tmp_path / "program.py"
    program.write_text(PRELUDE + body)
    done = subprocess.run(
        [sys.executable, str(program), json.dumps({"log": str(log), **options})],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return Output(log, done.stderr)


def test_secrets_are_redacted_in_the_file_and_on_the_console(tmp_path: Path) -> None:
    for console in ("json", "text"):
        out = run(tmp_path / console, SECRETS_PROGRAM, settings={"log_console": console})
        for where, text in (("file", out.text()), (f"{console} console", out.stderr)):
            for name, secret in SECRETS.items():
                assert secret not in text, f"{name} leaked into the {where}"
            assert text.count("[REDACTED]") >= len(SECRETS)

    events = {e["event"]: e for e in out.events}
    assert len(events) == 11
    # Values of secret-named fields go; the fields stay, so the event still reads.
    assert events["upstream.request"]["api_key"] == "[REDACTED]"
    assert events["upstream.request"]["headers"] == {"Authorization": "[REDACTED]"}
    assert events["user.login"]["password"] == "[REDACTED]"
    assert events["user.login"]["client_secret"] == "[REDACTED]"
    assert events["config.loaded"]["providers"] == [{"name": "glm", "apiKey": "[REDACTED]"}]
    # Inside text, only the secret part goes.
    assert events["client.connected"]["url"] == (
        "ws://127.0.0.1:8765/mcp?token=[REDACTED]&session=abc"
    )
    assert events["db.connect"]["dsn"] == "postgresql://exai:[REDACTED]@db.example:5432/exai"
    assert events["proxy.header"]["header"] == "Authorization: Basic [REDACTED]"
    assert events["token.leak"]["note"] == "the token [REDACTED] was echoed"
    assert events["git.remote"]["remote"] == "https://[REDACTED]@github.com/o/r.git"
    assert events["call.failed"]["exception"].endswith(
        "RuntimeError: upstream said: invalid api_key=[REDACTED]"
    )
    assert "connection failed: password=[REDACTED]" in events
    # Counts named like tokens, ids and ordinary words are not secrets.
    request = events["upstream.request"]
    assert (request["input_tokens"], request["output_tokens"], request["max_tokens"]) == (
        1200,
        34,
        1000,
    )
    assert events["user.login"]["session_id"] == "0b1c2d3e-session"
    assert events["user.login"]["tokens_reserved"] == 5
    assert events["call.failed"]["keyboard"] == "not a key"
    assert events["admin"]["progress"] == "step 1 of 3"
    assert events["connection failed: password=[REDACTED]"]["logger"] == "psycopg"


ROTATION_PROGRAM = """
def write(thread):
    for n in range(200):
        log.info("tick", thread=thread, n=n, pad="x" * 40)

threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
close_logging()
"""


def test_the_file_rotates_by_size_keeping_whole_lines_from_concurrent_writers(
    tmp_path: Path,
) -> None:
    out = run(
        tmp_path,
        ROTATION_PROGRAM,
        settings={"log_file_max_bytes": 4096, "log_file_backups": 2, "log_console": "off"},
    )
    names = sorted(path.name for path in out.log.parent.iterdir())
    assert names == ["exai.log", "exai.log.1", "exai.log.2"]
    for path in out.log.parent.iterdir():
        assert path.stat().st_size <= 4096
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for line in path.read_text().splitlines():
            json.loads(line)  # every line whole: no write was interleaved or cut
    # Oldest first across the files: each writer's events are consecutive and end with its
    # last one; what rotated away is a prefix, never a hole.
    ticks = [e for e in out.events if e["event"] == "tick"]
    assert 0 < len(ticks) < 800
    for thread in range(4):
        seen = [e["n"] for e in ticks if e["thread"] == thread]
        assert seen == list(range(200 - len(seen), 200))
    assert out.stderr == ""


SAMPLING_PROGRAM = """
KEPT = ["00000000aaaaaaaa", "7ffffffe00000000"]
DROPPED = ["80000000bbbbbbbb", "ffffffff00000000"]
for trace_id in KEPT + DROPPED:
    with trace.handling("/root/sessions/s", "tools/call", trace_id=trace_id):
        mark = trace.postmark()
    with trace.handling("/root/persistence", "Ship", postmark=mark):
        pass
try:
    with trace.handling("/root/sessions/s", "$/boom", trace_id=DROPPED[0]):
        raise ValueError("boom")
except ValueError:
    pass
structlog.get_logger("chatty").debug("chatty.debug")
structlog.get_logger("quiet").debug("quiet.debug")
structlog.get_logger("quiet").info("quiet.info")
close_logging()
"""


def test_trace_sampling_keeps_whole_traces_and_every_failure(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        SAMPLING_PROGRAM,
        settings={"trace_sample": 0.5, "log_console": "off", "log_levels": "chatty=debug"},
    )
    events = out.events
    messages = [e for e in events if e["event"] == "actor.message"]
    kept = {(e["trace_id"], e["actor"]) for e in messages if e["outcome"] == "ok"}
    assert kept == {
        ("00000000aaaaaaaa", "/root/sessions/s"),
        ("00000000aaaaaaaa", "/root/persistence"),
        ("7ffffffe00000000", "/root/sessions/s"),
        ("7ffffffe00000000", "/root/persistence"),
    }
    failed = [e for e in messages if e["outcome"] == "error"]
    assert [(e["trace_id"], e["kind"], e["error"], e["level"]) for e in failed] == [
        ("80000000bbbbbbbb", "$/boom", "ValueError('boom')", "warning")
    ]
    names = [e["event"] for e in events if e["event"] != "actor.message"]
    assert names == ["chatty.debug", "quiet.info"]  # debug only where asked for


def test_per_logger_level_turns_trace_events_down(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        SAMPLING_PROGRAM,
        settings={"log_console": "off", "log_levels": "trace=warning"},
    )
    messages = [e for e in out.events if e["event"] == "actor.message"]
    assert [e["outcome"] for e in messages] == ["error"]  # a failure is a warning: kept
    assert [e["event"] for e in out.events if e["event"] != "actor.message"] == ["quiet.info"]


def test_console_formats(tmp_path: Path) -> None:
    body = 'log.info("hello", n=1)\nclose_logging()\n'
    as_json = run(tmp_path / "json", body, settings={"log_console": "json"})
    (line,) = as_json.stderr.splitlines()
    assert json.loads(line)["event"] == "hello"
    as_text = run(tmp_path / "text", body, settings={"log_console": "text"})
    assert "hello" in as_text.stderr
    assert not as_text.stderr.startswith("{")
    off = run(tmp_path / "off", body, settings={"log_console": "off"})
    assert off.stderr == ""
    for out in (as_json, as_text, off):  # the file is JSON lines whatever the console shows
        assert [e["event"] for e in out.events] == ["hello"]
        assert out.events[0]["logger"] == "app"


def test_per_message_events_stay_off_the_console_unless_asked(tmp_path: Path) -> None:
    body = """
with trace.handling("/root/sessions/s", "ping"):
    pass
try:
    with trace.handling("/root/sessions/s", "$/boom"):
        raise ValueError("boom")
except ValueError:
    pass
log.info("other")
close_logging()
"""
    quiet = run(tmp_path / "default", body, settings={"log_console": "json"})
    shown = [json.loads(line) for line in quiet.stderr.splitlines()]
    assert [(e["event"], e.get("outcome")) for e in shown] == [
        ("actor.message", "error"),
        ("other", None),
    ]
    assert [e.get("kind") for e in quiet.events] == ["ping", "$/boom", None]  # the file: all
    loud = run(
        tmp_path / "asked",
        body,
        settings={"log_console": "json", "log_console_trace": True},
    )
    assert len(loud.stderr.splitlines()) == 3


def test_a_bad_log_setting_stops_serve_before_it_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(EXAI), "serve", "--state-dir", str(tmp_path / "state"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "EXAI_LOG_LEVELS": "trace"},
    )
    assert done.returncode == 2
    assert "expected logger=level, got 'trace'" in done.stderr
    assert not (tmp_path / "state" / "server.json").exists()


def test_every_event_is_one_line_whatever_unicode_it_holds(tmp_path: Path) -> None:
    # U+2028 and friends are line breaks to str.splitlines(): written raw, one event would
    # read as two broken lines.
    body = 'log.info("odd", text="a\\u2028b\\u0085c\\x1cd é 😀")\nclose_logging()\n'
    out = run(tmp_path, body, settings={"log_console": "json"})
    for text in (out.text(), out.stderr):
        (line,) = text.splitlines()
        assert line.isascii()
        assert json.loads(line)["text"] == "a\u2028b\u0085c\x1cd é 😀"


TRACE_FIELDS_PROGRAM = """
with trace.handling("/root/sessions/s", "tools/call", trace_id="00000000cccccccc") as h:
    h.note(tool="t" * 10000, api_key="sk-proj-abcdefghijklmnopqrstuvwx", caller="Bearer abcdefgh")
# A peer's method (the event's kind) and request id: clipped like any field.
with trace.handling("/root/sessions/s", "m" * 9000, rpc_id="r" * 9000) as h:
    pass
# ...and redacted like any: a client's own words may hold a secret, its token above all.
register_secret("known-client-token-123")
for _ in range(2):  # the second from the kinds remembered
    with trace.handling(
        "/root/sessions/s", "tools/call?token=abcdefgh123", rpc_id="Bearer abcdefgh123"
    ) as h:
        h.note(tool="x known-client-token-123")
with trace.handling("/root/sessions/s", "m/later-token-12345", rpc_id=7) as h:
    pass
register_secret("later-token-12345")  # the kinds remembered are forgotten
with trace.handling("/root/sessions/s", "m/later-token-12345", rpc_id=7) as h:
    pass
close_logging()
"""


def test_trace_events_are_redacted_clipped_and_stamped_like_every_event(tmp_path: Path) -> None:
    """Per-message events take a direct path (runtime.logs._trace_event), not structlog's
    pipeline: the same redaction, bounds and fields all the same."""
    out = run(tmp_path, TRACE_FIELDS_PROGRAM, settings={"log_console": "off"})
    event, peers, *secrets, before, known = [e for e in out.events if e["event"] == "actor.message"]
    assert event["api_key"] == "[REDACTED]"
    assert event["caller"] == "Bearer [REDACTED]"
    assert len(event["tool"]) < 4200
    assert "10000" in event["tool"]  # the clip marker gives the real length
    assert (event["logger"], event["level"], event["outcome"]) == ("trace", "info", "ok")
    # structlog's ISO form, as every other event's: microseconds, UTC, "Z".
    stamp = event["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    written = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - written).total_seconds()) < 600
    assert event["trace_id"] == "00000000cccccccc"
    for field in ("kind", "rpc_id"):
        assert len(peers[field]) < 4200
        assert "9000" in peers[field]
    assert len(secrets) == 2
    for secret in secrets:
        assert secret["kind"] == "tools/call?token=[REDACTED]"
        assert secret["rpc_id"] == "Bearer [REDACTED]"
        assert secret["tool"] == "x [REDACTED]"
    assert before["kind"] == "m/later-token-12345"
    assert (known["kind"], known["rpc_id"]) == ("m/[REDACTED]", 7)
