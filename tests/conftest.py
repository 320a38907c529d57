"""Fixtures: one real test database per run, and real servers started per module or test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerProcess, reachable_tempdir, start_server, test_database


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with test_database() as url:
        yield url


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``exai serve`` shared by a module's tests (each test opens its own sessions)."""
    handle = start_server(tmp_path_factory.mktemp("state"), database_url=database_url)
    yield handle
    assert handle.stop() == 0, handle.stderr_path.read_text()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state dir that an embedded Postgres can use, also as root (not under pytest's
    private base temp directory: :func:`tests.harness.reachable_tempdir`)."""
    with reachable_tempdir("exai-test-state-") as tmp:
        yield tmp / "state"
