"""``python -m bench proxy`` (issue 16) runs: its direct client drives a real stdio MCP server
(``@modelcontextprotocol/server-everything``, npm) through the orchestrator's line protocol,
and a short plan puts the same server behind ``exai serve`` (``[servers.everything]``) and
reports the overhead per call. Tiny windows, no timing assertions: only that every call was
answered and that each figure comes from the process it is about."""

from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from bench import proxy
from bench.loadgen import CALL, call_template
from bench.runner import RunOptions, measure
from bench.scenarios import Scenario
from bench.targets import Options, find_exai
from tests.test_proxy_client import everything

TINY = Scenario("c10", "3 clients", active=3, warmup=0.2, duration=0.6)


def test_a_call_template_names_the_tool_and_keeps_a_percent_sign_literal() -> None:
    assert call_template("echo", '{"text": "hello"}') == CALL
    text = call_template("everything__echo", '{"message": "100%"}') % 7
    assert json.loads(text) == {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "everything__echo", "arguments": {"message": "100%"}},
    }
    with pytest.raises(TypeError):
        call_template("echo", "[1]")


def test_the_config_declares_the_server_as_exai_reads_it() -> None:
    command = ["/opt/some dir/mcp-server", "--flag", 'with "quotes"']
    text = proxy.config_text(proxy.SERVERS["everything"], command)
    assert tomllib.loads(text) == {
        "servers": {"everything": {"command": command[0], "args": command[1:]}}
    }


def test_the_direct_client_measures_the_server_it_started(tmp_path: Path) -> None:
    server = proxy.SERVERS["everything"]
    with proxy.start("direct", server, everything(), _options(tmp_path), "t") as running:
        assert running.owned is None  # nothing runs until the generator starts the server
        m = measure(TINY, running, RunOptions(_python(), tmp_path, generator="bench.stdiogen"), "t")
    assert not m.failure, m.failure
    assert m.calls > 0
    assert (m.errors, m.stalled_sessions, m.connect_failed) == (0, 0, 0), m.first_error
    # The RSS read is the server's (the pid from the generator's ready event), not pid 0's.
    assert m.peak_rss_kib > 0


def test_a_short_plan_reports_the_overhead_through_exai(tmp_path: Path, database_url: str) -> None:
    # The suite's Postgres instead of an embedded one per exai: the same path, started sooner.
    opts = replace(_options(tmp_path), exai_database_url=database_url)
    if opts.exai is None:
        pytest.fail("no exai console script: run `just setup`")
    results = proxy.run_all([TINY], {"everything": everything()}, True, opts, tmp_path)
    assert [(r.server, r.path) for r in results] == [
        ("everything", "direct"),
        ("everything", "exai"),
        ("", "exai-own"),
    ]
    for r in results:
        assert not r.m.failure, r.m.failure
        assert r.m.calls > 0, r
        assert (r.m.errors, r.m.stalled_sessions) == (0, 0), r.m.first_error
    text = proxy.section(results, ["a note"])
    [overhead] = proxy.overheads(results)
    assert overhead.startswith("10 clients, concurrent, server-everything (npm): through exai")
    assert "exai's own `echo`" in overhead
    assert overhead in text
    assert "| through exai, WebSocket |" in text


def _python() -> str:
    return sys.executable


def _options(work: Path) -> Options:
    return replace(Options(_python(), find_exai(None), None, work), start_timeout=120.0)
