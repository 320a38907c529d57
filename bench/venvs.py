"""Virtual environments of the anchor servers, kept apart from the runtime's dependencies.

``bench/.venv-anchors`` (``requirements-anchors.txt``: ``mcp[ws]==1.30.0``, uvicorn, py-spy) and
``bench/.venv-mcp2`` (``requirements-mcp2.txt``: ``mcp==2.3.0``, uvicorn) and
``bench/.venv-server-time`` (``requirements-server-time.txt``: the ``mcp-server-time`` stdio
server that ``python -m bench proxy`` calls directly and through exai) are created on first use
with ``python -m venv`` + ``pip install -r``, and recreated when their requirements file
changes (a hash of it is stamped into the venv).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

VENVS: dict[str, str] = {
    "anchors": "requirements-anchors.txt",
    "mcp2": "requirements-mcp2.txt",
    "server-time": "requirements-server-time.txt",
}


def venv_dir(name: str) -> Path:
    return BENCH / f".venv-{name}"


def ensure(name: str, *, log: Path, timeout: float = 600.0) -> Path:
    """Return the venv's python, creating or refreshing the venv if needed."""
    requirements = BENCH / VENVS[name]
    venv = venv_dir(name)
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    print(f"bench: creating {venv.relative_to(BENCH.parent)} from {requirements.name} ...")
    with log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            stdout=out,
            stderr=out,
            timeout=120,
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
            check=True,
            stdout=out,
            stderr=out,
            timeout=timeout,
        )
    stamp.write_text(digest + "\n")
    return python
