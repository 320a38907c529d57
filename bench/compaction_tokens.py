"""Tokens sent upstream per turn of a 30-turn ``chat`` thread, compaction off and on.

Each run starts ``exai serve`` on a database with a config of its own, talks to the loopback
OpenAI-compatible server of the tests (``tests/fake_openai.py``), drives one 30-turn thread
and reads what the fake upstream received: a turn's request size is the characters of its
messages / 4 (the upstream reports no usage, so no calibration applies and budgets are in
these same units). Summary requests are counted apart.

Workload: each prompt 2,000 characters (500 tokens), each answer 6,000 (1,500 tokens), so an
exchange is 2,000 tokens; the fake summariser answers 4,800 characters (1,200 tokens) each
time. Two history configurations, each with compaction off and on:

* ``defaults``: ``[chat]`` as shipped (history_tokens 50,000, max_messages 20);
* ``tokens only``: max_messages 200, so only the token budget cuts the history.

With compaction off, ``max_turns = 30`` is set (its default is then 20)::

    .venv/bin/python -m bench.compaction_tokens --database-url postgresql://...

Prints a Markdown table (docs/chat.md, "Measured").
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from actors.conversation.compaction import INSTRUCTIONS
from tests.chat_support import (
    ALICE,
    Caller,
    provider_table,
    query,
    upstream_thread,
    write_config,
)
from tests.fake_openai import Behaviour, FakeOpenAI, Received, Reply
from tests.harness import RawClient, open_raw, start_server, wait_until

TURNS = 30
PROMPT_CHARS = 2_000
ANSWER_CHARS = 6_000
SUMMARY_CHARS = 4_800


@dataclass(frozen=True)
class Run:
    name: str
    chat: str


RUNS = [
    Run("defaults, off", "compaction = false\nmax_turns = 30\n"),
    Run("defaults, on", ""),
    Run("tokens only, off", "compaction = false\nmax_turns = 30\nmax_messages = 200\n"),
    Run("tokens only, on", "max_messages = 200\n"),
]


def _respond(request: Received) -> Behaviour:
    if request.body["messages"][0]["content"] == INSTRUCTIONS:
        return Reply("s" * SUMMARY_CHARS, usage=None)
    return Reply("a" * ANSWER_CHARS, usage=None)


def _tokens(messages: list[dict[str, Any]]) -> int:
    return math.ceil(sum(len(m["content"]) for m in messages) / 4)


async def _drive(
    url: str, database_url: str, summaries: list[int], fake: FakeOpenAI
) -> list[tuple[int, int, int]]:
    """(tokens sent, exchanges summarised, exchanges sent verbatim) per turn."""
    out: list[tuple[int, int, int]] = []
    async with open_raw(url) as ws:
        client = RawClient(ws)
        await client.initialize()
        caller = Caller(client)
        thread = None
        for i in range(TURNS):
            prompt = f"turn {i:02d} " + "p" * (PROMPT_CHARS - 8)
            args: dict[str, Any] = {} if thread is None else {"continuation_id": thread}
            reply = await caller.chat(prompt, **args)
            thread = reply["continuation_id"]
            sent = [r for r in fake.received if r.body["messages"][0]["content"] != INSTRUCTIONS]
            out.append(
                (
                    _tokens(sent[-1].body["messages"]),
                    reply["history_summarised_turns"],
                    reply["history_turns"],
                )
            )
            if reply["compacting"]:
                # Measured as a thread whose turns come slower than its summaries: the next
                # turn starts once this summary is stored.
                done = len(summaries) + 1

                def stored(thread: str = thread, done: int = done) -> bool:
                    rows = query(
                        database_url,
                        "select count(*) from thread_summaries where thread_id = %s",
                        (thread,),
                    )
                    return bool(rows[0][0] >= done)

                await wait_until(stored, what="the summary row")
                asked = [
                    r for r in fake.received if r.body["messages"][0]["content"] == INSTRUCTIONS
                ]
                summaries.append(_tokens(asked[-1].body["messages"]))
    return out


async def _run(database_url: str, run: Run, fake: FakeOpenAI, state: Path) -> dict[str, Any]:
    providers = '[upstream]\ndefault_provider = "fake"\n' + provider_table(
        "fake", fake.base_url, "fake-model"
    )
    state.mkdir(parents=True)  # noqa: ASYNC240 - a script's setup, before anything runs
    config = write_config(state / "exai.toml", chat=run.chat, providers=providers)
    server = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    summaries: list[int] = []
    try:
        turns = await _drive(server.authed_url(ALICE), database_url, summaries, fake)
    finally:
        server.stop()
    return {"run": run.name, "turns": turns, "summaries": summaries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "EXAI_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    results = []
    with upstream_thread() as fake, tempfile.TemporaryDirectory() as tmp:
        fake.respond = _respond
        for n, run in enumerate(RUNS):
            results.append(trio.run(_run, args.database_url, run, fake, Path(tmp) / str(n)))
    header = "| turn | " + " | ".join(r["run"] for r in results) + " |"
    print(header)
    print("|" + "---|" * (len(results) + 1))
    for i in range(TURNS):
        cells = []
        for r in results:
            sent, summarised, kept = r["turns"][i]
            cells.append(
                f"{sent:,}" + (f" (s{summarised}, v{kept})" if summarised else f" (v{kept})")
            )
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    totals = [sum(t for t, _, _ in r["turns"]) for r in results]
    print("| total | " + " | ".join(f"{t:,}" for t in totals) + " |")
    with_summaries = [t + sum(r["summaries"]) for t, r in zip(totals, results, strict=True)]
    print("| total with summary calls | " + " | ".join(f"{t:,}" for t in with_summaries) + " |")
    print(
        "| summary calls | "
        + " | ".join(f"{len(r['summaries'])} ({sum(r['summaries']):,} tokens)" for r in results)
        + " |"
    )


if __name__ == "__main__":
    main()
