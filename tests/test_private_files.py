"""Secrets stay private (issue 12, item 9): what the server creates is its owner's alone, a
file holding a secret that others can read is refused as ssh refuses such a key, and a config
file can name its clients without holding a secret (``token_env``, ``token_sha256``)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from trio_websocket import ConnectionRejected

from tests.harness import RawClient, open_raw, start_server

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


def loose_entries(root: Path) -> list[str]:
    """Everything under ``root`` that a group or other users may access."""
    loose = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory, name)
            mode = stat.S_IMODE(path.lstat().st_mode)
            if not path.is_symlink() and mode & 0o077:
                loose.append(f"{path.relative_to(root)} {mode:04o}")
    return loose


async def test_everything_the_server_creates_is_its_owners_alone(
    database_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    server = start_server(state, database_url=database_url, token="")  # token file created
    try:
        async with open_raw(server.authed_url()) as ws:
            client = RawClient(ws)
            await client.initialize()
            reply = await client.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
            assert reply["result"]["content"][0]["text"] == "x"
    finally:
        assert server.stop() == 0
    # The state dir itself and server.stderr were made by the harness; the rest, by the server.
    assert (state / "token").exists()
    assert [e for e in loose_entries(state) if not e.startswith("server.stderr ")] == []


def test_a_token_file_others_can_read_is_refused_with_how_to_fix_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    token_file = state / "token"
    token_file.write_text(ALICE + "\n")
    token_file.chmod(0o644)
    with pytest.raises(RuntimeError, match="exai serve exited 2") as refused:
        start_server(state, database_url=None, token="")
    message = str(refused.value)
    assert f"chmod 600 {token_file}" in message
    assert "0644" in message
    assert ALICE not in message


def test_a_config_file_with_a_raw_token_must_be_private(tmp_path: Path) -> None:
    config = tmp_path / "exai.toml"
    config.write_text(f'[clients]\nalice = "{ALICE}"\n')
    config.chmod(0o640)
    with pytest.raises(RuntimeError, match="exai serve exited 2") as refused:
        start_server(tmp_path / "state", database_url=None, extra_env={"EXAI_CONFIG": str(config)})
    assert f"chmod 600 {config}" in str(refused.value)
    assert ALICE not in str(refused.value)


async def test_clients_named_without_secrets_in_a_readable_config(
    database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "exai.toml"
    config.write_text(
        "[clients.alice]\n"
        f'token_sha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"\n'
        "[clients.bob]\n"
        'token_env = "EXAI_TEST_BOB_TOKEN"\n'
    )
    config.chmod(0o644)  # it holds no secret: it may be world-readable, or kept in git
    server = start_server(
        tmp_path / "state",
        database_url=database_url,
        extra_env={"EXAI_CONFIG": str(config), "EXAI_TEST_BOB_TOKEN": BOB},
    )
    try:
        for token in (ALICE, BOB):
            async with open_raw(server.authed_url(token)) as ws:
                assert "result" in await RawClient(ws).initialize()
        with pytest.raises(ConnectionRejected) as refused:
            async with open_raw(server.authed_url("not-" + ALICE)):
                pass
        assert refused.value.status_code == 401
        configured = [e for e in server.log_events() if e["event"] == "node.configured"]
        assert set(configured[0]["clients"]) == {"default", "alice", "bob"}
    finally:
        assert server.stop() == 0
