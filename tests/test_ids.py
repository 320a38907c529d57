"""Block-read random UUIDs (storage/ids.py): version 4, distinct, and never shared with a
forked child."""

from __future__ import annotations

import os
import uuid

from storage import ids


def test_ids_are_random_version_4_uuids_and_distinct_across_blocks() -> None:
    made = [ids.uuid4() for _ in range(1000)]  # about four blocks
    assert len(set(made)) == len(made)
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in made)


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    ids.uuid4()  # the parent holds a block now, 16 bytes of it used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, b"".join(ids.uuid4().bytes for _ in range(10)))
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    child = {data[i : i + 16] for i in range(0, len(data), 16)}
    parent = {ids.uuid4().bytes for _ in range(10)}
    assert len(child) == 10
    assert not child & parent
