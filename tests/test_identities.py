"""Client identities: every token names one, and what a client keeps (threads, a parked
session) is its identity's alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected

from runtime.auth import DEFAULT_IDENTITY, ClientTokens
from runtime.config import (
    ConfigError,
    load_config_file,
    load_settings,
    named_client_tokens,
)
from tests.chat_support import ALICE, BOB, Caller, error_text, provider_table, upstream_thread
from tests.chat_support import write_config as write_chat_config
from tests.fake_openai import FakeOpenAI
from tests.harness import RawClient, ServerProcess, open_raw, start_server, wait_until

GOING_AWAY = 1001

# -- tokens and configuration -------------------------------------------------------------------


def test_each_token_names_its_identity() -> None:
    clients = ClientTokens("the-default-token-0123", {"alice": ALICE, "bob": BOB})
    assert clients.identify("the-default-token-0123") == DEFAULT_IDENTITY
    assert clients.identify(ALICE) == "alice"
    assert clients.identify(BOB) == "bob"
    assert clients.identify(ALICE[:-1]) is None
    assert clients.identify(ALICE + "x") is None
    assert clients.identify(None) is None


@pytest.mark.parametrize(
    ("named", "problem"),
    [
        ({"alice": ALICE, "bob": ALICE}, "clients 'alice' and 'bob' have the same token"),
        ({"alice": "the-default-token-0123"}, "'default' and 'alice' have the same token"),
        ({"default": ALICE}, "reserved"),
        ({"al ice": ALICE}, "client name 'al ice'"),
        ({"alice": "short"}, "shorter than 16"),
    ],
)
def test_bad_client_tokens_are_refused_naming_the_client(
    named: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        ClientTokens("the-default-token-0123", named)
    assert ALICE not in str(refused.value)  # never quotes a token


def test_tokens_come_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_chat_config(tmp_path / "exai.toml", clients={"alice": ALICE})
    monkeypatch.setenv("EXAI_CLIENT_TOKENS", f"bob={BOB}, carol=carol-token-0123456789")
    named = named_client_tokens(load_settings(), load_config_file(config), {})
    assert named == {"alice": ALICE, "bob": BOB, "carol": "carol-token-0123456789"}
    monkeypatch.setenv("EXAI_CLIENT_TOKENS", f"alice={BOB}")
    with pytest.raises(ConfigError, match="both in EXAI_CLIENT_TOKENS and in the config file"):
        named_client_tokens(load_settings(), load_config_file(config), {})
    monkeypatch.setenv("EXAI_CLIENT_TOKENS", BOB)
    with pytest.raises(ConfigError, match="'name=token'") as refused:
        named_client_tokens(load_settings(), load_config_file(config), {})
    assert BOB not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[chats]\nmax_turns = 3\n", "chats: Extra inputs are not permitted"),
        ("[chat]\nmax_turn = 3\n", "chat.max_turn: Extra inputs are not permitted"),
        ("[chat]\nmax_turns = 0\n", "chat.max_turns"),
        (f'[clients]\nalice = "{ALICE}"\nbob = "{ALICE}"\n', "have the same token"),
        ("[upstream.providers.x]\nbase_url = 'ftp://nope'\n", "must be an http(s) URL"),
    ],
)
def test_a_bad_config_file_stops_the_server_with_exit_code_2(
    tmp_path: Path, text: str, problem: str
) -> None:
    config = tmp_path / "exai.toml"
    config.write_text(text)
    config.chmod(0o600)
    with pytest.raises(RuntimeError, match="exai serve exited 2") as failed:
        start_server(tmp_path / "state", database_url=None, extra_env={"EXAI_CONFIG": str(config)})
    assert problem in str(failed.value)
    assert ALICE not in str(failed.value)


# -- isolation, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def two_clients(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """alice from the config file, bob from EXAI_CLIENT_TOKENS, and the default token."""
    state = tmp_path_factory.mktemp("identities")
    config = write_chat_config(
        state / "exai.toml",
        clients={"alice": ALICE},
        providers=provider_table("fake", upstream.base_url, "fake-model"),
    )
    handle = start_server(
        state,
        database_url=database_url,
        extra_env={"EXAI_CONFIG": str(config), "EXAI_CLIENT_TOKENS": f"bob={BOB}"},
    )
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


async def _listed(caller: Caller) -> list[str]:
    reply = await caller.call("threads", {"include_expired": True, "limit": 100})
    return [t["continuation_id"] for t in reply["result"]["structuredContent"]["threads"]]


async def test_another_client_can_neither_continue_nor_list_a_thread(
    two_clients: ServerProcess,
) -> None:
    async with open_raw(two_clients.authed_url(ALICE)) as ws:
        alice = Caller(RawClient(ws))
        await alice.client.initialize()
        thread = (await alice.chat("a secret plan"))["continuation_id"]
        assert thread in await _listed(alice)
    for token in (BOB, two_clients.token):
        async with open_raw(two_clients.authed_url(token)) as ws:
            other = Caller(RawClient(ws))
            await other.client.initialize()
            refused = await other.call("chat", {"prompt": "tell me", "continuation_id": thread})
            # Exactly what an unknown id gets: the thread's existence is not revealed.
            assert error_text(refused).startswith(f"unknown continuation_id {thread}")
            assert thread not in await _listed(other)
    async with open_raw(two_clients.authed_url(ALICE)) as ws:
        alice = Caller(RawClient(ws))
        await alice.client.initialize()
        again = await alice.chat("continue the plan", continuation_id=thread)
        assert again["turn"] == 2


async def test_an_unknown_token_is_refused_at_the_handshake(two_clients: ServerProcess) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(two_clients.authed_url("not-a-token-of-anyone-at-all")):
            pass
    assert refused.value.status_code == 401


async def test_a_parked_session_resumes_only_for_its_own_client(
    two_clients: ServerProcess,
) -> None:
    async with open_raw(two_clients.authed_url(ALICE)) as ws:
        client = RawClient(ws)
        session_id = (await client.initialize())["result"]["_meta"]["exai/sessionId"]
        await ws.aclose(GOING_AWAY)
    await wait_until(
        lambda: any(
            e.get("event") == "session.detached" and e.get("session_id") == session_id
            for e in two_clients.log_events()
        ),
        what="the dropped session to be parked",
    )
    with pytest.raises(ConnectionRejected) as refused:
        async with open_raw(f"{two_clients.authed_url(BOB)}&session={session_id}"):
            pass
    assert refused.value.status_code == 404
    # Still parked for alice: bob's attempt took nothing away.
    async with open_raw(f"{two_clients.authed_url(ALICE)}&session={session_id}") as ws:
        assert dict(ws.handshake_headers)[b"mcp-session-id"].decode() == session_id
        reply = await RawClient(ws).request("tools/list")
        assert "result" in reply
        with trio.fail_after(10):
            await ws.aclose()
