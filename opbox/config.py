"""Client settings from the environment: OPBOX_URL, OPBOX_TOKEN, OPBOX_WORKSPACE, OPBOX_HOME.

When the token or workspace is not set, the credentials file that ``opbox up`` writes on
first start (``$OPBOX_HOME/credentials.json``) supplies them, so the local platform works
without exporting anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_WORKSPACE = "default"


def opbox_home() -> Path:
    return Path(os.environ.get("OPBOX_HOME") or Path.home() / ".opbox").expanduser()


def credentials_path(home: Path | None = None) -> Path:
    return (home or opbox_home()) / "credentials.json"


def read_credentials(home: Path | None = None) -> dict:
    try:
        return json.loads(credentials_path(home).read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class ClientConfig:
    """Where the SDK sends calls: the gateway's ``url``, a ``token`` (None: no Authorization header) and
    the ``workspace``. ``ClientConfig.from_env()`` fills what is not given from OPBOX_URL, OPBOX_TOKEN,
    OPBOX_WORKSPACE, then the credentials file; ``Client(config)`` or ``opbox.configure(...)`` uses one."""

    url: str
    token: str | None
    workspace: str

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None, workspace: str | None = None) -> "ClientConfig":
        saved = read_credentials()
        return cls(
            url=(url or os.environ.get("OPBOX_URL") or saved.get("url") or DEFAULT_URL).rstrip("/"),
            token=token or os.environ.get("OPBOX_TOKEN") or saved.get("token"),
            workspace=workspace or os.environ.get("OPBOX_WORKSPACE") or saved.get("workspace") or DEFAULT_WORKSPACE,
        )
