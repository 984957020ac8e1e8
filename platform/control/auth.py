"""Bearer tokens: stored as SHA-256 hashes, each bound to one workspace.

A request may only touch the workspace its token belongs to. A token of another
workspace gets 404, as if the workspace did not exist, so nothing about it leaks.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from opbox.errors import AuthError, NotFound

from ..ids import check_workspace, new_id
from ..state import State

TOKEN_PREFIX = "obx_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Auth:
    def __init__(self, state: State, secret: bytes):
        self.state = state
        self.secret = secret
        self._cache: dict[str, dict] = {}

    def create_token(self, workspace: str, name: str = "default", role: str = "admin", token: str | None = None) -> tuple[str, str]:
        check_workspace(workspace)
        token = token or new_token()
        token_id = new_id("t")
        self.state.ensure_workspace(workspace)
        self.state.add_token(token_id, workspace, name, hash_token(token), role)
        return token_id, token

    def revoke(self, workspace: str, token_id: str) -> None:
        cur = self.state.db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND workspace = ? AND revoked_at IS NULL",
            (time.time(), token_id, workspace))
        if cur.rowcount != 1:
            raise NotFound(f"no active token {token_id} in workspace {workspace}")
        self._cache.clear()

    def check(self, authorization: str | None, workspace: str) -> dict:
        """The token row for a request to ``workspace``; raises AuthError or NotFound."""
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <OPBOX_TOKEN>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 200:
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        digest = hash_token(token)
        row = self._cache.get(digest)
        if row is None:
            row = self.state.token_by_hash(digest)
            if row is None:
                raise AuthError("invalid or revoked token")
            self._cache[digest] = row
        if row["workspace"] != workspace:
            raise NotFound(f"no workspace {workspace!r}")
        return row

    # -- tokens for the platform's own processes (workers, batch runs) -----------------
    def internal_token(self, scope: str) -> str:
        return hmac.new(self.secret, scope.encode(), hashlib.sha256).hexdigest()

    def check_internal(self, authorization: str | None, scope: str) -> None:
        token = (authorization or "").partition(" ")[2].strip()
        if not token or not hmac.compare_digest(token, self.internal_token(scope)):
            raise AuthError("invalid internal token")
