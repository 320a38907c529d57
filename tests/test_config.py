"""Configuration: flags over environment over defaults, and a clear refusal of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.cli import main
from runtime.config import ConfigError, load_settings


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.state_dir) == ("127.0.0.1", 8765, Path(".exai"))
    assert settings.database_url is None
    assert settings.max_sessions == 10_000
    assert settings.max_inflight_per_session == 8


def test_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAI_PORT", "9000")
    monkeypatch.setenv("EXAI_HOST", "0.0.0.0")
    settings = load_settings(port="9100", host=None)
    assert settings.port == 9100
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("overrides", "mentions"),
    [
        ({"port": "abc"}, "port (--port / EXAI_PORT)"),
        ({"port": "70000"}, "port"),
        ({"database_url": "mysql://x"}, "database_url"),
        ({"log_level": "loud"}, "log_level"),
        ({"trusted_proxies": "10.0.0.1, 192.168.0.0/33"}, "'192.168.0.0/33' is not an IP"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(
    overrides: dict[str, str], mentions: str
) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as refused:
        load_settings(**overrides)
    assert mentions in str(refused.value)


def test_cli_exits_2_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "not-a-port"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "EXAI_PORT" in err
