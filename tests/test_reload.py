"""SIGHUP re-reads the client tokens without a restart; a bad file keeps the old ones (issue
12, item 7)."""

from __future__ import annotations

import signal
from pathlib import Path

from trio_websocket import ConnectionRejected

from tests.harness import RawClient, ServerProcess, open_raw, start_server, wait_until

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


def write_clients(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


async def accepted(server: ServerProcess, token: str) -> bool:
    """Whether the token opens a session; ``False`` if refused with 401 (anything else
    raises)."""
    try:
        async with open_raw(server.authed_url(token)) as ws:
            return "result" in await RawClient(ws).initialize()
    except ConnectionRejected as refused:
        if refused.status_code != 401:
            raise
        return False


async def hangup_and_wait(server: ServerProcess, event: str, seen: int) -> dict[str, object]:
    """Send SIGHUP; the next ``event`` line after the ``seen`` ones already logged."""
    server.process.send_signal(signal.SIGHUP)

    def lines() -> list[dict[str, object]]:
        return [e for e in server.log_events() if e["event"] == event]

    await wait_until(lambda: len(lines()) > seen, what=f"{event} after SIGHUP")
    return lines()[seen]


async def test_sighup_reloads_client_tokens_and_a_bad_file_keeps_the_old_ones(
    database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "exai.toml"
    write_clients(config, f'[clients]\nalice = "{ALICE}"\n')
    server = start_server(
        tmp_path / "state", database_url=database_url, extra_env={"EXAI_CONFIG": str(config)}
    )
    try:
        async with open_raw(server.authed_url(ALICE)) as open_ws:
            await RawClient(open_ws).initialize()  # a session open across the reload
            assert not await accepted(server, BOB)

            write_clients(config, f'[clients]\nbob = "{BOB}"\n')
            reloaded = await hangup_and_wait(server, "config.reloaded", 0)
            assert set(reloaded["clients"]) == {"default", "bob"}  # type: ignore[arg-type]
            assert await accepted(server, BOB)
            assert not await accepted(server, ALICE)
            assert await accepted(server, server.token)  # the node's own token stays
            # The session that was open goes on.
            assert (await RawClient(open_ws).request("ping"))["result"] == {}

            write_clients(config, "[clients\nbroken = ")
            refused = await hangup_and_wait(server, "config.reload_refused", 0)
            assert "cannot read config file" in str(refused["reason"])
            assert await accepted(server, BOB)  # the old tokens are kept

            config.write_text(f'[clients]\nbob = "{BOB}"\n')
            config.chmod(0o644)  # a raw token others can read
            loose = await hangup_and_wait(server, "config.reload_refused", 1)
            assert f"run 'chmod 600 {config}'" in str(loose["reason"])  # not redacted away
            assert await accepted(server, BOB)
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0
