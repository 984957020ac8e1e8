"""Administration on the platform's own machine (``opbox workspace create``): acts on the records directly."""

from __future__ import annotations

from opbox.errors import Conflict

from ..ids import check_workspace
from ..records.base import Records
from .auth import Auth


def create_workspace(records: Records, name: str) -> dict:
    check_workspace(name)
    auth = Auth(records, b"")
    if auth.workspace_exists(name):
        raise Conflict(f"workspace {name!r} exists already")
    token_id, token = auth.create_token(name, name="admin", role="admin")
    return {"workspace": name, "token_id": token_id, "token": token}
