"""Workspaces and their bearer tokens in SQLite (tokens by SHA-256 hash only)."""

from __future__ import annotations

import time

from ..base import TokenRecord
from .connection import Database, storage_errors

TOKEN = "SELECT id, workspace, name, hash, role, created_at, revoked_at FROM tokens"


@storage_errors
class SqliteTokens:
    def __init__(self, database: Database):
        self.db = database.db
        self.path = database.path
        self.tx = database.tx

    def add_workspace(self, name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO workspaces(name, created_at) VALUES (?, ?)", (name, time.time()))

    def workspace_exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM workspaces WHERE name = ?", (name,)).fetchone() is not None

    def add(self, token_id: str, workspace: str, name: str, token_hash: str, role: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO workspaces(name, created_at) VALUES (?, ?)", (workspace, now))
            db.execute("INSERT INTO tokens(id, workspace, name, hash, role, created_at) VALUES (?,?,?,?,?,?)",
                       (token_id, workspace, name, token_hash, role, now))

    def by_hash(self, token_hash: str, revoked_too: bool = False) -> TokenRecord | None:
        active = "" if revoked_too else " AND revoked_at IS NULL"
        row = self.db.execute(f"{TOKEN} WHERE hash = ?{active}", (token_hash,)).fetchone()
        return TokenRecord(*row) if row is not None else None

    def revoke(self, workspace: str, token_id: str, at: float) -> bool:
        cur = self.db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND workspace = ? AND revoked_at IS NULL",
            (at, token_id, workspace))
        return cur.rowcount == 1

    def in_workspace(self, workspace: str) -> list[TokenRecord]:
        return [TokenRecord(*r) for r in self.db.execute(f"{TOKEN} WHERE workspace = ? ORDER BY created_at",
                                                         (workspace,))]
