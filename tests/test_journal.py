"""The write journal on a real file system: order, truncation, bound, torn tails, and the
flock that tells a dead writer's journal from a live one's."""

from __future__ import annotations

import json
import resource
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from storage.journal import REJECTED_FILE, Journal, find_orphans
from storage.rows import (
    RECORD,
    Record,
    SessionActivity,
    SessionIdentified,
    SessionRow,
    TokenUsage,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _usage(n: int) -> TokenUsage:
    return TokenUsage(
        usage_id=uuid.uuid4(),
        session_id=f"s{n}",
        task_id=None,
        provider="kimi",
        model="k2",
        input_tokens=n,
        output_tokens=n,
        created_at=NOW,
    )


def test_records_come_back_in_order_and_the_file_truncates_once_replayed(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, node_id="n1")
    header = journal.size_bytes
    records = [_usage(n) for n in range(10)]
    journal.append(records[:4], durable=True)
    journal.append(records[4:], durable=False)
    assert journal.pending
    assert journal.pending_records == 10

    first, offset = journal.read(3)
    assert first == records[:3]
    journal.advance(offset, len(first))
    assert journal.pending_records == 7
    rest, end = journal.read(100)
    assert rest == records[3:]
    journal.advance(end, len(rest))

    assert not journal.pending
    assert journal.size_bytes == header == journal.path.stat().st_size
    journal.append(records[:1], durable=True)  # appends land after the header again
    assert journal.read(10)[0] == records[:1]
    journal.close()


def test_full_at_three_quarters_and_never_past_its_bound(tmp_path: Path) -> None:
    """New work is refused from three quarters on; the rest holds accepted work's records,
    and a record that does not fit is left out with the reason, whatever its kind."""
    # Past three quarters, room for the two usage records of accepted work below.
    journal = Journal.open(tmp_path, node_id="n1", max_bytes=2400)
    while not journal.full:
        assert journal.append([_usage(1)], durable=False) == {}
    assert 1800 <= journal.size_bytes < 2400
    big = SessionIdentified(
        session_id="s",
        client_name="x" * 3000,
        client_version="1",
        protocol_version="2025-06-18",
        at=NOW,
    )
    kept = journal.pending_records
    refused = journal.append([_usage(2), big, _usage(3)], durable=True)
    assert list(refused) == [1]
    assert "session_identified record of" in str(refused[1])
    assert "can never fit the write journal (bound 2400 bytes)" in str(refused[1])
    assert journal.pending_records == kept + 2
    while True:
        refused = journal.append([_usage(4)], durable=False)
        if refused:
            break
    assert "the write journal is full" in str(refused[0])
    assert "a token_usage record of" in str(refused[0])
    assert journal.size_bytes <= 2400
    assert journal.path.stat().st_size == journal.size_bytes
    records, _ = journal.read(1000)
    assert big not in records
    journal.close()


def test_close_removes_an_empty_journal_and_keeps_a_pending_one(tmp_path: Path) -> None:
    empty = Journal.open(tmp_path, node_id="clean")
    empty.close()
    assert not empty.path.exists()

    pending = Journal.open(tmp_path, node_id="dirty")
    pending.append([_usage(1)], durable=True)
    pending.close()
    assert pending.path.exists()


def test_a_live_journal_is_never_an_orphan_and_a_released_one_is(tmp_path: Path) -> None:
    mine = Journal.open(tmp_path, node_id="me")
    live = Journal.open(tmp_path, node_id="alive")
    dead = Journal.open(tmp_path, node_id="dead")
    written = [_usage(1), _usage(2)]
    dead.append(written, durable=True)
    dead.close()  # what the kernel does for a killed process: the lock is released

    orphans = find_orphans(tmp_path, exclude=mine.paths)
    try:
        assert [o.node_id for o in orphans] == ["dead"]
        assert [r for chunk in orphans[0].chunks(1) for r in chunk] == written
    finally:
        for orphan in orphans:
            orphan.release()
    live.close()
    mine.close()


def test_orphan_chunks_skip_a_torn_tail_and_keep_unreadable_lines(tmp_path: Path) -> None:
    dead = Journal.open(tmp_path, node_id="dead")
    good = [SessionRow(session_id="a", created_at=NOW), SessionRow(session_id="b", created_at=NOW)]
    dead.append(good[:1], durable=True)
    with dead.path.open("ab") as raw:
        raw.write(b'{"kind": "no_such_kind"}\n')
    dead.append(good[1:], durable=True)
    with dead.path.open("ab") as raw:
        raw.write(b'{"kind": "session", "session_id": "tor')  # the machine died mid-write
    dead.close()

    [orphan] = find_orphans(tmp_path)
    try:
        assert [r for chunk in orphan.chunks(10) for r in chunk] == good
    finally:
        orphan.remove()
    kept = [json.loads(line) for line in (tmp_path / REJECTED_FILE).read_text().splitlines()]
    assert [entry["raw"] for entry in kept] == ['{"kind": "no_such_kind"}']


def test_segments_rotate_and_go_once_the_database_has_them(tmp_path: Path) -> None:
    """A journal that is never caught up (steady load) still gives its disk back: full
    segments are left for new ones, and deleted once every record in them is committed."""
    journal = Journal.open(tmp_path, node_id="n1", segment_bytes=4096)
    records = [_usage(n) for n in range(200)]
    for record in records:
        journal.append([record], durable=False)
    segments = journal.paths
    assert len(segments) > 3
    assert journal.size_bytes == sum(p.stat().st_size for p in segments)

    seen: list[Record] = []
    while journal.pending:
        chunk, end = journal.read(7)
        seen += chunk
        journal.advance(end, len(chunk))
        # Every segment still on disk holds something the database does not have, or is
        # the one appends go to.
        assert all(p.exists() for p in journal.paths)
        assert [p for p in segments if p.exists()] == journal.paths
    assert seen == records
    assert journal.paths == [segments[-1]]
    assert journal.committed == journal.appended
    journal.append(records[:1], durable=True)  # positions go on from where they were
    assert journal.read(10)[0] == records[:1]
    journal.close()


def test_one_thread_appends_while_another_reads_and_advances(tmp_path: Path) -> None:
    """The persistence actor appends while its database writer reads and advances: every
    record comes back once, in order, across rotations and truncations."""
    journal = Journal.open(tmp_path, node_id="n1", segment_bytes=8192)
    records = [_usage(n) for n in range(3000)]
    done = threading.Event()

    def append() -> None:
        for start in range(0, len(records), 5):
            journal.append(records[start : start + 5], durable=False)
        done.set()

    appender = threading.Thread(target=append)
    appender.start()
    seen: list[Record] = []
    while not (done.is_set() and not journal.pending):
        chunk, end = journal.read(50)
        seen += chunk
        journal.advance(end, len(chunk))
    appender.join()
    assert seen == records
    assert len(journal.paths) == 1
    journal.close()
    assert list(tmp_path.glob("journal-*.jsonl")) == []


def test_a_write_that_fails_part_way_leaves_nothing_behind(tmp_path: Path) -> None:
    """A ``write(2)`` that fails after writing part of a batch (disk full; here
    ``RLIMIT_FSIZE``, whose EFBIG comes after a short write) is cut back, so the next append
    starts on a line of its own and everything after it reads back (found in review)."""
    journal = Journal.open(tmp_path, node_id="n1")
    first = [_usage(0)]
    journal.append(first, durable=False)
    size = journal.path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        with pytest.raises(OSError, match="too large"):
            journal.append([_usage(n) for n in range(1, 5)], durable=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert journal.path.stat().st_size == size
    later = [_usage(5), _usage(6)]
    journal.append(later, durable=False)
    records, _ = journal.read(100)
    assert records == first + later
    journal.close()


def test_segments_are_at_most_an_eighth_of_the_bound(tmp_path: Path) -> None:
    """The committed part of the oldest segment counts toward the bound until the segment
    goes: segments of at most an eighth of it keep that waste small (found in review: with a
    small bound, 'journal full' while the database kept up)."""
    journal = Journal.open(tmp_path, node_id="n1", max_bytes=64_000, segment_bytes=8 << 20)
    assert journal.segment_bytes == 8_000
    journal.close()


def test_an_activity_line_with_the_old_token_totals_is_read_without_them() -> None:
    # Journals written before token totals came from token_usage carry them on activity
    # records; a record built now has none, and is kept as it was built.
    line = json.dumps(
        {
            "kind": "session_activity",
            "session_id": "s1",
            "last_activity": NOW.isoformat(),
            "tool_calls": 3,
            "tool_errors": 1,
            "input_tokens": 0,
            "output_tokens": 0,
        }
    )
    old = RECORD.validate_json(line)
    assert old == SessionActivity(session_id="s1", last_activity=NOW, tool_calls=3, tool_errors=1)
    with pytest.raises(ValidationError):  # any other unknown field is still refused
        RECORD.validate_json(line.replace('"input_tokens"', '"inputs"'))
