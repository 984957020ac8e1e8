"""Workspaces and their bearer tokens in PostgreSQL (tokens by SHA-256 hash only)."""

from __future__ import annotations

import time

from ..base import TokenRecord
from .connection import Database, storage_errors

TOKEN = "SELECT id, workspace, name, hash, role, created_at, revoked_at FROM tokens"
ADD = """
WITH w AS (INSERT INTO workspaces(name, created_at) VALUES (%(ws)s, %(at)s) ON CONFLICT (name) DO NOTHING)
INSERT INTO tokens(id, workspace, name, hash, role, created_at) VALUES (%(id)s, %(ws)s, %(name)s, %(hash)s, %(role)s, %(at)s)"""


@storage_errors
class PostgresTokens:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def add_workspace(self, name: str) -> None:
        self.db.run("INSERT INTO workspaces(name, created_at) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                    (name, time.time()))

    def workspace_exists(self, name: str) -> bool:
        return self.db.one("SELECT 1 FROM workspaces WHERE name = %s", (name,)) is not None

    def add(self, token_id: str, workspace: str, name: str, token_hash: str, role: str) -> None:
        self.db.run(ADD, {"ws": workspace, "at": time.time(), "id": token_id, "name": name, "hash": token_hash,
                          "role": role})

    def by_hash(self, token_hash: str, revoked_too: bool = False) -> TokenRecord | None:
        active = "" if revoked_too else " AND revoked_at IS NULL"
        row = self.db.one(f"{TOKEN} WHERE hash = %s{active}", (token_hash,))
        return TokenRecord(*row) if row is not None else None

    def revoke(self, workspace: str, token_id: str, at: float) -> bool:
        return self.db.run("UPDATE tokens SET revoked_at = %s WHERE id = %s AND workspace = %s AND revoked_at IS NULL",
                           (at, token_id, workspace)) == 1

    def in_workspace(self, workspace: str) -> list[TokenRecord]:
        return [TokenRecord(*r) for r in self.db.all(f"{TOKEN} WHERE workspace = %s ORDER BY created_at", (workspace,))]
