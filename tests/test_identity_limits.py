"""Limits follow the client identity, not the connection; a model is allowed only if listed.

Over real sockets to a real ``exai serve`` and a real loopback OpenAI-compatible upstream:
three sessions of one identity, one after another, share one token quota (a reconnect resets
nothing) while another identity keeps its own; a model no provider lists is refused before
anything goes upstream, as -32602 before 2025-11-25 and as an ``isError`` result from it on.
Every test checks that the sessions around it still answer ``ping`` and ``echo``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.providers import UpstreamConfigError, load_upstream
from tests.chat_support import (
    ALICE,
    BOB,
    Caller,
    error_text,
    provider_table,
    upstream_thread,
    write_config,
)
from tests.fake_openai import FakeOpenAI, Reply
from tests.harness import RawClient, ServerProcess, open_raw, start_server

#: A call reserves its prompt estimate + max_output_tokens (100); the fake upstream reports
#: 100 tokens used. So one call fits the quota, and a second never does.
QUOTA = 150
USED = (10, 90)
PRICED = (
    "[upstream.providers.fake.prices.priced-model]\n"
    "input_per_million = 1.0\noutput_per_million = 2.0\n"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with upstream_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("identity-limits")
    providers = "\n".join(
        [
            f"[upstream.client_limits]\ntoken_quota = {QUOTA}\n",
            provider_table("fake", upstream.base_url, "fake-model", PRICED),
        ]
    )
    config = write_config(state / "exai.toml", chat="max_output_tokens = 100", providers=providers)
    handle = start_server(state, database_url=database_url, extra_env={"EXAI_CONFIG": str(config)})
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()[-3000:]


async def initialized(client: RawClient, version: str = "2025-06-18") -> Caller:
    await client.initialize(version)
    return Caller(client)


async def still_answers(caller: Caller) -> None:
    assert (await caller.client.request("ping"))["result"] == {}
    echoed = await caller.call("echo", {"text": "ok"})
    assert echoed["result"]["content"][0]["text"] == "ok", echoed


async def test_sessions_of_one_identity_share_one_token_quota(
    server: ServerProcess, upstream: FakeOpenAI
) -> None:
    async with open_raw(server.authed_url(BOB)) as bob_ws:
        bob = await initialized(RawClient(bob_ws))
        for session in range(3):  # alice reconnects twice
            async with open_raw(server.authed_url(ALICE)) as ws:
                alice = await initialized(RawClient(ws))
                before = len(upstream.received)
                if session == 0:
                    upstream.script(Reply("the first answer", usage=USED))
                    answer = await alice.chat("hi")
                    assert answer["usage"]["input_tokens"] + answer["usage"]["output_tokens"] == 100
                else:
                    refused = await alice.call("chat", {"prompt": "hi again"})
                    error = refused["error"]
                    assert error["code"] == -32005, refused
                    assert error["data"]["limit"] == "client_token_quota"
                    assert error["data"]["permanent"] is True
                    assert f"this client's token quota is {QUOTA}: 100 are used" in error["message"]
                    assert "client 'alice', all its sessions together" in error["message"]
                    assert len(upstream.received) == before  # nothing went upstream
                await still_answers(alice)
        # Another identity's quota is its own, untouched by alice's.
        upstream.script(Reply("bob's answer", usage=USED))
        assert (await bob.chat("hello"))["content"] == "bob's answer"
        await still_answers(bob)


async def test_a_model_no_provider_lists_is_invalid_params_in_the_requests_era(
    server: ServerProcess, upstream: FakeOpenAI
) -> None:
    offered = "the models offered are: fake-model, priced-model"
    async with open_raw(server.authed_url()) as old_ws, open_raw(server.authed_url()) as new_ws:
        old = await initialized(RawClient(old_ws), "2025-06-18")
        new = await initialized(RawClient(new_ws), "2025-11-25")
        before = len(upstream.received)

        refused = await old.call("chat", {"prompt": "hi", "model": "gpt-unlisted"})
        assert refused["error"]["code"] == -32602, refused
        message = refused["error"]["message"]
        assert message == (
            f"invalid arguments: model 'gpt-unlisted' is not offered by this server; {offered}"
        )
        assert error_text(await new.call("chat", {"prompt": "hi", "model": "gpt-unlisted"})) == (
            message
        )
        long = await new.call("chat", {"prompt": "hi", "model": "m" * 100_000})
        assert "…[truncated, 100000 chars]" in error_text(long)
        assert len(error_text(long)) < 1000
        assert len(upstream.received) == before  # nothing went upstream

        # Listed models go through: a priced one, and the default model.
        upstream.script(Reply("priced", usage=(1, 1)), Reply("default", usage=(1, 1)))
        assert (await new.chat("hi", model="priced-model"))["model"] == "priced-model"
        assert (await old.chat("hi", model="fake-model"))["model"] == "fake-model"
        await still_answers(old)
        await still_answers(new)


def test_models_default_to_the_priced_ones_and_the_default_model(tmp_path: Path) -> None:
    path = tmp_path / "exai.toml"
    path.write_text(
        """
[upstream.session_limits]   # the name from before limits were per client: still read
token_quota = 10
[upstream.providers.kimi]
preset = "kimi"
api_key = "kimi-key-from-the-file"
default_model = "my-finetune"
[upstream.providers.local]
base_url = "http://127.0.0.1:8000/v1"
default_model = "qwen3-8b"
models = ["qwen3-8b", "qwen3-32b"]
"""
    )
    config = load_upstream(path, env={})
    assert config.client_limits.token_quota == 10
    assert config.providers["kimi"].models == (
        "kimi-k2-thinking",
        "kimi-k2-turbo-preview",
        "my-finetune",
    )
    assert config.providers["local"].models == ("qwen3-8b", "qwen3-32b")

    path.write_text(
        '[upstream.providers.local]\nbase_url = "http://127.0.0.1:8000/v1"\n'
        'default_model = "qwen3-8b"\nmodels = ["qwen3-32b"]\n'
    )
    with pytest.raises(UpstreamConfigError, match="default_model 'qwen3-8b' is not in models"):
        load_upstream(path, env={})
