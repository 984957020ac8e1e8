"""Administration on the platform's own machine: acts on the state in OPBOX_HOME directly."""

from __future__ import annotations

from pathlib import Path

from opbox.config import opbox_home
from opbox.errors import Conflict

from .auth import Auth
from ..ids import check_workspace
from ..state import State


def create_workspace(home: Path | None, name: str) -> dict:
    check_workspace(name)
    home = home or opbox_home()
    state = State(home / "state.db")
    try:
        if state.one("SELECT 1 FROM workspaces WHERE name = ?", name):
            raise Conflict(f"workspace {name!r} exists already")
        token_id, token = Auth(state, b"").create_token(name, name="admin", role="admin")
        return {"workspace": name, "token_id": token_id, "token": token}
    finally:
        state.close()
