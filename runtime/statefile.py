"""``<state-dir>/server.json``: how local tools (``exai status``, the benchmarks) find us.

It exists exactly while the server accepts connections: written when ready, removed on
shutdown. It is written atomically (temp file + rename) so a reader never sees half of it.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel


class ServerInfo(BaseModel):
    url: str
    pid: int
    started_at: datetime
    protocol_versions: list[str]
    #: ``http://127.0.0.1:PORT`` of the admin interface (``exai status``); ``None`` in files
    #: written before it existed, or by a node that runs none.
    admin_url: str | None = None


def write_server_info(path: Path, info: ServerInfo) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(info.model_dump_json(indent=2) + "\n")
    os.replace(temporary, path)


def read_server_info(path: Path) -> ServerInfo | None:
    try:
        return ServerInfo.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def remove_server_info(path: Path) -> None:
    path.unlink(missing_ok=True)
